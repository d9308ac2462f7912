//! Layer blobs of a snapshot chain: image layers keep their original blob (or are
//! recompressed with `force`); built snapshots are turned into a compressed layer blob
//! streamed straight from their overlay upper dir, and memoized by the layer options once
//! the store's background sync has put the blob on disk (see [`memoize`]).
//! Layers of one chain are compressed in parallel on blocking threads; gzip and zstd are
//! themselves multi-threaded (see `kiln_oci::write_layer_blob`).

use crate::Worker;
use crate::error::{Error, Result};
use crate::snapshot::{LayerBlob, Meta};
use bytes::Bytes;
use kiln_oci::{Compression, LayerOptions};
use std::io::Write;
use std::path::Path;
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;

/// Parse the `compression` field of a Layers request: a compression name or a
/// `kiln_oci::LayerOptions` spec (`zstd;level=9;force;epoch=N`).
fn layer_options(spec: &str) -> Result<LayerOptions> {
    LayerOptions::parse(spec).map_err(|_| Error::Compression(spec.to_string()))
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(Error::io("read dir", dir))?
        .next()
        .is_none())
}

/// What to do for one snapshot of the chain.
enum Plan {
    Ready(Box<Option<LayerBlob>>),
    /// index into the chain; computed on a worker thread
    Compute(usize),
}

/// The layer blob of every snapshot of the chain of `r`, root first; `None`
/// for a snapshot whose diff is empty.
pub(crate) async fn layer_chain(
    w: &Worker,
    r: Option<&str>,
    compression_spec: &str,
) -> Result<Vec<Option<LayerBlob>>> {
    let options = layer_options(compression_spec)?;
    let key = options.spec();
    let _guard = w.layers_lock.lock().await;
    let _busy = crate::ops::Busy::start();
    let store = w.store.clone();
    let blobs = w.config.root.join("content/blobs/sha256");
    let top = r.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut chain = store.chain(top.as_deref())?;
        chain.reverse();
        let plans: Vec<Plan> = chain
            .iter()
            .enumerate()
            .map(|(i, meta)| match (&meta.blob, meta.layers.get(&key)) {
                (_, Some(memo)) => Plan::Ready(Box::new(memo.clone())),
                _ if let Some(memo) = pending_memo(&meta.id, &key) => Plan::Ready(Box::new(memo)),
                (Some(b), None)
                    if !options.force
                        || Compression::from_media_type(&b.descriptor.media_type)
                            == options.compression =>
                {
                    Plan::Ready(Box::new(Some(b.clone())))
                }
                _ => Plan::Compute(i),
            })
            .collect();
        let todo: Vec<usize> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Compute(i) => Some(*i),
                Plan::Ready(_) => None,
            })
            .collect();
        // a few layers at once; each one already uses every core for compression
        let mut computed: Vec<(usize, Result<Option<LayerBlob>>)> = Vec::new();
        for batch in todo.chunks(4) {
            let results: Vec<(usize, Result<Option<LayerBlob>>)> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|&i| {
                        let meta = &chain[i];
                        let (store, blobs) = (&store, &blobs);
                        (i, s.spawn(move || compute(store, meta, blobs, &options)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(i, h)| {
                        let r = h.join().unwrap_or_else(|_| {
                            Err(Error::Compression("layer thread panicked".into()))
                        });
                        (i, r)
                    })
                    .collect()
            });
            computed.extend(results);
        }
        let mut out = Vec::new();
        let mut fresh = Vec::new();
        let mut computed = computed.into_iter();
        for plan in plans {
            let blob = match plan {
                Plan::Ready(b) => *b,
                Plan::Compute(i) => {
                    let (j, res) = computed
                        .next()
                        .ok_or_else(|| Error::Compression("layer result missing".into()))?;
                    debug_assert_eq!(i, j);
                    let blob = res?;
                    fresh.push((chain[i].id.clone(), blob.clone()));
                    blob
                }
            };
            out.push(blob);
        }
        memoize(store, key, fresh);
        Ok(out)
    })
    .await?
}

