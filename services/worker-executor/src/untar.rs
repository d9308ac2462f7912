//! `ADD archive.tar /dest/`: unpacking a local tar (plain, gzip, bzip2, xz or zstd,
//! told apart by content as moby/go-archive's `DecompressStream` does) the way Docker does,
//! with every entry kept inside the destination: entry paths are cleaned lexically and
//! may not climb above the destination, parent symlinks resolve inside the root, and
//! hard links may only point at entries inside the destination.

use crate::fscopy::{self, CopyOpts};
use crate::rootpath;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// What kind of archive a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    GzipTar,
    Bzip2Tar,
    XzTar,
    ZstdTar,
}

/// A decompressing child process (`xz -d`, `bzip2 -d`; go-archive runs
/// `xz` too): its output, and its exit status checked at the end of it.
struct ChildReader {
    child: std::process::Child,
    out: std::process::ChildStdout,
    done: bool,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.done {
            self.done = true;
            let st = self.child.wait()?;
            if !st.success() {
                return Err(io::Error::other(format!("decompressing: {st}")));
            }
        }
        Ok(n)
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn child_reader(prog: &str, f: std::fs::File) -> io::Result<ChildReader> {
    let mut child = std::process::Command::new(prog)
        .args(["-d", "-c", "-q"])
        .stdin(f)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{prog}: {e}")))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other(format!("{prog}: no stdout")))?;
    Ok(ChildReader {
        child,
        out,
        done: false,
    })
}

/// The decompressed stream of `f`.
fn decoder(kind: ArchiveKind, f: std::fs::File) -> io::Result<Box<dyn Read>> {
    Ok(match kind {
        ArchiveKind::Tar => Box::new(f),
        // every member, as Go's gzip reader (and so BuildKit's ADD) reads them: a file of
        // concatenated gzip streams (`cat a.gz b.gz`, bgzip) is one archive
        ArchiveKind::GzipTar => Box::new(flate2::read::MultiGzDecoder::new(f)),
        ArchiveKind::Bzip2Tar => Box::new(child_reader("bzip2", f)?),
        ArchiveKind::XzTar => Box::new(child_reader("xz", f)?),
        ArchiveKind::ZstdTar => Box::new(zstd::stream::read::Decoder::new(f)?),
    })
}

/// The compression go-archive's `DetectCompression` sees in a file's first bytes.
fn compression(head: &[u8]) -> ArchiveKind {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        ArchiveKind::GzipTar
    } else if head.starts_with(b"BZh") {
        ArchiveKind::Bzip2Tar
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        ArchiveKind::XzTar
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
    {
        ArchiveKind::ZstdTar
    } else {
        ArchiveKind::Tar
    }
}

fn is_tar_header(b: &[u8]) -> bool {
    if b.len() < 512 {
        return false;
    }
    if &b[257..262] == b"ustar" {
        return true;
    }
    // old v7 tar: the header checksum is the only signature
    let stored = std::str::from_utf8(&b[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = b[..512]
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if (148..156).contains(&i) {
                32
            } else {
                c as u32
            }
        })
        .sum();
    stored == Some(sum) && b[0] != 0
}

/// `Some` when `path` is a tar archive Docker's ADD would unpack.
pub fn archive_kind(path: &Path) -> io::Result<Option<ArchiveKind>> {
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)?
        .take(512)
        .read_to_end(&mut head)?;
    let kind = compression(&head);
    if kind != ArchiveKind::Tar {
        let mut inner = Vec::with_capacity(512);
        let f = std::fs::File::open(path)?;
        // a corrupt stream is not an archive: the file is copied as is
        let ok = decoder(kind, f).and_then(|d| d.take(512).read_to_end(&mut inner));
        if ok.is_err() {
            return Ok(None);
        }
        return Ok(is_tar_header(&inner).then_some(kind));
    }
    Ok(is_tar_header(&head).then_some(ArchiveKind::Tar))
}

/// Cleans `p` lexically; `None` when it climbs above its start.
fn clean_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir if !out.pop() => {
                return None;
            }
            _ => {}
        }
    }
    Some(out)
}

fn escape(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "archive entry {} points outside the destination",
            p.display()
        ),
    )
}

