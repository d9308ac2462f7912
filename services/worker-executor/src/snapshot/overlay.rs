//! Mounting a snapshot chain as one filesystem with overlayfs.

use crate::error::{Error, Result};
use nix::mount::{MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// A mounted view of a snapshot chain. Unmounted (and its mountpoint removed) on drop.
#[derive(Debug)]
pub struct Mounted {
    path: PathBuf,
    mounted: bool,
    owned_dir: bool,
    /// what is left to do on release, besides unmounting
    after: Option<Box<After>>,
}

/// Work a view leaves for its release.
#[derive(Debug)]
enum After {
    /// fuse-overlayfs with an upper: unmark the directories it made opaque that hide
    /// nothing ([`unmark_new_dirs`])
    Fuse {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
    },
    /// a copied view ([`Backend::Copy`]): the upper rewritten from the view, which
    /// is then removed
    Copied {
        lowers: Vec<PathBuf>,
        upper: Option<PathBuf>,
        made: super::copy::DirInodes,
    },
}

impl Mounted {
    /// The root of the mounted filesystem.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts now, reporting failures (drop only logs them).
    pub fn unmount(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if let Some(After::Copied {
            lowers,
            upper,
            made,
        }) = self.after.as_deref()
        {
            if let Some(upper) = upper {
                super::copy::write_diff(lowers, &self.path, upper, made)
                    .map_err(Error::io("write the diff of a copied view", &self.path))?;
            }
            std::fs::remove_dir_all(&self.path)
                .map_err(Error::io("remove a copied view", &self.path))?;
            self.after = None;
            self.owned_dir = false;
            return Ok(());
        }
        if self.mounted {
            nix::mount::umount2(&self.path, MntFlags::empty())
                .or_else(|_| nix::mount::umount2(&self.path, MntFlags::MNT_DETACH))
                .map_err(|source| Error::Mount {
                    target: self.path.clone(),
                    source,
                })?;
            self.mounted = false;
            if let Some(After::Fuse { lowers, upper }) = self.after.take().map(|a| *a) {
                unmark_new_dirs(&upper, &lowers);
            }
        }
        if self.owned_dir {
            std::fs::remove_dir(&self.path).map_err(Error::io("remove mountpoint", &self.path))?;
            self.owned_dir = false;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "release mount");
        }
    }
}

/// Mount points under `dir` in this mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount under `dir` (what a killed worker left mounted there).
pub fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        match nix::mount::umount2(&m, MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::info!(mount = %m.display(), "unmounted a mount left by an earlier run")
            }
            Err(e) => {
                tracing::warn!(mount = %m.display(), error = %kiln_proto::status::Chain(&e), "unmount stale mount")
            }
        }
    }
}

/// A writable layer on top of the lowers: the overlay `upperdir` and its `workdir`.
#[derive(Debug, Clone, Copy)]
pub struct Upper<'a> {
    pub diff: &'a Path,
    pub work: &'a Path,
    /// Mount with overlayfs' `volatile` option: the unmount then skips the sync of the
    /// whole upper filesystem (the store syncs in the background, see
    /// [`super`]). Ignored where the kernel lacks it.
    pub volatile: bool,
}

/// Longest overlay option string passed straight to mount(2); the kernel
/// copies one page of it.
const MAX_MOUNT_DATA: usize = 3500;

/// How overlays are mounted: by the kernel's overlayfs, or by fuse-overlayfs (a
/// rootless worker whose kernel cannot mount overlayfs in a user namespace, or
/// `snapshotter = "fuse-overlayfs"`). One per process, chosen when the worker starts
/// ([`choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Fuse,
    /// no mount at all: views are copies ([`super::copy`])
    Copy,
}

static BACKEND: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The backend mounts use.
pub fn backend() -> Backend {
    match BACKEND.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Backend::Fuse,
        2 => Backend::Copy,
        _ => Backend::Kernel,
    }
}

