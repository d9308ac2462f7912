//! Content digests of trees: what makes two local-source snapshots the same
//! for the cache, and what an op reading only some paths of its input
//! depends on ([`paths`]). Covers paths, file types, permission bits,
//! owners, sizes, file contents and symlink targets; not timestamps.
//!
//! A file's content counts through its sha256, so a [`FileSums`] table of
//! per-file digests lets a rehash skip every file that did not change: the
//! local source keeps one per synced directory ([`tree_cached`]) and lends it
//! to the snapshot made from that sync ([`SumTables::remember_snapshot`]), whose
//! checksums then read only what is new ([`paths_in`]).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What must be unchanged for a file's cached content digest to stand:
/// the same inode, size and mtime (nanoseconds).
///
/// No ctime: kiln's own hard links (a snapshot of a synced directory shares
/// its inodes) change it on every build. The tables are only kept for trees
/// kiln alone writes, and it never rewrites a file in place: a new content
/// is a new inode renamed over the path (the session receiver), so the inode
/// number at a path changes with its content. Owner and mode are not part of
/// the key because they are hashed from a fresh stat every time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

impl FileId {
    fn of(md: &std::fs::Metadata) -> FileId {
        FileId {
            ino: md.ino(),
            size: md.len(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        }
    }
}

/// One file of a [`FileSums`]: its relative path, identity and content digest.
type SumEntry = (Box<[u8]>, FileId, [u8; 32]);

/// Content digests of the regular files of one tree, by path relative to its
/// root (sorted, for lookups by binary search).
#[derive(Debug, Default, Clone)]
pub struct FileSums {
    entries: Vec<SumEntry>,
    /// the [`tree`] digest of the pass that made this table
    tree: Option<String>,
}

impl FileSums {
    fn get(&self, rel: &[u8], id: FileId) -> Option<[u8; 32]> {
        let i = self
            .entries
            .binary_search_by(|(p, _, _)| p.as_ref().cmp(rel))
            .ok()?;
        let (_, cached, sum) = &self.entries[i];
        (*cached == id).then_some(*sum)
    }

    /// The tree digest computed with this table ([`tree_cached`]).
    pub fn tree_digest(&self) -> Option<&str> {
        self.tree.as_deref()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How a hash pass found its files: served from a table or read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HashStats {
    pub files: usize,
    pub read: usize,
    pub bytes_read: u64,
}

/// Feeds entries into a digest; reuses `known` content digests and records
/// every file's digest into `out` when given.
struct Hasher<'a> {
    h: kiln_digest::Hasher,
    buf: Vec<u8>,
    known: Option<&'a FileSums>,
    out: Option<Vec<SumEntry>>,
    stats: HashStats,
}

impl<'a> Hasher<'a> {
    fn new(known: Option<&'a FileSums>, record: bool) -> Self {
        Hasher {
            h: kiln_digest::Hasher::new(),
            buf: Vec::new(),
            known,
            out: record.then(Vec::new),
            stats: HashStats::default(),
        }
    }

    fn finish(self) -> (String, HashStats, Option<FileSums>) {
        let out = self.out.map(|mut entries| {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            FileSums {
                entries,
                tree: None,
            }
        });
        (self.h.finish(), self.stats, out)
    }

    fn content(&mut self, path: &Path, key: &[u8], md: &std::fs::Metadata) -> Result<[u8; 32]> {
        self.stats.files += 1;
        let id = FileId::of(md);
        let sum = match self.known.and_then(|k| k.get(key, id)) {
            Some(sum) => sum,
            None => {
                if self.buf.is_empty() {
                    self.buf = vec![0u8; 64 * 1024];
                }
                let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
                let mut h = Sha256::new();
                loop {
                    let n = f.read(&mut self.buf).map_err(Error::io("read", path))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&self.buf[..n]);
                    self.stats.bytes_read += n as u64;
                }
                self.stats.read += 1;
                h.finalize().into()
            }
        };
        if let Some(out) = &mut self.out {
            out.push((key.into(), id, sum));
        }
        Ok(sum)
    }