/// Layer blobs written by this process whose memo is not recorded yet, by
/// (snapshot id, layer options).
type Pending = std::collections::HashMap<(String, String), Option<LayerBlob>>;
static PENDING: std::sync::Mutex<Option<Pending>> = std::sync::Mutex::new(None);
/// How long a layer memo waits for the store's background sync of its blob.
const MEMO_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Held while a snapshot's layer memo is read, changed and written again.
static MEMO_WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pending_memo(id: &str, key: &str) -> Option<Option<LayerBlob>> {
    let g = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref()?.get(&(id.to_string(), key.to_string())).cloned()
}

/// Records the layer blobs just computed in their snapshots' memos, on a
/// thread of its own, once the store's background sync has put the blobs on
/// disk: a memo never names a blob a crash could have lost, and neither the
/// export nor the steps running meanwhile wait for the disk. Until then the
/// blobs are served from [`PENDING`].
fn memoize(store: crate::snapshot::Store, key: String, fresh: Vec<(String, Option<LayerBlob>)>) {
    if fresh.is_empty() {
        return;
    }
    {
        let mut g = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        let map = g.get_or_insert_with(Default::default);
        for (id, blob) in &fresh {
            map.insert((id.clone(), key.clone()), blob.clone());
        }
    }
    let record = move || {
        // one background sync of the store covers every blob written so far
        let synced = store.wait_synced(MEMO_SYNC_TIMEOUT);
        for (id, blob) in fresh {
            let res = if !synced {
                // not known to be on disk: no memo, the next export computes it
                Err(Error::Compression("no sync of the layer blob".into()))
            } else {
                let _w = MEMO_WRITE.lock().unwrap_or_else(|e| e.into_inner());
                store.meta(&id).and_then(|mut meta| {
                    meta.layers.insert(key.clone(), blob);
                    store.update_meta(&meta)
                })
            };
            if let Err(e) = res {
                // without the memo the layer is computed again next time
                tracing::debug!(snapshot = %id, error = %e, "layer memo not recorded");
            }
            let mut g = PENDING.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(map) = g.as_mut() {
                map.remove(&(id, key.clone()));
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("layer-memo".into())
        .spawn(record)
    {
        tracing::warn!(error = %e, "start the layer memo thread");
    }
}

/// The non-empty layer blobs of the chain of `r`, root first.
pub(crate) async fn layers(
    w: &Worker,
    r: Option<&str>,
    compression_spec: &str,
) -> Result<Vec<LayerBlob>> {
    Ok(layer_chain(w, r, compression_spec)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

/// The layer blob of one snapshot: its base blob recompressed (force), or its overlay diff
/// tarred and compressed in one stream; `None` for an empty diff.
fn compute(
    store: &crate::snapshot::Store,
    meta: &Meta,
    blobs: &Path,
    options: &LayerOptions,
) -> Result<Option<LayerBlob>> {
    let layer_err = |source| Error::Layer {
        digest: format!("snapshot {}", meta.id),
        source,
    };
    if let Some(b) = &meta.blob {
        let src = blobs.join(b.descriptor.digest.trim_start_matches("sha256:"));
        let (diff_id, descriptor) =
            kiln_oci::recompress_blob(&src, blobs, options).map_err(layer_err)?;
        return Ok(Some(LayerBlob {
            descriptor,
            diff_id,
        }));
    }
    let diff = store.diff_dir(&meta.id);
    if dir_is_empty(&diff)? {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let (diff_id, descriptor) = kiln_oci::write_layer_blob(blobs, options, |w| {
        kiln_oci::layer::diff_overlay_upper_clamped(&diff, w, options.clamp_mtime)
    })
    .map_err(layer_err)?;
    tracing::debug!(
        target: "kiln_timing",
        "layer of snapshot {}: {} bytes ({}) in {} ms",
        meta.id,
        descriptor.size,
        options.spec(),
        started.elapsed().as_millis()
    );
    Ok(Some(LayerBlob {
        descriptor,
        diff_id,
    }))
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
