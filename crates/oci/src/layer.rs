//! Layer tars: applying them onto a directory (with whiteouts), producing them from an
//! overlayfs upper dir or a whole tree, and detecting their compression.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeVal;

use crate::Error;

/// Prefix of a whiteout entry: `.wh.NAME` deletes NAME from lower layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque-dir marker: hides everything lower layers put in the directory.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// The xattrs that mark a directory of an overlay upper opaque: the kernel's (as root,
/// and in a user namespace with `userxattr`) and fuse-overlayfs's.
pub const OVERLAY_OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

/// Prefixes of the xattrs the overlay implementations keep for themselves: never taken
/// from a layer (a layer does not steer the mounts its snapshot takes part in), never
/// written into one.
const OVERLAY_XATTR_PREFIXES: [&str; 3] =
    ["trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."];

/// Whether `name` is one of the overlay implementations' own xattrs.
pub fn overlay_xattr(name: &str) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Apply an uncompressed layer tar onto `root`.
///
/// `.wh.NAME` deletes NAME, `.wh..wh..opq` empties the directory of everything this layer
/// did not write; hardlinks, symlinks, devices, modes, uid/gid, mtimes and xattrs are kept.
/// No entry may escape `root`: `..` components and symlinked parent directories are errors
/// naming the entry; absolute entry names and hardlink targets are taken relative to `root`.
pub fn apply(reader: impl Read, root: &Path) -> Result<(), Error> {
    let mut archive = tar::Archive::new(reader);
    let mut applied = Applied::default();
    let entries = archive
        .entries()
        .map_err(|source| Error::ReadLayer { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| Error::ReadLayer { source })?;
        apply_entry(&mut entry, root, &mut applied)?;
    }
    // Directory mtimes last: creating children changes them.
    for (path, mtime) in applied.dir_times.iter().rev() {
        set_times(path, *mtime).map_err(apply_err(&path.display().to_string()))?;
    }
    Ok(())
}

/// What applying a layer has done so far.
#[derive(Default)]
struct Applied {
    /// Paths this layer wrote (an opaque whiteout in the same layer keeps them).
    written: HashSet<PathBuf>,
    /// Directories with their mtimes, set once every entry is applied.
    dir_times: Vec<(PathBuf, u64)>,
}

/// Where an entry lands: its name in the layer (for errors), the root and its path there.
struct EntryTarget<'a> {
    name: &'a str,
    root: &'a Path,
    path: PathBuf,
}

/// The metadata an entry's header (and pax xattrs) give the file it writes.
struct EntryMeta {
    header: tar::Header,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let header = entry.header().clone();
        let kind = header.entry_type();
        // Blank numeric fields read as 0, like Go's archive/tar.
        let default_mode = if kind.is_dir() { 0o755 } else { 0o644 };
        Ok(EntryMeta {
            mode: header.mode().unwrap_or(default_mode) & 0o7777,
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            mtime: header.mtime().unwrap_or(0),
            xattrs: pax_xattrs(entry)?,
            kind,
            header,
        })
    }
}

/// An `ApplyEntry` error naming `entry`.
fn apply_err(entry: &str) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::ApplyEntry {
        entry: entry.to_string(),
        source,
    }
}

/// One entry: a whiteout removes what it names, anything else is written.
fn apply_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    root: &Path,
    applied: &mut Applied,
) -> Result<(), Error> {
    let raw = entry
        .path()
        .map_err(|source| Error::ReadLayer { source })?
        .into_owned();
    let name = raw.display().to_string();
    let rel = relative_within_root(&raw).ok_or_else(|| Error::UnsafeEntry {
        entry: name.clone(),
        reason: "path has a `..` component",
    })?;
    if rel.as_os_str().is_empty() {
        // The root itself ("./"): keep the existing root's metadata.
        return Ok(());
    }
    let parent = prepare_parent(root, &rel, &name, &mut applied.written)?;
    let file_name = rel
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();

    if file_name == WHITEOUT_OPAQUE {
        return clear_opaque(&parent, &applied.written).map_err(apply_err(&name));
    }
    if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(Error::UnsafeEntry {
                entry: name,
                reason: "malformed whiteout",
            });
        }
        return remove_any(&parent.join(hidden)).map_err(apply_err(&name));
    }
    let target = EntryTarget {
        name: &name,
        root,
        path: root.join(&rel),
    };
    write_entry(entry, target, applied)
}

