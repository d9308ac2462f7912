//! The pipes every streaming exporter uses: worker byte streams fed one after the other
//! into a blocking writer thread (the archive writers are synchronous), the writer's output
//! sent to the client through a bounded channel, and async streams read from blocking code.
//! Nothing is written to disk on the way.

use std::io::{Read, Write};
use std::path::PathBuf;

use bytes::Bytes;
use futures::StreamExt;
use kiln_oci::Descriptor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::StreamReader;

use crate::{AssembledImage, Error, FileData, PlatformRef, WorkerFs};

/// Bytes of worker streams, one after the other: `Some(chunk)`, then `None` at the end of
/// each stream; an error ends the feed.
pub(super) type FeedItem = Result<Option<Bytes>, String>;
pub(super) type FeedRx = mpsc::Receiver<FeedItem>;

/// Chunks held between the worker streams and the writing thread.
pub(super) const FEED_CHUNKS: usize = 16;

/// The distinct layers of `images`, in the order the archive writers add them.
pub(super) fn blob_order(images: &[AssembledImage]) -> Vec<Descriptor> {
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
pub(super) async fn pump_blobs(
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
pub(super) async fn pump_fs(
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
            let _ = tx.send(Err(kiln_proto::status::chain(&e))).await;
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
                let _ = tx.send(Err(kiln_proto::status::chain(&e))).await;
                return Err(e);
            }
        }
    }
    Ok(tx.send(Ok(None)).await.is_ok())
}

/// One stream of a feed, read from a blocking thread; ends at the stream's end marker.
pub(super) struct FeedReader<'a> {
    rx: &'a mut FeedRx,
    chunk: Bytes,
    done: bool,
}

impl<'a> FeedReader<'a> {
    pub(super) fn new(rx: &'a mut FeedRx) -> Self {
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
pub(super) struct LayerSource {
    feed: FeedRx,
    taken: std::collections::HashSet<String>,
}

impl LayerSource {
    pub(super) fn new(feed: FeedRx) -> Self {
        LayerSource {
            feed,
            taken: std::collections::HashSet::new(),
        }
    }

    /// A reader of the layer's bytes that fails at its end unless digest and size match;
    /// `None` when it was already taken (a layer shared by two platforms).
    pub(super) fn take(&mut self, desc: &Descriptor) -> Option<VerifyingReader<FeedReader<'_>>> {
        if !self.taken.insert(desc.digest.clone()) {
            return None;
        }
        Some(VerifyingReader {
            inner: FeedReader::new(&mut self.feed),
            hasher: kiln_oci::digest::Hasher::new(),
            desc: desc.clone(),
        })
    }
}

/// Checks the bytes it passes on against a descriptor, failing at the end on a mismatch.
pub(super) struct VerifyingReader<R> {
    inner: R,
    hasher: kiln_oci::digest::Hasher,
    desc: Descriptor,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let size = self.hasher.size();
            let actual = self.hasher.clone().finish();
            if actual != self.desc.digest || size != self.desc.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "layer {} from the worker is {actual} ({} bytes), expected {} bytes",
                        self.desc.digest, size, self.desc.size
                    ),
                ));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Output chunks held between the writing thread and the client: 4 x 1 MiB.
const PIPE_CHUNKS: usize = 4;
const PIPE_CHUNK: usize = 1 << 20;

/// A `Write` sending 1 MiB chunks into a bounded channel (blocking when the reader lags).
pub(super) struct ChannelWriter {
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
pub(super) fn spawn_writer(
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
            let message = kiln_proto::status::chain(&e);
            tracing::warn!("{message}");
            let _ = err_tx.blocking_send(Err(std::io::Error::other(message)));
        }
    });
    Box::new(StreamReader::new(ReceiverStream::new(rx)))
}

/// Reads an async byte stream from a blocking thread: a task on the runtime pulls the
/// stream into a small bounded channel, the blocking side waits on that channel.
pub(super) struct BlockingStreamReader {
    rx: mpsc::Receiver<Result<Bytes, Error>>,
    chunk: Bytes,
}

impl BlockingStreamReader {
    /// Starts pulling `stream` on `handle`'s runtime (a few chunks ahead of the reader).
    pub(super) fn new(mut stream: crate::ByteStream, handle: &tokio::runtime::Handle) -> Self {
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
                Some(Err(e)) => return Err(std::io::Error::other(kiln_proto::status::chain(&e))),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}