fn set_backend(b: Backend) {
    let v = match b {
        Backend::Kernel => 0,
        Backend::Fuse => 1,
        Backend::Copy => 2,
    };
    BACKEND.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The worker's `snapshotter` setting (buildkitd's `--oci-worker-snapshotter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Snapshotter {
    /// overlayfs; for a rootless worker whose kernel cannot mount it in a user
    /// namespace, fuse-overlayfs
    #[default]
    Auto,
    Overlayfs,
    FuseOverlayfs,
    /// copies instead of mounts: slow, for where nothing else mounts
    Native,
}

impl std::str::FromStr for Snapshotter {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "" => Ok(Snapshotter::Auto),
            "overlayfs" => Ok(Snapshotter::Overlayfs),
            "fuse-overlayfs" => Ok(Snapshotter::FuseOverlayfs),
            "native" => Ok(Snapshotter::Native),
            _ => Err(format!(
                "unknown snapshotter {s:?} (auto, overlayfs, fuse-overlayfs, native)"
            )),
        }
    }
}

/// Picks how overlays are mounted, checking with a real mount under `probe_dir`
/// where it matters: a rootless worker's (`probe`) or a chosen fuse-overlayfs.
pub fn choose(snapshotter: Snapshotter, probe_dir: &Path, rootless: bool) -> Result<Backend> {
    let try_backend = |b: Backend| -> std::result::Result<(), String> {
        set_backend(b);
        probe(probe_dir)
    };
    let chosen = match snapshotter {
        Snapshotter::Overlayfs if !rootless => Backend::Kernel,
        Snapshotter::Auto if !rootless => Backend::Kernel,
        Snapshotter::Overlayfs => {
            try_backend(Backend::Kernel).map_err(|e| snapshotter_error("overlayfs", &e))?;
            Backend::Kernel
        }
        Snapshotter::FuseOverlayfs => {
            try_backend(Backend::Fuse).map_err(|e| snapshotter_error("fuse-overlayfs", &e))?;
            Backend::Fuse
        }
        Snapshotter::Native => {
            try_backend(Backend::Copy).map_err(|e| snapshotter_error("copied snapshots", &e))?;
            Backend::Copy
        }
        Snapshotter::Auto => match try_backend(Backend::Kernel) {
            Ok(()) => Backend::Kernel,
            Err(kernel) => match try_backend(Backend::Fuse) {
                Ok(()) => {
                    tracing::warn!(
                        kernel = %kernel,
                        "overlayfs cannot be mounted in kilnd's user namespace: snapshots use fuse-overlayfs"
                    );
                    Backend::Fuse
                }
                Err(fuse) => match try_backend(Backend::Copy) {
                    Ok(()) => {
                        tracing::warn!(
                            kernel = %kernel,
                            fuse = %fuse,
                            "neither overlayfs nor fuse-overlayfs mounts in kilnd's user namespace: snapshots are copied (slow)"
                        );
                        Backend::Copy
                    }
                    Err(copy) => {
                        set_backend(Backend::Kernel);
                        return Err(snapshotter_error(
                            "overlayfs, fuse-overlayfs or copies",
                            &format!("overlayfs: {kernel}; fuse-overlayfs: {fuse}; copies: {copy}"),
                        ));
                    }
                },
            },
        },
    };
    set_backend(chosen);
    match chosen {
        Backend::Fuse => tracing::info!("snapshots are mounted by fuse-overlayfs"),
        Backend::Copy => tracing::info!("snapshots are copied, not mounted (native)"),
        Backend::Kernel => {}
    }
    Ok(chosen)
}

fn snapshotter_error(what: &str, why: &str) -> Error {
    Error::Snapshotter(format!(
        "{what} cannot be mounted here ({why}); rootless snapshots need Linux 5.11 or later \
         (overlayfs in a user namespace) or fuse-overlayfs with /dev/fuse, and a root on \
         ext4, xfs or another filesystem overlayfs takes as upper layer; `snapshotter = \
         \"native\"` copies instead"
    ))
}