    /// Feeds every entry at and below `root` (from `min_depth`) into the
    /// digest; `key_root` is what table keys are relative to.
    fn tree(&mut self, root: &Path, key_root: &Path, min_depth: usize) -> Result<()> {
        for entry in walkdir::WalkDir::new(root)
            .min_depth(min_depth)
            .follow_root_links(false)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let path = e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.to_path_buf());
                Error::io("walk", path)(
                    e.into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("walk loop")),
                )
            })?;
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            let md = entry
                .path()
                .symlink_metadata()
                .map_err(Error::io("stat", entry.path()))?;
            self.h.update(rel.as_os_str().as_encoded_bytes());
            self.h.update(&[0]);
            self.h.update(
                format!(
                    "{:o} {} {} {}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if md.is_file() { md.len() } else { 0 }
                )
                .as_bytes(),
            );
            self.h.update(&[0]);
            // extended attributes (file capabilities, user.*) are content too; an
            // entry without any hashes as before
            if !md.file_type().is_symlink() {
                for (n, v) in kiln_oci::layer::content_xattrs(entry.path()).unwrap_or_default() {
                    self.h.update(b"x");
                    self.h.update(n.as_bytes());
                    self.h.update(&[0]);
                    self.h.update(&v);
                    self.h.update(&[0]);
                }
            }
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(entry.path())
                    .map_err(Error::io("readlink", entry.path()))?;
                self.h.update(t.as_os_str().as_encoded_bytes());
            } else if md.is_file() {
                let key = entry
                    .path()
                    .strip_prefix(key_root)
                    .unwrap_or(entry.path())
                    .as_os_str()
                    .as_encoded_bytes();
                let sum = self.content(entry.path(), key, &md)?;
                self.h.update(&sum);
            }
            self.h.update(&[0xff]);
        }
        Ok(())
    }
}

/// `sha256:<hex>` over every entry under `root`, in sorted order.
pub fn tree(root: &Path) -> Result<String> {
    let mut h = Hasher::new(None, false);
    h.tree(root, root, 1)?;
    Ok(h.finish().0)
}

/// [`tree`], reading only the files whose inode, size or mtime differ from
/// `known`; returns the digest, what was read, and the table of this pass.
/// `known` must describe a tree whose files are replaced, never rewritten in
/// place (see [`FileSums`]).
pub fn tree_cached(root: &Path, known: &FileSums) -> Result<(String, HashStats, FileSums)> {
    let mut h = Hasher::new(Some(known), true);
    h.tree(root, root, 1)?;
    let (digest, stats, sums) = h.finish();
    let mut sums = sums.unwrap_or_default();
    sums.tree = Some(digest.clone());
    Ok((digest, stats, sums))
}

/// How many snapshots keep a table (the newest ones).
const SNAPSHOT_TABLES: usize = 4;

/// The digest tables a worker keeps between passes: the last table of every
/// synced directory (taken out while it syncs) and the table each recent local
/// snapshot was made (or reused) with. Owned by the worker: tables describe its
/// own directories and snapshots.
#[derive(Debug, Default)]
pub struct SumTables {
    dirs: Mutex<HashMap<PathBuf, Arc<FileSums>>>,
    snapshots: Mutex<Vec<(String, Arc<FileSums>)>>,
}

impl SumTables {
    /// Takes the table of a synced directory out: call before the directory
    /// changes, give it back with [`Self::put_dir`] once it has been rehashed.
    /// A directory whose sync failed is simply never given back.
    pub fn take_dir(&self, dir: &Path) -> Arc<FileSums> {
        let mut g = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(dir).unwrap_or_default()
    }

    pub fn put_dir(&self, dir: &Path, sums: Arc<FileSums>) {
        let mut g = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(dir.to_path_buf(), sums);
    }

