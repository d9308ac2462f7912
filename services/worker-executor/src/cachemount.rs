//! Persistent cache mounts (`RUN --mount=type=cache`): directories kept under
//! `<root>/cache-mounts/` by cache id, outliving builds and never part of a layer.
//!
//! Each id has numbered instances (`<key>/<n>/data`). `shared` mounts use
//! instance 0 concurrently; `locked` mounts wait for exclusive use of
//! instance 0; `private` mounts take any instance nobody is using, creating a
//! new one when all are busy.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// How concurrent users of one cache id share it (LLB's CacheSharingOpt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// All cache mounts of a worker.
#[derive(Debug)]
pub struct CacheMounts {
    root: PathBuf,
    instances: std::sync::Mutex<Instances>,
}

/// Locks of the cache-mount instances, by (cache key, instance number).
type Instances = HashMap<(String, usize), Arc<RwLock<()>>>;

#[derive(Debug)]
enum Hold {
    Shared(
        #[allow(dead_code, reason = "held, never read: the lock lasts while it does")]
        OwnedRwLockReadGuard<()>,
    ),
    Exclusive(
        #[allow(dead_code, reason = "held, never read: the lock lasts while it does")]
        OwnedRwLockWriteGuard<()>,
    ),
}

/// One use of a cache instance; the instance is free again when this drops.
#[derive(Debug)]
pub struct Lease {
    dir: PathBuf,
    fresh: bool,
    _hold: Hold,
}

impl Lease {
    /// The directory to mount.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the instance was just created (and should be seeded from the
    /// mount's input, if it has one).
    pub fn fresh(&self) -> bool {
        self.fresh
    }
}

impl CacheMounts {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CacheMounts {
            root: root.into(),
            instances: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn lock_of(&self, key: &str, n: usize) -> Arc<RwLock<()>> {
        let mut m = match self.instances.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry((key.to_string(), n)).or_default().clone()
    }

    fn open(&self, key: &str, n: usize, hold: Hold) -> Result<Lease> {
        let inst = self.root.join(key).join(n.to_string());
        let dir = inst.join("data");
        let fresh = !dir.exists();
        if fresh {
            std::fs::create_dir_all(&inst).map_err(Error::io("create cache mount", &inst))?;
            let tmp = inst.join(format!("data.tmp-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&tmp).map_err(Error::io("create cache mount", &tmp))?;
            std::fs::rename(&tmp, &dir).map_err(Error::io("create cache mount", &dir))?;
        }
        Ok(Lease {
            dir,
            fresh,
            _hold: hold,
        })
    }

    /// Exclusive hold of instance `n` of `key` if nobody uses it (for pruning).
    pub(crate) fn try_hold(&self, key: &str, n: usize) -> Option<OwnedRwLockWriteGuard<()>> {
        self.lock_of(key, n).try_write_owned().ok()
    }

    /// Takes cache `id` (with `base`, the ref it is seeded from, if any) for one run.
    pub async fn acquire(&self, id: &str, base: Option<&str>, sharing: Sharing) -> Result<Lease> {
        let name = match base {
            Some(b) => format!("{id}\0{b}"),
            None => id.to_string(),
        };
        let key = kiln_digest::sha256_hex(name.as_bytes());
        // the id, for `du` (the dir name is its digest)
        let id_file = self.root.join(&key).join("id");
        if !id_file.exists() {
            std::fs::create_dir_all(self.root.join(&key))
                .map_err(Error::io("create cache mount", &self.root))?;
            std::fs::write(&id_file, id).map_err(Error::io("write cache mount id", &id_file))?;
        }
        match sharing {
            Sharing::Shared => {
                let l = self.lock_of(&key, 0).read_owned().await;
                self.open(&key, 0, Hold::Shared(l))
            }
            Sharing::Locked => {
                let l = self.lock_of(&key, 0).write_owned().await;
                self.open(&key, 0, Hold::Exclusive(l))
            }
            Sharing::Private => {
                let mut n = 0;
                loop {
                    if let Ok(l) = self.lock_of(&key, n).try_write_owned() {
                        return self.open(&key, n, Hold::Exclusive(l));
                    }
                    n += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sharing_modes_pick_instances() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = CacheMounts::new(tmp.path());
        let a = c.acquire("x", None, Sharing::Shared).await.expect("a");
        assert!(a.fresh());
        std::fs::write(a.dir().join("f"), "1").expect("write");
        let b = c.acquire("x", None, Sharing::Shared).await.expect("b");
        assert_eq!(a.dir(), b.dir());
        assert!(!b.fresh());
        // private while instance 0 is in use: a new, empty instance
        let p = c.acquire("x", None, Sharing::Private).await.expect("p");
        assert_ne!(p.dir(), a.dir());
        assert!(!p.dir().join("f").exists());
        // locked waits until the shared users are gone
        let locked = c.acquire("x", None, Sharing::Locked);
        tokio::pin!(locked);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut locked)
                .await
                .is_err(),
            "locked must wait"
        );
        drop((a, b));
        let l = locked.await.expect("locked");
        assert_eq!(
            std::fs::read_to_string(l.dir().join("f")).expect("kept"),
            "1"
        );
        drop(l);
        // the same id seeded from another base is another cache
        let other = c
            .acquire("x", Some("base"), Sharing::Shared)
            .await
            .expect("o");
        assert!(other.fresh());
        drop(p);
        let p2 = c.acquire("x", None, Sharing::Private).await.expect("p2");
        assert!(
            p2.dir().join("f").exists(),
            "private reuses a free instance"
        );
    }
}