/// Mounts a lower and an upper under `dir`, writes through it and unmounts, as a step's
/// mount does.
fn probe(dir: &Path) -> std::result::Result<(), String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    std::fs::create_dir_all(dir).map_err(|e| s(&e))?;
    let tmp = tempfile::Builder::new()
        .prefix("overlay-probe-")
        .tempdir_in(dir)
        .map_err(|e| s(&e))?;
    let p = |n: &str| tmp.path().join(n);
    for n in ["lower", "diff", "work", "mnt"] {
        std::fs::create_dir_all(p(n)).map_err(|e| s(&e))?;
    }
    std::fs::write(p("lower/probe"), b"x").map_err(|e| s(&e))?;
    let (diff, work) = (p("diff"), p("work"));
    let m = mount(
        &p("mnt"),
        &[p("lower")],
        Some(Upper {
            diff: &diff,
            work: &work,
            volatile: false,
        }),
        MsFlags::empty(),
    )
    .map_err(|e| kiln_proto::status::Chain(&e).to_string())?;
    std::fs::remove_file(m.path().join("probe")).map_err(|e| s(&e))?;
    m.unmount()
        .map_err(|e| kiln_proto::status::Chain(&e).to_string())?;
    // the removal is a whiteout in the upper, as layers read them
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = std::fs::symlink_metadata(diff.join("probe")).map_err(|e| s(&e))?;
    if !(wh.file_type().is_char_device() && wh.rdev() == 0) {
        return Err("a removed file left no whiteout in the upper".into());
    }
    Ok(())
}

/// fuse-overlayfs's mount of `lowers` (and `upper`) on `target`; it serves the mount
/// from a process of its own until unmounted.
fn mount_fuse(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<Upper<'_>>,
    flags: MsFlags,
) -> Result<()> {
    let names: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    let mut opts = format!("lowerdir={}", names.join(":"));
    if let Some(u) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.diff.display(),
            u.work.display()
        ));
    }
    if flags.contains(MsFlags::MS_NOSUID) {
        opts.push_str(",nosuid");
    }
    if flags.contains(MsFlags::MS_NODEV) {
        opts.push_str(",nodev");
    }
    let out = std::process::Command::new("fuse-overlayfs")
        .arg("-o")
        .arg(&opts)
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::FuseOverlay {
            target: target.to_path_buf(),
            message: format!("run fuse-overlayfs (Debian's fuse-overlayfs): {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::FuseOverlay {
            target: target.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// fuse-overlayfs marks every directory it creates opaque (an xattr, a `.wh..wh..opq`
/// file and a whiteout of `.wh..opq`), where the kernel marks only one that replaces a
/// lower directory. A directory no lower has hides nothing: its marks are removed, so
/// the diff is the kernel's.
fn unmark_new_dirs(upper: &Path, lowers: &[PathBuf]) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    const XATTR: &str = "user.fuseoverlayfs.opaque";
    let in_a_lower = |rel: &Path| {
        lowers.iter().any(|l| {
            // not through a symlink of the lower
            let mut cur = l.clone();
            for c in rel.components() {
                cur.push(c);
                match std::fs::symlink_metadata(&cur) {
                    Ok(m) if m.file_type().is_symlink() => return false,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            true
        })
    };
    let walker = walkdir::WalkDir::new(upper)
        .follow_links(false)
        .min_depth(1)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_dir());
    for e in walker {
        let dir = e.path();
        if !xattr::get(dir, XATTR).is_ok_and(|v| v.is_some()) {
            continue;
        }
        let Ok(rel) = dir.strip_prefix(upper) else {
            continue;
        };
        if in_a_lower(rel) {
            continue;
        }
        let _ = xattr::remove(dir, XATTR);
        let marker = dir.join(kiln_oci::layer::WHITEOUT_OPAQUE);
        if std::fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let _ = std::fs::remove_file(&marker);
        }
        let wh = dir.join(".wh..opq");
        if std::fs::symlink_metadata(&wh)
            .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
        {
            let _ = std::fs::remove_file(&wh);
        }
    }
}

/// Whether the kernel took `volatile` (cleared on the first mount that rejects it).
static VOLATILE_SUPPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Runs `f` on a short-lived thread whose working directory is `dir`. The thread
/// first leaves the filesystem context (cwd) it shares with the process, so the
/// rest of the daemon keeps its own working directory.
fn in_dir<T: Send>(dir: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // this thread's own copy of cwd/root/umask
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
            std::env::set_current_dir(dir)?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("mount thread panicked"))?
    })
}

