//! Copying file trees with their metadata (owner, mode, times, symlinks, devices).

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Overrides applied to every copied entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOpts {
    pub owner: Option<(u32, u32)>,
    pub mode: Option<u32>,
    /// Nanoseconds since the epoch for atime and mtime.
    pub timestamp: Option<i64>,
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Sets owner, mode and times of `path` (without following a final symlink).
pub fn set_meta(
    path: &Path,
    owner: (u32, u32),
    mode: Option<u32>,
    times: (TimeSpec, TimeSpec),
) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))?;
    let md = std::fs::symlink_metadata(path)?;
    if !md.file_type().is_symlink() {
        if let Some(m) = mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m & 0o7777))?;
        }
    }
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &times.0,
        &times.1,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_io)
}

/// Time pair for `set_meta` from a nanosecond timestamp.
pub fn timespec(nanos: i64) -> (TimeSpec, TimeSpec) {
    let t = TimeSpec::new(
        nanos.div_euclid(1_000_000_000),
        nanos.rem_euclid(1_000_000_000),
    );
    (t, t)
}

/// Copies `src` (file, symlink, device or whole directory) to `dst`. An existing directory
/// at `dst` is merged into; any other existing entry is replaced.
pub fn copy_entry(src: &Path, dst: &Path, opts: &CopyOpts) -> io::Result<()> {
    let md = std::fs::symlink_metadata(src)?;
    let ft = md.file_type();
    let existing = std::fs::symlink_metadata(dst).ok();
    if let Some(e) = &existing {
        if !(ft.is_dir() && e.is_dir()) {
            if e.is_dir() {
                std::fs::remove_dir_all(dst)?;
            } else {
                std::fs::remove_file(dst)?;
            }
        }
    }
    if ft.is_dir() {
        if !dst.is_dir() {
            std::fs::create_dir(dst)?;
        }
        let mut names: Vec<_> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names {
            copy_entry(&src.join(&n), &dst.join(&n), opts)?;
        }
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_file() {
        std::fs::copy(src, dst)?;
    } else {
        let kind = SFlag::from_bits_truncate(md.mode() & libc::S_IFMT);
        nix::sys::stat::mknod(
            dst,
            kind,
            Mode::from_bits_truncate(md.mode() & 0o7777),
            md.rdev(),
        )
        .map_err(nix_io)?;
    }
    let owner = opts.owner.unwrap_or((md.uid(), md.gid()));
    let mode = opts.mode.or(Some(md.mode()));
    let times = match opts.timestamp {
        Some(t) => timespec(t),
        None => (
            TimeSpec::new(md.atime(), md.atime_nsec()),
            TimeSpec::new(md.mtime(), md.mtime_nsec()),
        ),
    };
    set_meta(dst, owner, mode, times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_tree_with_symlinks_and_overrides() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).expect("mkdir");
        std::fs::write(src.join("d/f"), "data").expect("write");
        std::os::unix::fs::symlink("d/f", src.join("l")).expect("symlink");
        let dst = tmp.path().join("dst");
        let opts = CopyOpts {
            owner: Some((7, 8)),
            mode: Some(0o600),
            timestamp: Some(1_000_000_000),
        };
        copy_entry(&src, &dst, &opts).expect("copy");
        assert_eq!(
            std::fs::read_to_string(dst.join("d/f")).expect("read"),
            "data"
        );
        assert_eq!(
            std::fs::read_link(dst.join("l")).expect("link"),
            Path::new("d/f")
        );
        let md = std::fs::metadata(dst.join("d/f")).expect("stat");
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777, md.mtime()),
            (7, 8, 0o600, 1)
        );
    }
}
