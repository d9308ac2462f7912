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
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;

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
///
/// Each snapshot's layer (per layer options) is computed once: its lock is
/// held while the chain's layers are planned and computed, taken root first
/// so chains sharing snapshots never wait on each other in a cycle; unrelated
/// chains go at once.
pub(crate) async fn layer_chain(
    w: &Worker,
    r: Option<&str>,
    options: &LayerOptions,
) -> Result<Vec<Option<LayerBlob>>> {
    let options = *options;
    let key = options.spec();
    let store = w.store.clone();
    let top = r.map(str::to_string);
    let mut chain = tokio::task::spawn_blocking(move || store.chain(top.as_deref())).await??;
    chain.reverse();
    let mut held = Vec::with_capacity(chain.len());
    for meta in &chain {
        let lock = w.layer_locks.get(format!("{} {key}", meta.id));
        held.push(lock.lock_owned().await);
    }
    let _busy = w.activity.start();
    let store = w.store.clone();
    let blobs = w.config.root.join("content/blobs/sha256");
    let memo = w.memo.clone();
    let streamed = w.streamed.clone();
    tokio::task::spawn_blocking(move || {
        let out = compute_chain(&store, &chain, &blobs, &options, &memo, &streamed)?;
        drop(held);
        Ok(out)
    })
    .await?
}

/// [`layer_chain`] with the chain's metas (root first) in hand and its locks held.
fn compute_chain(
    store: &crate::snapshot::Store,
    chain: &[Meta],
    blobs: &Path,
    options: &LayerOptions,
    memo: &MemoWriter,
    streamed: &Streamed,
) -> Result<Vec<Option<LayerBlob>>> {
    let key = options.spec();
    let plans: Vec<Plan> = chain
        .iter()
        .enumerate()
        .map(|(i, meta)| match (&meta.blob, meta.layers.get(&key)) {
            (_, Some(m)) => Plan::Ready(Box::new(m.clone())),
            _ if let Some(m) = memo.pending(&meta.id, &key) => Plan::Ready(Box::new(m)),
            _ if streams(meta, options)
                && let Some(b) = streamed.of_snapshot(&meta.id, options.clamp_mtime) =>
            {
                Plan::Ready(Box::new(Some(b)))
            }
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
    let mut computed = compute_all(store, chain, &todo, blobs, options, streamed).into_iter();
    let mut out = Vec::new();
    let mut fresh = Vec::new();
    for plan in plans {
        let blob = match plan {
            Plan::Ready(b) => *b,
            Plan::Compute(i) => {
                let (j, res) = computed.next().expect("one result per layer computed");
                debug_assert_eq!(i, j);
                let blob = res?;
                // a streamed layer has no blob to remember
                if !streams(&chain[i], options) {
                    fresh.push((chain[i].id.clone(), blob.clone()));
                }
                blob
            }
        };
        out.push(blob);
    }
    memo.record(key, fresh);
    Ok(out)
}

/// Computes the layers of `chain[i]` for each `i` of `todo`, a few at once
/// (each one already uses every core for compression); results in `todo`'s order.
fn compute_all(
    store: &crate::snapshot::Store,
    chain: &[Meta],
    todo: &[usize],
    blobs: &Path,
    options: &LayerOptions,
    streamed: &Streamed,
) -> Vec<(usize, Result<Option<LayerBlob>>)> {
    let mut computed = Vec::new();
    for batch in todo.chunks(4) {
        std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&i| {
                    (
                        i,
                        s.spawn(move || compute(store, &chain[i], blobs, options, streamed)),
                    )
                })
                .collect();
            for (i, h) in handles {
                let id = chain[i].id.clone();
                computed.push((i, h.join().unwrap_or(Err(Error::LayerPanicked { id }))));
            }
        });
    }
    computed
}

/// Layer blobs written by this worker whose memo is not recorded yet, by
/// (snapshot id, layer options).
type Pending = std::collections::HashMap<(String, String), Option<LayerBlob>>;

/// How long a layer memo waits for the store's background sync of its blob.
const MEMO_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Layers just computed, to be recorded in their snapshots' memos under `key`.
struct MemoBatch {
    key: String,
    fresh: Vec<(String, Option<LayerBlob>)>,
}

