//! Imports: a ref another worker of the farm holds, copied here by digest.
//!
//! The holder is asked for its chain's layers (`Layers`, uncompressed where it
//! must make a blob, a base image's own blob where it has one), and each layer
//! this worker lacks is read with `ReadBlob`, verified against its digest as it
//! is written to the content store, unpacked with its diff_id checked, and
//! indexed by chain id (the same `image-layers/` index image pulls use), so a
//! layer moves to a worker once however many steps or images want it, and a
//! base image this worker pulled itself is never moved. Concurrent imports of
//! one layer wait for the first (per-chain-id and per-blob locks).
//!
//! An imported built layer keeps its uncompressed blob as the memo of its
//! uncompressed layer, and no compressed blob: an export from here compresses
//! it from its files, exactly as the holder would have.

use crate::Worker;
use crate::error::{Error, Result};
use crate::ops::source::image::unpack_verified;
use crate::snapshot::{Kind, LayerBlob};
use kiln_oci::{Compression, Descriptor, LayerOptions};
use kiln_proto::kiln::worker::v1 as wpb;
use kiln_proto::kiln::worker::v1::worker_client::WorkerClient;
use kiln_session::dial::Channel;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    /// the ref here (`None`: the peer's ref was scratch or all empty layers over scratch)
    pub r#ref: Option<String>,
    pub bytes_moved: u64,
    pub layers_moved: u32,
}

/// gRPC clients of the other workers, by address (channels are shared and lazy).
#[derive(Debug, Default)]
pub(crate) struct Peers(std::sync::Mutex<HashMap<String, WorkerClient<Channel>>>);

impl Peers {
    async fn get(&self, addr: &str) -> Result<WorkerClient<Channel>> {
        if let Some(c) = self.0.lock().ok().and_then(|m| m.get(addr).cloned()) {
            return Ok(c);
        }
        let c = crate::grpc::client::connect(addr)
            .await
            .map_err(|source| Error::Peer {
                peer: addr.to_string(),
                op: "connect".into(),
                source: tonic::Status::unavailable(kiln_proto::status::chain(&source)),
            })?;
        if let Ok(mut m) = self.0.lock() {
            m.insert(addr.to_string(), c.clone());
        }
        Ok(c)
    }

    fn forget(&self, addr: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(addr);
        }
    }
}

/// How a holder is asked for layers to move: no compression where it must
/// make a blob (compression is slower than most links), its own blob where
/// one exists.
fn transfer_options() -> LayerOptions {
    LayerOptions::new(Compression::Uncompressed)
}