/// The overlay option string: `lowerdir` as given (joined by `:`), the upper, and flags.
fn overlay_data(lowers: &[String], upper: Option<Upper<'_>>, volatile: bool) -> String {
    let mut data = format!("lowerdir={}", lowers.join(":"));
    if let Some(u) = upper {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.diff.display(),
            u.work.display()
        ));
        if volatile {
            data.push_str(",volatile");
        }
    }
    data.push_str(",index=off");
    if crate::rootless::in_user_namespace() {
        // trusted.* xattrs are the initial namespace's root's alone
        data.push_str(",userxattr");
    }
    data
}

/// mount(2) of an overlay; when `volatile` is rejected by this kernel, again without it.
fn mount_overlay(
    target: &Path,
    lowers: &[String],
    upper: Option<Upper<'_>>,
    flags: MsFlags,
    cwd: Option<&Path>,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    let merr = |source| Error::Mount {
        target: target.to_path_buf(),
        source,
    };
    let want_volatile =
        upper.is_some_and(|u| u.volatile) && VOLATILE_SUPPORTED.load(Ordering::Relaxed);
    let attempt = |volatile: bool| -> Result<std::result::Result<(), nix::errno::Errno>> {
        let data = overlay_data(lowers, upper, volatile);
        let m = || {
            nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                flags,
                Some(data.as_str()),
            )
        };
        match cwd {
            None => Ok(m()),
            Some(dir) => in_dir(dir, m).map_err(Error::io("mount overlay from", dir)),
        }
    };
    match attempt(want_volatile)? {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) if want_volatile => {
            let r = attempt(false)?;
            if r.is_ok() {
                tracing::info!("overlayfs has no volatile option here; unmounts sync the upper");
                VOLATILE_SUPPORTED.store(false, Ordering::Relaxed);
            }
            r.map_err(merr)
        }
        Err(e) => Err(merr(e)),
    }
}

/// Mounts an overlay whose lowers are named by short relative names: each lower
/// is opened (`O_PATH`) and named by its descriptor number, resolved from a thread
/// whose working directory is `/proc/self/fd`. Nothing is written to disk (on a
/// busy disk, a directory of links to create and remove cost more than the mount);
/// the descriptors are closed once mounted (the mount holds the directories).
fn mount_with_short_lowers(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<Upper<'_>>,
    flags: MsFlags,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let fds = lowers
        .iter()
        .map(|l| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(l)
                .map_err(Error::io("open lower", l))
        })
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = fds.iter().map(|f| f.as_raw_fd().to_string()).collect();
    mount_overlay(
        target,
        &names,
        upper,
        flags,
        Some(Path::new("/proc/self/fd")),
    )
}