/// Records the layer blobs computed by a worker in their snapshots' memos, on
/// one long-lived thread fed by a channel, once the store's background sync has
/// put the blobs on disk: a memo never names a blob a crash could have lost, and
/// neither the export nor the steps running meanwhile wait for the disk. Until
/// then the blobs are served from `pending`. The thread is the only writer of
/// memos; it ends once the worker (the sender) is gone and the queue is done.
#[derive(Debug)]
pub(crate) struct MemoWriter {
    pending: Arc<Mutex<Pending>>,
    tx: std::sync::mpsc::Sender<MemoBatch>,
    _thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoWriter {
    pub(crate) fn start(store: crate::snapshot::Store) -> MemoWriter {
        let pending: Arc<Mutex<Pending>> = Default::default();
        let (tx, rx) = std::sync::mpsc::channel::<MemoBatch>();
        let p = pending.clone();
        let thread = std::thread::Builder::new()
            .name("layer-memo".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // one background sync of the store covers every blob written so far
                    let batches: Vec<MemoBatch> =
                        std::iter::once(first).chain(rx.try_iter()).collect();
                    let synced = store.wait_synced(MEMO_SYNC_TIMEOUT);
                    for b in batches {
                        write_memos(&store, &p, b, synced);
                    }
                }
            });
        let thread = thread
            .inspect_err(|e| tracing::warn!(error = %kiln_proto::status::Chain(&e), "start the layer memo thread"))
            .ok();
        MemoWriter {
            pending,
            tx,
            _thread: thread,
        }
    }

    fn pending(&self, id: &str, key: &str) -> Option<Option<LayerBlob>> {
        let g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&(id.to_string(), key.to_string())).cloned()
    }

    /// Queues the layers just computed (served from `pending` until recorded).
    fn record(&self, key: String, fresh: Vec<(String, Option<LayerBlob>)>) {
        if fresh.is_empty() {
            return;
        }
        {
            let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, blob) in &fresh {
                g.insert((id.clone(), key.clone()), blob.clone());
            }
        }
        let batch = MemoBatch { key, fresh };
        if let Err(std::sync::mpsc::SendError(batch)) = self.tx.send(batch) {
            // no writer thread: no memo, the next export computes the layers again
            let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, _) in batch.fresh {
                g.remove(&(id, batch.key.clone()));
            }
        }
    }
}

/// Writes one batch of memos (when their blobs are known to be on disk) and
/// takes them out of `pending`.
fn write_memos(
    store: &crate::snapshot::Store,
    pending: &Mutex<Pending>,
    b: MemoBatch,
    synced: bool,
) {
    for (id, blob) in b.fresh {
        // not known to be on disk: no memo, the next export computes it
        if synced {
            let res = store.meta(&id).and_then(|mut meta| {
                meta.layers.insert(b.key.clone(), blob);
                store.update_meta(&meta)
            });
            if let Err(e) = res {
                // without the memo the layer is computed again next time
                tracing::debug!(snapshot = %id, error = %kiln_proto::status::Chain(&e), "layer memo not recorded");
            }
        } else {
            tracing::debug!(snapshot = %id, "layer memo not recorded: no sync of the blob");
        }
        let mut g = pending.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(&(id, b.key.clone()));
    }
}

