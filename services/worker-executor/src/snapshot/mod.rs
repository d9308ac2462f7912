//! The snapshot store: immutable filesystem layers chained by parent id.
//!
//! Layout under the worker root:
//! * `snapshots/<id>/{diff,meta.json}`: committed snapshots (immutable; the
//!   `layers` memo in meta.json is the only thing ever rewritten);
//! * `staging/<id>/{diff,work}`: snapshots being written. A staging dir is renamed into
//!   `snapshots/` only after its meta.json is complete, so a crash never leaves a half
//!   snapshot visible; leftovers are removed when the store opens.

pub mod overlay;

use crate::error::{Error, Result};
pub use overlay::{Mounted, Upper};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a snapshot's content came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An image layer unpacked from a registry blob.
    Image,
    /// The diff of an exec or file op.
    Built,
    /// A copy of a client's local directory.
    Local,
}

/// A compressed layer blob in the content store and the digest of its uncompressed tar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerBlob {
    pub descriptor: kiln_oci::Descriptor,
    pub diff_id: String,
}

/// meta.json of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub parent: Option<String>,
    pub kind: Kind,
    /// For image layers: the blob the layer was unpacked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<LayerBlob>,
    /// Memoized layer blobs of this snapshot's diff by compression; `None` = empty diff.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, Option<LayerBlob>>,
    /// Digest of the content (see `contenthash`) where the op's definition
    /// does not determine it (local sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_key: Option<String>,
}

/// A snapshot being written: its `diff` dir is an overlay upper (or a plain dir).
#[derive(Debug)]
pub struct Staging {
    id: String,
    dir: PathBuf,
    committed: bool,
    /// recorded in the snapshot's metadata at commit
    pub content_key: Option<String>,
}

impl Staging {
    pub fn diff(&self) -> PathBuf {
        self.dir.join("diff")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "remove staging snapshot");
        }
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    snapshots: PathBuf,
    staging: PathBuf,
    mnt: PathBuf,
}

