//! The fsutil DiffCopy protocol: a sender walks a tree and sends one STAT
//! packet per entry (ids in walk order, an empty STAT ends the list); the
//! receiver compares with what it already has, sends REQ for the files it
//! needs, gets their bytes as DATA packets (an empty DATA ends a file) and
//! closes with FIN, which the sender answers with FIN.
//!
//! `Stat.mode` carries Go's `os.FileMode` bits and `modTime` nanoseconds,
//! as on the wire of BuildKit clients.

use crate::Error;
use globset::{Glob, GlobSet, GlobSetBuilder};
use kiln_dockerfile::IgnoreMatcher;
use kiln_proto::fsutil::types::{Packet, Stat, packet::PacketType};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DATA_CHUNK: usize = 32 * 1024;

/// The most entries one transfer may list. Far beyond any real context (a
/// large monorepo holds a few hundred thousand files); a sender that lists
/// more is refused before its list can fill the receiver's memory.
pub const MAX_ENTRIES: usize = 10_000_000;
/// The most files a receiver holds open at once: a sender may interleave the
/// data of several files, but not start ever more files without ending any.
pub const MAX_OPEN_FILES: usize = 1024;
/// Requests a receiver has out at once (each names a whole file).
const REQUESTS_AHEAD: usize = 32;
/// The longest path an entry (or a hard link's target) may have, in bytes:
/// Linux's `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;
/// The most components an entry's path may have. Trees are walked and copied
/// recursively; no real context nests directories this deep.
pub const MAX_PATH_DEPTH: usize = 1024;

/// One side of a DiffCopy call.
pub trait PacketConn: Send {
    fn send(&mut self, p: Packet) -> impl std::future::Future<Output = Result<(), Error>> + Send;
    /// `None` when the peer closed the stream.
    fn recv(&mut self) -> impl std::future::Future<Output = Result<Option<Packet>, Error>> + Send;
}

/// Go `os.FileMode` bits used by fsutil.
pub mod gomode {
    pub const DIR: u32 = 1 << 31;
    pub const SYMLINK: u32 = 1 << 27;
    pub const DEVICE: u32 = 1 << 26;
    pub const NAMED_PIPE: u32 = 1 << 25;
    pub const SOCKET: u32 = 1 << 24;
    pub const SETUID: u32 = 1 << 23;
    pub const SETGID: u32 = 1 << 22;
    pub const CHAR_DEVICE: u32 = 1 << 21;
    pub const STICKY: u32 = 1 << 20;
    pub const TYPE: u32 = DIR | SYMLINK | NAMED_PIPE | SOCKET | DEVICE | CHAR_DEVICE;

    /// Unix `st_mode` to Go `FileMode`.
    pub fn from_unix(m: u32) -> u32 {
        let mut g = m & 0o777;
        match m & libc::S_IFMT {
            libc::S_IFDIR => g |= DIR,
            libc::S_IFLNK => g |= SYMLINK,
            libc::S_IFCHR => g |= DEVICE | CHAR_DEVICE,
            libc::S_IFBLK => g |= DEVICE,
            libc::S_IFIFO => g |= NAMED_PIPE,
            libc::S_IFSOCK => g |= SOCKET,
            _ => {}
        }
        if m & libc::S_ISUID != 0 {
            g |= SETUID;
        }
        if m & libc::S_ISGID != 0 {
            g |= SETGID;
        }
        if m & libc::S_ISVTX != 0 {
            g |= STICKY;
        }
        g
    }

    /// Permission bits (with setuid/setgid/sticky) of a Go `FileMode`, in unix form.
    pub fn unix_perm(g: u32) -> u32 {
        let mut m = g & 0o777;
        if g & SETUID != 0 {
            m |= libc::S_ISUID;
        }
        if g & SETGID != 0 {
            m |= libc::S_ISGID;
        }
        if g & STICKY != 0 {
            m |= libc::S_ISVTX;
        }
        m
    }
}

/// Which paths of a tree take part in a transfer (relative, `/`-separated).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    include: Option<GlobSet>,
    /// per include pattern: its leading components without glob characters,
    /// and whether anything (a glob) follows them
    include_prefixes: Vec<(Vec<String>, bool)>,
    /// `.dockerignore` rules, matched as BuildKit's patternmatcher does (the
    /// same matcher the Dockerfile frontend uses)
    exclude: Option<IgnoreMatcher>,
}

/// A pattern's leading literal components and whether a glob follows them.
fn literal_prefix(pattern: &str) -> (Vec<String>, bool) {
    let mut lit = Vec::new();
    let mut parts = pattern.split('/').filter(|c| !c.is_empty() && *c != ".");
    for c in parts.by_ref() {
        if c.contains(['*', '?', '[', '{', '\\']) {
            return (lit, true);
        }
        lit.push(c.to_string());
    }
    (lit, false)
}

impl Filter {
    /// Include patterns select paths (and everything under them); exclude
    /// patterns follow .dockerignore rules (`!` re-includes, last match wins).
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, Error> {
        let include_prefixes = include.iter().map(|p| literal_prefix(p)).collect();
        let include = if include.is_empty() {
            None
        } else {
            let mut b = GlobSetBuilder::new();
            for p in include {
                let p = p.trim_start_matches('/').trim_end_matches('/');
                for pat in [p.to_string(), format!("{p}/**")] {
                    b.add(Glob::new(&pat).map_err(|source| Error::Pattern {
                        pattern: p.into(),
                        source,
                    })?);
                }
            }
            Some(b.build().map_err(|source| Error::Pattern {
                pattern: String::new(),
                source,
            })?)
        };
        let exclude = Some(IgnoreMatcher::new(exclude)).filter(|m| !m.is_empty());
        Ok(Filter {
            include,
            include_prefixes,
            exclude,
        })
    }

    fn excluded(&self, rel: &str) -> bool {
        self.exclude.as_ref().is_some_and(|m| m.excluded(rel))
    }

    /// Whether an entry is sent. Directories that lead to an included path
    /// are sent so the included path has its parents.
    pub fn matches(&self, rel: &str, is_dir: bool) -> bool {
        if self.excluded(rel) {
            // a directory with a re-included child is still walked
            return is_dir && self.may_reinclude_below(rel);
        }
        match &self.include {
            None => true,
            Some(set) => set.is_match(rel) || (is_dir && self.include_below(rel)),
        }
    }

