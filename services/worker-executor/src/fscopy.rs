//! Copying file trees with their metadata (owner, mode, times, symlinks, devices,
//! hard links), with include/exclude patterns and chmod-style mode strings.

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Overrides applied to every copied entry.
#[derive(Debug, Clone, Default)]
pub struct CopyOpts {
    pub owner: Option<(u32, u32)>,
    pub mode: Option<u32>,
    /// A chmod-style mode ("755", "u+x,go-w"), applied to each entry's own mode.
    pub mode_str: Option<ModeStr>,
    /// Nanoseconds since the epoch for atime and mtime.
    pub timestamp: Option<i64>,
    /// Which entries below the copied directory are copied.
    pub filter: Option<Filter>,
    /// Replace an existing directory by a non-directory (and the reverse)
    /// instead of failing.
    pub always_replace: bool,
    /// Hard-link regular files instead of copying them (falling back to a
    /// copy when linking fails). Only for sources that are never rewritten
    /// in place and destinations that are never written except through an
    /// overlay; with no owner, mode or timestamp override (the link shares
    /// the source's metadata).
    pub link_files: bool,
    /// A directory that already exists at the destination keeps its owner
    /// and mode (BuildKit's copier sets them only on directories it
    /// creates); its times become the source's.
    pub keep_existing_dirs: bool,
}

/// Include/exclude patterns over paths relative to the copy source
/// (`**` crosses directories; an exclude starting with `!` re-includes).
#[derive(Debug, Clone)]
pub struct Filter {
    include: Option<globset::GlobSet>,
    /// matched as BuildKit's patternmatcher matches them (as `.dockerignore`)
    exclude: Option<kiln_dockerfile::IgnoreMatcher>,
}

impl Filter {
    /// `None` when there are no patterns.
    pub fn new(include: &[String], exclude: &[String]) -> io::Result<Option<Filter>> {
        if include.is_empty() && exclude.is_empty() {
            return Ok(None);
        }
        let include = if include.is_empty() {
            None
        } else {
            let mut b = globset::GlobSetBuilder::new();
            for p in include {
                let p = p
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .trim_end_matches('/');
                b.add(
                    globset::GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                );
            }
            Some(
                b.build()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            )
        };
        let exclude = Some(kiln_dockerfile::IgnoreMatcher::new(exclude)).filter(|m| !m.is_empty());
        Ok(Some(Filter { include, exclude }))
    }

    /// Is `rel` (or one of its parents) excluded?
    fn excluded(&self, rel: &Path) -> bool {
        self.exclude
            .as_ref()
            .is_some_and(|m| m.excluded(&rel.to_string_lossy()))
    }

    /// Is `rel` (or one of its parents) included?
    fn included(&self, rel: &Path) -> bool {
        match &self.include {
            None => true,
            Some(s) => rel
                .ancestors()
                .any(|a| !a.as_os_str().is_empty() && s.is_match(a)),
        }
    }
}

/// One clause of a mode string: who (ugo bits), op, what.
#[derive(Debug, Clone, PartialEq)]
enum Clause {
    Abs(u32),
    Sym {
        who: u32,
        op: char,
        perm: u32,
        cond_x: bool,
    },
}

/// A parsed chmod mode string.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeStr(Vec<Clause>);

