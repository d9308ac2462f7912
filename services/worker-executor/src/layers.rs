//! Layer blobs of a snapshot chain: image layers keep their original blob; built snapshots
//! are turned into a compressed layer tar from their overlay upper dir (memoized in meta).

use crate::Worker;
use crate::error::{Error, Result};
use crate::snapshot::LayerBlob;
use bytes::Bytes;
use std::io::Write;
use std::path::Path;
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;

fn compression(name: &str) -> Result<(String, kiln_oci::Compression)> {
    match name {
        "" | "gzip" => Ok(("gzip".into(), kiln_oci::Compression::Gzip)),
        "uncompressed" => Ok(("uncompressed".into(), kiln_oci::Compression::Uncompressed)),
        other => Err(Error::Compression(other.to_string())),
    }
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(Error::io("read dir", dir))?
        .next()
        .is_none())
}

pub(crate) async fn layers(
    w: &Worker,
    r: Option<&str>,
    compression_name: &str,
) -> Result<Vec<LayerBlob>> {
    let (key, comp) = compression(compression_name)?;
    let _guard = w.layers_lock.lock().await;
    let store = w.store.clone();
    let root = w.config.root.clone();
    let top = r.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut chain = store.chain(top.as_deref())?;
        chain.reverse();
        let mut out = Vec::new();
        for mut meta in chain {
            if let Some(b) = &meta.blob {
                out.push(b.clone());
                continue;
            }
            if let Some(memo) = meta.layers.get(&key) {
                out.extend(memo.clone());
                continue;
            }
            let diff = store.diff_dir(&meta.id);
            let blob = if dir_is_empty(&diff)? {
                None
            } else {
                let tar = root
                    .join("tmp")
                    .join(format!("{}.tar", uuid::Uuid::new_v4()));
                let res = write_diff_tar(&diff, &tar).and_then(|()| {
                    kiln_oci::compress_layer(&tar, &root.join("content/blobs/sha256"), comp)
                        .map_err(|source| Error::Layer {
                            digest: format!("snapshot {}", meta.id),
                            source,
                        })
                });
                let _ = std::fs::remove_file(&tar);
                let (diff_id, descriptor) = res?;
                Some(LayerBlob {
                    descriptor,
                    diff_id,
                })
            };
            meta.layers.insert(key.clone(), blob.clone());
            store.update_meta(&meta)?;
            out.extend(blob);
        }
        Ok(out)
    })
    .await?
}

fn write_diff_tar(diff: &Path, tar: &Path) -> Result<()> {
    let f = std::fs::File::create(tar).map_err(Error::io("create", tar))?;
    let mut bw = std::io::BufWriter::new(f);
    kiln_oci::layer::diff_overlay_upper(diff, &mut bw).map_err(|source| Error::Layer {
        digest: format!("diff of {}", diff.display()),
        source,
    })?;
    bw.flush().map_err(Error::io("write", tar))?;
    bw.into_inner()
        .map_err(|e| Error::Io {
            op: "write",
            path: tar.to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(Error::io("sync", tar))
}

/// A blocking `Write` that sends 64 KiB chunks into a channel (for streaming tars).
pub struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Sends what is buffered.
    pub fn flush_chunk(&mut self) -> Result<()> {
        self.send().map_err(Error::io("stream", "export"))
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