    /// An excluded directory that is only walked because a `!` pattern may
    /// re-include something below it: it is sent only if something inside is.
    fn walked_for_reinclude(&self, rel: &str, is_dir: bool) -> bool {
        is_dir && self.may_reinclude_below(rel) && self.excluded(rel)
    }

    fn may_reinclude_below(&self, rel: &str) -> bool {
        self.exclude
            .as_ref()
            .is_some_and(|m| m.may_reinclude_below(rel))
    }

    /// Whether directory `rel` may hold a path an include pattern selects: it
    /// lies on the way to a pattern's literal prefix, or under the prefix of
    /// a pattern that goes on with a glob. Other directories are not walked
    /// (a Dockerfile sync does not walk the whole context).
    fn include_below(&self, rel: &str) -> bool {
        let r: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        self.include_prefixes.iter().any(|(lit, glob_follows)| {
            let n = r.len().min(lit.len());
            r[..n].iter().zip(&lit[..n]).all(|(a, b)| *a == b.as_str())
                && (r.len() < lit.len() || *glob_follows)
        })
    }
}

/// fsutil's metadata of an entry named `rel`.
pub fn stat_of(rel: &str, md: &std::fs::Metadata, link: Option<String>) -> Stat {
    stat_with_xattrs(rel, md, link, BTreeMap::new())
}

/// [`stat_of`] with the entry's extended attributes, as fsutil sends them (read
/// from `path`, not following a symlink; the overlay implementations' own left out).
pub fn stat_of_path(path: &Path, rel: &str, md: &std::fs::Metadata, link: Option<String>) -> Stat {
    let xattrs = if md.file_type().is_symlink() {
        BTreeMap::new()
    } else {
        kiln_oci::layer::content_xattrs(path)
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    stat_with_xattrs(rel, md, link, xattrs)
}

fn stat_with_xattrs(
    rel: &str,
    md: &std::fs::Metadata,
    link: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
) -> Stat {
    Stat {
        path: rel.to_string(),
        mode: gomode::from_unix(md.mode()),
        uid: md.uid(),
        gid: md.gid(),
        size: if md.is_file() { md.len() as i64 } else { 0 },
        mod_time: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        linkname: link.unwrap_or_default(),
        devmajor: 0,
        devminor: 0,
        xattrs,
    }
}

/// Walks `src` in fsutil order (lexical per directory, a directory before its
/// contents) and returns (relative path, stat) for every entry that passes.
fn walk(src: &Path, filter: &Filter) -> Result<Vec<(PathBuf, Stat)>, Error> {
    let mut out = Vec::new();
    let mut lazy_dirs: HashSet<String> = HashSet::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut it = walkdir::WalkDir::new(src)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = it.next() {
        let entry = entry.map_err(|e| Error::Io {
            op: "walk",
            path: src.to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk loop")),
        })?;
        let rel = entry.path().strip_prefix(src).unwrap_or(entry.path());
        let rel_s = rel.to_string_lossy().to_string();
        let md = entry
            .path()
            .symlink_metadata()
            .map_err(Error::io("stat", entry.path()))?;
        if !filter.matches(&rel_s, md.is_dir()) {
            if md.is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        if filter.walked_for_reinclude(&rel_s, md.is_dir()) {
            lazy_dirs.insert(rel_s.clone());
        }
        let mut link = None;
        if md.file_type().is_symlink() {
            let t =
                std::fs::read_link(entry.path()).map_err(Error::io("readlink", entry.path()))?;
            link = Some(t.to_string_lossy().to_string());
        } else if md.is_file() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = inodes.get(&key) {
                link = Some(first.clone());
            } else {
                inodes.insert(key, rel_s.clone());
            }
        }
        let mut st = stat_of_path(entry.path(), &rel_s, &md, link.clone());
        if md.is_file() && link.is_some() {
            st.size = 0;
        }
        out.push((entry.path().to_path_buf(), st));
    }
    // Drop excluded directories that were walked for a re-include but hold
    // nothing that is sent (BuildKit's fsutil emits such parents lazily).
    if !lazy_dirs.is_empty() {
        let mut needed: HashSet<String> = HashSet::new();
        for (_, s) in out.iter().filter(|(_, s)| !lazy_dirs.contains(&s.path)) {
            let mut p = Path::new(&s.path).parent();
            while let Some(pp) = p {
                if pp.as_os_str().is_empty() {
                    break;
                }
                needed.insert(pp.to_string_lossy().to_string());
                p = pp.parent();
            }
        }
        out.retain(|(_, s)| !lazy_dirs.contains(&s.path) || needed.contains(&s.path));
    }
    // Drop directories that ended up empty only because of an include filter.
    if filter.include.is_some() {
        let keep: HashSet<String> = out
            .iter()
            .filter(|(_, s)| s.mode & gomode::DIR == 0)
            .flat_map(|(_, s)| {
                let mut v = vec![s.path.clone()];
                let mut p = Path::new(&s.path).parent();
                while let Some(pp) = p {
                    if pp.as_os_str().is_empty() {
                        break;
                    }
                    v.push(pp.to_string_lossy().to_string());
                    p = pp.parent();
                }
                v
            })
            .collect();
        out.retain(|(_, s)| {
            s.mode & gomode::DIR == 0
                || keep.contains(&s.path)
                || filter.include.as_ref().is_some_and(|i| i.is_match(&s.path))
        });
    }
    Ok(out)
}

/// Sends the tree at `src` to a receiver on `conn`.
pub async fn send(conn: &mut impl PacketConn, src: &Path, filter: &Filter) -> Result<(), Error> {
    let src_owned = src.to_path_buf();
    let filter_owned = filter.clone();
    let entries = tokio::task::spawn_blocking(move || walk(&src_owned, &filter_owned))
        .await
        .map_err(|source| Error::Task {
            task: "walk",
            source,
        })??;
    for (id, (_, st)) in entries.iter().enumerate() {
        conn.send(Packet {
            r#type: PacketType::PacketStat as i32,
            stat: Some(st.clone()),
            id: id as u32,
            data: vec![],
        })
        .await?;
    }
    conn.send(Packet {
        r#type: PacketType::PacketStat as i32,
        ..Default::default()
    })
    .await?;
    loop {
        let Some(p) = conn.recv().await? else {
            return Ok(());
        };
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketReq) => {
                let (path, _) = entries.get(p.id as usize).ok_or_else(|| {
                    Error::Protocol(format!("request for unknown file id {}", p.id))
                })?;
                let mut f = tokio::fs::File::open(path)
                    .await
                    .map_err(Error::io("open", path))?;
                let mut buf = vec![0u8; DATA_CHUNK];
                loop {
                    let n = f.read(&mut buf).await.map_err(Error::io("read", path))?;
                    if n == 0 {
                        break;
                    }
                    conn.send(Packet {
                        r#type: PacketType::PacketData as i32,
                        id: p.id,
                        data: buf[..n].to_vec(),
                        stat: None,
                    })
                    .await?;
                }
                conn.send(Packet {
                    r#type: PacketType::PacketData as i32,
                    id: p.id,
                    ..Default::default()
                })
                .await?;
            }
            Ok(PacketType::PacketFin) => {
                conn.send(Packet {
                    r#type: PacketType::PacketFin as i32,
                    ..Default::default()
                })
                .await?;
                return Ok(());
            }
            Ok(PacketType::PacketErr) => {
                return Err(Error::Peer(String::from_utf8_lossy(&p.data).to_string()));
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "unexpected packet type {} from receiver",
                    p.r#type
                )));
            }
        }
    }
}

