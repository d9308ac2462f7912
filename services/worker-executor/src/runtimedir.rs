//! The worker's runtime dir: runc's state (`runc/`) and the bundles of running steps
//! (`exec-*/`: config.json, hosts, resolv.conf, secrets). Both live only while a container
//! runs, so they go on a tmpfs, as runc's own default `/run/runc` does, and not on the
//! disk that holds the snapshots: each exec step then makes eight fewer files and
//! directories there (a bundle's four, runc's four), and on an ext4 that has just deleted
//! a lot, every file made is slow.
//!
//! The dir is `/run/kiln-<hash of the root>` when `/run` is a tmpfs, else
//! `/dev/shm/kiln-<hash>`; it must be a directory of this user that nobody else can
//! enter (`/dev/shm` is world-writable). When neither works it is `<root>/runtime` on
//! disk. `<root>/runtime` is always the way to it (a symlink to the tmpfs dir). A tmpfs
//! outlives a killed kilnd, so a restarted worker still finds the containers to remove;
//! after a reboot it is empty, as are the containers.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The name of a runtime dir on a tmpfs: this and a hash of the worker's root.
const PREFIX: &str = "kiln-";

/// Where a worker's runc state and bundles live.
#[derive(Debug, Clone)]
pub struct RuntimeDir {
    path: PathBuf,
    tmpfs: bool,
}

impl RuntimeDir {
    /// The runtime dir of the worker whose (canonical) state dir is `root`; see the
    /// module docs.
    pub fn open(root: &Path) -> Result<RuntimeDir> {
        Self::open_on(root, &[Path::new("/run"), Path::new("/dev/shm")])
    }

    /// As [`RuntimeDir::open`], trying tmpfs dirs under `bases` in order.
    pub fn open_on(root: &Path, bases: &[&Path]) -> Result<RuntimeDir> {
        let hash = hex::encode(&Sha256::digest(root.as_os_str().as_encoded_bytes())[..8]);
        let link = root.join("runtime");
        for base in bases {
            if !is_tmpfs(base) {
                continue;
            }
            let dir = base.join(format!("{PREFIX}{hash}"));
            if let Err(e) = private_dir(&dir) {
                tracing::warn!(dir = %dir.display(), error = %kiln_proto::status::Chain(&e), "not used for runc state");
                continue;
            }
            point_link(&link, &dir)?;
            let owner = dir.join("root");
            if std::fs::read(&owner).ok().as_deref() != Some(root.as_os_str().as_encoded_bytes()) {
                // whole or not at all: another worker's sweep must never read a
                // half-written root (an empty path does not exist: it would
                // remove this live worker's dir)
                crate::snapshot::write_atomic(&owner, root.as_os_str().as_encoded_bytes())?;
            }
            if let Some(parent) = dir.parent() {
                sweep(parent, &dir);
            }
            return Ok(RuntimeDir {
                path: dir,
                tmpfs: true,
            });
        }
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&link).map_err(Error::io("remove", &link))?;
        }
        private_dir(&link).map_err(Error::io("create", &link))?;
        Ok(RuntimeDir {
            path: link,
            tmpfs: false,
        })
    }

    /// The dir itself (on the tmpfs, or `<root>/runtime`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is on a tmpfs (so a secret written there never reaches a disk).
    pub fn is_tmpfs(&self) -> bool {
        self.tmpfs
    }

    /// runc's `--root`.
    pub fn runc_state(&self) -> PathBuf {
        self.path.join("runc")
    }
}

