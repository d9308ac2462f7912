//! Snapshot existence, disk usage and pruning: what the solver's cache
//! records need from the worker. The worker keeps no cache index itself;
//! the solver says which refs are still wanted.
//!
//! Cache-mount instances (`RUN --mount=type=cache`) are listed and pruned
//! alongside snapshots under ids `cachemount:<key>/<n>`.

use crate::Worker;
use crate::error::{Error, Result};
use crate::snapshot::{Kind, Meta, Store, chain_depth};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Disk usage of one snapshot's own diff.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotUsage {
    pub id: String,
    pub parent: Option<String>,
    pub kind: Kind,
    /// bytes on disk (allocated blocks) of the snapshot: its diff and metadata
    pub size: i64,
    /// unix nanoseconds of the commit (of the last change, for a cache mount)
    pub created: i64,
    /// `Some(cache id)` when this is a cache-mount instance, not a snapshot
    pub cache_mount: Option<String>,
}

/// Prefix of the ids of cache-mount instances.
pub const CACHE_MOUNT_PREFIX: &str = "cachemount:";

fn mtime(p: &Path) -> i64 {
    std::fs::symlink_metadata(p)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Every cache-mount instance under `root` (`<key>/<n>/data`). The first
/// instance of a key also counts the key dir itself and its `id` file, so
/// the sizes add up to the dir's disk use.
fn cache_mount_usage(root: &Path) -> Vec<SnapshotUsage> {
    let mut out = Vec::new();
    let Ok(keys) = std::fs::read_dir(root) else {
        return out;
    };
    for k in keys.flatten() {
        let key = k.file_name().to_string_lossy().into_owned();
        let kdir = k.path();
        let id = std::fs::read_to_string(kdir.join("id")).unwrap_or_else(|_| key.clone());
        let own: i64 = [kdir.clone(), kdir.join("id")]
            .iter()
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .map(|m| (m.blocks() * 512) as i64)
            .sum();
        let Ok(insts) = std::fs::read_dir(&kdir) else {
            continue;
        };
        let mut first = true;
        let mut ns: Vec<(usize, std::path::PathBuf)> = insts
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
            .collect();
        ns.sort();
        for (n, dir) in ns {
            let data = dir.join("data");
            out.push(SnapshotUsage {
                id: format!("{CACHE_MOUNT_PREFIX}{key}/{n}"),
                parent: None,
                kind: Kind::Built,
                size: disk_size(&dir) + if first { own } else { 0 },
                created: mtime(&data).max(mtime(&dir)),
                cache_mount: Some(id.clone()),
            });
            first = false;
        }
    }
    out
}

/// Snapshots (listed or removed) and content-store bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub snapshots: Vec<SnapshotUsage>,
    pub blobs_size: i64,
}

fn created(dir: &Path) -> i64 {
    std::fs::metadata(dir.join("meta.json"))
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Allocated bytes of `dir` and everything under it, each inode once.
fn disk_size(dir: &Path) -> i64 {
    size_from(dir, 0, &mut HashSet::new())
}

/// Allocated bytes of the entries under `dir` (not `dir` itself).
fn contents_size(dir: &Path) -> i64 {
    size_from(dir, 1, &mut HashSet::new())
}

/// Allocated bytes under `dir`, skipping hard-linked inodes already in `seen`
/// (snapshots share files with each other: context copies and plain COPYs
/// are hard links).
fn size_from(dir: &Path, min_depth: usize, seen: &mut HashSet<(u64, u64)>) -> i64 {
    let mut total = 0i64;
    for e in walkdir::WalkDir::new(dir)
        .min_depth(min_depth)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        total += (md.blocks() * 512) as i64;
    }
    total
}

/// Allocated bytes of a committed snapshot: kiln's dir (meta.json, `diff`) and, on the
/// containerd backend, containerd's dir of it (the overlayfs snapshotter's `<n>/`,
/// holding `fs`, which `diff` links to, and the overlay's `work`).
fn snapshot_size(store: &Store, m: &Meta, seen: &mut HashSet<(u64, u64)>) -> i64 {
    let own = size_from(&store.dir(&m.id), 0, seen);
    let Some(c) = &m.containerd else {
        return own;
    };
    let theirs = match c.dir.parent() {
        Some(p) if c.dir.file_name().is_some_and(|n| n == "fs") => p,
        _ => c.dir.as_path(),
    };
    own + size_from(theirs, 0, seen)
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Image => "image",
        Kind::Built => "built",
        Kind::Local => "local",
    }
}

