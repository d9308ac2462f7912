//! Copying snapshots (`snapshotter = "native"`): where neither overlayfs nor
//! fuse-overlayfs can be mounted (a rootless worker on an old kernel without FUSE), a
//! chain is "mounted" by copying its layers into a fresh directory, and a writable view
//! is turned back into an overlay-style upper when it is released: what differs from
//! the layers below (by type, mode, owner, size, mtime, link target, xattrs) is copied
//! into the upper, and what is gone becomes a whiteout (a 0/0 character device), so
//! layers are written from it as from a kernel overlay's upper.

use crate::fscopy;
use kiln_oci::layer::remove_any;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn times(md: &std::fs::Metadata) -> (nix::sys::time::TimeSpec, nix::sys::time::TimeSpec) {
    (
        nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec()),
        nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec()),
    )
}

/// Makes `dst/rel` a copy of the entry at `src` (not a directory's contents), with
/// its owner, mode, times and xattrs; `links` keeps hard links within one copy.
fn copy_one(
    src: &Path,
    md: &std::fs::Metadata,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let ft = md.file_type();
    if ft.is_dir() {
        if !std::fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
            remove_any(dst)?;
            std::fs::create_dir(dst)?;
        }
    } else {
        remove_any(dst)?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
        } else if ft.is_file() {
            if md.nlink() > 1
                && let Some(first) = links.get(&(md.dev(), md.ino()))
                && std::fs::hard_link(first, dst).is_ok()
            {
                return Ok(());
            }
            std::fs::copy(src, dst)?;
            if md.nlink() > 1 {
                links.insert((md.dev(), md.ino()), dst.to_path_buf());
            }
        } else {
            let kind = nix::sys::stat::SFlag::from_bits_truncate(md.mode() & libc::S_IFMT);
            nix::sys::stat::mknod(
                dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(md.mode() & 0o7777),
                md.rdev(),
            )
            .map_err(io::Error::from)?;
        }
    }
    if ft.is_symlink() {
        let _ = nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            dst,
            Some(nix::unistd::Uid::from_raw(md.uid())),
            Some(nix::unistd::Gid::from_raw(md.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        let (at, mt) = times(md);
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            dst,
            &at,
            &mt,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
        return Ok(());
    }
    if !ft.is_dir() {
        fscopy::set_meta(dst, (md.uid(), md.gid()), Some(md.mode()), times(md))?;
        fscopy::copy_xattrs(src, dst);
    }
    Ok(())
}

/// Entries of `root`, sorted, directories before their contents: (relative path,
/// metadata).
fn entries(root: &Path) -> io::Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .sort_by_file_name()
    {
        let e = e.map_err(io::Error::other)?;
        let md = std::fs::symlink_metadata(e.path())?;
        let rel = e.path().strip_prefix(root).map_err(io::Error::other)?;
        out.push((rel.to_path_buf(), md));
    }
    Ok(out)
}

/// Copies the chain `lowers` (top first) and then `upper` into `target`, applying
/// whiteouts, as an overlay mount would show them.
/// Returns the inode of every directory in the view, so [`write_diff`] can tell a
/// directory a step removed and made again (opaque, as overlayfs marks it) from one
/// it kept.
pub fn materialize(
    target: &Path,
    lowers: &[PathBuf],
    upper: Option<&Path>,
) -> io::Result<DirInodes> {
    let mut layers: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    if let Some(u) = upper {
        layers.push(u);
    }
    let mut dirs: Vec<(PathBuf, PathBuf, std::fs::Metadata)> = Vec::new();
    for layer in layers {
        let mut links = HashMap::new();
        for (rel, md) in entries(layer)? {
            let dst = target.join(&rel);
            if is_whiteout(&md) {
                remove_any(&dst)?;
                continue;
            }
            copy_one(&layer.join(&rel), &md, &dst, &mut links)?;
            if md.is_dir() {
                // an opaque directory hides what the layers below had in it
                let src = layer.join(&rel);
                let is_opaque = kiln_oci::layer::OVERLAY_OPAQUE_XATTRS
                    .iter()
                    .any(|x| xattr::get(&src, x).is_ok_and(|v| v.as_deref() == Some(b"y")));
                if is_opaque {
                    for e in std::fs::read_dir(&dst)? {
                        remove_any(&e?.path())?;
                    }
                }
                dirs.push((src, dst, md));
            }
        }
    }
    // directories last (their contents changed their times); a later layer's wins
    for (src, dst, md) in dirs.iter() {
        if std::fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
            fscopy::set_meta(dst, (md.uid(), md.gid()), Some(md.mode()), times(md))?;
            fscopy::copy_xattrs(src, dst);
        }
    }
    let mut inodes = DirInodes::new();
    for (rel, md) in entries(target)? {
        if md.is_dir() {
            inodes.insert(rel, identity(&md));
        }
    }
    Ok(inodes)
}