impl ModeStr {
    pub fn parse(s: &str) -> io::Result<ModeStr> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("invalid mode {s:?}"));
        if !s.is_empty() && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return u32::from_str_radix(s, 8)
                .map(|m| ModeStr(vec![Clause::Abs(m & 0o7777)]))
                .map_err(|_| bad());
        }
        let mut out = Vec::new();
        for clause in s.split(',') {
            let opi = clause.find(['+', '-', '=']).ok_or_else(bad)?;
            let (who_s, rest) = clause.split_at(opi);
            let mut who = 0;
            for c in who_s.chars() {
                who |= match c {
                    'u' => 0o4700,
                    'g' => 0o2070,
                    'o' => 0o1007,
                    'a' => 0o7777,
                    _ => return Err(bad()),
                };
            }
            if who == 0 {
                who = 0o7777;
            }
            let mut chars = rest.chars();
            let op = chars.next().ok_or_else(bad)?;
            let (mut perm, mut cond_x) = (0, false);
            for c in chars {
                perm |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' => {
                        cond_x = true;
                        0
                    }
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => return Err(bad()),
                };
            }
            out.push(Clause::Sym {
                who,
                op,
                perm,
                cond_x,
            });
        }
        Ok(ModeStr(out))
    }

    /// The mode after applying the string to `mode` (of a directory when `is_dir`).
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let mut m = mode & 0o7777;
        for c in &self.0 {
            match c {
                Clause::Abs(a) => m = *a,
                Clause::Sym {
                    who,
                    op,
                    perm,
                    cond_x,
                } => {
                    let mut p = *perm;
                    if *cond_x && (is_dir || m & 0o111 != 0) {
                        p |= 0o111;
                    }
                    let bits = p & who;
                    match op {
                        '+' => m |= bits,
                        '-' => m &= !bits,
                        _ => m = (m & !who) | bits,
                    }
                }
            }
        }
        m
    }
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
    kiln_oci::idmap::lchown(path, owner.0, owner.1)?;
    let md = std::fs::symlink_metadata(path)?;
    if !md.file_type().is_symlink()
        && let Some(m) = mode
    {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m & 0o7777))?;
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

