//! Tarball and directory outputs: OCI layout / docker-archive of an assembled image (or an
//! image index), and the worker's filesystem as a tar or an unpacked directory (one
//! subdirectory per platform for multi-platform results). Tarballs are streamed to the
//! client as they are written, through a bounded pipe.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use kiln_oci::Descriptor;
use kiln_oci::layout::{DockerArchiveWriter, OciLayoutWriter, index_entry};
use kiln_registry::Reference;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;

use crate::{AssembledImage, AssembledIndex, Error, FileData, PlatformRef, WorkerFs};

/// The image as an OCI layout tar (or a docker-archive when `docker`), produced on a
/// blocking thread as the client reads it: nothing is written to disk. Layer bytes come
/// from `feed`, which [`pump_blobs`] fills in [`blob_order`].
pub(crate) fn archive_stream(
    docker: bool,
    image: &AssembledImage,
    names: &[String],
    feed: FeedRx,
) -> Result<FileData, Error> {
    let image = image.clone();
    let names = names.to_vec();
    Ok(spawn_writer("write image archive", move |w| {
        let mut blobs = LayerSource::new(feed);
        write_archive_sync(docker, &image, &names, &mut blobs, w)
    }))
}

/// Bytes of worker streams, one after the other: `Some(chunk)`, then `None` at the end of
/// each stream; an error ends the feed.
pub(crate) type FeedItem = Result<Option<Bytes>, String>;
pub(crate) type FeedRx = mpsc::Receiver<FeedItem>;

/// Chunks held between the worker streams and the writing thread.
pub(crate) const FEED_CHUNKS: usize = 16;

/// The distinct layers of `images`, in the order the archive writers add them.
pub(crate) fn blob_order(images: &[AssembledImage]) -> Vec<Descriptor> {
    let mut seen = std::collections::HashSet::new();
    images
        .iter()
        .flat_map(|i| i.layers.iter())
        .filter(|l| seen.insert(l.digest.clone()))
        .cloned()
        .collect()
}

/// Reads each blob of `order` from the worker, one stream at a time (several open streams
/// would share one HTTP/2 connection window, and the unread ones would stall the one being
/// read), into `tx`.
pub(crate) async fn pump_blobs(
    worker: &impl WorkerFs,
    order: &[Descriptor],
    tx: mpsc::Sender<FeedItem>,
) -> Result<(), Error> {
    for d in order {
        if !pump_opened(worker.read_blob(&d.digest).await, &tx).await? {
            break;
        }
    }
    Ok(())
}

/// As [`pump_blobs`] for the filesystems of `platforms` (scratch ones send nothing).
pub(crate) async fn pump_fs(
    worker: &impl WorkerFs,
    platforms: &[PlatformRef],
    tx: mpsc::Sender<FeedItem>,
) -> Result<(), Error> {
    for p in platforms.iter().filter(|p| !p.reference.is_empty()) {
        if !pump_opened(worker.export_fs(&p.reference).await, &tx).await? {
            break;
        }
    }
    Ok(())
}

/// [`pump_one`] of a stream just opened; an error opening it is sent on, then returned.
async fn pump_opened(
    opened: Result<crate::ByteStream, Error>,
    tx: &mpsc::Sender<FeedItem>,
) -> Result<bool, Error> {
    match opened {
        Ok(stream) => pump_one(stream, tx).await,
        Err(e) => {
            let _ = tx.send(Err(e.to_string())).await;
            Err(e)
        }
    }
}

/// Sends one stream and its end marker; false when the reader went away.
async fn pump_one(
    mut stream: crate::ByteStream,
    tx: &mpsc::Sender<FeedItem>,
) -> Result<bool, Error> {
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(Ok(Some(c))).await.is_err() {
                    return Ok(false);
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return Err(e);
            }
        }
    }
    Ok(tx.send(Ok(None)).await.is_ok())
}

/// One stream of a feed, read from a blocking thread; ends at the stream's end marker.
struct FeedReader<'a> {
    rx: &'a mut FeedRx,
    chunk: Bytes,
    done: bool,
}

impl<'a> FeedReader<'a> {
    fn new(rx: &'a mut FeedRx) -> Self {
        FeedReader {
            rx,
            chunk: Bytes::new(),
            done: false,
        }
    }
}

impl Read for FeedReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(Some(c))) => self.chunk = c,
                Some(Ok(None)) => self.done = true,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the worker stream ended early",
                    ));
                }
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Where the archive writer takes layer bytes from.
struct LayerSource {
    feed: FeedRx,
    taken: std::collections::HashSet<String>,
}

impl LayerSource {
    fn new(feed: FeedRx) -> Self {
        LayerSource {
            feed,
            taken: std::collections::HashSet::new(),
        }
    }