impl Worker {
    /// Copies `peer`'s ref `r` into this worker (see the module doc).
    pub async fn import(&self, peer: &str, r: &str) -> Result<Imported> {
        let started = std::time::Instant::now();
        let mut client = self.peers.get(peer).await?;
        let peer_err = |op: &str| {
            let op = format!("{op} {r}");
            move |source| Error::Peer {
                peer: peer.to_string(),
                op,
                source,
            }
        };
        let layers = client
            .layers(wpb::LayersRequest {
                r#ref: r.to_string(),
                options: Some((&transfer_options()).into()),
            })
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::Unavailable {
                    self.peers.forget(peer);
                }
                peer_err("layers")(s)
            })?
            .into_inner()
            .layers;
        let listed = started.elapsed();
        let mut fetching = std::time::Duration::ZERO;
        let mut done = Imported::default();
        let mut parent: Option<String> = None;
        let mut chain_id: Option<String> = None;
        for l in layers {
            let link = if l.empty {
                "empty".to_string()
            } else {
                l.diff_id.clone()
            };
            if !l.empty && kiln_digest::hex_part(&l.diff_id).is_none() {
                return Err(Error::Image {
                    reference: format!("{peer} {r}"),
                    reason: format!("the peer's layer names diff_id {:?}", l.diff_id),
                });
            }
            let cid = match &chain_id {
                None if !l.empty => l.diff_id.clone(),
                None => kiln_digest::sha256(b"empty"),
                Some(c) => kiln_digest::sha256(format!("{c} {link}").as_bytes()),
            };
            let index = self
                .config()
                .root
                .join("image-layers")
                .join(cid.trim_start_matches("sha256:"));
            chain_id = Some(cid);
            let _layer = self
                .pull_lock(format!("layer {}", index.display()))
                .lock_owned()
                .await;
            if let Ok(id) = std::fs::read_to_string(&index)
                && self
                    .store()
                    .meta(id.trim())
                    .is_ok_and(|m| m.parent == parent)
            {
                parent = Some(id.trim().to_string());
                continue;
            }
            let id = if l.empty {
                let store = self.store().clone();
                let p = parent.clone();
                tokio::task::spawn_blocking(move || -> Result<String> {
                    let st = store.prepare(p.as_deref())?;
                    let id = store.commit(st, Kind::Built, None)?;
                    let mut meta = store.meta(&id)?;
                    meta.layers.insert(transfer_options().spec(), None);
                    store.update_meta(&meta)?;
                    Ok(id)
                })
                .await??
            } else {
                let desc = Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size as u64,
                    ..Default::default()
                };
                let blob = self.blob_path(&desc.digest)?;
                let mut staged = None;
                if !blob.exists() {
                    let _blob = self
                        .pull_lock(format!("blob {}", desc.digest))
                        .lock_owned()
                        .await;
                    if !blob.exists() {
                        let t = std::time::Instant::now();
                        // an uncompressed layer (its digest is its diff_id) is
                        // unpacked as it arrives, and kept only once verified
                        let unpack = (desc.digest == l.diff_id)
                            .then(|| (self.store().clone(), parent.clone()));
                        let (n, st) = fetch_blob(&mut client, &desc, &blob, unpack)
                            .await
                            .map_err(|e| match e {
                                FetchError::Peer(s) => peer_err("read blob of")(s),
                                FetchError::Local(e) => e,
                            })?;
                        staged = st;
                        done.bytes_moved += n;
                        done.layers_moved += 1;
                        fetching += t.elapsed();
                    }
                }
                let store = self.store().clone();
                let (p, source) = (parent.clone(), format!("{peer} {r}"));
                let diff_id = l.diff_id.clone();
                tokio::task::spawn_blocking(move || -> Result<String> {
                    let st = match staged {
                        Some(st) => st,
                        None => {
                            unpack_verified(&store, &desc, &diff_id, &blob, p.as_deref(), &source)?
                        }
                    };
                    let kept = LayerBlob {
                        descriptor: desc.clone(),
                        diff_id,
                    };
                    if Compression::from_media_type(&desc.media_type) == Compression::Uncompressed {
                        // a built layer: its uncompressed blob, where kept, is its
                        // memo, not its origin
                        let id = store.commit(st, Kind::Built, None)?;
                        if blob.exists() {
                            let mut meta = store.meta(&id)?;
                            meta.layers.insert(transfer_options().spec(), Some(kept));
                            store.update_meta(&meta)?;
                        }
                        Ok(id)
                    } else {
                        store.commit(st, Kind::Image, Some(kept))
                    }
                })
                .await??
            };
            crate::snapshot::write_atomic(&index, id.as_bytes())?;
            parent = Some(id);
        }
        done.r#ref = parent;
        if done.bytes_moved > 0 {
            let total = started.elapsed();
            tracing::info!(
                peer,
                r,
                bytes = done.bytes_moved,
                layers = done.layers_moved,
                total_ms = total.as_millis() as u64,
                holder_layers_ms = listed.as_millis() as u64,
                fetch_ms = fetching.as_millis() as u64,
                "imported"
            );
        }
        Ok(done)
    }
}

enum FetchError {
    Peer(tonic::Status),
    Local(Error),
}

