//! `docker-image://` sources: pulled with kiln-registry, one snapshot per layer, found
//! again by chain id (`<root>/image-layers/<chain id>` names the layer's snapshot).

use crate::error::{Error, Result};
use crate::snapshot::{self, Kind, LayerBlob};
use crate::{Event, Worker, pb};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Image layers downloaded at once by one pull.
const PULL_CONCURRENCY: usize = 3;

/// The platform a source op asks for; the worker's default (linux/amd64) when it names none.
fn oci_platform(p: Option<&pb::Platform>) -> kiln_oci::Platform {
    match p.filter(|p| !p.os.is_empty() && !p.architecture.is_empty()) {
        Some(p) => kiln_oci::Platform::new(
            &p.os,
            &p.architecture,
            Some(p.variant.as_str()).filter(|v| !v.is_empty()),
        )
        .normalized(),
        None => kiln_oci::Platform::new("linux", "amd64", None),
    }
}

fn diff_ids(config: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    v.get("rootfs")?
        .get("diff_ids")?
        .as_array()?
        .iter()
        .map(|d| d.as_str().map(str::to_string))
        .collect()
}

/// One layer of the image being pulled.
struct ChainLayer {
    desc: kiln_oci::Descriptor,
    diff_id: String,
    /// the cache index file naming the layer's snapshot (by chain id)
    index: PathBuf,
}

/// One image pull: the registry (with the client's credentials) and where progress goes.
struct Pull<'a> {
    w: &'a Worker,
    /// the reference as the build wrote it
    name: &'a str,
    from: BlobSource,
    events: &'a mpsc::Sender<Event>,
}

/// Where a pull's blobs come from.
#[derive(Clone)]
enum BlobSource {
    Registry {
        registry: kiln_registry::Client,
        reference: kiln_registry::Reference,
    },
    /// a content store the client serves on its session (`local:DIR`, a
    /// local build cache; `oci:NAME`, an OCI layout)
    Session {
        client: kiln_session::SessionClient,
        store: String,
    },
}

/// Pulls and unpacks an image; returns the top layer's snapshot (`None` for no layers).
pub(super) async fn image(
    w: &Worker,
    r: &str,
    platform: Option<&pb::Platform>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let reg = |source| Error::Registry {
        reference: r.to_string(),
        source,
    };
    let reference = kiln_registry::Reference::parse(r).map_err(reg)?;
    let plat = oci_platform(platform);
    // concurrent pulls of one image wait for the first (its layers are then found)
    let _pull = w.pull_lock(format!("image {r} {plat}")).lock_owned().await;
    let registry = registry_for(w, session_id, &reference).await;
    let resolved = registry.resolve(&reference, &plat).await.map_err(reg)?;
    let pull = Pull {
        w,
        name: r,
        from: BlobSource::Registry {
            registry,
            reference,
        },
        events,
    };
    let ids = diff_ids(&resolved.config)
        .ok_or_else(|| pull.image_error("config has no rootfs.diff_ids".into()))?;
    let layers = &resolved.manifest.layers;
    if ids.len() != layers.len() {
        return Err(pull.image_error(format!(
            "{} layers but {} diff_ids",
            layers.len(),
            ids.len()
        )));
    }
    pull.layers(layers.iter().cloned().zip(ids).collect()).await
}

/// A layer chain from a build cache (`kiln-cache://REPOSITORY`, the layers
/// as JSON in [`CACHE_LAYERS_ATTR`]): pulled and unpacked as an image's
/// layers are, each verified against its diffID; returns the top layer's
/// snapshot. Only the scheduler makes these ops (it refuses them from clients).
pub(super) async fn cache_layers(
    w: &Worker,
    repository: &str,
    attrs: &std::collections::BTreeMap<String, String>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let from = if repository.starts_with(kiln_session::content::LOCAL_PREFIX) {
        let broker = &w.config().broker;
        let channel = kiln_session::dial::connect(broker)
            .await
            .map_err(|source| Error::CacheSession {
                op: "connect to the session broker",
                source,
            })?;
        BlobSource::Session {
            client: kiln_session::SessionClient::new(channel, session_id.to_string()),
            store: repository.to_string(),
        }
    } else {
        let reg = |source| Error::Registry {
            reference: repository.to_string(),
            source,
        };
        let reference = kiln_registry::Reference::parse(repository).map_err(reg)?;
        BlobSource::Registry {
            registry: registry_for(w, session_id, &reference).await,
            reference,
        }
    };
    let pull = Pull {
        w,
        name: repository,
        from,
        events,
    };
    let layers: Vec<kiln_oci::Descriptor> = attrs
        .get(CACHE_LAYERS_ATTR)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| pull.image_error(format!("cache layers: {e}")))?
        .unwrap_or_default();
    let mut chain = Vec::new();
    for l in layers {
        let diff_id = l
            .annotations
            .as_ref()
            .and_then(|a| a.get(UNCOMPRESSED_ANNOTATION))
            .cloned()
            .ok_or_else(|| pull.image_error(format!("cache layer {} has no diffID", l.digest)))?;
        chain.push((l, diff_id));
    }
    let _pull = w
        .pull_lock(format!("cache {repository}"))
        .lock_owned()
        .await;
    pull.layers(chain).await
}