    /// A reader of the layer's bytes that fails at its end unless digest and size match;
    /// `None` when it was already taken (a layer shared by two platforms).
    fn take(&mut self, desc: &Descriptor) -> Option<VerifyingReader<FeedReader<'_>>> {
        if !self.taken.insert(desc.digest.clone()) {
            return None;
        }
        Some(VerifyingReader {
            inner: FeedReader::new(&mut self.feed),
            hasher: Sha256::new(),
            size: 0,
            desc: desc.clone(),
        })
    }
}

/// Checks the bytes it passes on against a descriptor, failing at the end on a mismatch.
struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    desc: Descriptor,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
            if actual != self.desc.digest || self.size != self.desc.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "layer {} from the worker is {actual} ({} bytes), expected {} bytes",
                        self.desc.digest, self.size, self.desc.size
                    ),
                ));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// A multi-platform image as an OCI layout tar: every platform's blobs, the index blob, and
/// `index.json` naming the index, streamed as [`archive_stream`] does.
pub(crate) fn index_archive_stream(
    index: &AssembledIndex,
    names: &[String],
    feed: FeedRx,
) -> Result<FileData, Error> {
    let index = index.clone();
    let names = names.to_vec();
    Ok(spawn_writer("write image archive", move |w| {
        let mut blobs = LayerSource::new(feed);
        let oci = |source| Error::Oci {
            op: "write image archive",
            source,
        };
        let mut a = OciLayoutWriter::new(w).map_err(oci)?;
        for image in &index.images {
            for l in &image.layers {
                if let Some(r) = blobs.take(l) {
                    a.add_blob_reader(l, r).map_err(oci)?;
                }
            }
            a.add_blob_bytes(&image.config_desc.digest, &image.config)
                .map_err(oci)?;
            a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
                .map_err(oci)?;
        }
        a.add_blob_bytes(&index.desc.digest, &index.index)
            .map_err(oci)?;
        a.finish(index_entries(&index.desc, &names)).map_err(oci)?;
        Ok(())
    }))
}

/// `index.json` entries for `desc`: one per name (annotated), or one bare entry.
fn index_entries(desc: &kiln_oci::Descriptor, names: &[String]) -> Vec<kiln_oci::Descriptor> {
    if names.is_empty() {
        return vec![index_entry(desc, None)];
    }
    names
        .iter()
        .map(|n| {
            let full = Reference::parse(n)
                .map(|r| r.to_string())
                .unwrap_or_else(|_| n.clone());
            index_entry(desc, Some(&full))
        })
        .collect()
}

/// Output chunks held between the writing thread and the client: 4 x 1 MiB.
const PIPE_CHUNKS: usize = 4;
const PIPE_CHUNK: usize = 1 << 20;

/// A `Write` sending 1 MiB chunks into a bounded channel (blocking when the reader lags).
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(PIPE_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIPE_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= PIPE_CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buf()
    }
}

/// Run `produce` on a blocking thread writing into a pipe; the returned reader yields its
/// bytes, then its error (if any) as a read error.
fn spawn_writer(
    op: &'static str,
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), Error> + Send + 'static,
) -> FileData {
    let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(PIPE_CHUNK),
        };
        let result = produce(&mut w).and_then(|()| {
            w.flush().map_err(|source| Error::Io {
                op,
                path: PathBuf::from("<client stream>"),
                source,
            })
        });
        if let Err(e) = result {
            tracing::warn!("{op}: {e}");
            let _ = err_tx.blocking_send(Err(std::io::Error::other(format!("{op}: {e}"))));
        }
    });
    Box::new(StreamReader::new(ReceiverStream::new(rx)))
}

/// Reads an async byte stream from a blocking thread: a task on the runtime pulls the
/// stream into a small bounded channel, the blocking side waits on that channel.
struct BlockingStreamReader {
    rx: mpsc::Receiver<Result<Bytes, Error>>,
    chunk: Bytes,
}

