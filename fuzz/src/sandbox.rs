//! Temporary roots for the targets that write files, and the check that
//! nothing outside them changed.
//!
//! Each fuzzing thread gets a work dir `/dev/shm/kiln-fuzz-<tag>-<pid>-<n>/`
//! (`$KILN_FUZZ_DIR` or `$TMPDIR` instead, see [`work_base`])
//! holding `root/` (what the target writes into) and `sibling/` (a canary
//! beside it). `/tmp/kiln-fuzz-outside/` is a second canary at a fixed
//! absolute path, so inputs can name it. Both canaries hold a file `victim`
//! and an empty dir `dir/`; [`Sandbox::check`] panics when either tree
//! changed in any way (an entry added or removed, a mode, owner, size, time,
//! inode change time, link count or link target), which catches writes,
//! chmods, chowns, hard links and removals through symlinks alike.
//!
//! [`Sandbox::populate_base`] gives the root symlinks that lead out of it
//! (`link -> ../sibling`, `abs -> /tmp/kiln-fuzz-outside`, …), as an earlier
//! layer or a previous sync might have left them.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The canary at a fixed absolute path.
pub const OUTSIDE: &str = "/tmp/kiln-fuzz-outside";

/// Names of the base tree's entries and the canaries' paths, for tokens.
pub const TOKENS: &[&[u8]] = &[
    b"../",
    b"..",
    b"/",
    b"./",
    b"../sibling",
    b"../sibling/victim",
    b"../sibling/dir/x",
    b"../../",
    b"/tmp/kiln-fuzz-outside",
    b"/tmp/kiln-fuzz-outside/victim",
    b"/tmp/kiln-fuzz-outside/dir",
    b"link",
    b"link/",
    b"link/victim",
    b"link/dir/x",
    b"abs",
    b"abs/",
    b"abs/victim",
    b"abs/dir/new",
    b"victim",
    b"rel_victim",
    b"dir",
    b"dir/",
    b"dir/file",
    b"dir/up",
    b"dir/up/sibling/victim",
    b"loop",
    b"loop/x",
    b".wh.",
    b".wh..wh..opq",
];

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    rel: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    nlink: u64,
    ino: u64,
    link: Option<PathBuf>,
}

/// Every entry under `dir` (itself included), never following symlinks.
fn fingerprint(dir: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir()
            && let Ok(rd) = fs::read_dir(&p)
        {
            for e in rd.flatten() {
                stack.push(e.path());
            }
        }
        out.push(Entry {
            rel: p.strip_prefix(dir).unwrap_or(&p).to_path_buf(),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: if md.is_dir() { 0 } else { md.size() },
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            nlink: md.nlink(),
            ino: md.ino(),
            link: fs::read_link(&p).ok(),
        });
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out
}