/// [`set_meta`] with the owner, mode and times of `md`.
pub fn set_meta_like(path: &Path, md: &std::fs::Metadata) -> io::Result<()> {
    set_meta(
        path,
        (md.uid(), md.gid()),
        Some(md.mode()),
        (
            TimeSpec::new(md.atime(), md.atime_nsec()),
            TimeSpec::new(md.mtime(), md.mtime_nsec()),
        ),
    )
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
/// at `dst` is merged into; any other existing entry is replaced (a directory replaced by
/// a non-directory, or the reverse, only with `always_replace`). Files hard-linked to each
/// other inside `src` stay hard-linked in `dst`.
pub fn copy_entry(src: &Path, dst: &Path, opts: &CopyOpts) -> io::Result<()> {
    let mut links = HashMap::new();
    copy_rec(src, dst, Path::new(""), opts, &mut links, &mut None).map(|_| ())
}

/// [`copy_entry`] with `link_files` for a directory `src` into `dst`, which must not
/// exist or be an empty directory: the same tree, built by several threads
/// (a 10,000-file context is mostly `link(2)` calls, which run in parallel
/// on different directories). Files are hard-linked without being stat'ed
/// (the directory entry's type is enough); a file that cannot be linked is
/// copied. Directory metadata is set once everything below is in place.
pub fn link_tree(src: &Path, dst: &Path) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};
    let root_md = std::fs::symlink_metadata(src)?;
    if !root_md.is_dir() {
        let opts = CopyOpts {
            link_files: true,
            ..Default::default()
        };
        return copy_entry(src, dst, &opts);
    }
    if !dst.is_dir() {
        std::fs::create_dir(dst)?;
    }
    struct Shared {
        /// directories still to fill, and how many are queued or being filled
        jobs: Mutex<(Vec<(PathBuf, PathBuf)>, usize)>,
        wake: Condvar,
        failed: AtomicBool,
        error: Mutex<Option<io::Error>>,
        /// created directories and the metadata they take from their source
        dirs: Mutex<Vec<(PathBuf, std::fs::Metadata)>>,
        /// files copied because linking failed, by source (dev, ino)
        copied: Mutex<HashMap<(u64, u64), PathBuf>>,
    }
    let shared = Shared {
        jobs: Mutex::new((vec![(src.to_path_buf(), dst.to_path_buf())], 1)),
        wake: Condvar::new(),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        dirs: Mutex::new(vec![(dst.to_path_buf(), root_md)]),
        copied: Mutex::new(HashMap::new()),
    };
    let fill = |from: &Path, to: &Path| -> io::Result<Vec<(PathBuf, PathBuf)>> {
        let mut subdirs = Vec::new();
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let (s, d) = (e.path(), to.join(e.file_name()));
            let ft = e.file_type()?;
            if ft.is_file() && std::fs::hard_link(&s, &d).is_ok() {
                continue;
            }
            if ft.is_dir() {
                let md = std::fs::symlink_metadata(&s)?;
                std::fs::create_dir(&d)?;
                shared
                    .dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((d.clone(), md));
                subdirs.push((s, d));
                continue;
            }
            // symlinks, devices, and files that could not be linked
            let opts = CopyOpts::default();
            let mut copied = shared.copied.lock().unwrap_or_else(|e| e.into_inner());
            copy_rec(&s, &d, Path::new(""), &opts, &mut copied, &mut None)?;
        }
        Ok(subdirs)
    };
    let worker = || {
        loop {
            let job = {
                let mut g = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if shared.failed.load(Ordering::Acquire) || g.1 == 0 {
                        return;
                    }
                    if let Some(j) = g.0.pop() {
                        break j;
                    }
                    g = shared.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            let res = fill(&job.0, &job.1);
            let mut g = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
            match res {
                Ok(subdirs) => {
                    g.1 += subdirs.len();
                    g.0.extend(subdirs);
                }
                Err(e) => {
                    shared.failed.store(true, Ordering::Release);
                    shared
                        .error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            }
            g.1 -= 1;
            shared.wake.notify_all();
        }
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    std::thread::scope(|sc| {
        for _ in 1..threads {
            sc.spawn(worker);
        }
        worker();
    });
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    // deepest first, so setting a directory's times is the last change in it
    let mut dirs = shared.dirs.into_inner().unwrap_or_else(|e| e.into_inner());
    dirs.sort_by_key(|(d, _)| std::cmp::Reverse(d.components().count()));
    for (d, md) in dirs {
        set_meta_like(&d, &md)?;
    }
    Ok(())
}

/// A regular file that [`copy_entry_deferred`] left as an empty placeholder.
#[derive(Debug, Clone)]
pub struct Deferred {
    /// the placeholder
    pub dst: PathBuf,
    /// the file it stands for
    pub src: PathBuf,
    /// the inode `src` had when the placeholder was made
    pub ino: u64,
}

/// [`copy_entry`], except that regular files are created empty (with their
/// final owner, mode and times) and listed, for [`link_deferred`] to turn
/// into hard links once the destination is no longer behind an overlay
/// mount. The tree shape (parents, merges, replaced entries) is exactly the
/// copy's. Options with an owner, mode or timestamp override copy as usual.
pub fn copy_entry_deferred(src: &Path, dst: &Path, opts: &CopyOpts) -> io::Result<Vec<Deferred>> {
    let mut links = HashMap::new();
    let overrides = opts.owner.is_some()
        || opts.mode.is_some()
        || opts.mode_str.is_some()
        || opts.timestamp.is_some();
    let mut deferred = (!overrides).then(Vec::new);
    copy_rec(src, dst, Path::new(""), opts, &mut links, &mut deferred)?;
    Ok(deferred.unwrap_or_default())
}

/// What [`link_deferred`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub linked: usize,
    pub copied: usize,
}

/// Replaces the placeholders of [`copy_entry_deferred`] by hard links to
/// their sources. Paths are mapped from where the copy saw them (`src_view`,
/// `dst_view`: mount points) to the directories behind them (`src_real`,
/// `dst_real`: a snapshot's diff and a staging upper dir, unmounted). A
/// placeholder that is no longer an empty file (a later entry replaced it)
/// is left alone; a source whose inode changed, or a link that fails
/// (another filesystem, too many links), is copied instead.
pub fn link_deferred(
    items: &[Deferred],
    (src_view, src_real): (&Path, &Path),
    (dst_view, dst_real): (&Path, &Path),
) -> io::Result<LinkStats> {
    let outside = || io::Error::other("deferred path outside its view");
    let mut stats = LinkStats::default();
    let mut seen = std::collections::HashSet::new();
    // the last placeholder of a path wins
    for d in items.iter().rev() {
        if !seen.insert(&d.dst) {
            continue;
        }
        let dst = dst_real.join(d.dst.strip_prefix(dst_view).map_err(|_| outside())?);
        let src = src_real.join(d.src.strip_prefix(src_view).map_err(|_| outside())?);
        match std::fs::symlink_metadata(&dst) {
            Ok(md) if md.is_file() && md.len() == 0 => {}
            _ => continue,
        }
        let smd = std::fs::symlink_metadata(&src)?;
        if !smd.is_file() {
            return Err(io::Error::other(format!(
                "{} is no longer a file",
                src.display()
            )));
        }
        if smd.ino() == d.ino {
            std::fs::remove_file(&dst)?;
            match std::fs::hard_link(&src, &dst) {
                Ok(()) => {
                    stats.linked += 1;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %kiln_proto::status::Chain(&e), "link {}: copying", dst.display())
                }
            }
        }
        // copy the bytes, keeping the placeholder's metadata
        let md = std::fs::symlink_metadata(&dst).ok();
        std::fs::copy(&src, &dst)?;
        let md = md.unwrap_or(smd);
        set_meta_like(&dst, &md)?;
        copy_xattrs(&src, &dst);
        stats.copied += 1;
    }
    Ok(stats)
}