/// Writes a non-whiteout entry, replacing whatever lower layers left at its path.
fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    at: EntryTarget<'_>,
    applied: &mut Applied,
) -> Result<(), Error> {
    let err = apply_err(at.name);
    let meta = EntryMeta::read(entry).map_err(&err)?;
    let existing = fs::symlink_metadata(&at.path).ok();
    if meta.kind.is_dir() {
        match &existing {
            Some(m) if m.is_dir() => {}
            Some(_) => {
                remove_any(&at.path).map_err(&err)?;
                fs::create_dir(&at.path).map_err(&err)?;
            }
            None => fs::create_dir(&at.path).map_err(&err)?,
        }
        applied.written.insert(at.path.clone());
        set_owner_mode_xattrs(&at.path, meta.uid, meta.gid, Some(meta.mode), &meta.xattrs)
            .map_err(&err)?;
        applied.dir_times.push((at.path, meta.mtime));
        return Ok(());
    }

    if existing.is_some() {
        remove_any(&at.path).map_err(&err)?;
    }
    if meta.kind.is_hard_link() {
        hard_link(entry, &at)?;
    } else if meta.kind.is_symlink() {
        let target = link_target(entry, at.name, "symlink without target")?;
        std::os::unix::fs::symlink(&target, &at.path).map_err(&err)?;
        set_owner_mode_xattrs(&at.path, meta.uid, meta.gid, None, &meta.xattrs).map_err(&err)?;
        set_times(&at.path, meta.mtime).map_err(&err)?;
    } else if write_node(entry, &at.path, &meta).map_err(&err)? {
        set_owner_mode_xattrs(&at.path, meta.uid, meta.gid, Some(meta.mode), &meta.xattrs)
            .map_err(&err)?;
        set_times(&at.path, meta.mtime).map_err(&err)?;
    } else {
        // pax/gnu metadata entries are consumed by the tar crate; anything else is skipped.
        return Ok(());
    }
    applied.written.insert(at.path);
    Ok(())
}

/// The target a hardlink or symlink entry names; `missing` is the reason when it has none.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    name: &str,
    missing: &'static str,
) -> Result<PathBuf, Error> {
    Ok(entry
        .link_name()
        .map_err(apply_err(name))?
        .ok_or_else(|| Error::UnsafeEntry {
            entry: name.to_string(),
            reason: missing,
        })?
        .into_owned())
}

/// A hardlink to a file already under the root (its target taken relative to the root).
fn hard_link<R: Read>(entry: &tar::Entry<'_, R>, at: &EntryTarget<'_>) -> Result<(), Error> {
    let target = link_target(entry, at.name, "hardlink without target")?;
    let target_rel = relative_within_root(&target).ok_or_else(|| Error::UnsafeEntry {
        entry: at.name.to_string(),
        reason: "hardlink target has a `..` component",
    })?;
    check_parent(at.root, &target_rel, at.name)?;
    let target_path = at.root.join(&target_rel);
    if target_rel.as_os_str().is_empty()
        || fs::symlink_metadata(&target_path)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        return Err(Error::UnsafeEntry {
            entry: at.name.to_string(),
            reason: "hardlink target is a directory",
        });
    }
    fs::hard_link(&target_path, &at.path).map_err(apply_err(at.name))
}