/// Joins a relative wire path onto `dest`, refusing anything that would
/// leave it.
pub fn contained(dest: &Path, rel: &str) -> Result<PathBuf, Error> {
    let mut out = dest.to_path_buf();
    let mut depth = 0usize;
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
            Component::CurDir => {}
            _ => return Err(Error::Escape(rel.to_string())),
        }
    }
    if depth == 0 {
        return Err(Error::Escape(rel.to_string()));
    }
    Ok(out)
}

/// [`contained`], and every directory on the way from `dest` to the entry is a
/// real directory here: an entry never reaches beyond `dest` through a symlink
/// the sender made earlier (a context's `a -> /etc` then `a/passwd`), and a
/// parent that did not arrive as a directory is refused.
pub fn beneath(dest: &Path, rel: &str) -> Result<PathBuf, Error> {
    let target = contained(dest, rel)?;
    let mut dir = dest.to_path_buf();
    let parts: Vec<_> = Path::new(rel)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        dir.push(c);
        match dir.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            _ => return Err(Error::Escape(rel.to_string())),
        }
    }
    Ok(target)
}

/// Refuses a wire path longer than [`MAX_PATH_LEN`] or deeper than [`MAX_PATH_DEPTH`].
fn check_path(rel: &str) -> Result<(), Error> {
    if rel.len() > MAX_PATH_LEN {
        let shown: String = rel.chars().take(64).collect();
        return Err(Error::Limit {
            what: format!(
                "entry path {shown:?}... is {} bytes long, more than {MAX_PATH_LEN}",
                rel.len()
            ),
            limit: MAX_PATH_LEN,
        });
    }
    let depth = Path::new(rel)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    if depth > MAX_PATH_DEPTH {
        return Err(Error::Limit {
            what: format!(
                "entry path {rel:?} is {depth} directories deep, more than {MAX_PATH_DEPTH}"
            ),
            limit: MAX_PATH_DEPTH,
        });
    }
    Ok(())
}

fn same_file(md: &std::fs::Metadata, st: &Stat) -> bool {
    md.is_file()
        && md.len() as i64 == st.size
        && md.mtime() * 1_000_000_000 + md.mtime_nsec() == st.mod_time
        && gomode::from_unix(md.mode()) == st.mode
        && md.uid() == st.uid
        && md.gid() == st.gid
}

fn set_meta(path: &Path, st: &Stat, is_link: bool) -> Result<(), Error> {
    let _ = nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(nix::unistd::Uid::from_raw(st.uid)),
        Some(nix::unistd::Gid::from_raw(st.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    if !is_link {
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(gomode::unix_perm(st.mode)),
        )
        .map_err(Error::io("chmod", path))?;
    }
    let ts = nix::sys::time::TimeSpec::new(
        st.mod_time.div_euclid(1_000_000_000),
        st.mod_time.rem_euclid(1_000_000_000),
    );
    if !is_link {
        // after the owner (a chown clears security.capability); never the overlay
        // implementations' own, which would steer the mounts this tree takes part in
        for (k, v) in &st.xattrs {
            let _ = kiln_oci::layer::set_carried_xattr(path, k, v);
        }
    }
    let _ = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
    Ok(())
}

/// What a receive did, for progress and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReceiveStats {
    pub entries: usize,
    /// files whose content was transferred
    pub transferred: usize,
    pub bytes: u64,
    pub removed: usize,
    /// `false` only when the tree is as it was before: no entry was added,
    /// removed or replaced, and no type, mode, owner, size, content or link
    /// target changed (times may have)
    pub changed: bool,
}

/// Makes `dest` mirror the sender's tree, asking only for files whose
/// metadata differs from what `dest` already holds.
pub async fn receive(conn: &mut impl PacketConn, dest: &Path) -> Result<ReceiveStats, Error> {
    receive_limited(conn, dest, Limits::default()).await
}

/// The receiver's bounds on one transfer (the `MAX_*` constants; tests lower them).
#[derive(Debug, Clone, Copy)]
struct Limits {
    entries: usize,
    open_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entries: MAX_ENTRIES,
            open_files: MAX_OPEN_FILES,
        }
    }
}

