//! Source ops: `docker-image://` (pulled with kiln-registry, one snapshot per layer, cached
//! by chain id) and `local://` (synced from the client session, copied into a snapshot).

use crate::error::{Error, Result};
use crate::snapshot::{self, Kind, LayerBlob};
use crate::{Event, Worker, fscopy, pb};
use sha2::Digest;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

pub async fn run(
    w: &Worker,
    s: &pb::SourceOp,
    platform: Option<&pb::Platform>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    if let Some(r) = s.identifier.strip_prefix("docker-image://") {
        image(w, r, platform, events).await
    } else if let Some(name) = s.identifier.strip_prefix("local://") {
        local(w, name, &s.attrs, session_id).await.map(Some)
    } else {
        Err(Error::UnsupportedSource {
            identifier: s.identifier.clone(),
        })
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn oci_platform(p: Option<&pb::Platform>) -> kiln_oci::Platform {
    match p.filter(|p| !p.os.is_empty() && !p.architecture.is_empty()) {
        Some(p) => kiln_oci::Platform::new(
            &p.os,
            &p.architecture,
            Some(p.variant.as_str()).filter(|v| !v.is_empty()),
        ),
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

/// Pulls and unpacks an image; returns the top layer's snapshot (`None` for no layers).
pub async fn image(
    w: &Worker,
    r: &str,
    platform: Option<&pb::Platform>,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let reg = |source| Error::Registry {
        reference: r.to_string(),
        source,
    };
    let reference = kiln_registry::Reference::parse(r).map_err(reg)?;
    let plat = oci_platform(platform);
    let _pull = w.pull_lock.lock().await;
    let resolved = w.registry.resolve(&reference, &plat).await.map_err(reg)?;
    let ids = diff_ids(&resolved.config).ok_or_else(|| Error::Image {
        reference: r.to_string(),
        reason: "config has no rootfs.diff_ids".into(),
    })?;
    let layers = resolved.manifest.layers.clone();
    if ids.len() != layers.len() {
        return Err(Error::Image {
            reference: r.to_string(),
            reason: format!("{} layers but {} diff_ids", layers.len(), ids.len()),
        });
    }
    let store = w.store().clone();
    let mut parent: Option<String> = None;
    let mut chain_id: Option<String> = None;
    for (desc, diff_id) in layers.into_iter().zip(ids) {
        let cid = match &chain_id {
            None => diff_id.clone(),
            Some(c) => format!("sha256:{}", sha256_hex(format!("{c} {diff_id}").as_bytes())),
        };
        chain_id = Some(cid.clone());
        let index = w
            .config()
            .root
            .join("image-layers")
            .join(cid.trim_start_matches("sha256:"));
        if let Ok(id) = std::fs::read_to_string(&index) {
            if store.meta(id.trim()).is_ok_and(|m| m.parent == parent) {
                parent = Some(id.trim().to_string());
                continue;
            }
        }
        let blob = w.blob_path(&desc.digest)?;
        if !blob.exists() {
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
            let res = w
                .registry
                .fetch_blob(&reference, &desc, &tmp)
                .await
                .map_err(reg);
            if let Err(e) = res {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, &blob).map_err(Error::io("rename", &blob))?;
            let _ = events
                .send(Event::Progress {
                    id: desc.digest.clone(),
                    current: total,
                    total,
                    completed: true,
                })
                .await;
        }
        let store = store.clone();
        let p = parent.clone();
        let id = tokio::task::spawn_blocking(move || -> Result<String> {
            let st = store.prepare()?;
            let m = store.mount_rw(p.as_deref(), &st)?;
            let layer = |source| Error::Layer {
                digest: desc.digest.clone(),
                source,
            };
            let f = std::fs::File::open(&blob).map_err(Error::io("open", &blob))?;
            let reader = kiln_oci::layer::decompress(f).map_err(layer)?;
            kiln_oci::layer::apply(reader, m.path()).map_err(layer)?;
            m.unmount()?;
            store.commit(
                st,
                p.as_deref(),
                Kind::Image,
                Some(LayerBlob {
                    descriptor: desc,
                    diff_id,
                }),
            )
        })
        .await??;
        snapshot::write_atomic(&index, id.as_bytes())?;
        parent = Some(id);
    }
    Ok(parent)
}

fn json_list(attrs: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>> {
    match attrs.get(key).filter(|v| !v.is_empty()) {
        None => Ok(Vec::new()),
        Some(v) => {
            serde_json::from_str(v).map_err(|e| Error::InvalidOp(format!("attr {key}: {e}")))
        }
    }
}

/// Syncs the client's local dir `name` into a persistent dir and snapshots a copy of it.
pub async fn local(
    w: &Worker,
    name: &str,
    attrs: &BTreeMap<String, String>,
    session_id: &str,
) -> Result<String> {
    let session = attrs
        .get("local.session")
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or(session_id);
    if session.is_empty() {
        return Err(Error::InvalidOp(format!(
            "local source {name:?} without a session"
        )));
    }
    let hint = attrs
        .get("local.sharedkeyhint")
        .map(String::as_str)
        .unwrap_or(name);
    let dir = w
        .config()
        .root
        .join("local")
        .join(sha256_hex(format!("{name}\0{hint}").as_bytes()));
    std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let lock = w.local_lock(&dir);
    let _guard = lock.lock().await;
    let opts = kiln_session::SyncOptions {
        include_patterns: json_list(attrs, "local.includepattern")?,
        exclude_patterns: json_list(attrs, "local.excludepatterns")?,
        follow_paths: json_list(attrs, "local.followpaths")?,
    };
    let sess = |source| Error::Session {
        name: name.to_string(),
        source,
    };
    let channel = kiln_session::dial::connect(&w.config().broker)
        .await
        .map_err(sess)?;
    kiln_session::SessionClient::new(channel, session.to_string())
        .sync_dir(name, &dir, &opts)
        .await
        .map_err(sess)?;
    let store = w.store().clone();
    tokio::task::spawn_blocking(move || {
        let mut st = store.prepare()?;
        fscopy::copy_entry(&dir, &st.diff(), &fscopy::CopyOpts::default())
            .map_err(Error::io("copy local dir", &dir))?;
        st.content_key = Some(crate::contenthash::tree(&st.diff())?);
        store.commit(st, None, Kind::Local, None)
    })
    .await?
}