/// The non-empty layer blobs of the chain of `r`, root first.
pub(crate) async fn layers(
    w: &Worker,
    r: Option<&str>,
    options: &LayerOptions,
) -> Result<Vec<LayerBlob>> {
    Ok(layer_chain(w, r, options)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

/// Whether the layer of `meta` is streamed rather than stored: the
/// uncompressed layer of a built snapshot (as moved between workers) is its
/// overlay diff tarred, which costs a read of the diff; storing it would cost
/// a write of all of it, for a blob read once.
fn streams(meta: &Meta, options: &LayerOptions) -> bool {
    meta.blob.is_none() && options.compression == Compression::Uncompressed
}

/// Uncompressed layers of built snapshots that are streamed, not stored (see
/// [`streams`]): by digest, the snapshot and mtime clamp that make their
/// bytes again. Entered when the layer is computed (`Layers`, which every
/// import asks first); a worker that restarted between the two answers the
/// read with "not found", and that import fails.
/// A committed snapshot's diff does not change, so its layer is hashed once
/// and every later `Layers` (another worker importing it) answers at once.
#[derive(Debug, Default)]
pub(crate) struct Streamed(Mutex<StreamedMaps>);

#[derive(Debug, Default)]
pub(crate) struct StreamedMaps {
    by_digest: std::collections::HashMap<String, (String, Option<u64>)>,
    by_snapshot: std::collections::HashMap<(String, Option<u64>), LayerBlob>,
}

/// How many streamed layers are remembered; past it the maps start over (the
/// next `Layers` of a forgotten one hashes it again).
const STREAMED_MAX: usize = 65_536;

impl Streamed {
    fn insert(&self, blob: &LayerBlob, snapshot: String, clamp: Option<u64>) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.by_digest.len() >= STREAMED_MAX {
            *g = StreamedMaps::default();
        }
        g.by_digest
            .insert(blob.descriptor.digest.clone(), (snapshot.clone(), clamp));
        g.by_snapshot.insert((snapshot, clamp), blob.clone());
    }

    /// The snapshot (and mtime clamp) whose diff is the streamed layer `digest`.
    pub(crate) fn get(&self, digest: &str) -> Option<(String, Option<u64>)> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.by_digest.get(digest).cloned()
    }

    /// The streamed layer of `snapshot` (with mtime clamp), if already hashed.
    fn of_snapshot(&self, snapshot: &str, clamp: Option<u64>) -> Option<LayerBlob> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.by_snapshot.get(&(snapshot.to_string(), clamp)).cloned()
    }
}

/// Streams the layer `digest` entered in `streamed`: the snapshot's overlay
/// diff tarred again, in `chunk`-byte pieces. Its bytes are the ones hashed
/// when it was computed, as a committed snapshot does not change; the reader
/// checks the digest anyway.
pub(crate) fn stream_layer(
    store: &crate::snapshot::Store,
    snapshot: &str,
    clamp: Option<u64>,
    digest: &str,
    tx: mpsc::Sender<Result<Bytes>>,
    chunk: usize,
) {
    let diff = store.diff_dir(snapshot);
    let mut w = ChannelWriter::with_chunk(tx.clone(), chunk);
    let res = kiln_oci::layer::diff_overlay_upper_clamped(&diff, &mut w, clamp)
        .map_err(|source| Error::Layer {
            digest: digest.to_string(),
            source,
        })
        .and_then(|()| w.flush_chunk());
    if let Err(e) = res {
        let _ = tx.blocking_send(Err(e));
    }
}

/// The layer blob of one snapshot: its base blob recompressed (force), its
/// overlay diff tarred and compressed in one stream, or (uncompressed) only
/// hashed and streamed when read; `None` for an empty diff.
fn compute(
    store: &crate::snapshot::Store,
    meta: &Meta,
    blobs: &Path,
    options: &LayerOptions,
    streamed: &Streamed,
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
    if streams(meta, options) {
        let mut w = kiln_digest::DigestWriter::new(std::io::sink());
        kiln_oci::layer::diff_overlay_upper_clamped(&diff, &mut w, options.clamp_mtime)
            .map_err(layer_err)?;
        let (_, digest, size) = w.finish();
        let blob = LayerBlob {
            descriptor: kiln_oci::Descriptor {
                media_type: Compression::Uncompressed.oci_media_type().to_string(),
                digest: digest.clone(),
                size,
                ..Default::default()
            },
            diff_id: digest,
        };
        streamed.insert(&blob, meta.id.clone(), options.clamp_mtime);
        return Ok(Some(blob));
    }
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
    chunk: usize,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<Result<Bytes>>) -> Self {
        Self::with_chunk(tx, CHUNK)
    }

    /// Sends `chunk`-byte pieces.
    pub fn with_chunk(tx: mpsc::Sender<Result<Bytes>>, chunk: usize) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(chunk),
            chunk,
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
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.chunk),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.chunk {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