async fn receive_limited(
    conn: &mut impl PacketConn,
    dest: &Path,
    limits: Limits,
) -> Result<ReceiveStats, Error> {
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(Error::io("mkdir", dest))?;
    let stats = receive_file_list(conn, limits).await?;
    let dest_owned = dest.to_path_buf();
    let Prepared {
        wanted,
        mut result,
        stats,
    } = tokio::task::spawn_blocking(move || prepare(&dest_owned, stats))
        .await
        .map_err(|source| Error::Task {
            task: "prepare",
            source,
        })??;
    let mut files = IncomingFiles::new(dest, &stats, limits.open_files);
    let mut to_ask = wanted.iter();
    loop {
        // A few requests ahead, never all: the sender answers one request at a time and
        // reads the next only when that file is sent, and this side reads no data while
        // it writes requests. With every request written first, a long list fills the
        // stream's window both ways and each side waits for the other for ever.
        while files.pending.len() < REQUESTS_AHEAD {
            let Some(id) = to_ask.next() else { break };
            conn.send(Packet {
                r#type: PacketType::PacketReq as i32,
                id: *id,
                ..Default::default()
            })
            .await?;
            files.pending.insert(*id);
        }
        if files.pending.is_empty() {
            break;
        }
        let p = conn
            .recv()
            .await?
            .ok_or_else(|| Error::Protocol("stream closed during file data".into()))?;
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketData) => files.data(p, &mut result).await?,
            Ok(PacketType::PacketErr) => {
                return Err(Error::Peer(String::from_utf8_lossy(&p.data).to_string()));
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "unexpected packet type {} during file data",
                    p.r#type
                )));
            }
        }
    }
    // hardlinks and directory metadata once all contents are in place
    let dest_owned = dest.to_path_buf();
    tokio::task::spawn_blocking(move || finish(&dest_owned, &stats))
        .await
        .map_err(|source| Error::Task {
            task: "finish",
            source,
        })??;
    conn.send(Packet {
        r#type: PacketType::PacketFin as i32,
        ..Default::default()
    })
    .await?;
    // wait for the sender's FIN (or the end of the stream)
    while let Some(p) = conn.recv().await? {
        if p.r#type == PacketType::PacketFin as i32 {
            break;
        }
    }
    Ok(result)
}

/// The sender's file list, up to the empty stat that ends it; every path checked.
async fn receive_file_list(conn: &mut impl PacketConn, limits: Limits) -> Result<Vec<Stat>, Error> {
    let mut stats: Vec<Stat> = Vec::new();
    loop {
        let p = conn
            .recv()
            .await?
            .ok_or_else(|| Error::Protocol("stream closed before the file list ended".into()))?;
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::PacketStat) => match p.stat {
                None => return Ok(stats),
                Some(st) => {
                    if stats.len() == limits.entries {
                        return Err(Error::Limit {
                            what: format!(
                                "the file list holds more than {} entries",
                                limits.entries
                            ),
                            limit: limits.entries,
                        });
                    }
                    check_path(&st.path)?;
                    if !st.linkname.is_empty() && st.mode & gomode::TYPE == 0 {
                        check_path(&st.linkname)?;
                    }
                    stats.push(st);
                }
            },
            Ok(PacketType::PacketErr) => {
                return Err(Error::Peer(String::from_utf8_lossy(&p.data).to_string()));
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "unexpected packet type {} in file list",
                    p.r#type
                )));
            }
        }
    }
}

/// A file being received: written to `tmp`, renamed onto its target when complete.
struct OpenFile {
    file: tokio::fs::File,
    tmp: PathBuf,
}

/// The requested files' contents as they arrive: each goes to a new temporary file beside
/// its target and is renamed into place (with its metadata) when its empty packet ends it.
struct IncomingFiles<'a> {
    dest: &'a Path,
    stats: &'a [Stat],
    max_open: usize,
    /// Requested and not complete yet.
    pending: HashSet<u32>,
    open: HashMap<u32, OpenFile>,
    /// Part of every temporary name; seeded from the OS's randomness, so the sender
    /// cannot guess it.
    nonce: u64,
}

impl<'a> IncomingFiles<'a> {
    fn new(dest: &'a Path, stats: &'a [Stat], max_open: usize) -> Self {
        use std::hash::{BuildHasher, Hasher};
        IncomingFiles {
            dest,
            stats,
            max_open,
            pending: HashSet::new(),
            open: HashMap::new(),
            nonce: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }

    /// One data packet: more of a file's content, or (empty) its end.
    async fn data(&mut self, p: Packet, result: &mut ReceiveStats) -> Result<(), Error> {
        let st = self
            .stats
            .get(p.id as usize)
            .ok_or_else(|| Error::Protocol(format!("data for unknown id {}", p.id)))?;
        if !self.pending.contains(&p.id) {
            return Err(Error::Protocol(format!(
                "data for file {} that was not requested",
                st.path
            )));
        }
        let target = beneath(self.dest, &st.path)?;
        if !self.open.contains_key(&p.id) {
            let file = self.open_tmp(p.id, st, &target).await?;
            self.open.insert(p.id, file);
        }
        if p.data.is_empty() {
            let OpenFile { mut file, tmp } =
                self.open.remove(&p.id).expect("file was opened above");
            file.flush().await.map_err(Error::io("write", &tmp))?;
            drop(file);
            let st = st.clone();
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                set_meta(&tmp, &st, false)?;
                std::fs::rename(&tmp, &target).map_err(Error::io("rename", &target))
            })
            .await
            .map_err(|source| Error::Task {
                task: "finish",
                source,
            })??;
            self.pending.remove(&p.id);
            result.transferred += 1;
        } else {
            let OpenFile { file, tmp } = self.open.get_mut(&p.id).expect("file was opened above");
            file.write_all(&p.data)
                .await
                .map_err(Error::io("write", tmp.clone()))?;
            result.bytes += p.data.len() as u64;
        }
        Ok(())
    }

    /// A new file of ours beside `target`, named so that no entry of the sender can be it
    /// (and short: the target's name may be 255 bytes); never a path the sender placed,
    /// never followed.
    async fn open_tmp(&self, id: u32, st: &Stat, target: &Path) -> Result<OpenFile, Error> {
        if self.open.len() == self.max_open {
            return Err(Error::Limit {
                what: format!(
                    "the sender has more than {} files open at once (starting {})",
                    self.max_open, st.path
                ),
                limit: self.max_open,
            });
        }
        let tmp = target.with_file_name(format!(".kiln-recv-{:016x}-{id}", self.nonce));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .await
            .map_err(Error::io("create", &tmp))?;
        Ok(OpenFile { file, tmp })
    }
}