/// An image in an OCI layout the client serves (`oci-layout://NAME@DIGEST`,
/// the store in `oci.store`): its index, manifest and config read through
/// the session broker from the client's content store `oci:STORE`, each
/// checked against its digest, then its layers pulled and unpacked as an
/// image's are (found again by chain id, so a layout's layers are read
/// once). Returns the top layer's snapshot.
pub(super) async fn oci_layout(
    w: &Worker,
    r: &str,
    attrs: &std::collections::BTreeMap<String, String>,
    platform: Option<&pb::Platform>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    use kiln_session::ocilayout::{self, ATTR_LAYER_LIMIT, ATTR_SESSION, ATTR_STORE, SCHEME};
    let name = format!("{SCHEME}{r}");
    let err = |reason: String| Error::Image {
        reference: name.clone(),
        reason,
    };
    let digest = match r.rsplit_once('@') {
        Some((_, d)) if ocilayout::is_digest(d) => d,
        _ => return Err(err("the reference must have a sha256 digest".into())),
    };
    let store = attrs
        .get(ATTR_STORE)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(format!("no {ATTR_STORE} names the client's store")))?;
    if let Some(s) = attrs.get(ATTR_SESSION).filter(|s| !s.is_empty())
        && s != session_id
    {
        return Err(err(format!("session {s:?} is not this build's")));
    }
    let layer_limit = match attrs.get(ATTR_LAYER_LIMIT) {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| err(format!("invalid {ATTR_LAYER_LIMIT} {v:?}")))?,
        ),
        None => None,
    };
    let plat = oci_platform(platform);
    let store = ocilayout::store_id(store);
    let channel = kiln_session::dial::connect(&w.config().broker)
        .await
        .map_err(|source| Error::CacheSession {
            op: "connect to the session broker",
            source,
        })?;
    let client = kiln_session::SessionClient::new(channel, session_id.to_string());
    let _pull = w
        .pull_lock(format!("oci-layout {digest} {plat}"))
        .lock_owned()
        .await;
    let read = |d: String, limit: u64| {
        let (client, store) = (client.clone(), store.clone());
        async move { ocilayout::read_via(&client, &store, &d, limit).await }
    };
    let resolved = ocilayout::resolve(read, digest, &plat)
        .await
        .map_err(|e| err(kiln_proto::status::chain(&e)))?;
    let pull = Pull {
        w,
        name: &name,
        from: BlobSource::Session { client, store },
        events,
    };
    let mut ids = diff_ids(&resolved.config)
        .ok_or_else(|| pull.image_error("config has no rootfs.diff_ids".into()))?;
    let mut layers = resolved.manifest.layers;
    if ids.len() != layers.len() {
        return Err(pull.image_error(format!(
            "{} layers but {} diff_ids",
            layers.len(),
            ids.len()
        )));
    }
    if let Some(n) = layer_limit {
        layers.truncate(n);
        ids.truncate(n);
    }
    pull.layers(layers.into_iter().zip(ids).collect()).await
}

use kiln_oci::cache_config::UNCOMPRESSED_ANNOTATION;
use kiln_oci::cache_config::sources::CACHE_LAYERS_ATTR;

/// The worker's registry client; for a private registry, with the client's
/// credentials, asked through its session.
async fn registry_for(
    w: &Worker,
    session_id: &str,
    reference: &kiln_registry::Reference,
) -> kiln_registry::Client {
    match kiln_session::credentials_via(&w.config().broker, session_id, &reference.registry).await {
        Some(c) => {
            let host = reference.registry.clone();
            w.registry
                .clone()
                .with_credentials(std::sync::Arc::new(move |h: &str| {
                    (h == host).then(|| c.clone())
                }))
        }
        None => w.registry.clone(),
    }
}