/// The bytes of a blob as they arrive: read by a layer's unpacking (or drained),
/// each chunk also handed to a hashing thread (so hashing overlaps the
/// unpacking's writes) and written to the blob's file where it is kept.
struct Tee {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    pending: bytes::Bytes,
    /// the blob's file; none when the blob is unpacked as it arrives
    file: Option<std::io::BufWriter<std::fs::File>>,
    hash: Option<std::sync::mpsc::SyncSender<bytes::Bytes>>,
    n: u64,
}

impl std::io::Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.n += b.len() as u64;
                    if let Some(f) = &mut self.file {
                        f.write_all(&b)?;
                    }
                    if let Some(h) = &self.hash {
                        h.send(b.clone()).map_err(|_| {
                            std::io::Error::other("the blob's hashing thread ended")
                        })?;
                    }
                    self.pending = b;
                }
                None => return Ok(0),
            }
        }
        let k = buf.len().min(self.pending.len());
        let chunk = self.pending.split_to(k);
        buf[..k].copy_from_slice(&chunk);
        Ok(k)
    }
}

/// A thread hashing the chunks sent to it; its digest once the sender is dropped.
fn hashing_thread() -> Result<(
    std::sync::mpsc::SyncSender<bytes::Bytes>,
    std::thread::JoinHandle<String>,
)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
    let h = std::thread::Builder::new()
        .name("blob-hash".into())
        .spawn(move || {
            let mut hasher = kiln_digest::Hasher::new();
            for b in rx {
                hasher.update(&b);
            }
            hasher.finish()
        })
        .map_err(Error::io("spawn", "blob-hash thread"))?;
    Ok((tx, h))
}