/// Copies one entry; returns false when the filter left it (and everything below) out.
fn copy_rec(
    src: &Path,
    dst: &Path,
    rel: &Path,
    opts: &CopyOpts,
    links: &mut HashMap<(u64, u64), PathBuf>,
    deferred: &mut Option<Vec<Deferred>>,
) -> io::Result<bool> {
    let md = std::fs::symlink_metadata(src)?;
    let ft = md.file_type();
    let filtered = !rel.as_os_str().is_empty() && opts.filter.is_some();
    if filtered
        && let Some(f) = &opts.filter
        && (f.excluded(rel) || (!ft.is_dir() && !f.included(rel)))
    {
        return Ok(false);
    }
    let existing = std::fs::symlink_metadata(dst).ok();
    if let Some(e) = &existing
        && !(ft.is_dir() && e.is_dir())
    {
        if e.is_dir() != ft.is_dir() && !opts.always_replace {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot replace {} {} with a {}",
                    if e.is_dir() { "directory" } else { "file" },
                    dst.display(),
                    if ft.is_dir() { "directory" } else { "file" }
                ),
            ));
        }
        if e.is_dir() {
            std::fs::remove_dir_all(dst)?;
        } else {
            std::fs::remove_file(dst)?;
        }
    }
    if ft.is_dir() {
        let created = !dst.is_dir();
        if created {
            std::fs::create_dir(dst)?;
        }
        let mut names: Vec<_> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        let mut any = false;
        for n in names {
            any |= copy_rec(
                &src.join(&n),
                &dst.join(&n),
                &rel.join(&n),
                opts,
                links,
                deferred,
            )?;
        }
        // with include patterns, a directory is kept only when it holds something
        // included or is itself included
        if filtered && created && !any && opts.filter.as_ref().is_some_and(|f| !f.included(rel)) {
            std::fs::remove_dir(dst)?;
            return Ok(false);
        }
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_file()
        && let Some(list) = deferred
    {
        // every path gets its own placeholder; linking them all to their
        // sources keeps the sources' hard links
        std::fs::File::create(dst)?;
        list.push(Deferred {
            dst: dst.to_path_buf(),
            src: src.to_path_buf(),
            ino: md.ino(),
        });
    } else if ft.is_file()
        && opts.link_files
        && opts.owner.is_none()
        && opts.mode.is_none()
        && opts.mode_str.is_none()
        && opts.timestamp.is_none()
        && std::fs::hard_link(src, dst).is_ok()
    {
        return Ok(true);
    } else if ft.is_file() && md.nlink() > 1 {
        if let Some(first) = links.get(&(md.dev(), md.ino())) {
            std::fs::hard_link(first, dst)?;
            return Ok(true);
        }
        std::fs::copy(src, dst)?;
        links.insert((md.dev(), md.ino()), dst.to_path_buf());
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
    let times = match opts.timestamp {
        Some(t) => timespec(t),
        None => (
            TimeSpec::new(md.atime(), md.atime_nsec()),
            TimeSpec::new(md.mtime(), md.mtime_nsec()),
        ),
    };
    if ft.is_dir() && opts.keep_existing_dirs && existing.as_ref().is_some_and(|e| e.is_dir()) {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            dst,
            &times.0,
            &times.1,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(nix_io)?;
        return Ok(true);
    }
    let owner = opts.owner.unwrap_or((md.uid(), md.gid()));
    let mode = match &opts.mode_str {
        Some(ms) => Some(ms.apply(md.mode(), ft.is_dir())),
        None => opts.mode.or(Some(md.mode())),
    };
    set_meta(dst, owner, mode, times)?;
    if !ft.is_symlink() {
        // after the owner: a chown clears security.capability
        copy_xattrs(src, dst);
    }
    Ok(true)
}

/// Copies `src`'s extended attributes to `dst` (neither followed if a symlink), as
/// BuildKit's copy does: file capabilities (`security.capability`), `user.*` and the
/// rest, but never the overlay implementations' own. One that cannot be set here (a
/// `trusted.*` one in a user namespace, a filesystem without xattrs) is left out.
pub fn copy_xattrs(src: &Path, dst: &Path) {
    for (k, v) in kiln_oci::layer::content_xattrs(src).unwrap_or_default() {
        if let Err(e) = kiln_oci::layer::set_carried_xattr(dst, &k, &v) {
            tracing::debug!(xattr = %k, error = %e, "xattr of {} left out", dst.display());
        }
    }
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
            ..Default::default()
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

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn link_tree_builds_the_same_tree_as_a_linking_copy() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        for i in 0..20 {
            let d = src.join(format!("d{i}/sub"));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("f"), format!("{i}")).expect("write");
            std::fs::write(src.join(format!("d{i}/g")), "g").expect("write");
        }
        std::fs::set_permissions(src.join("d3"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        symlink("../d1/g", src.join("d2/link")).expect("symlink");
        std::fs::hard_link(src.join("d4/g"), src.join("d5/also-g")).expect("link");
        for d in ["d3", "d7/sub", ""] {
            set_meta(
                &src.join(d),
                (0, 0),
                None,
                timespec(1_500_000_000_000_000_000),
            )
            .expect("times");
        }
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let opts = CopyOpts {
            link_files: true,
            ..Default::default()
        };
        copy_entry(&src, &a, &opts).expect("copy");
        std::fs::create_dir(&b).expect("empty dst");
        link_tree(&src, &b).expect("link tree");
        let list = |root: &Path| -> Vec<(PathBuf, u32, i64, u64, Option<PathBuf>)> {
            let mut out: Vec<_> = walkdir::WalkDir::new(root)
                .into_iter()
                .map(|e| {
                    let e = e.expect("walk");
                    let md = e.path().symlink_metadata().expect("stat");
                    let rel = e.path().strip_prefix(root).expect("rel").to_path_buf();
                    let ino = if md.is_file() { md.ino() } else { 0 };
                    let target = std::fs::read_link(e.path()).ok();
                    (rel, md.mode(), md.mtime(), ino, target)
                })
                .collect();
            out.sort();
            out
        };
        let (la, lb) = (list(&a), list(&b));
        assert_eq!(la.len(), 20 * 4 + 2 + 1, "{la:?}");
        assert_eq!(la, lb);
        // files are the source's inodes
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(&b.join("d9/sub/f")), ino(&src.join("d9/sub/f")));
        assert_eq!(ino(&b.join("d5/also-g")), ino(&b.join("d4/g")));
    }

    #[test]
    fn mode_strings_follow_chmod() {
        let m = |s: &str, mode: u32, dir: bool| ModeStr::parse(s).expect("parse").apply(mode, dir);
        assert_eq!(m("755", 0o600, false), 0o755);
        assert_eq!(m("u+x", 0o644, false), 0o744);
        assert_eq!(m("go-r", 0o644, false), 0o600);
        assert_eq!(m("+x", 0o644, false), 0o755);
        assert_eq!(m("a=r", 0o755, false), 0o444);
        assert_eq!(m("u=rwx,g=rx,o=", 0o600, false), 0o750);
        assert_eq!(m("a+X", 0o644, false), 0o644);
        assert_eq!(m("a+X", 0o644, true), 0o755);
        assert!(ModeStr::parse("q+x").is_err());
    }

    #[test]
    fn filters_hardlinks_and_replace_policy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("a/deep")).expect("mkdir");
        std::fs::create_dir_all(src.join("b")).expect("mkdir");
        std::fs::write(src.join("a/deep/x.go"), "x").expect("w");
        std::fs::write(src.join("a/y.txt"), "y").expect("w");
        std::fs::write(src.join("b/z.go"), "z").expect("w");
        std::fs::write(src.join("b/skip.go"), "s").expect("w");
        std::fs::hard_link(src.join("a/y.txt"), src.join("b/y-link")).expect("link");
        let dst = tmp.path().join("dst");
        let opts = CopyOpts {
            filter: Filter::new(&["**/*.go".into(), "**/y*".into()], &["b/skip.go".into()])
                .expect("filter"),
            ..Default::default()
        };
        copy_entry(&src, &dst, &opts).expect("copy");
        assert!(dst.join("a/deep/x.go").exists());
        assert!(dst.join("b/z.go").exists());
        assert!(!dst.join("b/skip.go").exists());
        let (a, b) = (
            std::fs::metadata(dst.join("a/y.txt")).expect("y"),
            std::fs::metadata(dst.join("b/y-link")).expect("link"),
        );
        assert_eq!(a.ino(), b.ino(), "hard link preserved");

        // a file over a directory needs always_replace
        let f = tmp.path().join("f");
        std::fs::write(&f, "f").expect("w");
        assert!(copy_entry(&f, &dst.join("a"), &CopyOpts::default()).is_err());
        let opts = CopyOpts {
            always_replace: true,
            ..Default::default()
        };
        copy_entry(&f, &dst.join("a"), &opts).expect("replace");
        assert!(dst.join("a").is_file());
    }

    #[test]
    fn deferred_copies_become_links_to_their_sources() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d")).expect("mkdir");
        std::fs::write(src.join("d/a"), "aaa").expect("w");
        std::fs::write(src.join("b"), "bb").expect("w");
        std::fs::hard_link(src.join("b"), src.join("b2")).expect("link");
        std::os::unix::fs::symlink("b", src.join("l")).expect("symlink");
        let dst = tmp.path().join("dst");
        let mut items = copy_entry_deferred(&src, &dst, &CopyOpts::default()).expect("copy");
        assert_eq!(items.len(), 3, "regular files only");
        assert_eq!(std::fs::metadata(dst.join("d/a")).expect("stat").len(), 0);
        // a later placeholder of the same path wins
        items.push(Deferred {
            dst: dst.join("d/a"),
            src: src.join("b"),
            ino: std::fs::metadata(src.join("b")).expect("stat").ino(),
        });
        std::fs::write(dst.join("d/a"), "").expect("w");
        let stats = link_deferred(&items, (&src, &src), (&dst, &dst)).expect("link");
        assert_eq!(
            stats,
            LinkStats {
                linked: 3,
                copied: 0
            }
        );
        let ino = |p: PathBuf| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(ino(dst.join("d/a")), ino(src.join("b")));
        assert_eq!(ino(dst.join("b2")), ino(src.join("b")), "hard links kept");
        assert_eq!(
            std::fs::read_link(dst.join("l")).expect("l"),
            Path::new("b")
        );
        // an override copies as usual
        let dst2 = tmp.path().join("dst2");
        let opts = CopyOpts {
            mode: Some(0o600),
            ..Default::default()
        };
        assert!(
            copy_entry_deferred(&src, &dst2, &opts)
                .expect("copy")
                .is_empty()
        );
        assert_eq!(std::fs::read_to_string(dst2.join("d/a")).expect("r"), "aaa");
        // link_files links unless an override asks for other metadata
        let dst3 = tmp.path().join("dst3");
        let opts = CopyOpts {
            link_files: true,
            ..Default::default()
        };
        copy_entry(&src, &dst3, &opts).expect("copy");
        assert_eq!(ino(dst3.join("d/a")), ino(src.join("d/a")));
        let dst4 = tmp.path().join("dst4");
        let opts = CopyOpts {
            link_files: true,
            owner: Some((3, 4)),
            ..Default::default()
        };
        copy_entry(&src, &dst4, &opts).expect("copy");
        assert_ne!(ino(dst4.join("d/a")), ino(src.join("d/a")));
    }
}