impl Pull<'_> {
    fn image_error(&self, reason: String) -> Error {
        Error::Image {
            reference: self.name.to_string(),
            reason,
        }
    }

    /// Pulls and unpacks `layers` (descriptor and diffID, bottom first);
    /// returns the top layer's snapshot (`None` for no layers).
    async fn layers(&self, layers: Vec<(kiln_oci::Descriptor, String)>) -> Result<Option<String>> {
        let chain = self.chain(layers)?;
        // missing blobs download up to PULL_CONCURRENCY at a time, ahead of the unpacking,
        // which goes in order as each arrives
        let mut fetched =
            futures::stream::iter(self.prefetches(&chain)?).buffered(PULL_CONCURRENCY);
        let mut parent: Option<String> = None;
        for layer in chain {
            let blob = match fetched.next().await {
                Some(b) => b?,
                None => self.w.blob_path(&layer.desc.digest)?,
            };
            parent = Some(self.unpack(layer, blob, parent).await?);
        }
        Ok(parent)
    }

    /// `layers` (descriptor and diffID, bottom first) with their chain ids' index paths.
    fn chain(&self, layers: Vec<(kiln_oci::Descriptor, String)>) -> Result<Vec<ChainLayer>> {
        // diffIDs name paths of the layer index: only real digests
        if let Some((_, bad)) = layers
            .iter()
            .find(|(_, d)| kiln_digest::hex_part(d).is_none())
        {
            return Err(self.image_error(format!("diffID {bad:?} is not a sha256 digest")));
        }
        let mut chain = Vec::new();
        let mut chain_id: Option<String> = None;
        for (desc, diff_id) in layers {
            let cid = match &chain_id {
                None => diff_id.clone(),
                Some(c) => kiln_digest::sha256(format!("{c} {diff_id}").as_bytes()),
            };
            let index = self
                .w
                .config()
                .root
                .join("image-layers")
                .join(cid.trim_start_matches("sha256:"));
            chain_id = Some(cid);
            chain.push(ChainLayer {
                desc,
                diff_id,
                index,
            });
        }
        Ok(chain)
    }

    /// One download per layer whose blob and snapshot are both missing, in chain order;
    /// each resolves to the blob's path.
    fn prefetches(
        &self,
        chain: &[ChainLayer],
    ) -> Result<Vec<impl Future<Output = Result<PathBuf>> + use<>>> {
        let mut fetches = Vec::new();
        for layer in chain {
            let blob = self.w.blob_path(&layer.desc.digest)?;
            let needed = !blob.exists() && !layer.index.exists();
            let from = self.from.clone();
            let (desc, events) = (layer.desc.clone(), self.events.clone());
            let lock = self.w.pull_lock(format!("blob {}", desc.digest));
            fetches.push(async move {
                if needed {
                    // another image's pull may be fetching the same blob
                    let _blob = lock.lock_owned().await;
                    if !blob.exists() {
                        fetch_layer(&from, &desc, &blob, &events).await?;
                    }
                }
                Ok::<_, Error>(blob)
            });
        }
        Ok(fetches)
    }

    /// The snapshot of `layer` over `parent`: found through its index, or unpacked
    /// from `blob` (downloaded first when another pull has not left it).
    async fn unpack(
        &self,
        layer: ChainLayer,
        blob: PathBuf,
        parent: Option<String>,
    ) -> Result<String> {
        let store = self.w.store().clone();
        // one unpack of a layer chain at a time, whichever image it came with
        let _layer = self
            .w
            .pull_lock(format!("layer {}", layer.index.display()))
            .lock_owned()
            .await;
        if let Ok(id) = std::fs::read_to_string(&layer.index)
            && store.meta(id.trim()).is_ok_and(|m| m.parent == parent)
        {
            return Ok(id.trim().to_string());
        }
        if !blob.exists() {
            let _blob = self
                .w
                .pull_lock(format!("blob {}", layer.desc.digest))
                .lock_owned()
                .await;
            if !blob.exists() {
                fetch_layer(&self.from, &layer.desc, &blob, self.events).await?;
            }
        }
        let index = layer.index.clone();
        let name = self.name.to_string();
        let id = tokio::task::spawn_blocking(move || {
            apply_layer(&store, layer, &blob, parent.as_deref(), &name)
        })
        .await??;
        snapshot::write_atomic(&index, id.as_bytes())?;
        Ok(id)
    }
}