/// Checks that a ref is a snapshot id we could have produced (no path tricks).
pub fn check_id(id: &str) -> Result<()> {
    if uuid::Uuid::parse_str(id).is_ok() && !id.contains('/') {
        Ok(())
    } else {
        Err(Error::InvalidRef { id: id.to_string() })
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    let mut f = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename", path))
}

impl Store {
    /// Opens (creating) the store under `root` and discards unfinished snapshots, and
    /// the mounts a killed worker left under `root`.
    pub fn open(root: &Path) -> Result<Store> {
        let s = Store {
            snapshots: root.join("snapshots"),
            staging: root.join("staging"),
            mnt: root.join("mnt"),
        };
        overlay::unmount_all_under(root);
        if let Ok(rd) = std::fs::read_dir(&s.mnt) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if s.staging.exists() {
            std::fs::remove_dir_all(&s.staging).map_err(Error::io("clear staging", &s.staging))?;
        }
        for d in [&s.snapshots, &s.staging, &s.mnt] {
            std::fs::create_dir_all(d).map_err(Error::io("create", d))?;
        }
        Ok(s)
    }

    /// Starts a new snapshot.
    pub fn prepare(&self) -> Result<Staging> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.staging.join(&id);
        let st = Staging {
            id,
            dir,
            committed: false,
            content_key: None,
        };
        for d in [st.diff(), st.work()] {
            std::fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        Ok(st)
    }

    /// Makes a staging snapshot immutable and visible. Its mounts must be gone.
    pub fn commit(
        &self,
        mut staging: Staging,
        parent: Option<&str>,
        kind: Kind,
        blob: Option<LayerBlob>,
    ) -> Result<String> {
        let work = staging.work();
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(Error::io("remove workdir", &work))?;
        }
        let meta = Meta {
            id: staging.id.clone(),
            parent: parent.map(str::to_string),
            kind,
            blob,
            layers: BTreeMap::new(),
            content_key: staging.content_key.take(),
        };
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|source| Error::SnapshotMeta {
            id: meta.id.clone(),
            source,
        })?;
        write_atomic(&staging.dir.join("meta.json"), &bytes)?;
        let dest = self.snapshots.join(&staging.id);
        std::fs::rename(&staging.dir, &dest).map_err(Error::io("commit snapshot", &dest))?;
        staging.committed = true;
        Ok(staging.id.clone())
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.snapshots.join(id)
    }

    pub fn diff_dir(&self, id: &str) -> PathBuf {
        self.snapshots.join(id).join("diff")
    }

    pub fn meta(&self, id: &str) -> Result<Meta> {
        check_id(id)?;
        let p = self.dir(id).join("meta.json");
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound { id: id.to_string() });
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "read",
                    path: p,
                    source: e,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|source| Error::SnapshotMeta {
            id: id.to_string(),
            source,
        })
    }

    /// Rewrites a committed snapshot's meta.json (only the memo fields may change).
    pub fn update_meta(&self, meta: &Meta) -> Result<()> {
        check_id(&meta.id)?;
        let bytes = serde_json::to_vec_pretty(meta).map_err(|source| Error::SnapshotMeta {
            id: meta.id.clone(),
            source,
        })?;
        write_atomic(&self.dir(&meta.id).join("meta.json"), &bytes)
    }

    /// The chain ending at `top`, top first. `None` (scratch) is the empty chain.
    pub fn chain(&self, top: Option<&str>) -> Result<Vec<Meta>> {
        let mut out = Vec::new();
        let mut next = top.map(str::to_string);
        while let Some(id) = next {
            let m = self.meta(&id)?;
            next = m.parent.clone();
            out.push(m);
        }
        Ok(out)
    }

    fn lowers(&self, top: Option<&str>) -> Result<Vec<PathBuf>> {
        Ok(self
            .chain(top)?
            .iter()
            .map(|m| self.diff_dir(&m.id))
            .collect())
    }

    /// Mounts the chain ending at `top` read-only.
    pub fn mount_ro(&self, top: Option<&str>) -> Result<Mounted> {
        overlay::mount(&self.mnt, &self.lowers(top)?, None)
    }

    /// Mounts the chain ending at `parent` with `staging` as the writable upper.
    pub fn mount_rw(&self, parent: Option<&str>, staging: &Staging) -> Result<Mounted> {
        let (diff, work) = (staging.diff(), staging.work());
        overlay::mount(
            &self.mnt,
            &self.lowers(parent)?,
            Some(Upper {
                diff: &diff,
                work: &work,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_chain_shows_upper_over_lower_and_records_whiteouts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let s1 = store.prepare().expect("prepare");
        std::fs::write(s1.diff().join("a"), "1").expect("write");
        std::fs::write(s1.diff().join("b"), "1").expect("write");
        let id1 = store.commit(s1, None, Kind::Built, None).expect("commit");

        let s2 = store.prepare().expect("prepare");
        let m = store.mount_rw(Some(&id1), &s2).expect("mount");
        assert_eq!(
            std::fs::read_to_string(m.path().join("a")).expect("read"),
            "1"
        );
        std::fs::write(m.path().join("a"), "2").expect("write");
        std::fs::remove_file(m.path().join("b")).expect("rm");
        m.unmount().expect("unmount");
        let upper = s2.diff();
        use std::os::unix::fs::FileTypeExt;
        let wh = std::fs::symlink_metadata(upper.join("b")).expect("whiteout");
        assert!(wh.file_type().is_char_device());
        let id2 = store
            .commit(s2, Some(&id1), Kind::Built, None)
            .expect("commit");
        assert!(!upper.exists(), "staging dir moved away");

        let ro = store.mount_ro(Some(&id2)).expect("mount ro");
        assert_eq!(
            std::fs::read_to_string(ro.path().join("a")).expect("read"),
            "2"
        );
        assert!(!ro.path().join("b").exists());
        assert!(
            std::fs::write(ro.path().join("c"), "x").is_err(),
            "read-only"
        );
        let single = store.mount_ro(Some(&id1)).expect("bind ro");
        assert!(
            std::fs::write(single.path().join("c"), "x").is_err(),
            "read-only bind"
        );
        assert_eq!(store.chain(Some(&id2)).expect("chain").len(), 2);
    }

    #[test]
    fn uncommitted_snapshots_vanish() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let s = store.prepare().expect("prepare");
        let dir = s.diff();
        drop(s);
        assert!(!dir.exists());
        assert!(matches!(
            store.meta("../etc"),
            Err(Error::InvalidRef { .. })
        ));
    }
}