impl SnapshotUsage {
    pub fn kind_name(&self) -> &'static str {
        if self.cache_mount.is_some() {
            return "cachemount";
        }
        kind_name(self.kind)
    }
}

/// One entry an op reads (see [`Worker::path_entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry {
    pub path: String,
    pub content: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

fn file_digest(p: &Path) -> Result<String> {
    let f = std::fs::File::open(p).map_err(Error::io("open", p))?;
    let (digest, _) = kiln_digest::DigestReader::new(f)
        .finish()
        .map_err(Error::io("read", p))?;
    Ok(digest)
}

/// Every entry under `root` that `selectors` reach (a wildcard matches
/// against paths under root), with content digests. Never leaves `root`.
pub fn entries_under(
    root: &Path,
    selectors: &[crate::contenthash::Selector],
) -> Result<Vec<PathEntry>> {
    let mut out = std::collections::BTreeMap::new();
    for sel in selectors {
        let full = if sel.path.starts_with('/') {
            sel.path.clone()
        } else {
            format!("/{}", sel.path)
        };
        let starts: Vec<String> = if sel.wildcard && crate::wildcard::has_wildcards(&full) {
            crate::wildcard::expand(root, &full)?
        } else {
            vec![full]
        };
        for start in starts {
            let Ok(p) = crate::rootpath::resolve(root, &start, sel.follow_links) else {
                continue;
            };
            if p.symlink_metadata().is_err() {
                continue;
            }
            for e in walkdir::WalkDir::new(&p).into_iter().filter_map(|e| e.ok()) {
                let Ok(md) = e.path().symlink_metadata() else {
                    continue;
                };
                let rel = e.path().strip_prefix(root).unwrap_or(e.path());
                let path = format!("/{}", rel.to_string_lossy());
                let content = if md.file_type().is_file() {
                    file_digest(e.path())?
                } else if md.file_type().is_symlink() {
                    std::fs::read_link(e.path())
                        .map(|t| format!("link:{}", t.to_string_lossy()))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                out.insert(
                    path.clone(),
                    PathEntry {
                        path,
                        content,
                        mode: md.mode(),
                        uid: md.uid(),
                        gid: md.gid(),
                    },
                );
            }
        }
    }
    Ok(out.into_values().collect())
}

impl Worker {
    /// The entries of ref `r` that `selectors` reach, each with its content
    /// digest, mode and owner: what a cache-miss explanation compares.
    pub async fn path_entries(
        &self,
        r: Option<&str>,
        selectors: Vec<crate::contenthash::Selector>,
    ) -> Result<Vec<PathEntry>> {
        let top = r.map(str::to_string);
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || {
            let m = store.mount_ro(top.as_deref())?;
            let entries = entries_under(m.path(), &selectors);
            m.unmount()?;
            entries
        })
        .await?
    }

    /// Whether each ref and its whole parent chain are committed here.
    pub fn exists(&self, refs: &[String]) -> Vec<bool> {
        refs.iter().map(|r| self.store().chain_exists(r)).collect()
    }

    fn all_metas(&self) -> Result<Vec<Meta>> {
        let dir = self.config().root.join("snapshots");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(Error::io("read dir", &dir))? {
            let e = e.map_err(Error::io("read dir", &dir))?;
            let id = e.file_name().to_string_lossy().into_owned();
            match self.store().meta(&id) {
                Ok(m) => out.push(m),
                Err(err) => {
                    tracing::warn!(snapshot = %id, error = %kiln_proto::status::Chain(&err), "skipping unreadable snapshot")
                }
            }
        }
        Ok(out)
    }

    fn blobs_dir(&self) -> std::path::PathBuf {
        self.config().root.join("content/blobs/sha256")
    }

    fn cache_mounts_dir(&self) -> std::path::PathBuf {
        self.config().root.join("cache-mounts")
    }

    /// Disk usage of `refs` (every snapshot and cache-mount instance when
    /// empty) and of the blob store.
    pub async fn usage(&self, refs: &[String]) -> Result<Usage> {
        let metas: Vec<Meta> = if refs.is_empty() {
            self.all_metas()?
        } else {
            refs.iter()
                .filter_map(|r| self.store().meta(r).ok())
                .collect()
        };
        let store = self.store().clone();
        let blobs = self.blobs_dir();
        let mounts = refs.is_empty().then(|| self.cache_mounts_dir());
        tokio::task::spawn_blocking(move || {
            // a file shared by several snapshots counts once, for the oldest
            let mut metas: Vec<(i64, Meta)> = metas
                .into_iter()
                .map(|m| (created(&store.dir(&m.id)), m))
                .collect();
            metas.sort_by_key(|(c, _)| *c);
            let mut seen = HashSet::new();
            let mut snapshots: Vec<SnapshotUsage> = metas
                .into_iter()
                .map(|(created, m)| SnapshotUsage {
                    size: snapshot_size(&store, &m, &mut seen),
                    created,
                    id: m.id,
                    parent: m.parent,
                    kind: m.kind,
                    cache_mount: None,
                })
                .collect();
            if let Some(dir) = mounts {
                snapshots.extend(cache_mount_usage(&dir));
            }
            Ok(Usage {
                snapshots,
                blobs_size: contents_size(&blobs),
            })
        })
        .await?
    }

    /// Removes every snapshot committed before `before` (unix ns; 0 = now)
    /// that neither `keep` nor a newer snapshot reaches through its parents,
    /// and blobs no remaining snapshot names. A snapshot is first renamed
    /// into `staging/` (cleared at start), so a crash never leaves half of
    /// one visible. Cache-mount instances not in `keep` go too, unless a
    /// running step holds them. Returns what was removed.
    pub async fn prune(&self, keep: &[String], before: i64) -> Result<Usage> {
        let mut removed_mounts = self.prune_cache_mounts(keep).await?;
        let mut u = self.prune_snapshots(keep, before).await?;
        u.snapshots.append(&mut removed_mounts);
        Ok(u)
    }

    async fn prune_cache_mounts(&self, keep: &[String]) -> Result<Vec<SnapshotUsage>> {
        let root = self.cache_mounts_dir();
        let staging = self.config().root.join("staging");
        let listed = {
            let r = root.clone();
            tokio::task::spawn_blocking(move || cache_mount_usage(&r)).await?
        };
        let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
        let mut removed = Vec::new();
        for m in listed.into_iter().filter(|m| !keep.contains(m.id.as_str())) {
            let Some((key, n)) =
                m.id.strip_prefix(CACHE_MOUNT_PREFIX)
                    .and_then(|s| s.split_once('/'))
                    .and_then(|(k, n)| Some((k.to_string(), n.parse::<usize>().ok()?)))
            else {
                continue;
            };
            // a running step holds it: it stays
            let Some(_hold) = self.cache_mounts.try_hold(&key, n) else {
                continue;
            };
            let dir = root.join(&key).join(n.to_string());
            let gone = staging.join(format!("pruned-cache-{key}-{n}"));
            std::fs::rename(&dir, &gone).map_err(Error::io("prune cache mount", &dir))?;
            std::fs::remove_dir_all(&gone).map_err(Error::io("remove", &gone))?;
            // the key dir goes with its last instance
            let kdir = root.join(&key);
            let empty = std::fs::read_dir(&kdir)
                .map(|d| d.flatten().all(|e| e.file_name() == "id"))
                .unwrap_or(false);
            if empty {
                let _ = std::fs::remove_dir_all(&kdir);
            }
            removed.push(m);
        }
        Ok(removed)
    }

    async fn prune_snapshots(&self, keep: &[String], before: i64) -> Result<Usage> {
        let before = if before <= 0 { i64::MAX } else { before };
        let metas = self.all_metas()?;
        let store = self.store().clone();
        let blobs = self.blobs_dir();
        let keep: Vec<String> = keep.to_vec();
        tokio::task::spawn_blocking(move || {
            let by_id: HashMap<&str, &Meta> = metas.iter().map(|m| (m.id.as_str(), m)).collect();
            let mut live: HashSet<String> = HashSet::new();
            let roots = keep.iter().cloned().chain(
                metas
                    .iter()
                    .filter(|m| created(&store.dir(&m.id)) >= before)
                    .map(|m| m.id.clone()),
            );
            for r in roots {
                let mut next = Some(r);
                while let Some(id) = next {
                    if !live.insert(id.clone()) {
                        break;
                    }
                    next = by_id.get(id.as_str()).and_then(|m| m.parent.clone());
                }
            }
            // children before their parents (containerd refuses the other order)
            let parent_of = |id: &str| by_id.get(id).and_then(|m| m.parent.as_deref());
            let mut doomed: Vec<(usize, &Meta)> = metas
                .iter()
                .filter(|m| !live.contains(&m.id))
                .map(|m| (chain_depth(&m.id, parent_of, by_id.len()), m))
                .collect();
            doomed.sort_by_key(|d| std::cmp::Reverse(d.0));
            let mut removed = Vec::new();
            for (_, m) in doomed {
                let dir = store.dir(&m.id);
                let usage = SnapshotUsage {
                    id: m.id.clone(),
                    parent: m.parent.clone(),
                    kind: m.kind,
                    size: snapshot_size(&store, m, &mut HashSet::new()),
                    created: created(&dir),
                    cache_mount: None,
                };
                if store.remove(&m.id)? {
                    removed.push(usage);
                } else {
                    // a step running on it holds it: it stays, with its blobs
                    live.insert(m.id.clone());
                }
            }
            let mut wanted: HashSet<String> = HashSet::new();
            for m in metas.iter().filter(|m| live.contains(&m.id)) {
                wanted.extend(m.blob.iter().map(|b| b.descriptor.digest.to_string()));
                wanted.extend(
                    m.layers
                        .values()
                        .flatten()
                        .map(|b| b.descriptor.digest.to_string()),
                );
            }
            let mut blobs_removed = 0i64;
            if let Ok(rd) = std::fs::read_dir(&blobs) {
                for e in rd.flatten() {
                    let digest = format!("sha256:{}", e.file_name().to_string_lossy());
                    let Ok(md) = e.metadata() else { continue };
                    let mtime = md
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos() as i64);
                    if wanted.contains(&digest) || mtime.is_none_or(|t| t >= before) {
                        continue;
                    }
                    if std::fs::remove_file(e.path()).is_ok() {
                        blobs_removed += (md.blocks() * 512) as i64;
                    }
                }
            }
            Ok(Usage {
                snapshots: removed,
                blobs_size: blobs_removed,
            })
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::{snapshot, worker};

    #[tokio::test]
    async fn files_shared_by_snapshots_count_once_in_usage() {
        let (_tmp, w) = worker();
        let a = snapshot(&w, None, |d| {
            std::fs::write(d.join("big"), vec![7u8; 1 << 20]).expect("write")
        });
        let a_file = w.store().diff_dir(&a).join("big");
        // b is created strictly later (timestamps are coarse)
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = snapshot(&w, None, |d| {
            std::fs::hard_link(&a_file, d.join("big")).expect("link")
        });
        let u = w.usage(&[]).await.expect("usage");
        let size = |id: &str| {
            u.snapshots
                .iter()
                .find(|s| s.id == id)
                .map(|s| s.size)
                .expect("listed")
        };
        assert!(size(&a) >= 1 << 20, "the oldest holder counts the file");
        assert!(
            size(&b) < 1 << 20,
            "the second holder does not count it again"
        );
        // each alone still owns its whole size
        let alone = w.usage(std::slice::from_ref(&b)).await.expect("usage");
        assert!(alone.snapshots[0].size >= 1 << 20);
    }

    #[tokio::test]
    async fn prune_keeps_what_kept_refs_reach_and_removes_the_rest() {
        let (_tmp, w) = worker();
        let base = snapshot(&w, None, |d| {
            std::fs::write(d.join("base"), vec![1u8; 10_000]).expect("write")
        });
        let kept = snapshot(&w, Some(&base), |d| {
            std::fs::write(d.join("kept"), "k").expect("write")
        });
        let dropped = snapshot(&w, Some(&base), |d| {
            std::fs::write(d.join("gone"), vec![2u8; 20_000]).expect("write")
        });
        assert_eq!(
            w.exists(&[kept.clone(), dropped.clone(), "nope".into()]),
            [true, true, false]
        );
        let u = w.usage(&[]).await.expect("usage");
        assert_eq!(u.snapshots.len(), 3);
        assert!(
            u.snapshots
                .iter()
                .find(|s| s.id == dropped)
                .expect("listed")
                .size
                >= 20_000
        );
        // everything is newer than `before`: nothing goes
        let none = w.prune(&[], 1).await.expect("prune");
        assert!(none.snapshots.is_empty());
        let removed = w
            .prune(std::slice::from_ref(&kept), 0)
            .await
            .expect("prune");
        assert_eq!(
            removed
                .snapshots
                .iter()
                .map(|s| s.id.clone())
                .collect::<Vec<_>>(),
            std::slice::from_ref(&dropped)
        );
        assert_eq!(
            w.exists(&[kept.clone(), base.clone(), dropped]),
            [true, true, false]
        );
        let all = w.prune(&[], 0).await.expect("prune all");
        assert_eq!(all.snapshots.len(), 2);
        assert_eq!(w.exists(&[kept]), [false]);
    }

    #[test]
    fn entries_list_what_selectors_reach_with_content_mode_and_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let r = tmp.path();
        std::fs::create_dir_all(r.join("src/sub")).expect("mkdir");
        std::fs::write(r.join("src/a.txt"), "a").expect("write");
        std::fs::write(r.join("src/sub/b.txt"), "b").expect("write");
        std::fs::write(r.join("other.txt"), "o").expect("write");
        std::fs::set_permissions(r.join("src/a.txt"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let sel = |p: &str, wildcard: bool| crate::contenthash::Selector {
            path: p.into(),
            wildcard,
            follow_links: false,
        };
        let e = super::entries_under(r, &[sel("/src", false)]).expect("entries");
        let paths: Vec<&str> = e.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths, ["/src", "/src/a.txt", "/src/sub", "/src/sub/b.txt"]);
        let a = &e[1];
        assert_eq!(a.mode & 0o777, 0o600);
        assert!(a.content.starts_with("sha256:ca978112"), "{a:?}");
        let w = super::entries_under(r, &[sel("/*.txt", true)]).expect("entries");
        assert_eq!(
            w.iter().map(|x| x.path.as_str()).collect::<Vec<_>>(),
            ["/other.txt"]
        );
        assert!(
            super::entries_under(r, &[sel("/missing", false)])
                .expect("entries")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn cache_mounts_are_listed_and_pruned_unless_held() {
        use crate::cachemount::Sharing;
        let (_tmp, w) = worker();
        let lease = w
            .cache_mounts
            .acquire("/root/.cache", None, Sharing::Locked)
            .await
            .expect("acquire");
        std::fs::write(lease.dir().join("f"), vec![3u8; 50_000]).expect("write");
        let u = w.usage(&[]).await.expect("usage");
        let m = u
            .snapshots
            .iter()
            .find(|s| s.cache_mount.is_some())
            .expect("cache mount listed");
        assert_eq!(m.kind_name(), "cachemount");
        assert_eq!(m.cache_mount.as_deref(), Some("/root/.cache"));
        assert!(m.size >= 50_000, "{m:?}");
        // held by a running step: it stays
        let r = w.prune(&[], 0).await.expect("prune");
        assert!(r.snapshots.is_empty());
        drop(lease);
        // kept by the caller: it stays
        let r = w
            .prune(std::slice::from_ref(&m.id), 0)
            .await
            .expect("prune");
        assert!(r.snapshots.is_empty());
        let r = w.prune(&[], 0).await.expect("prune");
        assert_eq!(r.snapshots.len(), 1);
        let u = w.usage(&[]).await.expect("usage");
        assert!(u.snapshots.is_empty(), "{u:?}");
    }
}