/// Applies the layer blob `blob` over `parent` into a new snapshot, checking that
/// its content is the config's diff_id.
fn apply_layer(
    store: &snapshot::Store,
    layer: ChainLayer,
    blob: &Path,
    parent: Option<&str>,
    reference: &str,
) -> Result<String> {
    let st = unpack_verified(store, &layer.desc, &layer.diff_id, blob, parent, reference)?;
    store.commit(
        st,
        Kind::Image,
        Some(LayerBlob {
            descriptor: layer.desc,
            diff_id: layer.diff_id,
        }),
    )
}

/// Unpacks the layer blob `blob` (`desc`) over `parent` into a staging snapshot,
/// checking that its uncompressed content is `diff_id`: another layer must never
/// be passed off under a diff_id, since later pulls and imports find snapshots
/// by chain id. `source` names where the layer came from in errors.
pub(crate) fn unpack_verified(
    store: &snapshot::Store,
    desc: &kiln_oci::Descriptor,
    diff_id: &str,
    blob: &Path,
    parent: Option<&str>,
    source: &str,
) -> Result<snapshot::Staging> {
    let st = store.prepare(parent)?;
    let m = store.mount_rw(&st)?;
    let layer_err = |source| Error::Layer {
        digest: desc.digest.clone(),
        source,
    };
    let f = std::fs::File::open(blob).map_err(Error::io("open", blob))?;
    if desc.digest == diff_id {
        // an uncompressed layer: the content store checked its digest, which is
        // its diff_id, when the blob was written
        let mut f = std::io::BufReader::with_capacity(1 << 20, f);
        kiln_oci::layer::apply(&mut f, m.path()).map_err(layer_err)?;
        m.unmount()?;
        return Ok(st);
    }
    let reader = kiln_oci::layer::decompress(f).map_err(layer_err)?;
    let mut hashed = kiln_digest::DigestReader::new(reader);
    kiln_oci::layer::apply(&mut hashed, m.path()).map_err(layer_err)?;
    let (content, _) = hashed
        .finish()
        .map_err(|source| layer_err(kiln_oci::Error::ReadLayer { source }))?;
    if content != diff_id {
        return Err(Error::Image {
            reference: source.to_string(),
            reason: format!(
                "layer {} holds content {content}, but the config's rootfs.diff_ids names {diff_id}",
                desc.digest
            ),
        });
    }
    m.unmount()?;
    Ok(st)
}

/// Reads blob `desc` from the client's content store `store` into `dest`,
/// checking its size and digest.
async fn fetch_from_session(
    client: &kiln_session::SessionClient,
    store: &str,
    desc: &kiln_oci::Descriptor,
    dest: &Path,
) -> Result<()> {
    use std::io::Write as _;
    let file = std::fs::File::create(dest).map_err(Error::io("create", dest))?;
    let mut out = kiln_digest::DigestWriter::new(std::io::BufWriter::new(file));
    client
        .content_read(store, &desc.digest, desc.size, |b| {
            out.write_all(b)
                .map_err(|e| kiln_session::Error::Protocol(format!("write blob: {e}")))
        })
        .await
        .map_err(|source| Error::CacheSession {
            op: "read a blob of the client's content store",
            source,
        })?;
    let (w, digest, size) = out.finish();
    w.into_inner()
        .map_err(|e| Error::io("write", dest)(e.into_error()))?;
    if digest != desc.digest || size != desc.size {
        return Err(Error::Image {
            reference: store.to_string(),
            reason: format!(
                "blob {} holds {digest} ({size} bytes), expected {} bytes",
                desc.digest, desc.size
            ),
        });
    }
    Ok(())
}

/// Downloads one layer blob to `blob` (through a temp file), with progress events.
async fn fetch_layer(
    from: &BlobSource,
    desc: &kiln_oci::Descriptor,
    blob: &Path,
    events: &mpsc::Sender<Event>,
) -> Result<()> {
    let total = desc.size as i64;
    let _ = events
        .send(Event::Progress {
            id: desc.digest.clone(),
            current: 0,
            total,
            completed: false,
        })
        .await;
    let tmp = blob.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    let fetched = match from {
        BlobSource::Registry {
            registry,
            reference,
        } => registry
            .fetch_blob(reference, desc, &tmp)
            .await
            .map_err(|source| Error::Registry {
                reference: reference.to_string(),
                source,
            }),
        BlobSource::Session { client, store } => {
            fetch_from_session(client, store, desc, &tmp).await
        }
    };
    if let Err(e) = fetched {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, blob).map_err(Error::io("rename", blob))?;
    let _ = events
        .send(Event::Progress {
            id: desc.digest.clone(),
            current: total,
            total,
            completed: true,
        })
        .await;
    Ok(())
}