    /// Lends `sums` to the committed, immutable snapshot `id`, whose files are
    /// (mostly) the same inodes: its checksums ([`paths_in`]) reuse the digests
    /// of files whose inode, size and mtime match. A snapshot holds its inodes,
    /// so a matching inode number there is the very file that was hashed.
    pub fn remember_snapshot(&self, id: &str, sums: Arc<FileSums>) {
        let mut g = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|(s, _)| s != id);
        g.push((id.to_string(), sums));
        if g.len() > SNAPSHOT_TABLES {
            g.remove(0);
        }
    }

    /// The table lent to snapshot `id`, if any.
    pub fn snapshot(&self, id: &str) -> Option<Arc<FileSums>> {
        let g = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().find(|(s, _)| s == id).map(|(_, t)| t.clone())
    }
}

/// A path an op reads inside a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// absolute, or relative to the root
    pub path: String,
    /// expand `*`, `?` and `[...]` in each component
    pub wildcard: bool,
    /// follow a symlink in the last component
    pub follow_links: bool,
}

/// `sha256:<hex>` over what `selectors` reach under `root`: per selector,
/// the matched paths (a wildcard's expansion, in sorted order) and for each
/// the entry itself and everything below it (type, mode, owner, size,
/// content, symlink target; not mtime). A missing path counts as missing,
/// so creating it changes the digest. Never leaves `root`.
pub fn paths(root: &Path, selectors: &[Selector]) -> Result<String> {
    paths_with(root, selectors, None).map(|(d, _)| d)
}

/// [`paths`] in the view `root` of a snapshot (mounted, or its diff dir):
/// files whose digest the snapshot was lent ([`SumTables::remember_snapshot`])
/// are not read again.
pub fn paths_in(
    root: &Path,
    selectors: &[Selector],
    lent: Option<&FileSums>,
) -> Result<(String, HashStats)> {
    paths_with(root, selectors, lent)
}

