//! Cache mounts carried in a build cache (`--export-cache …,cache-mounts=true`
//! and `--import-cache …,cache-mounts=true`): `kiln-cachemount-export://ID`
//! makes a snapshot of cache mount ID's content (its shared instance), which
//! the exporter writes as a layer; `kiln-cachemount-import://ID` pulls such a
//! layer (as a `kiln-cache://` source does) and seeds cache mount ID with it
//! when this worker's is empty. Only the scheduler makes these ops (it
//! refuses them from clients).

use crate::cachemount::Sharing;
use crate::error::{Error, Result};
use crate::fscopy::{self, CopyOpts};
use crate::snapshot::Kind;
use crate::{Event, Worker};
use std::collections::BTreeMap;
use tokio::sync::mpsc;

use kiln_oci::cache_config::sources::MOUNT_REPOSITORY_ATTR as REPOSITORY_ATTR;

/// A snapshot of cache mount `id`, taken while no step writes to it.
pub(super) async fn export(w: &Worker, id: &str) -> Result<Option<String>> {
    let lease = w.cache_mounts.acquire(id, None, Sharing::Locked).await?;
    let (store, dir) = (w.store().clone(), lease.dir().to_path_buf());
    let snapshot = tokio::task::spawn_blocking(move || {
        let st = store.prepare(None)?;
        fscopy::copy_entry(&dir, &st.diff(), &CopyOpts::default())
            .map_err(Error::io("snapshot cache mount", &dir))?;
        store.commit(st, Kind::Built, None)
    })
    .await??;
    drop(lease);
    Ok(Some(snapshot))
}

/// Pulls the layer and seeds cache mount `id` with it unless it holds files.
pub(super) async fn import(
    w: &Worker,
    id: &str,
    attrs: &BTreeMap<String, String>,
    session_id: &str,
    events: &mpsc::Sender<Event>,
) -> Result<Option<String>> {
    let repository = attrs.get(REPOSITORY_ATTR).ok_or_else(|| Error::Image {
        reference: id.to_string(),
        reason: format!("cache mount import without {REPOSITORY_ATTR}"),
    })?;
    let snapshot = super::image::cache_layers(w, repository, attrs, session_id, events).await?;
    let lease = w.cache_mounts.acquire(id, None, Sharing::Locked).await?;
    let dir = lease.dir().to_path_buf();
    let empty = std::fs::read_dir(&dir)
        .map_err(Error::io("read cache mount", &dir))?
        .next()
        .is_none();
    if empty {
        let store = w.store().clone();
        let top = snapshot.clone();
        tokio::task::spawn_blocking(move || {
            let src = store.mount_ro(top.as_deref())?;
            fscopy::copy_entry(src.path(), &dir, &CopyOpts::default())
                .map_err(Error::io("seed cache mount", &dir))?;
            src.unmount()
        })
        .await??;
    }
    drop(lease);
    Ok(snapshot)
}