/// A directory's inode and birth time: a directory removed and made again may get
/// the same inode number back, not the same birth time.
fn identity(md: &std::fs::Metadata) -> (u64, Option<std::time::SystemTime>) {
    (md.ino(), md.created().ok())
}

/// The identity of a view's directories when it was made, by relative path.
pub type DirInodes = HashMap<PathBuf, (u64, Option<std::time::SystemTime>)>;

/// The entry at `rel` in the chain `lowers` (top first), as an overlay shows it:
/// `None` when no layer has it, a layer's whiteout hides it, or a higher layer has a
/// whiteout or a non-directory at one of its parents.
fn lower_entry(lowers: &[PathBuf], rel: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let parents: Vec<&Path> = rel
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    for (i, l) in lowers.iter().enumerate() {
        let hidden = lowers[..=i].iter().any(|h| {
            parents.iter().any(|p| {
                std::fs::symlink_metadata(h.join(p)).is_ok_and(|m| is_whiteout(&m) || !m.is_dir())
            })
        });
        if hidden {
            return None;
        }
        match std::fs::symlink_metadata(l.join(rel)) {
            Ok(m) if is_whiteout(&m) => return None,
            Ok(m) => return Some((l.join(rel), m)),
            Err(_) => continue,
        }
    }
    None
}

/// Whether `a` (at `pa`) and `b` (at `pb`) are the same entry as far as a layer
/// can tell.
fn same(pa: &Path, a: &std::fs::Metadata, pb: &Path, b: &std::fs::Metadata) -> bool {
    let kind = |m: &std::fs::Metadata| m.mode() & libc::S_IFMT;
    kind(a) == kind(b)
        && a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && (a.is_dir()
            || a.file_type().is_symlink()
            || (a.len() == b.len()
                && a.mtime() == b.mtime()
                && a.mtime_nsec() == b.mtime_nsec()
                && a.nlink() == b.nlink()))
        && a.rdev() == b.rdev()
        && (!a.file_type().is_symlink()
            || std::fs::read_link(pa).ok() == std::fs::read_link(pb).ok())
        && (a.file_type().is_symlink()
            || kiln_oci::layer::content_xattrs(pa).ok() == kiln_oci::layer::content_xattrs(pb).ok())
}