/// Streams blob `desc` from a peer, checking its digest and size; returns the
/// bytes read. Unpacking (or writing) runs on a blocking thread and hashing
/// on another while the next chunks arrive. Without `unpack` the blob is kept in `blob` (through a temp
/// file); with `unpack` (the store and the parent) the blob, an uncompressed
/// layer, is unpacked on the way into a staging snapshot, returned only when
/// the digest is right, and not kept: the snapshot is what was wanted, and
/// writing the blob too would double the bytes written.
async fn fetch_blob(
    client: &mut WorkerClient<Channel>,
    desc: &Descriptor,
    blob: &Path,
    unpack: Option<(crate::snapshot::Store, Option<String>)>,
) -> std::result::Result<(u64, Option<crate::snapshot::Staging>), FetchError> {
    let tmp = blob.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    let keep = unpack.is_none();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let writer = {
        let (tmp, digest) = (tmp.clone(), desc.digest.clone());
        tokio::task::spawn_blocking(move || -> Result<_> {
            let file = match keep {
                true => Some(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?,
                )),
                false => None,
            };
            let (hash, hashing) = hashing_thread()?;
            let mut tee = Tee {
                rx,
                pending: bytes::Bytes::new(),
                file,
                hash: Some(hash),
                n: 0,
            };
            let staged = match unpack {
                Some((store, parent)) => {
                    let st = store.prepare(parent.as_deref())?;
                    let m = store.mount_rw(&st)?;
                    kiln_oci::layer::apply(&mut tee, m.path())
                        .map_err(|source| Error::Layer { digest, source })?;
                    m.unmount()?;
                    Some(st)
                }
                None => None,
            };
            // the rest (all of it, or a tar's trailing padding)
            std::io::copy(&mut tee, &mut std::io::sink()).map_err(Error::io("write", &tmp))?;
            if let Some(f) = &mut tee.file {
                f.flush().map_err(Error::io("write", &tmp))?;
            }
            drop(tee.hash.take());
            let digest = hashing.join().map_err(|_| Error::Image {
                reference: tmp.display().to_string(),
                reason: "the blob's hashing thread panicked".into(),
            })?;
            Ok((tee.n, digest, staged))
        })
    };
    let received = async {
        let mut stream = client
            .read_blob(wpb::ReadBlobRequest {
                digest: desc.digest.clone(),
            })
            .await?
            .into_inner();
        let mut n = 0u64;
        while let Some(chunk) = stream.message().await? {
            n += chunk.data.len() as u64;
            // more than the layer's size: stop reading, the check below fails
            if n > desc.size || tx.send(chunk.data.into()).await.is_err() {
                break;
            }
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    drop(tx);
    let written = writer.await.map_err(Error::from).and_then(|r| r);
    let r = match (received, written) {
        (Err(s), _) => Err(FetchError::Peer(s)),
        (_, Err(e)) => Err(FetchError::Local(e)),
        (Ok(()), Ok((n, got, _))) if n != desc.size || got != desc.digest => {
            Err(FetchError::Local(Error::Image {
                reference: desc.digest.clone(),
                reason: format!(
                    "the peer sent {n} bytes with digest {got}, not the {} bytes of the layer",
                    desc.size
                ),
            }))
        }
        (Ok(()), Ok((n, _, staged))) if !keep => Ok((n, staged)),
        (Ok(()), Ok((n, _, staged))) => std::fs::rename(&tmp, blob)
            .map(|()| (n, staged))
            .map_err(|e| FetchError::Local(Error::io("rename", blob)(e))),
    };
    if r.is_err() && keep {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use crate::testutil::{snapshot, worker};
    use std::sync::Arc;

    /// Serves `w`'s Worker API on a loopback port; its address.
    async fn serve(w: Arc<crate::Worker>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(crate::grpc::server(w))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        format!("tcp://{addr}")
    }

    fn read(w: &crate::Worker, r: &str, path: &str) -> Vec<u8> {
        let m = w.store().mount_ro(Some(r)).expect("mount");
        let data = std::fs::read(m.path().join(path)).expect("read");
        m.unmount().expect("unmount");
        data
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ref_moves_between_workers_verified_and_once() {
        let (_ta, a) = worker();
        let a = Arc::new(a);
        let base = snapshot(&a, None, |d| {
            std::fs::write(d.join("base"), b"base layer").expect("write");
        });
        let top = snapshot(&a, Some(&base), |d| {
            std::fs::write(d.join("top"), vec![7u8; 3 << 20]).expect("write");
            std::os::unix::fs::symlink("top", d.join("link")).expect("symlink");
        });
        let peer = serve(a.clone()).await;
        let (_tb, b) = worker();
        let got = b.import(&peer, &top).await.expect("import");
        let here = got.r#ref.clone().expect("a ref");
        assert_eq!(got.layers_moved, 2);
        assert!(got.bytes_moved > 3 << 20, "{got:?}");
        assert_eq!(read(&b, &here, "base"), b"base layer");
        assert_eq!(read(&b, &here, "top"), vec![7u8; 3 << 20]);
        assert_eq!(
            std::fs::read_link(b.store().dir(&here).join("diff/link")).expect("link"),
            std::path::Path::new("top")
        );
        // the same content hashes the same on both workers (cache keys agree)
        let sel = vec![crate::contenthash::Selector {
            path: "/".into(),
            wildcard: false,
            follow_links: false,
        }];
        let (ha, hb) = (
            a.checksum(Some(&top), sel.clone()).await.expect("checksum"),
            b.checksum(Some(&here), sel).await.expect("checksum"),
        );
        assert_eq!(ha, hb);
        // again: nothing moves, the same snapshot is found by chain id
        let again = b.import(&peer, &top).await.expect("import");
        assert_eq!(
            (again.bytes_moved, again.r#ref.as_deref()),
            (0, Some(here.as_str()))
        );
        // built layers are streamed from the holder's snapshot and unpacked as
        // they arrive: no blob was written on either side
        for w in [&*a, &b] {
            let blobs: Vec<_> = std::fs::read_dir(w.config().root.join("content/blobs/sha256"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(blobs.is_empty(), "{blobs:?}");
        }
    }

    /// Commits on `w` an image-layer snapshot (over `parent`) from a gzip blob of
    /// the files `fill` writes, kept in its content store; the blob's descriptor.
    fn image_layer(
        w: &crate::Worker,
        parent: Option<&str>,
        fill: impl FnOnce(&std::path::Path),
    ) -> (String, kiln_oci::Descriptor) {
        let src = tempfile::tempdir().expect("tempdir");
        fill(src.path());
        let blobs = w.config().root.join("content/blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("blobs");
        let (diff_id, desc) = kiln_oci::write_layer_blob(
            &blobs,
            &kiln_oci::LayerOptions::new(kiln_oci::Compression::Gzip),
            |out| kiln_oci::layer::tar_dir(src.path(), out),
        )
        .expect("blob");
        let blob = w.blob_path(&desc.digest).expect("path");
        let st = crate::ops::source::image::unpack_verified(
            w.store(),
            &desc,
            &diff_id,
            &blob,
            parent,
            "test",
        )
        .expect("unpack");
        let kept = crate::snapshot::LayerBlob {
            descriptor: desc.clone(),
            diff_id,
        };
        let id = w
            .store()
            .commit(st, crate::snapshot::Kind::Image, Some(kept))
            .expect("commit");
        (id, desc)
    }

    /// A built layer is hashed once (its snapshot does not change) and
    /// streamed from the diff on every read: bytes that no longer match the
    /// digest the holder gave are refused, and nothing is left behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_layer_whose_bytes_changed_under_its_holder_is_refused() {
        let (_ta, a) = worker();
        let a = Arc::new(a);
        let top = snapshot(&a, None, |d| {
            std::fs::write(d.join("f"), b"the real content").expect("write");
        });
        let opts = kiln_oci::LayerOptions::new(kiln_oci::Compression::Uncompressed);
        let first = crate::layers::layer_chain(&a, Some(&top), &opts)
            .await
            .expect("layers");
        std::fs::write(a.store().diff_dir(&top).join("f"), b"the fake content").expect("tamper");
        let again = crate::layers::layer_chain(&a, Some(&top), &opts)
            .await
            .expect("layers");
        assert_eq!(
            first[0].as_ref().map(|b| &b.descriptor.digest),
            again[0].as_ref().map(|b| &b.descriptor.digest),
            "the layer is hashed once"
        );
        let peer = serve(a.clone()).await;
        let (_tb, b) = worker();
        refused_leaving_nothing(&b, &peer, &top).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_sending_other_bytes_than_its_layer_is_refused_and_leaves_nothing() {
        let (_ta, a) = worker();
        let a = Arc::new(a);
        // an image layer, whose gzip blob the holder keeps and sends as it is;
        // the blob is changed under it
        let (top, desc) = image_layer(&a, None, |d| {
            std::fs::write(d.join("f"), vec![42u8; 1 << 16]).expect("write");
        });
        let path = a.blob_path(&desc.digest).expect("path");
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).expect("tamper");
        let peer = serve(a.clone()).await;
        let (_tb, b) = worker();
        refused_leaving_nothing(&b, &peer, &top).await;
        // nor its blob
        assert!(!b.blob_path(&desc.digest).expect("path").exists());
    }

    /// `b`'s import of `top` from `peer` fails on the bytes the peer sent, and
    /// leaves no snapshot, index entry or staging directory behind.
    async fn refused_leaving_nothing(b: &crate::Worker, peer: &str, top: &str) {
        let e = b.import(peer, top).await.expect_err("refused");
        assert!(
            kiln_proto::status::chain(&e).contains("the peer sent"),
            "{}",
            kiln_proto::status::chain(&e)
        );
        assert!(b.store().chain(None).map(|c| c.is_empty()).unwrap_or(true));
        let left: Vec<_> = std::fs::read_dir(b.config().root.join("staging"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }
}