/// A device, fifo or regular file at `path` (mode 0600 until its metadata is set); false
/// for entry kinds that write nothing.
fn write_node<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    meta: &EntryMeta,
) -> io::Result<bool> {
    let kind = meta.kind;
    if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
        let (sflag, dev) = if kind.is_fifo() {
            (SFlag::S_IFIFO, 0)
        } else {
            let major = meta.header.device_major()?.unwrap_or(0);
            let minor = meta.header.device_minor()?.unwrap_or(0);
            let flag = if kind.is_character_special() {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            (flag, nix::sys::stat::makedev(major.into(), minor.into()))
        };
        nix::sys::stat::mknod(path, sflag, Mode::from_bits_truncate(0o600), dev)?;
    } else if kind.is_file() || kind == tar::EntryType::Continuous {
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        copy_content(entry, &mut f, meta.header.size().unwrap_or(0))?;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// Copies a file's `size` bytes of content in pieces of up to 1 MiB: a big
/// file costs a few hundred writes, not one per 8 KiB.
fn copy_content(from: &mut impl Read, to: &mut File, size: u64) -> io::Result<()> {
    let mut buf = vec![0u8; size.clamp(1, 1 << 20) as usize];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// A layer entry's path as one relative to the root it is applied to: only normal
/// components, `None` when it has a `..` (a containment check, not a cleaner).
/// Leading `/` and `.` components are dropped.
fn relative_within_root(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// Make sure every parent of `rel` under `root` is a real directory (creating missing ones),
/// never following a symlink. Returns the parent's path.
fn prepare_parent(
    root: &Path,
    rel: &Path,
    entry: &str,
    written: &mut HashSet<PathBuf>,
) -> Result<PathBuf, Error> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::UnsafeEntry {
                        entry: entry.to_string(),
                        reason: "parent directory is a symlink",
                    });
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::UnsafeEntry {
                        entry: entry.to_string(),
                        reason: "parent is not a directory",
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(|source| Error::ApplyEntry {
                        entry: entry.to_string(),
                        source,
                    })?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).map_err(
                        |source| Error::ApplyEntry {
                            entry: entry.to_string(),
                            source,
                        },
                    )?;
                    written.insert(cur.clone());
                }
                Err(source) => {
                    return Err(Error::ApplyEntry {
                        entry: entry.to_string(),
                        source,
                    });
                }
            }
        }
    }
    Ok(cur)
}