/// Rewrites `upper` as the difference between the chain `lowers` (top first) and
/// `target`: changed and new entries copied, removed ones whited out.
pub fn write_diff(
    lowers: &[PathBuf],
    target: &Path,
    upper: &Path,
    made: &DirInodes,
) -> io::Result<()> {
    for e in std::fs::read_dir(upper)? {
        remove_any(&e?.path())?;
    }
    let mut links = HashMap::new();
    let mut written_dirs: Vec<(PathBuf, PathBuf, std::fs::Metadata)> = Vec::new();
    // every directory above a written entry must be in the upper too
    let ensure_parents =
        |rel: &Path, written: &mut Vec<(PathBuf, PathBuf, std::fs::Metadata)>| -> io::Result<()> {
            let mut acc = PathBuf::new();
            let comps: Vec<_> = rel.components().collect();
            for c in &comps[..comps.len().saturating_sub(1)] {
                acc.push(c);
                let dst = upper.join(&acc);
                if !dst.is_dir() {
                    let src = target.join(&acc);
                    let md = std::fs::symlink_metadata(&src)?;
                    std::fs::create_dir(&dst)?;
                    written.push((src, dst, md));
                }
            }
            Ok(())
        };
    let present: Vec<(PathBuf, std::fs::Metadata)> = entries(target)?;
    let names: BTreeSet<&Path> = present.iter().map(|(r, _)| r.as_path()).collect();
    // directories removed and made again: opaque, nothing below them from the layers
    let mut opaque: BTreeSet<PathBuf> = BTreeSet::new();
    for (rel, md) in &present {
        let src = target.join(rel);
        let below = lower_entry(lowers, rel);
        let remade = md.is_dir()
            && below.as_ref().is_some_and(|(_, l)| l.is_dir())
            && made.get(rel).is_none_or(|id| *id != identity(md));
        let unchanged = !remade && below.is_some_and(|(lp, lmd)| same(&src, md, &lp, &lmd));
        if unchanged {
            continue;
        }
        ensure_parents(rel, &mut written_dirs)?;
        let dst = upper.join(rel);
        copy_one(&src, md, &dst, &mut links)?;
        if md.is_dir() {
            written_dirs.push((src, dst.clone(), md.clone()));
        }
        if remade {
            xattr::set(&dst, crate::rootless::overlay_opaque_xattr(), b"y")?;
            opaque.insert(rel.clone());
        }
    }
    // what the layers below have and the view no longer does
    let mut below: BTreeSet<PathBuf> = BTreeSet::new();
    for l in lowers {
        for (rel, md) in entries(l)? {
            if !is_whiteout(&md) {
                below.insert(rel);
            }
        }
    }
    for rel in below {
        if names.contains(rel.as_path()) || lower_entry(lowers, &rel).is_none() {
            continue;
        }
        // a removed directory's whiteout, or an opaque one, covers what was below it
        if rel
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .any(|p| !names.contains(p) || opaque.contains(p))
        {
            continue;
        }
        ensure_parents(&rel, &mut written_dirs)?;
        let wh = upper.join(&rel);
        remove_any(&wh)?;
        nix::sys::stat::mknod(
            &wh,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .map_err(io::Error::from)?;
    }
    for (src, dst, md) in written_dirs.iter().rev() {
        fscopy::set_meta(dst, (md.uid(), md.gid()), Some(md.mode()), times(md))?;
        fscopy::copy_xattrs(src, dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_view_turns_back_into_the_upper_an_overlay_would_write() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = |n: &str| tmp.path().join(n);
        for d in ["l1/a", "l2", "view", "upper"] {
            std::fs::create_dir_all(p(d)).expect("mkdir");
        }
        std::fs::write(p("l1/a/f"), "f").expect("f");
        std::fs::write(p("l1/keep"), "k").expect("keep");
        std::fs::write(p("l1/gone"), "g").expect("gone");
        // l2 removes l1's gone
        nix::sys::stat::mknod(
            &p("l2/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("whiteout");
        std::fs::write(p("l2/b"), "b").expect("b");
        let lowers = [p("l2"), p("l1")];
        let made = materialize(&p("view"), &lowers, None).expect("materialize");
        assert!(!p("view/gone").exists());
        assert_eq!(std::fs::read_to_string(p("view/a/f")).expect("f"), "f");
        // a step: change one file, add one, remove one, remove a directory
        std::fs::write(p("view/b"), "changed").expect("b");
        std::fs::write(p("view/new"), "n").expect("new");
        std::fs::remove_file(p("view/keep")).expect("rm");
        std::fs::remove_dir_all(p("view/a")).expect("rm a");
        write_diff(&lowers, &p("view"), &p("upper"), &made).expect("diff");
        let mut got: Vec<String> = entries(&p("upper"))
            .expect("entries")
            .into_iter()
            .map(|(r, md)| {
                format!(
                    "{}{}",
                    r.display(),
                    if is_whiteout(&md) { " (whiteout)" } else { "" }
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, ["a (whiteout)", "b", "keep (whiteout)", "new"]);
    }
}