/// Unpacks the archive at `src` into `dst` (an existing directory inside `root`).
pub fn unpack(
    src: &Path,
    kind: ArchiveKind,
    root: &Path,
    dst: &Path,
    opts: &CopyOpts,
) -> io::Result<()> {
    let f = std::fs::File::open(src)?;
    let reader = decoder(kind, f)?;
    let dst_in_root = rootpath::in_root_display(root, dst);
    let mut ar = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    for entry in ar.entries()? {
        let mut e = entry?;
        let raw = e.path()?.into_owned();
        let rel = clean_rel(&raw).ok_or_else(|| escape(&raw))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        // parents resolve inside the root (symlinks included); the entry itself is
        // never followed
        let in_root = format!("{}/{}", dst_in_root.trim_end_matches('/'), rel.display());
        let target = rootpath::resolve(root, &in_root, false)?;
        if !target.starts_with(dst) {
            return Err(escape(&raw));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let h = e.header().clone();
        let et = h.entry_type();
        if let Ok(md) = std::fs::symlink_metadata(&target)
            && !(et.is_dir() && md.is_dir())
        {
            if md.is_dir() {
                std::fs::remove_dir_all(&target)?;
            } else {
                std::fs::remove_file(&target)?;
            }
        }
        match et {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    std::fs::create_dir(&target)?;
                }
                dirs.push((target, h));
                continue;
            }
            tar::EntryType::Symlink => {
                let link = e.link_name()?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "symlink without target")
                })?;
                // stored as is: inside the container an absolute target means the
                // container's root, and every later resolution happens in the root
                std::os::unix::fs::symlink(link.as_ref(), &target)?;
            }
            tar::EntryType::Link => {
                let link = e
                    .link_name()?
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "hard link without target")
                    })?
                    .into_owned();
                let lrel = clean_rel(&link).ok_or_else(|| escape(&link))?;
                let lpath = rootpath::resolve(
                    root,
                    &format!("{}/{}", dst_in_root.trim_end_matches('/'), lrel.display()),
                    false,
                )?;
                if !lpath.starts_with(dst) {
                    return Err(escape(&link));
                }
                std::fs::hard_link(&lpath, &target)?;
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = std::fs::File::create(&target)?;
                io::copy(&mut e, &mut out)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                use nix::sys::stat::{Mode, SFlag};
                let kind = match et {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = nix::sys::stat::makedev(
                    h.device_major()?.unwrap_or(0) as u64,
                    h.device_minor()?.unwrap_or(0) as u64,
                );
                nix::sys::stat::mknod(&target, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            }
            // pax headers and the like carry no file
            _ => continue,
        }
        set_entry_meta(&target, &h, opts)?;
    }
    // directories last, so writing their content did not disturb their times
    for (d, h) in dirs.iter().rev() {
        set_entry_meta(d, h, opts)?;
    }
    Ok(())
}