/// Like `prepare_parent` but creates nothing: every parent must already be a real directory.
fn check_parent(root: &Path, rel: &Path, entry: &str) -> Result<(), Error> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::UnsafeEntry {
                        entry: entry.to_string(),
                        reason: "hardlink target parent is not a real directory",
                    });
                }
                Err(source) => {
                    return Err(Error::ApplyEntry {
                        entry: entry.to_string(),
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Remove everything under `dir` that this layer did not write (`written` holds the
/// absolute paths this layer created).
fn clear_opaque(dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for child in fs::read_dir(dir)? {
        let child = child?.path();
        if written.contains(&child) {
            if fs::symlink_metadata(&child)?.is_dir() {
                clear_opaque(&child, written)?;
            }
        } else {
            remove_any(&child)?;
        }
    }
    Ok(())
}

/// Remove a file, symlink or whole directory tree; missing is fine.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            // overlayfs's own xattrs are kiln's to set: a layer does not steer the
            // overlay mounts its snapshot takes part in (as `diff_overlay_upper`
            // never writes them)
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                && !overlay_xattr(name)
            {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

fn set_owner_mode_xattrs(
    path: &Path,
    uid: u64,
    gid: u64,
    mode: Option<u32>,
    xattrs: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let id = |v: u64| u32::try_from(v).map_err(|_| io::Error::other("uid/gid out of range"));
    crate::idmap::lchown(path, id(uid)?, id(gid)?)?;
    // chmod after chown: chown clears setuid/setgid bits.
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    for (name, value) in xattrs {
        xattr::set(path, name, value)?;
    }
    Ok(())
}

fn set_times(path: &Path, mtime: u64) -> io::Result<()> {
    let secs = i64::try_from(mtime).unwrap_or(i64::MAX);
    let tv = TimeVal::new(secs, 0);
    nix::sys::stat::lutimes(path, &tv, &tv).map_err(io::Error::from)
}

/// Write the diff in an overlayfs upper dir as a layer tar: a char device 0/0 becomes
/// `.wh.NAME`, a directory with the xattr `trusted.overlay.opaque=y` (or `user.overlay.opaque`)
/// gets a `DIR/.wh..wh..opq` entry. Entries are sorted; hardlinks within the dir are kept.
pub fn diff_overlay_upper(upper: &Path, w: impl Write) -> Result<(), Error> {
    write_tree(upper, w, true, None)
}

/// [`diff_overlay_upper`] with every mtime later than `clamp` set to `clamp`
/// (BuildKit's `rewrite-timestamp` with `SOURCE_DATE_EPOCH`).
pub fn diff_overlay_upper_clamped(
    upper: &Path,
    w: impl Write,
    clamp: Option<u64>,
) -> Result<(), Error> {
    write_tree(upper, w, true, clamp)
}

/// Tar a whole tree (sorted entries, hardlinks kept, xattrs as PAX records).
pub fn tar_dir(root: &Path, w: impl Write) -> Result<(), Error> {
    write_tree(root, w, false, None)
}

fn write_tree(root: &Path, w: impl Write, overlay: bool, clamp: Option<u64>) -> Result<(), Error> {
    let clamp = clamp.unwrap_or(u64::MAX);
    let mut builder = tar::Builder::new(w);
    builder.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut opaque_dirs: HashSet<PathBuf> = HashSet::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .sort_by_file_name();
    for item in walker {
        let item = item.map_err(|e| Error::WalkDir {
            path: e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf()),
            source: e.into(),
        })?;
        let path = item.path();
        let rel = path.strip_prefix(root).unwrap_or(path).to_path_buf();
        let tar_err = |source: io::Error| Error::WriteTarEntry {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(tar_err)?;
        let ft = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_mode(meta.mode() & 0o7777);
        let mtime = (meta.mtime().max(0) as u64).min(clamp);
        header.set_mtime(mtime);

        use std::os::unix::fs::FileTypeExt;
        let name = rel
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // fuse-overlayfs marks an opaque dir three ways: the xattr (the entry below
        // comes from it), a `.wh..wh..opq` file and a whiteout of `.wh..opq`
        if overlay
            && name.starts_with(WHITEOUT_PREFIX)
            && rel.parent().is_some_and(|p| opaque_dirs.contains(p))
            && ((ft.is_char_device() && meta.rdev() == 0)
                || (ft.is_file() && name == WHITEOUT_OPAQUE && meta.len() == 0))
        {
            continue;
        }
        if overlay && ft.is_char_device() && meta.rdev() == 0 {
            let wh = rel.with_file_name(format!("{WHITEOUT_PREFIX}{name}"));
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_mtime(mtime);
            builder
                .append_data(&mut h, &wh, io::empty())
                .map_err(tar_err)?;
            continue;
        }

        let xattrs = read_xattrs(path).map_err(tar_err)?;
        let opaque = overlay
            && ft.is_dir()
            && xattrs
                .iter()
                .any(|(k, v)| OVERLAY_OPAQUE_XATTRS.contains(&k.as_str()) && v == b"y");
        let kept: Vec<(String, Vec<u8>)> = xattrs
            .into_iter()
            .filter(|(k, _)| !overlay_xattr(k))
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
            .collect();
        if !kept.is_empty() {
            builder
                .append_pax_extensions(kept.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(tar_err)?;
        }

        if ft.is_dir() {
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(tar_err)?;
            if opaque {
                opaque_dirs.insert(rel.clone());
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                h.set_mtime(mtime);
                builder
                    .append_data(&mut h, rel.join(WHITEOUT_OPAQUE), io::empty())
                    .map_err(tar_err)?;
            }
            continue;
        }
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = links.get(&key) {
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                builder
                    .append_link(&mut header, &rel, first)
                    .map_err(tar_err)?;
                continue;
            }
            links.insert(key, rel.clone());
        }
        if ft.is_symlink() {
            let target = fs::read_link(path).map_err(tar_err)?;
            header.set_size(0);
            builder
                .append_link(&mut header, &rel, &target)
                .map_err(tar_err)?;
        } else if ft.is_file() {
            let f = File::open(path).map_err(tar_err)?;
            header.set_size(meta.len());
            builder.append_data(&mut header, &rel, f).map_err(tar_err)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            header.set_size(0);
            header
                .set_device_major(nix::sys::stat::major(rdev) as u32)
                .map_err(tar_err)?;
            header
                .set_device_minor(nix::sys::stat::minor(rdev) as u32)
                .map_err(tar_err)?;
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(tar_err)?;
        } else if ft.is_fifo() {
            header.set_size(0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(tar_err)?;
        }
        // sockets are not representable in a layer; skipped like docker does.
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|source| Error::WriteTarEntry {
            path: root.to_path_buf(),
            source,
        })
}

/// The extended attributes of `path` (not followed) that belong to its content: all
/// but the overlay implementations' own, sorted by name; none where the filesystem
/// keeps none.
pub fn content_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut all = read_xattrs(path)?;
    all.retain(|(k, _)| !overlay_xattr(k));
    Ok(all)
}

/// Sets the xattr `name` on `path` (not followed), unless it is one kiln never
/// carries over: the overlay implementations' own (they would steer the mounts the
/// tree takes part in) and SELinux labels (the host's to give).
pub fn set_carried_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    if overlay_xattr(name) || name == "security.selinux" {
        return Ok(());
    }
    xattr::set(path, name, value)
}

fn read_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name.to_string_lossy().into_owned(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Detect gzip / zstd / plain by magic bytes and return a decompressing reader.
pub fn decompress(r: impl Read + Send + 'static) -> Result<Box<dyn Read + Send>, Error> {
    let mut buf = BufReader::with_capacity(64 * 1024, r);
    let head = buf
        .fill_buf()
        .map_err(|source| Error::DetectCompression { source })?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::with_buffer(buf)
            .map(|d| Box::new(d) as Box<dyn Read + Send>)
            .map_err(|source| Error::DetectCompression { source })
    } else {
        Ok(Box::new(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    use crate::raw_tar::{RawEntry as E, raw_tar as build};

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = walkdir::WalkDir::new(dir)
            .min_depth(1)
            .into_iter()
            .map(|e| {
                e.expect("walk")
                    .path()
                    .strip_prefix(dir)
                    .expect("prefix")
                    .display()
                    .to_string()
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn apply_handles_whiteouts_opaque_dirs_and_links() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let base = build(&[
            E::Dir("a", 0o755),
            E::File("a/keep", b"k", 0o644, 0),
            E::File("a/old", b"o", 0o644, 0),
            E::Dir("b", 0o755),
            E::File("b/x", b"x", 0o644, 0),
            E::Dir("b/sub", 0o755),
            E::File("b/sub/deep", b"d", 0o644, 0),
            E::Dir("c", 0o755),
            E::File("c/y", b"y", 0o644, 0),
            E::File("d", b"old d", 0o644, 0),
        ]);
        apply(&base[..], r).expect("apply base");
        assert_eq!(
            fs::metadata(r.join("b")).expect("b").mtime(),
            1_000_000,
            "dir mtime set last"
        );
        let layer = build(&[
            E::File("a/.wh.old", b"", 0o644, 0),
            E::File("b/first", b"1", 0o644, 0),
            E::File("b/.wh..wh..opq", b"", 0o644, 0),
            E::File("b/new", b"n", 0o644, 0),
            E::File(".wh.c", b"", 0o644, 0),
            E::File("./d", b"new d", 0o4750, 1000),
            E::Symlink("l", "/etc/passwd"),
            E::Hardlink("h", "d"),
            E::File("/abs/file", b"abs", 0o600, 0),
        ]);
        apply(&layer[..], r).expect("apply layer");
        assert_eq!(
            names(r),
            [
                "a", "a/keep", "abs", "abs/file", "b", "b/first", "b/new", "d", "h", "l"
            ]
        );
        let d = fs::metadata(r.join("d")).expect("d");
        assert_eq!(fs::read(r.join("d")).expect("read d"), b"new d");
        assert_eq!(d.mode() & 0o7777, 0o4750, "setuid kept after chown");
        assert_eq!((d.uid(), d.gid()), (1000, 1000));
        assert_eq!(d.mtime(), 1_000_000);
        assert_eq!(d.nlink(), 2);
        assert_eq!(fs::metadata(r.join("h")).expect("h").ino(), d.ino());
        assert_eq!(
            fs::read_link(r.join("l")).expect("l"),
            Path::new("/etc/passwd")
        );
    }

    fn assert_unsafe(entries: &[E], setup: &[E]) {
        let root = tempfile::tempdir().expect("tempdir");
        let inner = root.path().join("root");
        fs::create_dir(&inner).expect("mkdir");
        apply(&build(setup)[..], &inner).expect("setup");
        let err = apply(&build(entries)[..], &inner).expect_err("must be rejected");
        assert!(matches!(err, Error::UnsafeEntry { .. }), "{err:?}");
        assert!(!root.path().join("x").exists());
    }

    #[test]
    fn apply_rejects_dotdot_entries() {
        assert_unsafe(&[E::File("../x", b"evil", 0o644, 0)], &[]);
        assert_unsafe(
            &[E::File("a/../../x", b"evil", 0o644, 0)],
            &[E::Dir("a", 0o755)],
        );
    }

    #[test]
    fn apply_rejects_writes_through_symlinked_parent() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        let layer = build(&[
            E::Symlink("a", outside.path().to_str().expect("utf8")),
            E::File("a/passwd", b"evil", 0o644, 0),
        ]);
        let err = apply(&layer[..], root.path()).expect_err("must be rejected");
        match err {
            Error::UnsafeEntry { entry, .. } => assert_eq!(entry, "a/passwd"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!outside.path().join("passwd").exists());
        // the classic form: a -> /etc
        assert_unsafe(
            &[
                E::Symlink("a", "/etc"),
                E::File("a/passwd", b"evil", 0o644, 0),
            ],
            &[],
        );
    }

    /// `build`, with PAX xattrs on the entry named `on`.
    fn build_with_xattrs(entries: &[E], on: &str, xattrs: &[(&str, &[u8])]) -> Vec<u8> {
        let plain = build(entries);
        let mut ar = tar::Archive::new(&plain[..]);
        let mut b = tar::Builder::new(Vec::new());
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let h = e.header().clone();
            if e.path().expect("path").to_str() == Some(on) {
                b.append_pax_extensions(
                    xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                        .collect::<Vec<_>>()
                        .iter()
                        .map(|(k, v)| (k.as_str(), *v)),
                )
                .expect("pax");
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            b.append(&h, &data[..]).expect("append");
        }
        b.into_inner().expect("finish")
    }

    /// An outside dir with a file and a directory, for the attacks to aim at.
    fn outside() -> tempfile::TempDir {
        let o = tempfile::tempdir().expect("outside");
        fs::write(o.path().join("victim"), b"untouched").expect("victim");
        fs::create_dir(o.path().join("dir")).expect("dir");
        fs::write(o.path().join("dir/keep"), b"keep").expect("keep");
        o
    }

    fn assert_outside_untouched(o: &Path) {
        assert_eq!(names(o), ["dir", "dir/keep", "victim"]);
        assert_eq!(fs::read(o.join("victim")).expect("victim"), b"untouched");
        assert!(
            xattr::list(o.join("victim"))
                .expect("list")
                .next()
                .is_none()
        );
        assert!(xattr::list(o.join("dir")).expect("list").next().is_none());
    }

    #[test]
    fn apply_never_reaches_through_symlinks_up_or_out() {
        let o = outside();
        let out = o.path().to_str().expect("utf8");
        let depth = "../".repeat(16);
        let up = format!("{depth}{}", out.trim_start_matches('/'));
        let below = |l: &str, rest: &str| format!("{l}/{}/{rest}", out.trim_start_matches('/'));
        // `a -> ../../..` then `a/<outside>/victim`, in one layer and across layers
        let climb = depth.clone();
        let (a_victim, a_new) = (below("a", "victim"), below("a", "new"));
        let cases: Vec<(Vec<E>, Vec<E>)> = vec![
            (
                vec![],
                vec![
                    E::Symlink("a", &climb),
                    E::File(&a_victim, b"evil", 0o644, 0),
                ],
            ),
            (
                vec![E::Symlink("a", &climb)],
                vec![E::File(&a_new, b"evil", 0o644, 0)],
            ),
            // a whiteout and an opaque marker below a symlink to the outside dir
            (
                vec![E::Symlink("w", out)],
                vec![E::File("w/.wh.victim", b"", 0o644, 0)],
            ),
            (
                vec![E::Symlink("w", &up)],
                vec![E::File("w/.wh..wh..opq", b"", 0o644, 0)],
            ),
            // a directory entry below a symlink
            (vec![E::Symlink("d", out)], vec![E::Dir("d/dir", 0o777)]),
            // a hard link to a file reached through a symlink, in the same layer
            (
                vec![],
                vec![E::Symlink("s", &up), E::Hardlink("h", "s/victim")],
            ),
        ];
        for (lower, layer) in &cases {
            assert_unsafe(layer, lower);
            assert_outside_untouched(o.path());
        }
        // a hard link to a symlink links the symlink, never its target
        let root = tempfile::tempdir().expect("root");
        let victim = o.path().join("victim");
        let layer = build(&[
            E::Symlink("s", victim.to_str().expect("utf8")),
            E::Hardlink("h", "s"),
        ]);
        apply(&layer[..], root.path()).expect("apply");
        assert!(
            fs::symlink_metadata(root.path().join("h"))
                .expect("h")
                .file_type()
                .is_symlink()
        );
        // and rewriting `h` later replaces the link, not the file it names
        apply(&build(&[E::File("h", b"evil", 0o644, 0)])[..], root.path()).expect("apply");
        assert_outside_untouched(o.path());
    }

    #[test]
    fn apply_sets_xattrs_on_symlinks_themselves_and_drops_overlay_xattrs() {
        let o = outside();
        let root = tempfile::tempdir().expect("root");
        let victim = o.path().join("victim");
        // xattrs on a symlink to an outside file: set on the link (or refused by the
        // filesystem), never on the file
        let layer = build_with_xattrs(
            &[E::Symlink("l", victim.to_str().expect("utf8"))],
            "l",
            &[("user.pwned", b"1"), ("trusted.pwned", b"1")],
        );
        let _ = apply(&layer[..], root.path());
        assert_outside_untouched(o.path());
        // overlayfs's xattrs are not taken from a layer
        let layer = build_with_xattrs(
            &[E::Dir("d", 0o755)],
            "d",
            &[
                ("trusted.overlay.opaque", b"y"),
                ("trusted.overlay.redirect", b"/elsewhere"),
                ("user.overlay.opaque", b"y"),
                ("user.kept", b"k"),
            ],
        );
        apply(&layer[..], root.path()).expect("apply");
        let d = root.path().join("d");
        let mut got: Vec<String> = xattr::list(&d)
            .expect("list")
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, ["user.kept"]);
    }

    #[test]
    fn apply_rejects_hardlinks_outside_root() {
        assert_unsafe(&[E::Hardlink("h", "../../etc/passwd")], &[]);
        // an absolute target is root-relative: /etc/passwd does not exist under root
        let root = tempfile::tempdir().expect("tempdir");
        let err = apply(&build(&[E::Hardlink("h", "/etc/passwd")])[..], root.path())
            .expect_err("no such file in root");
        assert!(matches!(err, Error::ApplyEntry { .. }), "{err:?}");
        // a hardlink through a symlinked dir is refused
        assert_unsafe(
            &[E::Symlink("e", "/etc"), E::Hardlink("h", "e/passwd")],
            &[],
        );
    }

    #[test]
    fn diff_of_a_fuse_overlayfs_upper_has_one_opaque_marker_per_dir() {
        // fuse-overlayfs marks `d` opaque by xattr, a `.wh..wh..opq` file and a
        // whiteout of `.wh..opq`; `e` only by the file
        let upper = tempfile::tempdir().expect("upper");
        let u = upper.path();
        fs::create_dir(u.join("d")).expect("d");
        xattr::set(u.join("d"), "user.fuseoverlayfs.opaque", b"y").expect("setxattr");
        fs::write(u.join("d/.wh..wh..opq"), b"").expect("marker");
        nix::sys::stat::mknod(
            &u.join("d/.wh..opq"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o700),
            0,
        )
        .expect("mknod");
        fs::write(u.join("d/n"), b"n").expect("d/n");
        fs::create_dir(u.join("e")).expect("e");
        fs::write(u.join("e/.wh..wh..opq"), b"").expect("marker");
        let mut out = Vec::new();
        diff_overlay_upper(u, &mut out).expect("diff");
        let mut ar = tar::Archive::new(&out[..]);
        let mut got = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            // no overlay xattr reaches the layer
            let xattrs = match e.pax_extensions().expect("pax") {
                Some(x) => x.count(),
                None => 0,
            };
            got.push((e.path().expect("path").display().to_string(), xattrs));
        }
        assert_eq!(
            got,
            vec![
                ("d".to_string(), 0),
                ("d/.wh..wh..opq".to_string(), 0),
                ("d/n".to_string(), 0),
                ("e".to_string(), 0),
                ("e/.wh..wh..opq".to_string(), 0),
            ]
        );
    }

    #[test]
    fn diff_overlay_upper_emits_whiteouts() {
        let upper = tempfile::tempdir().expect("upper");
        let u = upper.path();
        fs::write(u.join("f"), b"file").expect("f");
        fs::hard_link(u.join("f"), u.join("f2")).expect("f2");
        nix::sys::stat::mknod(
            &u.join("gone"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("mknod whiteout");
        fs::create_dir(u.join("o")).expect("o");
        xattr::set(u.join("o"), "trusted.overlay.opaque", b"y").expect("setxattr");
        fs::write(u.join("o/n"), b"n").expect("o/n");
        std::os::unix::fs::symlink("f", u.join("s")).expect("s");

        let mut out = Vec::new();
        diff_overlay_upper(u, &mut out).expect("diff");
        let mut ar = tar::Archive::new(&out[..]);
        let got: Vec<(String, tar::EntryType, Option<String>)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().entry_type(),
                    e.link_name()
                        .expect("link")
                        .map(|l| l.display().to_string()),
                )
            })
            .collect();
        use tar::EntryType as T;
        assert_eq!(
            got,
            vec![
                ("f".into(), T::Regular, None),
                ("f2".into(), T::Link, Some("f".into())),
                (".wh.gone".into(), T::Regular, None),
                ("o".into(), T::Directory, None),
                ("o/.wh..wh..opq".into(), T::Regular, None),
                ("o/n".into(), T::Regular, None),
                ("s".into(), T::Symlink, Some("f".into())),
            ]
        );

        // Applying the diff onto a lower tree gives overlay semantics.
        let lower = tempfile::tempdir().expect("lower");
        let l = lower.path();
        fs::write(l.join("gone"), b"x").expect("gone");
        fs::create_dir(l.join("o")).expect("o");
        fs::write(l.join("o/hidden"), b"h").expect("hidden");
        apply(&out[..], l).expect("apply diff");
        assert_eq!(names(l), ["f", "f2", "o", "o/n", "s"]);
        assert!(
            xattr::get(l.join("o"), "trusted.overlay.opaque")
                .expect("getxattr")
                .is_none()
        );
    }

    #[test]
    fn tar_dir_round_trips_through_apply() {
        let src = tempfile::tempdir().expect("src");
        let s = src.path();
        fs::create_dir_all(s.join("usr/bin")).expect("mkdir");
        fs::write(s.join("usr/bin/tool"), b"#!/bin/sh\n").expect("tool");
        fs::set_permissions(s.join("usr/bin/tool"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        xattr::set(s.join("usr/bin/tool"), "user.kiln", b"v").expect("xattr");
        std::os::unix::fs::symlink("usr/bin", s.join("bin")).expect("symlink");
        nix::unistd::mkfifo(&s.join("fifo"), Mode::from_bits_truncate(0o644)).expect("fifo");
        let mut out = Vec::new();
        tar_dir(s, &mut out).expect("tar");
        let dst = tempfile::tempdir().expect("dst");
        apply(&out[..], dst.path()).expect("apply");
        assert_eq!(names(dst.path()), names(s));
        let m = fs::metadata(dst.path().join("usr/bin/tool")).expect("tool");
        assert_eq!(m.mode() & 0o777, 0o755);
        assert_eq!(
            xattr::get(dst.path().join("usr/bin/tool"), "user.kiln").expect("getxattr"),
            Some(b"v".to_vec())
        );
        assert_eq!(
            fs::read_link(dst.path().join("bin")).expect("link"),
            Path::new("usr/bin")
        );
    }

    #[test]
    fn decompress_detects_gzip_and_plain() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"payload").expect("gz");
        let gz = gz.finish().expect("gz");
        let mut s = String::new();
        decompress(io::Cursor::new(gz))
            .expect("gz")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "payload");
        let mut s = String::new();
        decompress(io::Cursor::new(b"plain".to_vec()))
            .expect("plain")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "plain");
        let z = zstd::encode_all(&b"zpayload"[..], 3).expect("zstd");
        let mut s = String::new();
        decompress(io::Cursor::new(z))
            .expect("zstd")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "zpayload");
    }

    #[test]
    fn clamped_diff_has_no_mtime_after_the_epoch() {
        let src = tempfile::tempdir().expect("tempdir");
        fs::create_dir(src.path().join("d")).expect("mkdir");
        fs::write(src.path().join("d/new"), b"x").expect("write");
        fs::write(src.path().join("old"), b"y").expect("write");
        set_times(&src.path().join("old"), 1000).expect("utimes");
        let mut out = Vec::new();
        diff_overlay_upper_clamped(src.path(), &mut out, Some(5000)).expect("tar");
        let mut a = tar::Archive::new(&out[..]);
        let mut times = Vec::new();
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            let p = e.path().expect("path").display().to_string();
            times.push((p, e.header().mtime().expect("mtime")));
        }
        assert_eq!(
            times,
            vec![
                ("d".to_string(), 5000),
                ("d/new".to_string(), 5000),
                ("old".to_string(), 1000)
            ]
        );
    }
}
