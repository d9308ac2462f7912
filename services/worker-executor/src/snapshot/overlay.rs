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
            tracing::warn!(error = %e, "release mount");
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
            Err(e) => tracing::warn!(mount = %m.display(), error = %e, "unmount stale mount"),
        }
    }
}

/// A writable layer on top of the lowers: the overlay `upperdir` and its `workdir`.
#[derive(Debug, Clone, Copy)]
pub struct Upper<'a> {
    pub diff: &'a Path,
    pub work: &'a Path,
}

/// Longest overlay option string passed straight to mount(2); the kernel
/// copies one page of it.
const MAX_MOUNT_DATA: usize = 3500;

/// Mounts an overlay whose lowers are named by links `0`, `1`, ... in a
/// scratch dir next to `target`, with `mount(8)` run in that dir so the
/// relative names resolve there. The links are removed once mounted (the
/// mount holds the directories themselves).
fn mount_with_short_lowers(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<Upper<'_>>,
    flags: MsFlags,
) -> Result<()> {
    let links = target.with_extension("lowers");
    std::fs::create_dir_all(&links).map_err(Error::io("create lower links", &links))?;
    let mut names = Vec::with_capacity(lowers.len());
    for (i, l) in lowers.iter().enumerate() {
        let name = format!("{i:x}");
        std::os::unix::fs::symlink(l, links.join(&name)).map_err(Error::io("link lower", l))?;
        names.push(name);
    }
    let mut data = format!("lowerdir={}", names.join(":"));
    if let Some(u) = upper {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.diff.display(),
            u.work.display()
        ));
    }
    data.push_str(",index=off");
    if flags.contains(MsFlags::MS_RDONLY) {
        data.push_str(",ro");
    }
    let out = std::process::Command::new("mount")
        .current_dir(&links)
        .args(["-t", "overlay", "overlay", "-o", &data])
        .arg(target)
        .output();
    let _ = std::fs::remove_dir_all(&links);
    let out = out.map_err(Error::io("run mount", target))?;
    if !out.status.success() {
        return Err(Error::Mount {
            target: target.to_path_buf(),
            source: nix::errno::Errno::EINVAL,
        })
        .inspect_err(|_| {
            tracing::warn!(
                "mount(8) of {}: {}",
                target.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    }
    Ok(())
}

/// Mounts `lowers` (top first) with an optional writable `upper` under a fresh mountpoint
/// in `mnt_dir`.
///
/// * no lowers, no upper: an empty directory;
/// * no lowers, an upper: the upper directory itself (nothing to merge);
/// * one lower, no upper: a read-only bind mount of that lower;
/// * otherwise an overlay mount (read-only when there is no upper).
pub fn mount(mnt_dir: &Path, lowers: &[PathBuf], upper: Option<Upper<'_>>) -> Result<Mounted> {
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
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(merr)?;
        }
        (lowers, upper) => {
            let lowerdir = lowers
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(":");
            let mut data = format!("lowerdir={lowerdir}");
            let mut flags = MsFlags::empty();
            match upper {
                Some(u) => {
                    data.push_str(&format!(
                        ",upperdir={},workdir={}",
                        u.diff.display(),
                        u.work.display()
                    ));
                }
                None => flags |= MsFlags::MS_RDONLY,
            }
            data.push_str(",index=off");
            if data.len() > MAX_MOUNT_DATA {
                // Mount options must fit in one page: name the lowers by short
                // relative links instead (as containerd and docker do).
                mount_with_short_lowers(&target, lowers, upper, flags)?;
            } else {
                nix::mount::mount(
                    Some("overlay"),
                    &target,
                    Some("overlay"),
                    flags,
                    Some(data.as_str()),
                )
                .map_err(merr)?;
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
            }),
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
        std::fs::write(m.path.join("new"), "x").expect("write through the overlay");
        drop(m);
        assert!(upper.join("new").exists(), "writes land in the upper");
        // read-only, no upper
        let m = mount(&mnt, &lowers, None).expect("mount ro");
        assert!(std::fs::write(m.path.join("nope"), "x").is_err());
    }
}