impl BlockingStreamReader {
    /// Starts pulling `stream` on `handle`'s runtime (a few chunks ahead of the reader).
    fn new(mut stream: crate::ByteStream, handle: &tokio::runtime::Handle) -> Self {
        let (tx, rx) = mpsc::channel(4);
        handle.spawn(async move {
            while let Some(item) = stream.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        BlockingStreamReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for BlockingStreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

fn write_archive_sync(
    docker: bool,
    image: &AssembledImage,
    names: &[String],
    blobs: &mut LayerSource,
    w: &mut ChannelWriter,
) -> Result<(), Error> {
    let oci = |source| Error::Oci {
        op: "write image archive",
        source,
    };
    let parsed: Vec<Option<Reference>> = names.iter().map(|n| Reference::parse(n).ok()).collect();
    if docker {
        let mut a = DockerArchiveWriter::new(w).map_err(oci)?;
        for l in &image.layers {
            if let Some(r) = blobs.take(l) {
                a.add_blob_reader(l, r).map_err(oci)?;
            }
        }
        a.add_blob_bytes(&image.config_desc.digest, &image.config)
            .map_err(oci)?;
        a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
            .map_err(oci)?;
        let tags: Vec<String> = names
            .iter()
            .zip(&parsed)
            .map(|(n, r)| {
                r.as_ref()
                    .map(Reference::familiar)
                    .unwrap_or_else(|| n.clone())
            })
            .collect();
        let layer_digests: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
        a.finish(
            &image.manifest_desc,
            &image.config_desc.digest,
            &layer_digests,
            &tags,
        )
        .map_err(oci)?;
    } else {
        let mut a = OciLayoutWriter::new(w).map_err(oci)?;
        for l in &image.layers {
            if let Some(r) = blobs.take(l) {
                a.add_blob_reader(l, r).map_err(oci)?;
            }
        }
        a.add_blob_bytes(&image.config_desc.digest, &image.config)
            .map_err(oci)?;
        a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
            .map_err(oci)?;
        let entries = if names.is_empty() {
            vec![index_entry(&image.manifest_desc, None)]
        } else {
            names
                .iter()
                .zip(&parsed)
                .map(|(n, r)| {
                    let full = r
                        .as_ref()
                        .map(Reference::to_string)
                        .unwrap_or_else(|| n.clone());
                    index_entry(&image.manifest_desc, Some(&full))
                })
                .collect()
        };
        a.finish(entries).map_err(oci)?;
    }
    Ok(())
}

/// The ref's filesystem as a tar stream straight from the worker (an empty tar for
/// scratch).
pub(crate) async fn fs_tar_stream(
    worker: &impl WorkerFs,
    reference: &str,
) -> Result<FileData, Error> {
    if reference.is_empty() {
        // two zero blocks: an empty tar
        return Ok(Box::new(std::io::Cursor::new(vec![0u8; 1024])));
    }
    let stream = worker
        .export_fs(reference)
        .await?
        .map(|c| c.map_err(|e| std::io::Error::other(e.to_string())));
    Ok(Box::new(StreamReader::new(stream)))
}

/// The filesystems of a multi-platform result as one tar with a top directory per
/// platform (`linux_amd64/...`), streamed.
pub(crate) fn fs_tar_multi(platforms: &[PlatformRef], mut feed: FeedRx) -> FileData {
    let sources: Vec<(String, bool)> = platforms
        .iter()
        .map(|p| (p.dir_name(), !p.reference.is_empty()))
        .collect();
    spawn_writer("write filesystem tar", move |w| {
        let werr = |source| Error::Io {
            op: "write filesystem tar",
            path: PathBuf::from("<client stream>"),
            source,
        };
        let mut out = tar::Builder::new(w);
        for (dir, has_fs) in sources {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            out.append_data(&mut h, format!("{dir}/"), std::io::empty())
                .map_err(werr)?;
            if !has_fs {
                continue;
            }
            let mut ar = tar::Archive::new(FeedReader::new(&mut feed));
            for entry in ar.entries().map_err(werr)? {
                let mut entry = entry.map_err(werr)?;
                let path = entry.path().map_err(werr)?.into_owned();
                let mut h = entry.header().clone();
                let name = Path::new(&dir).join(&path);
                if let Some(link) = entry.link_name().map_err(werr)? {
                    // hard links name a path in the archive: under the same directory
                    let target = if h.entry_type() == tar::EntryType::Link {
                        Path::new(&dir).join(link.as_ref())
                    } else {
                        link.into_owned()
                    };
                    out.append_link(&mut h, &name, &target).map_err(werr)?;
                    continue;
                }
                out.append_data(&mut h, &name, &mut entry).map_err(werr)?;
            }
            // the rest of this stream (the tar's end blocks) up to its end marker
            std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).map_err(werr)?;
        }
        out.finish().map_err(werr)?;
        Ok(())
    })
}

/// The ref's filesystem unpacked into `dir`, streamed from the worker (no tar on disk).
pub(crate) async fn fs_dir(
    worker: &impl WorkerFs,
    reference: &str,
    dir: &Path,
) -> Result<(), Error> {
    let root = dir.to_path_buf();
    tokio::fs::create_dir_all(&root)
        .await
        .map_err(|source| Error::Io {
            op: "create output dir",
            path: root.clone(),
            source,
        })?;
    if reference.is_empty() {
        return Ok(());
    }
    let stream = worker.export_fs(reference).await?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let reader = BlockingStreamReader::new(stream, &handle);
        kiln_oci::layer::apply(std::io::BufReader::new(reader), &root).map_err(|source| {
            Error::Oci {
                op: "unpack filesystem",
                source,
            }
        })
    })
    .await
    .map_err(|source| Error::Join {
        op: "unpack filesystem",
        source,
    })??;
    Ok(())
}