fn set_entry_meta(p: &Path, h: &tar::Header, opts: &CopyOpts) -> io::Result<()> {
    let owner = opts
        .owner
        .unwrap_or((h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32));
    let mode = h.mode().unwrap_or(0o644);
    let is_dir = h.entry_type().is_dir();
    let mode = match &opts.mode_str {
        Some(ms) => ms.apply(mode, is_dir),
        None => opts.mode.unwrap_or(mode),
    };
    let times = match opts.timestamp {
        Some(t) => fscopy::timespec(t),
        None => {
            let m = h.mtime().unwrap_or(0) as i64;
            let t = nix::sys::time::TimeSpec::new(m, 0);
            (t, t)
        }
    };
    fscopy::set_meta(p, owner, Some(mode), times)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, et, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*et);
            h.set_mode(0o644);
            h.set_mtime(1);
            match et {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    // set_link_name refuses `..`; write the raw bytes
                    let name = &mut h.as_old_mut().linkname;
                    name[..data.len()].copy_from_slice(data.as_bytes());
                }
                _ => h.set_size(data.len() as u64),
            }
            {
                let name = &mut h.as_old_mut().name;
                name[..path.len()].copy_from_slice(path.as_bytes());
            }
            h.set_cksum();
            let body: &[u8] = if matches!(et, tar::EntryType::Regular) {
                data.as_bytes()
            } else {
                &[]
            };
            b.append(&h, body).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn an_archive_in_several_gzip_members_or_zstd_frames_is_unpacked_whole() {
        use std::io::Write;
        let tar = tar_with(&[
            ("first.txt", tar::EntryType::Regular, "one"),
            ("dir/second.txt", tar::EntryType::Regular, "two"),
            ("dir/third.txt", tar::EntryType::Regular, "three"),
        ]);
        // cut inside the second entry's header: no member holds a whole archive
        let (a, b) = tar.split_at(1024 + 100);
        let gzip = |part: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).expect("gz");
            e.finish().expect("gz")
        };
        let zstd = |part: &[u8]| zstd::stream::encode_all(part, 3).expect("zstd");
        let tmp = tempfile::tempdir().expect("tempdir");
        for (name, kind, blob) in [
            (
                "members.tar.gz",
                ArchiveKind::GzipTar,
                [gzip(a), gzip(b)].concat(),
            ),
            (
                "frames.tar.zst",
                ArchiveKind::ZstdTar,
                [zstd(a), zstd(b)].concat(),
            ),
        ] {
            let src = tmp.path().join(name);
            std::fs::write(&src, blob).expect("w");
            assert_eq!(archive_kind(&src).expect("kind"), Some(kind), "{name}");
            let root = tmp.path().join(format!("root-{name}"));
            std::fs::create_dir_all(&root).expect("mkdir");
            unpack(&src, kind, &root, &root, &CopyOpts::default()).expect("unpack");
            for (path, body) in [
                ("first.txt", "one"),
                ("dir/second.txt", "two"),
                ("dir/third.txt", "three"),
            ] {
                assert_eq!(
                    std::fs::read_to_string(root.join(path)).ok().as_deref(),
                    Some(body),
                    "{name}: {path}"
                );
            }
        }
    }

    #[test]
    fn unpacks_inside_the_destination_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let dst = root.join("dest");
        std::fs::create_dir_all(&dst).expect("mkdir");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/passwd"), "orig").expect("w");
        let good = tar_with(&[
            ("a/b.txt", tar::EntryType::Regular, "b"),
            ("abs-link", tar::EntryType::Symlink, "/etc"),
            ("a/hl", tar::EntryType::Link, "a/b.txt"),
        ]);
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&good).expect("gz");
            e.finish().expect("gz")
        };
        let src = tmp.path().join("good.tar.gz");
        std::fs::write(&src, gz).expect("w");
        assert_eq!(
            archive_kind(&src).expect("kind"),
            Some(ArchiveKind::GzipTar)
        );
        unpack(
            &src,
            ArchiveKind::GzipTar,
            &root,
            &dst,
            &CopyOpts::default(),
        )
        .expect("unpack");
        assert_eq!(
            std::fs::read_to_string(dst.join("a/b.txt")).expect("b"),
            "b"
        );
        assert_eq!(
            std::fs::read_link(dst.join("abs-link")).expect("link"),
            Path::new("/etc")
        );

        for (name, bad) in [
            (
                "dotdot",
                tar_with(&[("../../escaped", tar::EntryType::Regular, "x")]),
            ),
            (
                "through-link",
                tar_with(&[("abs-link/passwd", tar::EntryType::Regular, "pwned")]),
            ),
            (
                "hardlink-out",
                tar_with(&[("hl", tar::EntryType::Link, "../etc/passwd")]),
            ),
        ] {
            let src = tmp.path().join(format!("{name}.tar"));
            std::fs::write(&src, bad).expect("w");
            assert_eq!(
                archive_kind(&src).expect("kind"),
                Some(ArchiveKind::Tar),
                "{name}"
            );
            assert!(
                unpack(&src, ArchiveKind::Tar, &root, &dst, &CopyOpts::default()).is_err(),
                "{name} must fail"
            );
        }
        assert_eq!(
            std::fs::read_to_string(root.join("etc/passwd")).expect("passwd"),
            "orig"
        );
        assert!(!tmp.path().join("escaped").exists());
        let plain = tmp.path().join("plain.txt");
        std::fs::write(&plain, "not an archive").expect("w");
        assert_eq!(archive_kind(&plain).expect("kind"), None);
    }
}