fn paths_with(
    root: &Path,
    selectors: &[Selector],
    known: Option<&FileSums>,
) -> Result<(String, HashStats)> {
    let mut hs = Hasher::new(known, false);
    for sel in selectors {
        let full = if sel.path.starts_with('/') {
            sel.path.clone()
        } else {
            format!("/{}", sel.path)
        };
        hs.h.update(b"selector\0");
        hs.h.update(full.as_bytes());
        hs.h.update(&[0, sel.wildcard as u8, sel.follow_links as u8]);
        let matches = if sel.wildcard && crate::wildcard::has_wildcards(&full) {
            crate::wildcard::expand(root, &full)?
        } else {
            vec![full]
        };
        for m in matches {
            hs.h.update(b"match\0");
            hs.h.update(m.as_bytes());
            hs.h.update(&[0]);
            let p = crate::rootpath::resolve(root, &m, sel.follow_links)
                .map_err(Error::io("resolve", &m))?;
            match p.symlink_metadata() {
                Ok(_) => hs.tree(&p, root, 0)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => hs.h.update(b"missing\0"),
                Err(e) => return Err(Error::io("stat", &p)(e)),
            }
        }
    }
    let (digest, stats, _) = hs.finish();
    Ok((digest, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(path: &str, wildcard: bool) -> Selector {
        Selector {
            path: path.into(),
            wildcard,
            follow_links: true,
        }
    }

    #[test]
    fn paths_digest_covers_only_the_selected_paths() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("tmp");
        let write = |p: &str, s: &str| std::fs::write(a.path().join(p), s).expect("write");
        write("a.txt", "a");
        write("b.txt", "b");
        write("c.md", "c");
        let one = |s: &[Selector]| paths(a.path(), s).expect("checksum");
        let k = one(&[sel("/a.txt", false)]);
        let kw = one(&[sel("*.txt", true)]);
        // another file changes: the digest of a.txt stays
        write("c.md", "changed");
        assert_eq!(one(&[sel("/a.txt", false)]), k);
        assert_eq!(one(&[sel("*.txt", true)]), kw);
        // same content rewritten (new mtime): unchanged
        write("a.txt", "a");
        assert_eq!(
            one(&[sel("a.txt", false)]),
            k,
            "relative and absolute paths agree"
        );
        // mode change: changed
        std::fs::set_permissions(
            a.path().join("a.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let k2 = one(&[sel("/a.txt", false)]);
        assert_ne!(k2, k);
        // a new match of the wildcard: changed
        write("d.txt", "d");
        assert_ne!(one(&[sel("*.txt", true)]), kw);
        // a symlink counts by its target unless followed
        std::os::unix::fs::symlink("a.txt", a.path().join("l")).expect("symlink");
        let nofollow = Selector {
            path: "/l".into(),
            wildcard: false,
            follow_links: false,
        };
        assert_eq!(one(&[sel("/l", false)]), one(&[sel("/l", false)]));
        assert_ne!(
            one(std::slice::from_ref(&nofollow)),
            one(&[sel("/a.txt", false)])
        );
        // a missing path has a digest, and creating it changes it
        let missing = one(&[sel("/nope", false)]);
        write("nope", "");
        assert_ne!(one(&[sel("/nope", false)]), missing);
        // paths cannot escape the root: the link resolves inside it
        std::os::unix::fs::symlink("/../../etc/hostname", a.path().join("esc")).expect("symlink");
        let outside = one(&[sel("/esc", false)]);
        std::fs::create_dir(a.path().join("etc")).expect("mkdir");
        write("etc/hostname", "inside");
        assert_ne!(
            one(&[sel("/esc", false)]),
            outside,
            "reads <root>/etc/hostname"
        );
    }

    #[test]
    fn an_unrelated_directory_leaves_a_wildcard_digest_alone() {
        let a = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(a.path().join("src1")).expect("mkdir");
        std::fs::write(a.path().join("src1/go.mod"), "m").expect("write");
        std::fs::write(a.path().join("a.txt"), "a").expect("write");
        let sels = [sel("*.txt", true), sel("src*/go.mod", true)];
        let k = paths(a.path(), &sels).expect("checksum");
        // neither names a `.txt` file nor holds a go.mod
        std::fs::create_dir(a.path().join("src2")).expect("mkdir");
        std::fs::create_dir(a.path().join("unrelated")).expect("mkdir");
        assert_eq!(paths(a.path(), &sels).expect("checksum"), k);
        std::fs::write(a.path().join("src2/go.mod"), "m").expect("write");
        assert_ne!(paths(a.path(), &sels).expect("checksum"), k);
    }

    #[test]
    fn content_not_mtime_decides() {
        let a = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(a.path().join("d")).expect("mkdir");
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        let k1 = tree(a.path()).expect("hash");
        // touching (same content) keeps the key
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        assert_eq!(tree(a.path()).expect("hash"), k1);
        // a content change changes it
        std::fs::write(a.path().join("d/f"), "two").expect("write");
        assert_ne!(tree(a.path()).expect("hash"), k1);
        // so does a new file
        std::fs::write(a.path().join("d/f"), "one").expect("write");
        std::fs::write(a.path().join("g"), "").expect("write");
        assert_ne!(tree(a.path()).expect("hash"), k1);
    }

    /// Replaces `p` the way the session receiver does: a new file renamed over it.
    fn replace(p: &Path, data: &str) {
        let tmp = p.with_extension("recv-tmp");
        std::fs::write(&tmp, data).expect("write");
        std::fs::rename(&tmp, p).expect("rename");
    }

    #[test]
    fn cached_tree_reads_only_changed_files_and_still_sees_every_change() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(a.path().join("d")).expect("mkdir");
        for i in 0..5 {
            std::fs::write(a.path().join(format!("d/f{i}")), format!("file {i}")).expect("write");
        }
        let (k1, s1, t1) = tree_cached(a.path(), &FileSums::default()).expect("hash");
        assert_eq!((s1.files, s1.read), (5, 5));
        assert_eq!(k1, tree(a.path()).expect("hash"), "same digest as uncached");
        assert_eq!(t1.tree_digest(), Some(k1.as_str()));
        // nothing changed: nothing read, same digest
        let (k2, s2, t2) = tree_cached(a.path(), &t1).expect("hash");
        assert_eq!((k2.as_str(), s2.read), (k1.as_str(), 0));
        // content change (new inode): that file alone is read
        replace(&a.path().join("d/f1"), "changed");
        let (k3, s3, t3) = tree_cached(a.path(), &t2).expect("hash");
        assert_ne!(k3, k1);
        assert_eq!(s3.read, 1);
        assert_eq!(k3, tree(a.path()).expect("hash"));
        // content change in place (same inode, new size and mtime) is seen too
        std::fs::write(a.path().join("d/f2"), "longer content").expect("write");
        let (k4, s4, t4) = tree_cached(a.path(), &t3).expect("hash");
        assert_eq!(s4.read, 1);
        assert_eq!(k4, tree(a.path()).expect("hash"));
        assert_ne!(k4, k3);
        // mtime only: read again (the mtime is part of the key), digest unchanged
        let f0 = std::fs::File::options()
            .write(true)
            .open(a.path().join("d/f0"))
            .expect("open");
        f0.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .expect("mtime");
        let (k5, s5, t5) = tree_cached(a.path(), &t4).expect("hash");
        assert_eq!((k5.as_str(), s5.read), (k4.as_str(), 1));
        // mode change: new digest without reading anything
        std::fs::set_permissions(
            a.path().join("d/f3"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let (k6, s6, t6) = tree_cached(a.path(), &t5).expect("hash");
        assert_ne!(k6, k5);
        assert_eq!(s6.read, 0);
        // owner change: new digest (tests run as root)
        std::os::unix::fs::lchown(a.path().join("d/f4"), Some(1234), Some(5678)).expect("chown");
        let (k7, s7, t7) = tree_cached(a.path(), &t6).expect("hash");
        assert_ne!(k7, k6);
        assert_eq!(s7.read, 0);
        assert_eq!(k7, tree(a.path()).expect("hash"));
        // a removed file leaves the table
        std::fs::remove_file(a.path().join("d/f4")).expect("rm");
        let (_, _, t8) = tree_cached(a.path(), &t7).expect("hash");
        assert_eq!((t7.len(), t8.len()), (5, 4));
    }

    #[test]
    fn a_snapshot_lent_a_table_reads_only_files_it_does_not_share() {
        let synced = tempfile::tempdir().expect("tmp");
        let snap = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(synced.path().join("ctx")).expect("mkdir");
        for i in 0..4 {
            std::fs::write(synced.path().join(format!("ctx/f{i}")), format!("{i}")).expect("w");
        }
        let (_, _, sums) = tree_cached(synced.path(), &FileSums::default()).expect("hash");
        // the snapshot shares three inodes and has one file of its own
        std::fs::create_dir(snap.path().join("ctx")).expect("mkdir");
        for i in 0..3 {
            std::fs::hard_link(
                synced.path().join(format!("ctx/f{i}")),
                snap.path().join(format!("ctx/f{i}")),
            )
            .expect("link");
        }
        std::fs::write(snap.path().join("ctx/f3"), "3").expect("w");
        let tables = SumTables::default();
        tables.remember_snapshot("snap", Arc::new(sums));
        let lent_sums = tables.snapshot("snap");
        let sel = [sel("/ctx", false)];
        let (lent, stats) = paths_in(snap.path(), &sel, lent_sums.as_deref()).expect("checksum");
        assert_eq!((stats.files, stats.read), (4, 1));
        let (plain, stats) = paths_in(snap.path(), &sel, None).expect("checksum");
        assert_eq!((lent.as_str(), stats.read), (plain.as_str(), 4));
        assert_eq!(plain, paths(snap.path(), &sel).expect("checksum"));
    }
}
