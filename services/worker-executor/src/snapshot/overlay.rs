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
        if self.mounted {
            nix::mount::umount2(&self.path, MntFlags::empty())
                .or_else(|_| nix::mount::umount2(&self.path, MntFlags::MNT_DETACH))
                .map_err(|source| Error::Mount {
                    target: self.path.clone(),
                    source,
                })?;
            self.mounted = false;
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
        });
    }
    let target = mnt_dir.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(&target).map_err(Error::io("create mountpoint", &target))?;
    let mut m = Mounted {
        path: target.clone(),
        mounted: false,
        owned_dir: true,
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
            if overlay_data(&names, upper, true).len() > MAX_MOUNT_DATA {
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