/// The receiving tree once [`prepare`] has shaped it.
struct Prepared {
    /// ids (indexes into `stats`) of the files whose contents to request
    wanted: Vec<u32>,
    /// what has changed so far
    result: ReceiveStats,
    /// the sender's file list, handed back
    stats: Vec<Stat>,
}

/// Brings the tree to the sender's shape except for file contents: removes
/// what is gone, creates dirs and symlinks, and lists the files to request.
fn prepare(dest: &Path, stats: Vec<Stat>) -> Result<Prepared, Error> {
    let mut result = ReceiveStats {
        entries: stats.len(),
        ..Default::default()
    };
    let wanted_paths: HashSet<PathBuf> = stats.iter().map(|s| PathBuf::from(&s.path)).collect();
    // remove entries that the sender no longer has
    let mut stale = Vec::new();
    for e in walkdir::WalkDir::new(dest)
        .min_depth(1)
        .contents_first(true)
    {
        let e = e.map_err(|e| Error::Io {
            op: "walk",
            path: dest.to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk")),
        })?;
        let rel = e
            .path()
            .strip_prefix(dest)
            .unwrap_or(e.path())
            .to_path_buf();
        if !wanted_paths.contains(&rel) {
            stale.push(e.path().to_path_buf());
        }
    }
    for p in stale {
        let md = p.symlink_metadata();
        let r = match md {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        r.map_err(Error::io("remove", &p))?;
        result.removed += 1;
        result.changed = true;
    }
    let mut wanted = Vec::new();
    for (id, st) in stats.iter().enumerate() {
        let target = beneath(dest, &st.path)?;
        let existing = target.symlink_metadata().ok();
        let kind = st.mode & gomode::TYPE;
        let same_owner = existing
            .as_ref()
            .is_some_and(|m| m.uid() == st.uid && m.gid() == st.gid);
        if kind == gomode::DIR {
            let same = existing.as_ref().is_some_and(|m| {
                m.is_dir() && gomode::from_unix(m.mode()) == st.mode && same_owner
            });
            result.changed |= !same;
            if let Some(m) = &existing
                && !m.is_dir()
            {
                std::fs::remove_file(&target).map_err(Error::io("remove", &target))?;
            }
            if !target.is_dir() {
                std::fs::create_dir(&target).map_err(Error::io("mkdir", &target))?;
            }
        } else if kind == gomode::SYMLINK {
            let same = existing.as_ref().is_some_and(|m| {
                m.file_type().is_symlink()
                    && same_owner
                    && std::fs::read_link(&target)
                        .is_ok_and(|t| t.as_os_str() == std::ffi::OsStr::new(&st.linkname))
            });
            result.changed |= !same;
            if same
                && existing
                    .as_ref()
                    .is_some_and(|m| mtime_ns(m) == st.mod_time)
            {
                continue; // already there, times included
            }
            if let Some(m) = &existing {
                if m.is_dir() {
                    std::fs::remove_dir_all(&target).map_err(Error::io("remove", &target))?;
                } else {
                    std::fs::remove_file(&target).map_err(Error::io("remove", &target))?;
                }
            }
            std::os::unix::fs::symlink(&st.linkname, &target)
                .map_err(Error::io("symlink", &target))?;
            set_meta(&target, st, true)?;
        } else if kind == 0 {
            if !st.linkname.is_empty() {
                result.changed = true;
                continue; // hardlink, made in finish()
            }
            match &existing {
                Some(m) if same_file(m, st) => {}
                Some(m) => {
                    if m.is_dir() {
                        std::fs::remove_dir_all(&target).map_err(Error::io("remove", &target))?;
                    }
                    wanted.push(id as u32);
                }
                None => wanted.push(id as u32),
            }
            result.changed |= wanted.last() == Some(&(id as u32));
        } else {
            // devices, fifos, sockets are not part of build contexts; nothing an
            // earlier sync left stays at their path
            tracing::debug!("skipping special file {}", st.path);
            if let Some(m) = &existing {
                if m.is_dir() {
                    std::fs::remove_dir_all(&target).map_err(Error::io("remove", &target))?;
                } else {
                    std::fs::remove_file(&target).map_err(Error::io("remove", &target))?;
                }
                result.removed += 1;
                result.changed = true;
            }
        }
    }
    Ok(Prepared {
        wanted,
        result,
        stats,
    })
}

fn finish(dest: &Path, stats: &[Stat]) -> Result<(), Error> {
    for st in stats {
        let kind = st.mode & gomode::TYPE;
        if kind == 0 && !st.linkname.is_empty() {
            let target = beneath(dest, &st.path)?;
            let source = beneath(dest, &st.linkname)?;
            let _ = std::fs::remove_file(&target);
            std::fs::hard_link(&source, &target).map_err(Error::io("link", &target))?;
        }
    }
    // directory metadata last, deepest first, so writes inside don't touch mtimes afterwards;
    // a directory that already has it is left alone (no inode write)
    for st in stats.iter().rev() {
        if st.mode & gomode::TYPE == gomode::DIR {
            let target = beneath(dest, &st.path)?;
            let current = target.symlink_metadata().ok();
            // only a real directory gets a directory's metadata: a later entry of
            // the same name (a symlink) is not followed to chmod its target
            if !current.as_ref().is_some_and(|m| m.is_dir()) {
                continue;
            }
            if current.is_some_and(|m| {
                m.is_dir()
                    && gomode::from_unix(m.mode()) == st.mode
                    && m.uid() == st.uid
                    && m.gid() == st.gid
                    && mtime_ns(&m) == st.mod_time
            }) {
                continue;
            }
            set_meta(&target, st, false)?;
        }
    }
    Ok(())
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    struct ChanConn {
        tx: mpsc::Sender<Packet>,
        rx: mpsc::Receiver<Packet>,
    }

    impl PacketConn for ChanConn {
        async fn send(&mut self, p: Packet) -> Result<(), Error> {
            self.tx
                .send(p)
                .await
                .map_err(|_| Error::Protocol("closed".into()))
        }
        async fn recv(&mut self) -> Result<Option<Packet>, Error> {
            Ok(self.rx.recv().await)
        }
    }

    fn pair() -> (ChanConn, ChanConn) {
        let (a_tx, a_rx) = mpsc::channel(64);
        let (b_tx, b_rx) = mpsc::channel(64);
        (
            ChanConn { tx: a_tx, rx: b_rx },
            ChanConn { tx: b_tx, rx: a_rx },
        )
    }

    /// A sender that says exactly what a test wants: the stat list, then the
    /// data of every file the receiver asks for.
    async fn crafted_send(conn: &mut ChanConn, stats: Vec<Stat>, data: &[u8]) {
        for st in stats {
            let _ = conn
                .send(Packet {
                    r#type: PacketType::PacketStat as i32,
                    stat: Some(st),
                    ..Default::default()
                })
                .await;
        }
        let _ = conn
            .send(Packet {
                r#type: PacketType::PacketStat as i32,
                ..Default::default()
            })
            .await;
        while let Ok(Some(p)) = conn.recv().await {
            if p.r#type == PacketType::PacketReq as i32 {
                for d in [data.to_vec(), vec![]] {
                    let _ = conn
                        .send(Packet {
                            r#type: PacketType::PacketData as i32,
                            id: p.id,
                            data: d,
                            ..Default::default()
                        })
                        .await;
                }
            } else if p.r#type == PacketType::PacketFin as i32 {
                let _ = conn
                    .send(Packet {
                        r#type: PacketType::PacketFin as i32,
                        ..Default::default()
                    })
                    .await;
                return;
            }
        }
    }

    fn stat(path: &str, mode: u32, link: &str) -> Stat {
        Stat {
            path: path.into(),
            mode,
            linkname: link.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_context_cannot_write_through_its_own_symlinks() {
        let outside = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        // `a -> OUTSIDE`, then `a/pwned`: refused, nothing written outside
        let (mut a, mut b) = pair();
        let out = outside.path().display().to_string();
        let stats = vec![
            stat("a", gomode::SYMLINK | 0o777, &out),
            stat("a/pwned", 0o644, ""),
        ];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"owned").await });
        let r = receive(&mut b, dest.path()).await;
        drop(b);
        let _ = sender.await;
        assert!(matches!(r, Err(Error::Escape(_))), "{r:?}");
        assert!(!outside.path().join("pwned").exists());

        // a symlink named like the receiver's temporary file is not followed
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "untouched").expect("write");
        let (mut a, mut b) = pair();
        let stats = vec![
            stat(
                ".kiln-recv-f",
                gomode::SYMLINK | 0o777,
                &victim.display().to_string(),
            ),
            stat("f", 0o644, ""),
        ];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"data").await });
        receive(&mut b, dest.path()).await.expect("receive");
        let _ = sender.await;
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "untouched"
        );
        assert_eq!(
            std::fs::read_to_string(dest.path().join("f")).expect("f"),
            "data"
        );

        // a hard link cannot name a file through a symlink either
        let (mut a, mut b) = pair();
        let stats = vec![
            stat("s", gomode::SYMLINK | 0o777, &out),
            stat("h", 0o644, "s/victim"),
        ];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"").await });
        let r = receive(&mut b, dest.path()).await;
        drop(b);
        let _ = sender.await;
        assert!(matches!(r, Err(Error::Escape(_))), "{r:?}");
        assert!(!dest.path().join("h").exists());
    }

    #[tokio::test]
    async fn a_dir_replaced_by_a_symlink_of_the_same_name_does_not_chmod_its_target() {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        // `a` as a dir with mode 0777, then `a -> OUTSIDE`: the dir's metadata is
        // set last, and must not land on what the symlink names
        let (mut a, mut b) = pair();
        let stats = vec![
            stat("a", gomode::DIR | 0o777, ""),
            stat(
                "a",
                gomode::SYMLINK | 0o777,
                &outside.path().display().to_string(),
            ),
        ];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"").await });
        let _ = receive(&mut b, dest.path()).await;
        drop(b);
        let _ = sender.await;
        let mode = std::fs::metadata(outside.path()).expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o700, "the symlink's target was chmodded to {mode:o}");
    }

    async fn transfer(src: &Path, dest: &Path, filter: Filter) -> ReceiveStats {
        let (mut a, mut b) = pair();
        let src = src.to_path_buf();
        let sender = tokio::spawn(async move { send(&mut a, &src, &filter).await });
        let stats = receive(&mut b, dest).await.expect("receive");
        sender.await.expect("join").expect("send");
        stats
    }

    #[tokio::test]
    async fn a_context_of_many_files_is_received_whole_without_either_side_waiting_for_ever() {
        // far more files than either direction of the connection holds packets: a
        // receiver that asked for every file before reading any stopped both sides
        let src = tempfile::tempdir().expect("tmp");
        for i in 0..3000 {
            let d = src.path().join(format!("d{}", i / 500));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join(format!("f{i}")), format!("file {i}\n")).expect("write");
        }
        let dest = tempfile::tempdir().expect("tmp");
        let filter = Filter::new(&[], &[]).expect("filter");
        let stats = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            transfer(src.path(), dest.path(), filter),
        )
        .await
        .expect("the transfer ends");
        assert_eq!(stats.transferred, 3000);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("d5/f2999")).expect("last file"),
            "file 2999\n"
        );
    }

    #[tokio::test]
    async fn second_sync_transfers_only_the_changed_file() {
        let src = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(src.path().join("a/b")).expect("mkdir");
        for i in 0..20 {
            std::fs::write(src.path().join(format!("a/b/f{i}")), format!("content {i}"))
                .expect("write");
        }
        std::os::unix::fs::symlink("a/b/f1", src.path().join("link")).expect("symlink");
        let s1 = transfer(src.path(), dest.path(), Filter::default()).await;
        assert_eq!(s1.transferred, 20);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("a/b/f7")).expect("read"),
            "content 7"
        );
        assert_eq!(
            std::fs::read_link(dest.path().join("link")).expect("readlink"),
            Path::new("a/b/f1")
        );

        assert!(s1.changed);
        // nothing changed: the receiver says so and rewrites nothing
        let link_ino = || {
            std::fs::symlink_metadata(dest.path().join("link"))
                .expect("link")
                .ino()
        };
        let before = link_ino();
        let same = transfer(src.path(), dest.path(), Filter::default()).await;
        assert_eq!((same.transferred, same.changed), (0, false));
        assert_eq!(link_ino(), before, "an unchanged symlink is kept");
        std::fs::set_permissions(
            src.path().join("a/b"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        let dir_mode = transfer(src.path(), dest.path(), Filter::default()).await;
        assert_eq!((dir_mode.transferred, dir_mode.changed), (0, true));
        std::fs::remove_file(src.path().join("link")).expect("rm");
        std::os::unix::fs::symlink("a/b/f2", src.path().join("link")).expect("symlink");
        let relinked = transfer(src.path(), dest.path(), Filter::default()).await;
        assert!(relinked.changed, "new symlink target");
        assert!(
            !transfer(src.path(), dest.path(), Filter::default())
                .await
                .changed
        );

        std::fs::write(src.path().join("a/b/f3"), "changed!").expect("write");
        std::fs::remove_file(src.path().join("a/b/f4")).expect("rm");
        let s2 = transfer(src.path(), dest.path(), Filter::default()).await;
        assert!(s2.changed);
        assert_eq!(s2.transferred, 1);
        assert_eq!(s2.removed, 1);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("a/b/f3")).expect("read"),
            "changed!"
        );
        assert!(!dest.path().join("a/b/f4").exists());
    }

    #[tokio::test]
    async fn exclude_patterns_with_reinclude() {
        let src = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(src.path().join("logs")).expect("mkdir");
        std::fs::write(src.path().join("logs/a.log"), "x").expect("write");
        std::fs::write(src.path().join("logs/keep.log"), "x").expect("write");
        std::fs::write(src.path().join("main.rs"), "x").expect("write");
        let f = Filter::new(&[], &["logs/*.log".into(), "!logs/keep.log".into()]).expect("filter");
        transfer(src.path(), dest.path(), f).await;
        assert!(dest.path().join("main.rs").exists());
        assert!(dest.path().join("logs/keep.log").exists());
        assert!(!dest.path().join("logs/a.log").exists());
    }

    #[tokio::test]
    async fn excluded_dir_is_sent_only_for_its_reincluded_children() {
        let src = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        for f in [
            "node_modules/a/x.js",
            "node_modules/keep.md",
            "cache/c.bin",
            "src/main.rs",
        ] {
            let p = src.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, "x").expect("write");
        }
        let f = Filter::new(
            &[],
            &[
                "node_modules".into(),
                "cache".into(),
                "!node_modules/keep.md".into(),
            ],
        )
        .expect("filter");
        transfer(src.path(), dest.path(), f).await;
        assert!(dest.path().join("src/main.rs").exists());
        assert!(dest.path().join("node_modules/keep.md").exists());
        assert!(
            !dest.path().join("node_modules/a").exists(),
            "excluded subdir leaked"
        );
        // walked because of the re-include, but nothing in it is sent
        assert!(
            !dest.path().join("cache").exists(),
            "excluded dir sent empty"
        );
    }

    #[tokio::test]
    async fn double_star_and_leading_slash_patterns() {
        let src = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        for f in ["a/b/c.tmp", "top.tmp", "a/keep.txt", "root.txt"] {
            let p = src.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, "x").expect("write");
        }
        let f = Filter::new(&[], &["**/*.tmp".into(), "/root.txt".into()]).expect("filter");
        transfer(src.path(), dest.path(), f).await;
        assert!(!dest.path().join("a/b/c.tmp").exists());
        assert!(!dest.path().join("top.tmp").exists());
        assert!(!dest.path().join("root.txt").exists());
        assert!(dest.path().join("a/keep.txt").exists());
    }

    #[test]
    fn include_patterns_walk_only_directories_that_can_hold_a_match() {
        let f = Filter::new(&["Dockerfile".into()], &[]).expect("filter");
        assert!(f.matches("Dockerfile", false));
        assert!(!f.matches("src", true), "no pattern reaches into src");
        let f = Filter::new(&["src/app/main.go".into(), "docs/*.md".into()], &[]).expect("filter");
        assert!(f.matches("src", true));
        assert!(f.matches("src/app", true));
        assert!(!f.matches("src/lib", true));
        assert!(f.matches("docs", true));
        assert!(
            f.matches("docs/sub", true),
            "a glob may reach below its prefix"
        );
        assert!(!f.matches("vendor", true));
        let f = Filter::new(&["*/main.go".into()], &[]).expect("filter");
        assert!(
            f.matches("anything", true),
            "a leading glob reaches everywhere"
        );
    }

    #[test]
    fn paths_never_escape() {
        let d = Path::new("/tmp/x");
        assert!(contained(d, "../etc/passwd").is_err());
        assert!(contained(d, "/etc/passwd").is_err());
        assert!(contained(d, "a/../../b").is_err());
        assert_eq!(contained(d, "a/b").expect("ok"), Path::new("/tmp/x/a/b"));
    }

    #[test]
    fn go_modes() {
        assert_eq!(
            gomode::from_unix(libc::S_IFDIR | 0o755),
            gomode::DIR | 0o755
        );
        assert_eq!(
            gomode::from_unix(libc::S_IFREG | 0o4755),
            gomode::SETUID | 0o755
        );
        assert_eq!(gomode::unix_perm(gomode::SETUID | 0o755), 0o4755);
    }

    /// A canary directory holding only `dest`: whatever a test sends, nothing else
    /// may appear in it.
    fn canary() -> (tempfile::TempDir, PathBuf) {
        let canary = tempfile::tempdir().expect("tmp");
        let dest = canary.path().join("dest");
        (canary, dest)
    }

    fn assert_only_dest(canary: &Path) {
        let names: Vec<_> = std::fs::read_dir(canary)
            .expect("canary")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            names.iter().all(|n| n == "dest"),
            "written outside the destination: {names:?}"
        );
    }

    fn limit_of(r: Result<ReceiveStats, Error>) -> (usize, String) {
        match r {
            Err(e @ Error::Limit { limit, .. }) => (limit, e.to_string()),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_list_longer_than_the_entry_limit_is_refused() {
        let (canary, dest) = canary();
        let limits = Limits {
            entries: 50,
            ..Limits::default()
        };
        // exactly at the limit: received
        let (mut a, mut b) = pair();
        let stats: Vec<Stat> = (0..50).map(|i| stat(&format!("f{i}"), 0o644, "")).collect();
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"x").await });
        let got = receive_limited(&mut b, &dest, limits)
            .await
            .expect("50 entries");
        let _ = sender.await;
        assert_eq!(got.entries, 50);
        // one more: refused with the limit named, before any request
        let (mut a, mut b) = pair();
        let stats: Vec<Stat> = (0..51).map(|i| stat(&format!("g{i}"), 0o644, "")).collect();
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"x").await });
        let r = receive_limited(&mut b, &dest, limits).await;
        drop(b);
        let _ = sender.await;
        let (limit, msg) = limit_of(r);
        assert_eq!(limit, 50);
        assert_eq!(
            msg,
            "the file list holds more than 50 entries (the limit is 50)"
        );
        assert!(!dest.join("g0").exists());
        assert_eq!(Limits::default().entries, MAX_ENTRIES);
        assert_only_dest(canary.path());
    }

    #[tokio::test]
    async fn a_sender_cannot_hold_more_than_the_open_file_limit() {
        let (canary, dest) = canary();
        let n = REQUESTS_AHEAD + 8;
        let limits = Limits {
            open_files: 8,
            ..Limits::default()
        };
        let (mut a, mut b) = pair();
        let sender = tokio::spawn(async move {
            for i in 0..n {
                let _ = a
                    .send(Packet {
                        r#type: PacketType::PacketStat as i32,
                        stat: Some(stat(&format!("f{i}"), 0o644, "")),
                        ..Default::default()
                    })
                    .await;
            }
            let _ = a
                .send(Packet {
                    r#type: PacketType::PacketStat as i32,
                    ..Default::default()
                })
                .await;
            // the receiver asks for a few files at a time, never for all of them
            let mut ids = Vec::new();
            while ids.len() < REQUESTS_AHEAD {
                match a.recv().await {
                    Ok(Some(p)) if p.r#type == PacketType::PacketReq as i32 => ids.push(p.id),
                    _ => return 0,
                }
            }
            let more = tokio::time::timeout(std::time::Duration::from_millis(200), a.recv()).await;
            let asked = ids.len() + usize::from(more.is_ok_and(|p| p.is_ok_and(|p| p.is_some())));
            // every requested file is started, none is ended
            for id in ids {
                let sent = a
                    .send(Packet {
                        r#type: PacketType::PacketData as i32,
                        id,
                        data: b"partial".to_vec(),
                        ..Default::default()
                    })
                    .await;
                if sent.is_err() {
                    break;
                }
            }
            asked
        });
        let r = receive_limited(&mut b, &dest, limits).await;
        drop(b);
        let asked = sender.await.expect("sender");
        assert_eq!(
            asked, REQUESTS_AHEAD,
            "requests out before any file was sent"
        );
        let (limit, msg) = limit_of(r);
        assert_eq!(limit, 8);
        assert!(
            msg.starts_with("the sender has more than 8 files open at once")
                && msg.ends_with("(the limit is 8)"),
            "{msg}"
        );
        assert_only_dest(canary.path());
    }

    #[tokio::test]
    async fn paths_longer_or_deeper_than_the_limits_are_refused() {
        let (canary, dest) = canary();
        let long = "x".repeat(MAX_PATH_LEN + 1);
        let deep = format!("{}f", "d/".repeat(MAX_PATH_DEPTH));
        let link_to_long = stat("h", 0o644, &long);
        for (stats, limit) in [
            (vec![stat(&long, 0o644, "")], MAX_PATH_LEN),
            (vec![stat(&deep, 0o644, "")], MAX_PATH_DEPTH),
            (vec![link_to_long], MAX_PATH_LEN),
        ] {
            let (mut a, mut b) = pair();
            let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"x").await });
            let r = receive(&mut b, &dest).await;
            drop(b);
            let _ = sender.await;
            let (got, msg) = limit_of(r);
            assert_eq!(got, limit, "{msg}");
            assert!(msg.ends_with(&format!("(the limit is {limit})")), "{msg}");
        }
        // at the depth limit a path is fine
        let ok = format!("{}f", "d/".repeat(MAX_PATH_DEPTH - 1));
        assert!(check_path(&ok).is_ok());
        assert!(check_path(&"y".repeat(MAX_PATH_LEN)).is_ok());
        assert_only_dest(canary.path());
    }

    #[tokio::test]
    async fn every_sent_file_arrives_whatever_its_name() {
        let (canary, dest) = canary();
        let long = "n".repeat(255);
        let names = ["x", ".kiln-recv-x", long.as_str(), ".kiln-recv-0", "y"];
        let (mut a, mut b) = pair();
        let stats: Vec<Stat> = names.iter().map(|n| stat(n, 0o644, "")).collect();
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"sent").await });
        let got = receive(&mut b, &dest).await.expect("receive");
        let _ = sender.await;
        assert_eq!(got.transferred, names.len());
        let mut have: Vec<String> = std::fs::read_dir(&dest)
            .expect("dest")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        have.sort();
        let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        want.sort();
        assert_eq!(have, want, "exactly the sent entries");
        for n in names {
            assert_eq!(std::fs::read(dest.join(n)).expect(n), b"sent");
        }
        assert_only_dest(canary.path());
    }

    #[tokio::test]
    async fn a_special_file_leaves_nothing_of_an_earlier_sync_at_its_path() {
        let (canary, dest) = canary();
        let (mut a, mut b) = pair();
        let stats = vec![stat("app", 0o644, "")];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"planted").await });
        receive(&mut b, &dest).await.expect("first sync");
        let _ = sender.await;
        // the next sender has a fifo there: the earlier file does not stay
        let (mut a, mut b) = pair();
        let stats = vec![stat("app", gomode::NAMED_PIPE | 0o644, "")];
        let sender = tokio::spawn(async move { crafted_send(&mut a, stats, b"").await });
        let got = receive(&mut b, &dest).await.expect("second sync");
        let _ = sender.await;
        assert!(!dest.join("app").exists(), "planted file stayed");
        assert!(got.changed);
        assert_only_dest(canary.path());
    }
}