/// Mounts `lowers` (top first) with an optional writable `upper` under a fresh mountpoint
/// in `mnt_dir`.
///
/// * no lowers, no upper: an empty directory;
/// * no lowers, an upper: the upper directory itself (nothing to merge);
/// * one lower, no upper: a read-only bind mount of that lower;
/// * otherwise an overlay mount (read-only when there is no upper).
///
/// `extra` flags (e.g. `MS_NOSUID | MS_NODEV`) apply to whatever is mounted.
pub fn mount(
    mnt_dir: &Path,
    lowers: &[PathBuf],
    upper: Option<Upper<'_>>,
    extra: MsFlags,
) -> Result<Mounted> {
    if lowers.is_empty()
        && let Some(u) = upper
    {
        return Ok(Mounted {
            path: u.diff.to_path_buf(),
            mounted: false,
            owned_dir: false,
            after: None,
        });
    }
    let target = mnt_dir.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&target).map_err(Error::io("create mountpoint", &target))?;
    let mut m = Mounted {
        path: target.clone(),
        mounted: false,
        owned_dir: true,
        after: None,
    };
    let merr = |source| Error::Mount {
        target: target.clone(),
        source,
    };
    match (lowers, upper) {
        ([], _) => {}
        ([only], None) => {
            nix::mount::mount(
                Some(only.as_path()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(merr)?;
            m.mounted = true;
            nix::mount::mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra,
                None::<&str>,
            )
            .map_err(merr)?;
        }
        (lowers, upper) if backend() == Backend::Copy => {
            let upper_dir = upper.map(|u| u.diff.to_path_buf());
            let made = super::copy::materialize(&target, lowers, upper_dir.as_deref())
                .map_err(Error::io("copy a snapshot chain", &target))?;
            m.after = Some(Box::new(After::Copied {
                lowers: lowers.to_vec(),
                upper: upper_dir,
                made,
            }));
        }
        (lowers, upper) => {
            let flags = extra
                | if upper.is_none() {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
            let names: Vec<String> = lowers
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if backend() == Backend::Fuse {
                mount_fuse(&target, lowers, upper, flags)?;
                m.after = upper.map(|u| {
                    Box::new(After::Fuse {
                        lowers: lowers.to_vec(),
                        upper: u.diff.to_path_buf(),
                    })
                });
            } else if overlay_data(&names, upper, true).len() > MAX_MOUNT_DATA {
                // Mount options must fit in one page: name the lowers by short
                // relative names instead (containerd and docker use links).
                mount_with_short_lowers(&target, lowers, upper, flags)?;
            } else {
                mount_overlay(&target, &names, upper, flags, None)?;
            }
            m.mounted = true;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/x\\04"), "/x\\04");
    }

    #[test]
    fn stale_mounts_under_a_dir_are_detached_deepest_first() {
        let tmp = tempfile::tempdir().expect("tmp");
        let outer = tmp.path().join("mnt/a b");
        let inner = outer.join("in");
        std::fs::create_dir_all(&outer).expect("mkdir");
        for m in [&outer, &inner] {
            if m == &inner {
                std::fs::create_dir_all(m).expect("mkdir");
            }
            nix::mount::mount(
                Some("tmpfs"),
                m,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount tmpfs");
        }
        assert_eq!(mounts_under(tmp.path()), vec![inner.clone(), outer.clone()]);
        unmount_all_under(tmp.path());
        assert!(mounts_under(tmp.path()).is_empty());
    }

    #[test]
    fn a_chain_too_long_for_one_page_of_options_still_mounts() {
        let tmp = tempfile::tempdir().expect("tmp");
        // long paths, like deep state dirs: 120 lowers * ~90 bytes is over a page
        let base = tmp
            .path()
            .join("a-rather-long-state-directory-name-to-make-paths-long/snapshots");
        let mut lowers = Vec::new();
        for i in 0..120 {
            let d = base.join(format!("{:036}", i)).join("diff");
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join(format!("f{i}")), format!("{i}")).expect("write");
            lowers.push(d);
        }
        lowers.reverse(); // top first
        let upper = tmp.path().join("up");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&upper).expect("mkdir");
        std::fs::create_dir_all(&work).expect("mkdir");
        let mnt = tmp.path().join("mnt");
        let m = mount(
            &mnt,
            &lowers,
            Some(Upper {
                diff: &upper,
                work: &work,
                volatile: true,
            }),
            MsFlags::empty(),
        )
        .expect("mount");
        assert_eq!(
            std::fs::read_to_string(m.path.join("f0")).expect("bottom layer"),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(m.path.join("f119")).expect("top layer"),
            "119"
        );
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(m.path.to_str().expect("utf-8")))
            .expect("mounted");
        assert!(
            line.contains("volatile")
                || !VOLATILE_SUPPORTED.load(std::sync::atomic::Ordering::Relaxed),
            "{line}"
        );
        std::fs::write(m.path.join("new"), "x").expect("write through the overlay");
        drop(m);
        assert!(upper.join("new").exists(), "writes land in the upper");
        // read-only, no upper
        let m =
            mount(&mnt, &lowers, None, MsFlags::MS_NOSUID | MsFlags::MS_NODEV).expect("mount ro");
        assert!(std::fs::write(m.path.join("nope"), "x").is_err());
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(m.path.to_str().expect("utf-8")))
            .expect("mounted");
        let opts = line.split(' ').nth(5).unwrap_or_default();
        assert!(
            opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"),
            "{line}"
        );
    }
}