fn make_canary(dir: &Path) {
    fs::create_dir_all(dir.join("dir")).expect("canary dir");
    fs::write(dir.join("victim"), b"canary\n").expect("canary file");
    fs::set_permissions(dir.join("victim"), fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::set_permissions(dir.join("dir"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Whether a canary is as [`make_canary`] leaves it.
fn canary_intact(dir: &Path) -> bool {
    let mode = |p: &Path| fs::symlink_metadata(p).map(|m| m.mode()).ok();
    let mut names: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
        Err(_) => return false,
    };
    names.sort();
    names == ["dir", "victim"]
        && mode(dir) == Some(0o40755)
        && mode(&dir.join("dir")) == Some(0o40755)
        && mode(&dir.join("victim")) == Some(0o100644)
        && fs::read(dir.join("victim")).is_ok_and(|b| b == b"canary\n")
        && fs::read_dir(dir.join("dir")).is_ok_and(|mut rd| rd.next().is_none())
}

/// Creates [`OUTSIDE`] (atomically: concurrent runs share it), or puts it
/// back the way it was when an earlier run found an escape into it.
fn ensure_outside() {
    let outside = Path::new(OUTSIDE);
    if canary_intact(outside) {
        return;
    }
    if fs::symlink_metadata(outside).is_ok() {
        eprintln!("{OUTSIDE} was changed (by an escape an earlier run found?): making it again");
        let _ = fs::remove_dir_all(outside).or_else(|_| fs::remove_file(outside));
    }
    let tmp = PathBuf::from(format!("{OUTSIDE}.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    make_canary(&tmp);
    if fs::rename(&tmp, outside).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Where work dirs go: `$KILN_FUZZ_DIR`, else `/dev/shm` (a tmpfs: creating
/// files and symlinks on a disk costs a hundred times more), else `$TMPDIR`.
fn work_base() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_FUZZ_DIR") {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    match fs::metadata(shm) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o2 != 0 => shm.to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

/// A work dir with `root/` and the `sibling/` canary; removed on drop.
pub struct Sandbox {
    pub work: PathBuf,
    pub root: PathBuf,
    sibling: PathBuf,
    /// names allowed in the work dir besides `root` and `sibling`
    extra: Vec<String>,
    outside_print: Vec<Entry>,
    sibling_print: Vec<Entry>,
}

impl Sandbox {
    /// A fresh sandbox; `extra` names files the target itself keeps in the work dir.
    pub fn new(tag: &str, extra: &[&str]) -> Sandbox {
        ensure_outside();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let work = work_base().join(format!("kiln-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).expect("work dir");
        let sibling = work.join("sibling");
        make_canary(&sibling);
        let root = work.join("root");
        fs::create_dir(&root).expect("root dir");
        Sandbox {
            outside_print: fingerprint(Path::new(OUTSIDE)),
            sibling_print: fingerprint(&sibling),
            work,
            root,
            sibling,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Empties the root (whatever the last input left in it).
    pub fn reset(&self) {
        if fs::symlink_metadata(&self.root).is_ok() {
            make_removable(&self.root);
            if let Err(e) = fs::remove_dir_all(&self.root) {
                panic!("cannot empty {}: {e}", self.root.display());
            }
        }
        fs::create_dir(&self.root).expect("root dir");
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755)).expect("chmod root");
    }

    /// Symlinks out of the root and a plain dir, as a lower layer or an
    /// earlier sync could have left them.
    pub fn populate_base(&self) {
        let r = &self.root;
        fs::create_dir(r.join("dir")).expect("base dir");
        fs::write(r.join("dir/file"), b"base\n").expect("base file");
        let links: &[(&str, &str)] = &[
            ("link", "../sibling"),
            ("abs", OUTSIDE),
            ("victim", "/tmp/kiln-fuzz-outside/victim"),
            ("rel_victim", "../sibling/victim"),
            ("dir/up", "../.."),
            ("loop", "loop"),
        ];
        for (name, target) in links {
            std::os::unix::fs::symlink(target, r.join(name)).expect("base symlink");
        }
    }

    /// Panics when anything outside the root changed.
    pub fn check(&self) {
        let now = fingerprint(Path::new(OUTSIDE));
        if now != self.outside_print {
            panic!(
                "ESCAPE: {OUTSIDE} changed: before {:?}, after {:?}",
                self.outside_print, now
            );
        }
        let now = fingerprint(&self.sibling);
        if now != self.sibling_print {
            panic!(
                "ESCAPE: {} (beside the root) changed: before {:?}, after {:?}",
                self.sibling.display(),
                self.sibling_print,
                now
            );
        }
        let mut names: Vec<String> = fs::read_dir(&self.work)
            .expect("read work dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let allowed = |n: &String| n == "root" || n == "sibling" || self.extra.contains(n);
        if let Some(n) = names.iter().find(|n| !allowed(n)) {
            panic!(
                "ESCAPE: {} appeared beside the root in {}",
                n,
                self.work.display()
            );
        }
        match fs::symlink_metadata(&self.root) {
            Ok(m) if m.is_dir() => {}
            other => panic!("the root itself was replaced: {other:?}"),
        }
    }
}

/// Gives every dir under `p` (not following symlinks) an owner-writable mode,
/// so a tree an input made read-only can be removed.
fn make_removable(p: &Path) {
    let Ok(md) = fs::symlink_metadata(p) else {
        return;
    };
    if md.is_dir() {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                make_removable(&e.path());
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        make_removable(&self.work);
        let _ = fs::remove_dir_all(&self.work);
    }
}
