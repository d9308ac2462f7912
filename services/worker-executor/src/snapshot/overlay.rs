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

/// A writable layer on top of the lowers: the overlay `upperdir` and its `workdir`.
#[derive(Debug, Clone, Copy)]
pub struct Upper<'a> {
    pub diff: &'a Path,
    pub work: &'a Path,
}

/// Mounts `lowers` (top first) with an optional writable `upper` under a fresh mountpoint
/// in `mnt_dir`.
///
/// * no lowers, no upper: an empty directory;
/// * no lowers, an upper: the upper directory itself (nothing to merge);
/// * one lower, no upper: a read-only bind mount of that lower;
/// * otherwise an overlay mount (read-only when there is no upper).
pub fn mount(mnt_dir: &Path, lowers: &[PathBuf], upper: Option<Upper<'_>>) -> Result<Mounted> {
    if lowers.is_empty() {
        if let Some(u) = upper {
            return Ok(Mounted {
                path: u.diff.to_path_buf(),
                mounted: false,
                owned_dir: false,
            });
        }
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
            nix::mount::mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                flags,
                Some(data.as_str()),
            )
            .map_err(merr)?;
            m.mounted = true;
        }
    }
    Ok(m)
}