/// Removes the runtime dirs beside `keep` whose worker root is gone and that hold no
/// runc container: what test and CI runs leave on the tmpfs. Only private dirs of this
/// user are touched.
fn sweep(parent: &Path, keep: &Path) {
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let dir = e.path();
        if dir == keep
            || !e.file_name().to_string_lossy().starts_with(PREFIX)
            || private_dir_ok(&dir).is_err()
        {
            continue;
        }
        let Ok(root) = std::fs::read(dir.join("root")) else {
            continue; // not a runtime dir
        };
        if root.is_empty() {
            continue; // being made (an older kiln wrote it in place)
        }
        let root = PathBuf::from(std::ffi::OsStr::from_bytes(&root));
        // its worker's root is still there: the worker may be running, or
        // starting (between making this dir and linking it), or killed and
        // about to clean up itself
        if root.exists() || std::fs::read_link(root.join("runtime")).is_ok_and(|t| t == dir) {
            continue;
        }
        let containers = std::fs::read_dir(dir.join("runc"))
            .map(|d| d.count())
            .unwrap_or(0);
        if containers == 0 {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn is_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Makes `dir` (mode 0700) unless it is there, then checks that it is a real directory
/// of this user that no one else may enter.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    private_dir_ok(dir)
}

fn private_dir_ok(dir: &Path) -> std::io::Result<()> {
    let md = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.file_type().is_dir() || md.uid() != me || md.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "not a private directory of uid {me} (type {:?}, owner {}, mode {:o})",
                md.file_type(),
                md.uid(),
                md.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Makes `link` a symlink to `target` (replacing an older link, or the on-disk dir of a
/// run that had no tmpfs).
fn point_link(link: &Path, target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(link).is_ok_and(|t| t == target) {
                return Ok(());
            }
            std::fs::remove_file(link).map_err(Error::io("remove", link))?;
        }
        Ok(_) => std::fs::remove_dir_all(link).map_err(Error::io("remove", link))?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, link).map_err(Error::io("symlink", link))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn on_dev_shm_it_is_a_private_dir_the_root_links_to() {
        if !is_tmpfs(Path::new("/dev/shm")) {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonical");
        let rt = RuntimeDir::open_on(&root, &[Path::new("/dev/shm")]).expect("open");
        assert!(rt.is_tmpfs());
        assert!(rt.path().starts_with("/dev/shm"), "{}", rt.path().display());
        let md = std::fs::symlink_metadata(rt.path()).expect("stat");
        assert!(md.is_dir());
        assert_eq!(md.mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_link(root.join("runtime")).expect("link"),
            rt.path()
        );
        // the same root finds the same dir again
        let again = RuntimeDir::open_on(&root, &[Path::new("/dev/shm")]).expect("open");
        assert_eq!(again.path(), rt.path());
        std::fs::remove_dir_all(rt.path()).expect("clean");
    }

    #[test]
    fn a_dir_someone_else_can_enter_is_refused_and_the_disk_is_used() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonical");
        let hash = hex::encode(&Sha256::digest(root.as_os_str().as_encoded_bytes())[..8]);
        // squatted: made earlier, open to everyone
        let squat = Path::new("/dev/shm").join(format!("kiln-{hash}"));
        std::fs::create_dir(&squat).expect("squat");
        std::fs::set_permissions(&squat, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let rt = RuntimeDir::open_on(&root, &[Path::new("/dev/shm")]).expect("open");
        std::fs::remove_dir(&squat).expect("clean");
        assert!(!rt.is_tmpfs());
        assert_eq!(rt.path(), root.join("runtime"));
        assert!(std::fs::symlink_metadata(rt.path()).expect("stat").is_dir());
        // a symlink planted where the dir goes is refused too
        let tmp2 = tempfile::tempdir().expect("tempdir");
        let root2 = std::fs::canonicalize(tmp2.path()).expect("canonical");
        let hash2 = hex::encode(&Sha256::digest(root2.as_os_str().as_encoded_bytes())[..8]);
        let planted = Path::new("/dev/shm").join(format!("kiln-{hash2}"));
        std::os::unix::fs::symlink(tmp.path(), &planted).expect("plant");
        let rt2 = RuntimeDir::open_on(&root2, &[Path::new("/dev/shm")]).expect("open");
        std::fs::remove_file(&planted).expect("clean");
        assert!(!rt2.is_tmpfs());
    }

    #[test]
    fn a_gone_workers_dir_is_swept_and_a_live_ones_or_one_with_a_container_is_not() {
        if !is_tmpfs(Path::new("/dev/shm")) {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return;
        }
        let (gone, live, busy) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let open = |t: &tempfile::TempDir| {
            let root = std::fs::canonicalize(t.path()).expect("canonical");
            RuntimeDir::open_on(&root, &[Path::new("/dev/shm")]).expect("open")
        };
        let (g, b) = (open(&gone), open(&busy));
        std::fs::create_dir_all(b.runc_state().join("kiln-abc")).expect("container state");
        // a worker that has made its dir and not yet written its root whole
        let starting =
            Path::new("/dev/shm").join(format!("{PREFIX}test-{}", uuid::Uuid::new_v4().simple()));
        private_dir(&starting).expect("dir");
        std::fs::write(starting.join("root"), b"").expect("empty root");
        drop(gone);
        drop(busy);
        let l = open(&live);
        assert!(!g.path().exists(), "gone worker's dir kept");
        assert!(b.path().exists(), "dir with a container swept");
        assert!(l.path().exists());
        assert!(starting.exists(), "a starting worker's dir swept");
        std::fs::remove_dir_all(b.path()).expect("clean");
        std::fs::remove_dir_all(l.path()).expect("clean");
        std::fs::remove_dir_all(&starting).expect("clean");
    }

    #[test]
    fn no_tmpfs_means_the_dir_under_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonical");
        let rt = RuntimeDir::open_on(&root, &[&root.join("no-such-dir")]).expect("open");
        assert!(!rt.is_tmpfs());
        assert_eq!(rt.runc_state(), root.join("runtime/runc"));
    }
}
