//! File ops: mkdir, mkfile, rm, copy and symlink actions on a mounted view of the input with
//! a fresh upper, so the change is captured as a diff. Every path is resolved inside its
//! root ([`rootpath`]): `..` and absolute symlinks never leave it.

use crate::error::{Error, Result};
use crate::fscopy::{self, CopyOpts};
use crate::pb::{self, file_action::Action, user_opt::User};
use crate::snapshot::{Kind, Mounted, Staging, Store};
use crate::{Worker, rootpath, users, wildcard};
use nix::sys::time::TimeSpec;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A mutable view: a staging snapshot over `parent`, mounted.
struct WorkView {
    staging: Staging,
    mounted: Mounted,
}

impl WorkView {
    fn new(store: &Store, parent: Option<String>) -> Result<WorkView> {
        let staging = store.prepare(parent.as_deref())?;
        let mounted = store.mount_rw(&staging)?;
        Ok(WorkView { staging, mounted })
    }

    fn commit(self, store: &Store) -> Result<String> {
        self.commit_linking(store, None)
    }

    /// Commits, first turning the placeholders a deferred copy left in the
    /// upper into hard links (once the overlay is unmounted, so the upper is
    /// a plain directory again).
    fn commit_linking(self, store: &Store, link: Option<&LinkPlan>) -> Result<String> {
        let view = self.mounted.path().to_path_buf();
        self.mounted.unmount()?;
        if let Some(plan) = link
            && !plan.items.is_empty()
        {
            let started = std::time::Instant::now();
            let upper = self.staging.diff();
            let stats = fscopy::link_deferred(
                &plan.items,
                (&plan.src_view, &plan.src_real),
                (&view, &upper),
            )
            .map_err(Error::io("link copied files", &upper))?;
            tracing::debug!(
                target: "kiln_timing",
                "copy: {} files hard-linked, {} copied in {} ms",
                stats.linked,
                stats.copied,
                started.elapsed().as_millis()
            );
        }
        store.commit(self.staging, Kind::Built, None)
    }
}

/// A copy whose regular files are hard-linked from its source snapshot
/// instead of copied: the source is one committed snapshot (immutable, no
/// parent, so its diff dir is its whole view) and the action's result is
/// committed right after it, so nothing writes into the new layer except
/// through an overlay (whose copy-up leaves the shared inodes alone).
struct LinkPlan {
    src_view: PathBuf,
    src_real: PathBuf,
    items: Vec<fscopy::Deferred>,
}

/// The source snapshot's diff dir when action `a` may hard-link (see [`LinkPlan`]).
fn link_source(store: &Store, a: &pb::FileAction, inputs: &[Option<String>]) -> Option<PathBuf> {
    let n_in = inputs.len() as i64;
    let Some(Action::Copy(c)) = a.action.as_ref() else {
        return None;
    };
    let plain = c.owner.is_none() && c.mode < 0 && c.mode_str.is_empty() && c.timestamp < 0;
    if !plain || a.input >= n_in || a.output < 0 || !(0..n_in).contains(&a.secondary_input) {
        return None;
    }
    let id = inputs.get(a.secondary_input as usize)?.as_deref()?;
    let meta = store.meta(id).ok()?;
    meta.parent.is_none().then(|| store.diff_dir(id))
}

enum ActionResult {
    Working(WorkView),
    Committed(String),
}

pub async fn run(
    w: &Worker,
    f: &pb::FileOp,
    inputs: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let store = w.store().clone();
    let (f, inputs) = (f.clone(), inputs.to_vec());
    tokio::task::spawn_blocking(move || run_blocking(&store, &f, &inputs)).await?
}

fn run_blocking(
    store: &Store,
    f: &pb::FileOp,
    inputs: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let n_in = inputs.len() as i64;
    let mut uses = vec![0usize; f.actions.len()];
    for a in &f.actions {
        for idx in [a.input, a.secondary_input] {
            if idx >= n_in
                && let Some(u) = uses.get_mut((idx - n_in) as usize)
            {
                *u += 1;
            }
        }
    }
    let mut run = FileRun {
        store,
        inputs,
        uses,
        results: Vec::new(),
        outputs: Vec::new(),
    };
    for (k, a) in f.actions.iter().enumerate() {
        run.action(k, a)?;
    }
    Ok(run.outputs)
}

/// The actions of one file op as they run: each reads the op's inputs or the
/// results of earlier actions (index `inputs.len() + j` is action `j`'s).
struct FileRun<'a> {
    store: &'a Store,
    inputs: &'a [Option<String>],
    /// how many later actions read each action's result
    uses: Vec<usize>,
    /// each action's result, `None` once taken over by the one action reading it
    results: Vec<Option<ActionResult>>,
    outputs: Vec<Option<String>>,
}

impl FileRun<'_> {
    fn n_in(&self) -> i64 {
        self.inputs.len() as i64
    }

    /// The earlier action whose result index `idx` names (for action `k`).
    fn prior(&self, k: usize, idx: i64) -> Result<usize> {
        let j = (idx - self.n_in()) as usize;
        if j >= k {
            return Err(Error::InvalidOp(format!(
                "action {k} refers to later action {j}"
            )));
        }
        Ok(j)
    }

    fn consumed(k: usize, j: usize) -> Error {
        Error::InvalidOp(format!("action {k}: result of action {j} already consumed"))
    }

    fn output(&mut self, a: &pb::FileAction, id: String) {
        let o = a.output as usize;
        if self.outputs.len() <= o {
            self.outputs.resize(o + 1, None);
        }
        self.outputs[o] = Some(id.clone());
        self.results.push(Some(ActionResult::Committed(id)));
    }

    fn action(&mut self, k: usize, a: &pb::FileAction) -> Result<()> {
        let store = self.store;
        // a plain copy of a directory into a new or empty directory: the
        // layer is built straight in a new upper, its files hard-linked
        if let Some(src_real) = link_source(store, a, self.inputs)
            && let Some(Action::Copy(c)) = a.action.as_ref()
        {
            let parent = super::input_ref(self.inputs, a.input)?;
            let started = std::time::Instant::now();
            if let Some(st) = direct_copy(store, parent.as_deref(), &src_real, c)? {
                let id = store.commit(st, Kind::Built, None)?;
                tracing::debug!(
                    target: "kiln_timing",
                    "file action {k}: copied into a new upper with hard links in {} ms",
                    started.elapsed().as_millis()
                );
                self.output(a, id);
                return Ok(());
            }
        }
        let view = self.view(k, a)?;
        // the root a copy reads from
        let (secondary, secondary_mount) = if a.secondary_input < 0 {
            (None, None)
        } else {
            self.read_root(k, a.secondary_input, true)?
        };
        // a user name looked up in another input's /etc/passwd (NamedUserOpt.input)
        let (user_root, user_mount) = match named_user_input(a) {
            Some(idx) if idx >= 0 && idx != a.input => self.read_root(k, idx, false)?,
            _ => (None, None),
        };
        let mut link = match (link_source(store, a, self.inputs), &secondary) {
            (Some(src_real), Some(src_view)) => Some(LinkPlan {
                src_view: src_view.clone(),
                src_real,
                items: Vec::new(),
            }),
            _ => None,
        };
        let started = std::time::Instant::now();
        apply_deferring(
            view.mounted.path(),
            secondary.as_deref(),
            user_root.as_deref(),
            a,
            link.as_mut().map(|l| &mut l.items),
        )?;
        drop(user_mount);
        drop(secondary_mount);
        tracing::debug!(
            target: "kiln_timing",
            "file action {k}: applied in {} ms ({} files deferred)",
            started.elapsed().as_millis(),
            link.as_ref().map_or(0, |l| l.items.len())
        );
        if a.output >= 0 {
            let id = view.commit_linking(store, link.as_ref())?;
            self.output(a, id);
        } else {
            self.results.push(Some(ActionResult::Working(view)));
        }
        Ok(())
    }

    /// The view action `k` writes to: over an input, or the earlier action's view
    /// itself when `k` is its last reader.
    fn view(&mut self, k: usize, a: &pb::FileAction) -> Result<WorkView> {
        let store = self.store;
        if a.input < self.n_in() {
            return WorkView::new(store, super::input_ref(self.inputs, a.input)?);
        }
        let j = self.prior(k, a.input)?;
        self.uses[j] -= 1;
        match self.results[j].take() {
            Some(ActionResult::Working(v)) if self.uses[j] == 0 => Ok(v),
            Some(ActionResult::Working(v)) => {
                let id = v.commit(store)?;
                self.results[j] = Some(ActionResult::Committed(id.clone()));
                WorkView::new(store, Some(id))
            }
            Some(ActionResult::Committed(id)) => {
                self.results[j] = Some(ActionResult::Committed(id.clone()));
                WorkView::new(store, Some(id))
            }
            None => Err(Self::consumed(k, j)),
        }
    }

    /// A root action `k` reads (index `idx`): an input or an earlier action's
    /// result, with the read-only mount that keeps it when one was made. A
    /// `secondary` read counts as a use and needs the result to be there.
    fn read_root(
        &mut self,
        k: usize,
        idx: i64,
        secondary: bool,
    ) -> Result<(Option<PathBuf>, Option<Mounted>)> {
        let store = self.store;
        let mount = |id: Option<&str>| -> Result<(Option<PathBuf>, Option<Mounted>)> {
            let m = store.mount_ro(id)?;
            Ok((Some(m.path().to_path_buf()), Some(m)))
        };
        if idx < self.n_in() {
            return mount(super::input_ref(self.inputs, idx)?.as_deref());
        }
        let j = self.prior(k, idx)?;
        if secondary {
            self.uses[j] = self.uses[j].saturating_sub(1);
        }
        match self.results.get(j).and_then(|r| r.as_ref()) {
            Some(ActionResult::Working(v)) => Ok((Some(v.mounted.path().to_path_buf()), None)),
            Some(ActionResult::Committed(id)) => mount(Some(id)),
            None if secondary => Err(Self::consumed(k, j)),
            None => Ok((None, None)),
        }
    }
}

/// The directories a direct copy makes, with their metadata in the parent
/// view when they exist there.
type DirPlan = Vec<(PathBuf, Option<std::fs::Metadata>)>;

/// A copy of one directory's contents (`src_real`: an unmounted snapshot
/// diff, see [`link_source`]) to a destination that is new, or an empty
/// directory, in `parent`'s view: built without an overlay mount in a new
/// upper. The destination's existing parents are created there with their
/// metadata from `parent` (as the overlay's copy-up would), missing ones as
/// `mkdir -p` would, and files are hard-linked. `None` when the copy has
/// another shape (the overlay path handles it, errors included).
fn direct_copy(
    store: &Store,
    parent: Option<&str>,
    src_real: &Path,
    c: &pb::FileActionCopy,
) -> Result<Option<Staging>> {
    if !c.dir_copy_contents
        || (c.allow_wildcard && wildcard::has_wildcards(&c.src))
        || !c.required_paths.is_empty()
        || !c.create_dest_path
    {
        return Ok(None);
    }
    let err = |e: std::io::Error| Error::file_io("copy", &c.src)(e);
    let Ok(src) = rootpath::resolve(src_real, &abs(&c.src), c.follow_symlink) else {
        return Ok(None);
    };
    if !std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_dir()) {
        return Ok(None);
    }
    let filter = fscopy::Filter::new(&c.include_patterns, &c.exclude_patterns).map_err(err)?;
    // the destination and its parents in the parent's view
    let ro = store.mount_ro(parent)?;
    let plan = (|| -> std::io::Result<Option<(PathBuf, DirPlan)>> {
        let dst = rootpath::resolve(ro.path(), &abs(&c.dest), true)?;
        let rel = dst
            .strip_prefix(ro.path())
            .map_err(|_| std::io::Error::other("destination outside the root"))?
            .to_path_buf();
        if rel.as_os_str().is_empty() {
            return Ok(None);
        }
        let mut dirs = Vec::new();
        let mut so_far = PathBuf::new();
        let mut missing = false;
        for comp in rel.components() {
            so_far.push(comp);
            let md = if missing {
                None
            } else {
                std::fs::symlink_metadata(ro.path().join(&so_far)).ok()
            };
            match md {
                Some(m) if m.is_dir() => dirs.push((so_far.clone(), Some(m))),
                Some(_) => return Ok(None),
                None => {
                    missing = true;
                    dirs.push((so_far.clone(), None));
                }
            }
        }
        if !missing && std::fs::read_dir(&dst)?.next().is_some() {
            return Ok(None);
        }
        Ok(Some((rel, dirs)))
    })();
    ro.unmount()?;
    let Some((rel, dirs)) = plan.map_err(err)? else {
        return Ok(None);
    };
    let st = store.prepare(parent)?;
    let upper = st.diff();
    for (d, md) in &dirs {
        let p = upper.join(d);
        std::fs::create_dir(&p).map_err(err)?;
        match md {
            Some(m) => fscopy::set_meta_like(&p, m),
            None => times_of(&p, None).and_then(|t| fscopy::set_meta(&p, (0, 0), Some(0o755), t)),
        }
        .map_err(err)?;
    }
    let opts = CopyOpts {
        filter,
        always_replace: c.always_replace_existing_dest_paths,
        link_files: true,
        keep_existing_dirs: true,
        ..Default::default()
    };
    let top = upper.join(&rel);
    // as BuildKit: the destination directory keeps the owner and mode it had
    // (0755 root's when the copy made it), only its times are the source's
    let top_md = std::fs::symlink_metadata(&top).map_err(err)?;
    if opts.filter.is_none() {
        // the destination is new and empty: every core can link at once
        fscopy::link_tree(&src, &top).map_err(err)?;
        let src_md = std::fs::symlink_metadata(&src).map_err(err)?;
        fscopy::set_meta(
            &top,
            (top_md.uid(), top_md.gid()),
            Some(top_md.mode()),
            (
                TimeSpec::new(src_md.atime(), src_md.atime_nsec()),
                TimeSpec::new(src_md.mtime(), src_md.mtime_nsec()),
            ),
        )
        .map_err(err)?;
    } else {
        fscopy::copy_entry(&src, &top, &opts).map_err(err)?;
    }
    Ok(Some(st))
}

fn abs(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

fn timestamp(t: i64) -> Option<i64> {
    (t >= 0).then_some(t)
}

/// Resolves a ChownOpt in `root` (the destination rootfs) as BuildKit does:
/// names missing from its passwd/group files are root's ids, not an error.
fn owner(root: &Path, o: Option<&pb::ChownOpt>) -> Result<Option<(u32, u32)>> {
    let Some(o) = o else { return Ok(None) };
    let user = o.user.as_ref().and_then(|u| u.user.as_ref());
    let group = o.group.as_ref().and_then(|g| g.user.as_ref());
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let name = |u: &User| match u {
        User::ById(id) => id.to_string(),
        User::ByName(n) => n.name.clone(),
    };
    let (user, group) = (user.map(name), group.map(name));
    Ok(Some(users::chown_ids(
        root,
        user.as_deref(),
        group.as_deref(),
    )))
}

fn times_of(path: &Path, ts: Option<i64>) -> std::io::Result<(TimeSpec, TimeSpec)> {
    match ts {
        Some(t) => Ok(fscopy::timespec(t)),
        None => {
            let md = std::fs::symlink_metadata(path)?;
            Ok((
                TimeSpec::new(md.atime(), md.atime_nsec()),
                TimeSpec::new(md.mtime(), md.mtime_nsec()),
            ))
        }
    }
}

/// mkdir -p inside `root` for an already resolved path; created dirs get mode/owner/times.
fn mkdir_all(
    root: &Path,
    target: &Path,
    mode: u32,
    own: Option<(u32, u32)>,
    ts: Option<i64>,
) -> std::io::Result<()> {
    let rel = target
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("path outside root"))?;
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => continue,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "not a directory",
                ));
            }
            Err(_) => {
                std::fs::create_dir(&cur)?;
                let t = times_of(&cur, ts)?;
                fscopy::set_meta(&cur, own.unwrap_or((0, 0)), Some(mode), t)?;
            }
        }
    }
    Ok(())
}

/// The input index of a by-name owner of `a`, if any.
fn named_user_input(a: &pb::FileAction) -> Option<i64> {
    let owner = match a.action.as_ref()? {
        Action::Copy(c) => c.owner.as_ref(),
        Action::Mkdir(m) => m.owner.as_ref(),
        Action::Mkfile(m) => m.owner.as_ref(),
        Action::Symlink(s) => s.owner.as_ref(),
        Action::Rm(_) => None,
    }?;
    [owner.user.as_ref(), owner.group.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|u| match &u.user {
            Some(User::ByName(n)) => Some(n.input),
            _ => None,
        })
}

/// Applies one action to the view at `root`.
pub fn apply(root: &Path, secondary: Option<&Path>, a: &pb::FileAction) -> Result<()> {
    apply_with_users(root, secondary, None, a)
}

/// Applies one action; user and group names resolve in `users_root` when given
/// (else in `root`).
pub fn apply_with_users(
    root: &Path,
    secondary: Option<&Path>,
    users_root: Option<&Path>,
    a: &pb::FileAction,
) -> Result<()> {
    apply_deferring(root, secondary, users_root, a, None)
}

/// [`apply_with_users`]; a copy with `deferred` leaves its regular files as
/// placeholders listed there (see [`fscopy::copy_entry_deferred`]).
fn apply_deferring(
    root: &Path,
    secondary: Option<&Path>,
    users_root: Option<&Path>,
    a: &pb::FileAction,
    deferred: Option<&mut Vec<fscopy::Deferred>>,
) -> Result<()> {
    let user_db = users_root.unwrap_or(root);
    fn io<'a>(action: &'static str, path: &'a str) -> impl Fn(std::io::Error) -> Error + 'a {
        Error::file_io(action, path)
    }
    match a.action.as_ref() {
        None => Err(Error::InvalidOp("file action has no body".into())),
        Some(Action::Mkdir(m)) => {
            let p = rootpath::resolve(root, &abs(&m.path), true).map_err(io("mkdir", &m.path))?;
            let own = owner(user_db, m.owner.as_ref())?;
            let mode = (m.mode as u32) & 0o7777;
            if m.make_parents {
                mkdir_all(root, &p, mode, own, timestamp(m.timestamp)).map_err(io("mkdir", &m.path))
            } else {
                std::fs::create_dir(&p).map_err(io("mkdir", &m.path))?;
                let t = times_of(&p, timestamp(m.timestamp)).map_err(io("mkdir", &m.path))?;
                fscopy::set_meta(&p, own.unwrap_or((0, 0)), Some(mode), t)
                    .map_err(io("mkdir", &m.path))
            }
        }
        Some(Action::Mkfile(m)) => {
            let p = rootpath::resolve(root, &abs(&m.path), true).map_err(io("mkfile", &m.path))?;
            let own = owner(user_db, m.owner.as_ref())?;
            std::fs::write(&p, &m.data).map_err(io("mkfile", &m.path))?;
            let t = times_of(&p, timestamp(m.timestamp)).map_err(io("mkfile", &m.path))?;
            fscopy::set_meta(&p, own.unwrap_or((0, 0)), Some((m.mode as u32) & 0o7777), t)
                .map_err(io("mkfile", &m.path))
        }
        Some(Action::Rm(r)) => {
            let paths = if r.allow_wildcard && wildcard::has_wildcards(&r.path) {
                wildcard::expand(root, &r.path)?
            } else {
                vec![abs(&r.path)]
            };
            for path in paths {
                let p = rootpath::resolve(root, &path, false).map_err(io("rm", &r.path))?;
                let res = match std::fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p),
                    Ok(_) => std::fs::remove_file(&p),
                    Err(e) => Err(e),
                };
                match res {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && r.allow_not_found => {}
                    Err(e) => return Err(Error::file_io("rm", &r.path)(e)),
                    Ok(()) => {}
                }
            }
            Ok(())
        }
        Some(Action::Symlink(s)) => {
            let p = rootpath::resolve(root, &abs(&s.newpath), false)
                .map_err(io("symlink", &s.newpath))?;
            std::os::unix::fs::symlink(&s.oldpath, &p).map_err(io("symlink", &s.newpath))?;
            let own = owner(user_db, s.owner.as_ref())?;
            let t = times_of(&p, timestamp(s.timestamp)).map_err(io("symlink", &s.newpath))?;
            fscopy::set_meta(&p, own.unwrap_or((0, 0)), None, t).map_err(io("symlink", &s.newpath))
        }
        Some(Action::Copy(c)) => copy(root, secondary, user_db, c, deferred),
    }
}

fn copy(
    root: &Path,
    secondary: Option<&Path>,
    user_db: &Path,
    c: &pb::FileActionCopy,
    mut deferred: Option<&mut Vec<fscopy::Deferred>>,
) -> Result<()> {
    let empty = tempfile::tempdir().map_err(Error::file_io("copy", &c.src))?;
    let src_root = secondary.unwrap_or(empty.path());
    let err = |e: std::io::Error| Error::file_io("copy", &c.src)(e);
    for req in &c.required_paths {
        let p = rootpath::resolve(src_root, &abs(req), false).map_err(err)?;
        if std::fs::symlink_metadata(&p).is_err() {
            return Err(Error::file("copy", req, "required path not found"));
        }
    }
    let srcs = if c.allow_wildcard && wildcard::has_wildcards(&c.src) {
        let m = wildcard::expand(src_root, &c.src)?;
        if m.is_empty() && !c.allow_empty_wildcard {
            return Err(Error::file("copy", &c.src, "no matches found"));
        }
        m
    } else {
        vec![abs(&c.src)]
    };
    let own = owner(user_db, c.owner.as_ref())?;
    let mode_str = if c.mode_str.is_empty() {
        None
    } else {
        Some(fscopy::ModeStr::parse(&c.mode_str).map_err(err)?)
    };
    let opts = CopyOpts {
        owner: own,
        mode: (c.mode >= 0).then_some(c.mode as u32),
        mode_str,
        timestamp: timestamp(c.timestamp),
        filter: fscopy::Filter::new(&c.include_patterns, &c.exclude_patterns).map_err(err)?,
        always_replace: c.always_replace_existing_dest_paths,
        link_files: false,
        keep_existing_dirs: true,
    };
    // BuildKit (fsutil copy.Copy): the destination's directory (the
    // destination itself when it ends in `/` or `/.`) is made first, then for
    // each source the directory the entry goes into; both with the octal
    // mode, else 0755, and the owner. Directories that exist are left alone.
    let dir_mode = match (&opts.mode_str, opts.mode) {
        (None, Some(m)) => m & 0o7777,
        _ => 0o755,
    };
    let dest_abs = abs(&c.dest);
    let last = dest_abs.rsplit('/').next().unwrap_or("");
    let ensure = if last.is_empty() || last == "." {
        dest_abs.clone()
    } else {
        dest_abs[..dest_abs.len() - last.len()].to_string()
    };
    if !c.create_dest_path {
        let d = rootpath::resolve(root, &dest_abs, true).map_err(err)?;
        if !d.parent().is_none_or(|p| p.is_dir()) {
            return Err(Error::file(
                "copy",
                &c.dest,
                "destination directory does not exist",
            ));
        }
    }
    let ensure = rootpath::resolve(root, &ensure, true).map_err(err)?;
    // an unpacked archive takes no mode (BuildKit's unpack is given none)
    let unpack_opts = CopyOpts {
        mode: None,
        mode_str: None,
        ..opts.clone()
    };
    for src in srcs {
        let src_path = rootpath::resolve(src_root, &src, c.follow_symlink).map_err(err)?;
        let src_md = std::fs::symlink_metadata(&src_path).map_err(|e| match e.kind() {
            // as users know it from BuildKit: the quoted path, then "not found"
            std::io::ErrorKind::NotFound => {
                Error::file("copy source", &format!("{src:?}"), "not found")
            }
            _ => Error::file("copy source", &format!("{src:?}"), e),
        })?;
        if c.attempt_unpack_docker_compatibility
            && src_md.is_file()
            && let Some(kind) = crate::untar::archive_kind(&src_path).map_err(err)?
        {
            let dst = rootpath::resolve(root, &dest_abs, true).map_err(err)?;
            mkdir_all(root, &dst, 0o755, own, opts.timestamp).map_err(err)?;
            crate::untar::unpack(&src_path, kind, root, &dst, &unpack_opts).map_err(err)?;
            continue;
        }
        if ensure.starts_with(root) {
            mkdir_all(root, &ensure, dir_mode, own, opts.timestamp).map_err(err)?;
        }
        let mut dst = rootpath::resolve(root, &dest_abs, true).map_err(err)?;
        let dst_md = std::fs::metadata(&dst).ok();
        let src_is_dir = src_md.is_dir();
        if (!c.dir_copy_contents && src_is_dir && dst_md.is_some())
            || (!src_is_dir && dst_md.as_ref().is_some_and(|m| m.is_dir()))
        {
            let base = Path::new(&src)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            dst.push(base);
        }
        let target = if c.dir_copy_contents && src_is_dir && dst_md.is_none() {
            Some(dst.as_path())
        } else {
            dst.parent()
        };
        if let Some(t) = target.filter(|t| t.starts_with(root)) {
            mkdir_all(root, t, dir_mode, own, opts.timestamp).map_err(err)?;
        }
        match deferred.as_deref_mut() {
            Some(list) => {
                list.extend(fscopy::copy_entry_deferred(&src_path, &dst, &opts).map_err(err)?)
            }
            None => fscopy::copy_entry(&src_path, &dst, &opts).map_err(err)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::pb::{self, file_action::Action, op::Op};
    use crate::testutil;
    use crate::{RunRequest, Worker};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn action(input: i64, secondary: i64, output: i64, a: Action) -> pb::FileAction {
        pb::FileAction {
            input,
            secondary_input: secondary,
            output,
            action: Some(a),
        }
    }

    fn copy(src: &str, dest: &str) -> pb::FileActionCopy {
        pb::FileActionCopy {
            src: src.into(),
            dest: dest.into(),
            mode: -1,
            timestamp: -1,
            create_dest_path: true,
            follow_symlink: true,
            ..Default::default()
        }
    }

    async fn run(
        w: &Worker,
        inputs: Vec<Option<String>>,
        actions: Vec<pb::FileAction>,
    ) -> crate::Result<Option<String>> {
        let op = pb::Op {
            inputs: inputs
                .iter()
                .map(|_| pb::Input {
                    digest: "sha256:x".into(),
                    index: 0,
                })
                .collect(),
            op: Some(Op::File(pb::FileOp { actions })),
            ..Default::default()
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let req = RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "f".into(),
            op,
            inputs,
            entitlements: Vec::new(),
        };
        Ok(w.run(req, tx).await?.into_iter().next().flatten())
    }

    fn base(w: &Worker) -> String {
        testutil::snapshot(w, None, |d| {
            std::fs::create_dir_all(d.join("etc")).expect("mkdir");
            std::fs::write(
                d.join("etc/passwd"),
                "root:x:0:0::/:/bin/sh\nalice:x:1000:1001::/:/bin/sh\n",
            )
            .expect("w");
            std::fs::write(d.join("a.txt"), "a").expect("w");
            std::os::unix::fs::symlink("/tmp", d.join("link")).expect("symlink");
        })
    }

    #[tokio::test]
    async fn mkdir_mkfile_copy_rm_capture_a_diff_with_whiteouts() {
        let (_tmp, w) = testutil::worker();
        let dest = base(&w);
        let src = testutil::snapshot(&w, None, |d| {
            std::fs::create_dir_all(d.join("src/sub")).expect("mkdir");
            std::fs::write(d.join("src/sub/f"), "f").expect("w");
            std::fs::write(d.join("one.txt"), "1").expect("w");
        });
        let mut chown = copy("/src", "/x/");
        chown.owner = Some(pb::ChownOpt {
            user: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: "alice".into(),
                    input: 0,
                })),
            }),
            group: None,
        });
        let mut wild = copy("/*.txt", "/y/");
        wild.allow_wildcard = true;
        let out = run(
            &w,
            vec![Some(dest.clone()), Some(src)],
            vec![
                action(
                    0,
                    -1,
                    -1,
                    Action::Mkdir(pb::FileActionMkDir {
                        path: "/x".into(),
                        mode: 0o755,
                        make_parents: true,
                        timestamp: -1,
                        owner: None,
                    }),
                ),
                action(
                    2,
                    -1,
                    -1,
                    Action::Mkfile(pb::FileActionMkFile {
                        path: "/x/new".into(),
                        mode: 0o600,
                        data: b"new".to_vec(),
                        timestamp: 1_000_000_000,
                        owner: None,
                    }),
                ),
                action(3, 1, -1, Action::Copy(chown)),
                action(4, 1, -1, Action::Copy(wild)),
                action(
                    5,
                    -1,
                    -1,
                    Action::Rm(pb::FileActionRm {
                        path: "/a.txt".into(),
                        ..Default::default()
                    }),
                ),
                action(
                    6,
                    -1,
                    0,
                    Action::Symlink(pb::FileActionSymlink {
                        oldpath: "new".into(),
                        newpath: "/x/ln".into(),
                        timestamp: -1,
                        owner: None,
                    }),
                ),
            ],
        )
        .await
        .expect("file op")
        .expect("output");
        let diff = w.store().diff_dir(&out);
        assert_eq!(
            std::fs::read_to_string(diff.join("x/new")).expect("mkfile"),
            "new"
        );
        let md = std::fs::metadata(diff.join("x/new")).expect("stat");
        assert_eq!((md.mode() & 0o777, md.mtime()), (0o600, 1));
        let copied = std::fs::metadata(diff.join("x/src/sub/f")).expect("copied");
        assert_eq!((copied.uid(), copied.gid()), (1000, 1001));
        assert_eq!(
            std::fs::read_to_string(diff.join("y/one.txt")).expect("wildcard"),
            "1"
        );
        assert!(
            std::fs::symlink_metadata(diff.join("a.txt"))
                .expect("whiteout")
                .file_type()
                .is_char_device()
        );
        assert_eq!(
            std::fs::read_link(diff.join("x/ln")).expect("symlink"),
            std::path::Path::new("new")
        );
        // the chain above the base holds the whole result
        let chain = w.store().chain(Some(&out)).expect("chain");
        assert_eq!(chain.last().map(|m| m.id.clone()), Some(dest));

        let layers = w
            .layers(Some(&out), &kiln_oci::LayerOptions::default())
            .await
            .expect("layers");
        assert_eq!(layers.len(), chain.len());
        let top = layers.last().expect("top layer");
        assert_eq!(
            top.descriptor.media_type,
            kiln_oci::media_types::OCI_LAYER_GZIP
        );
        let f =
            std::fs::File::open(w.blob_path(&top.descriptor.digest).expect("path")).expect("blob");
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect();
        for want in [".wh.a.txt", "x/new", "x/src/sub/f", "x/ln", "y/one.txt"] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert_eq!(
            w.layers(Some(&out), &kiln_oci::LayerOptions::default())
                .await
                .expect("memoized"),
            layers
        );
    }

    #[tokio::test]
    async fn copy_cannot_escape_the_roots() {
        let (_tmp, w) = testutil::worker();
        let dest = base(&w);
        let src = testutil::snapshot(&w, None, |d| {
            std::fs::create_dir_all(d.join("etc")).expect("mkdir");
            std::fs::write(d.join("etc/passwd"), "inside").expect("w");
            std::os::unix::fs::symlink("/etc", d.join("evil")).expect("symlink");
            std::os::unix::fs::symlink("../../../../../../etc", d.join("up")).expect("symlink");
        });
        let out = run(
            &w,
            vec![Some(dest), Some(src.clone())],
            vec![
                action(0, 1, -1, Action::Copy(copy("/evil/passwd", "/got-abs"))),
                action(
                    2,
                    1,
                    -1,
                    Action::Copy(copy("../../../../up/passwd", "/got-rel")),
                ),
                action(
                    3,
                    1,
                    -1,
                    Action::Copy(copy("/etc/passwd", "../../../../../escaped")),
                ),
                action(
                    4,
                    1,
                    0,
                    Action::Copy(copy("/etc/passwd", "/link/through-symlink")),
                ),
            ],
        )
        .await
        .expect("file op")
        .expect("output");
        let diff = w.store().diff_dir(&out);
        assert_eq!(
            std::fs::read_to_string(diff.join("got-abs")).expect("abs"),
            "inside"
        );
        assert_eq!(
            std::fs::read_to_string(diff.join("got-rel")).expect("rel"),
            "inside"
        );
        assert_eq!(
            std::fs::read_to_string(diff.join("escaped")).expect("clamped"),
            "inside"
        );
        assert_eq!(
            std::fs::read_to_string(diff.join("tmp/through-symlink")).expect("in root"),
            "inside"
        );
        assert!(!std::path::Path::new("/tmp/through-symlink").exists());

        let missing = run(
            &w,
            vec![None, Some(src)],
            vec![action(
                0,
                1,
                0,
                Action::Copy(copy("/../../etc/hostname", "/h")),
            )],
        )
        .await;
        assert!(missing.is_err(), "host /etc/hostname must not be reachable");
    }

    #[tokio::test]
    async fn owner_names_from_another_input_required_paths_mode_strings_and_unpack() {
        let (_tmp, w) = testutil::worker();
        let dest = base(&w);
        let users = testutil::snapshot(&w, None, |d| {
            std::fs::create_dir_all(d.join("etc")).expect("mkdir");
            std::fs::write(d.join("etc/passwd"), "bob:x:4242:4343::/:/bin/sh\n").expect("w");
            std::fs::write(d.join("etc/group"), "bob:x:4343:\n").expect("w");
        });
        let src = testutil::snapshot(&w, None, |d| {
            std::fs::write(d.join("f.sh"), "x").expect("w");
            let mut t = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o640);
            h.set_cksum();
            t.append_data(&mut h, "inner/file", &b"hi"[..])
                .expect("append");
            std::fs::write(d.join("a.tar"), t.into_inner().expect("tar")).expect("w");
        });
        let mut by_name = copy("/f.sh", "/f.sh");
        by_name.owner = Some(pb::ChownOpt {
            user: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: "bob".into(),
                    input: 2,
                })),
            }),
            group: None,
        });
        by_name.mode_str = "u+x,go=".into();
        by_name.required_paths = vec!["/f.sh".into()];
        let mut unpack = copy("/a.tar", "/x/");
        unpack.attempt_unpack_docker_compatibility = true;
        let mut keep_tar = copy("/a.tar", "/kept.tar");
        keep_tar.attempt_unpack_docker_compatibility = false;
        let out = run(
            &w,
            vec![Some(dest.clone()), Some(src.clone()), Some(users)],
            vec![
                action(0, 1, -1, Action::Copy(by_name)),
                action(3, 1, -1, Action::Copy(unpack)),
                action(4, 1, 0, Action::Copy(keep_tar)),
            ],
        )
        .await
        .expect("file op")
        .expect("output");
        let diff = w.store().diff_dir(&out);
        let md = std::fs::metadata(diff.join("f.sh")).expect("f.sh");
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o777), (4242, 4343, 0o700));
        assert_eq!(
            std::fs::read_to_string(diff.join("x/inner/file")).expect("unpacked"),
            "hi"
        );
        assert!(diff.join("kept.tar").is_file());

        let mut missing = copy("/f.sh", "/g");
        missing.required_paths = vec!["/nope".into()];
        let err = run(
            &w,
            vec![Some(dest), Some(src)],
            vec![action(0, 1, 0, Action::Copy(missing))],
        )
        .await;
        assert!(
            err.expect_err("required path")
                .to_string()
                .contains("required path not found")
        );
    }

    #[tokio::test]
    async fn a_plain_copy_from_one_snapshot_hard_links_and_overlay_writes_leave_it_alone() {
        let (_tmp, w) = testutil::worker();
        let dest = base(&w);
        let src = testutil::snapshot(&w, None, |d| {
            std::fs::create_dir_all(d.join("ctx/sub")).expect("mkdir");
            std::fs::write(d.join("ctx/sub/f"), "original").expect("w");
            std::fs::write(d.join("ctx/g"), "g").expect("w");
            std::fs::hard_link(d.join("ctx/g"), d.join("ctx/g2")).expect("link");
            std::os::unix::fs::symlink("sub/f", d.join("ctx/l")).expect("symlink");
        });
        let mut c = copy("/ctx", "/ctx/");
        c.dir_copy_contents = true;
        let out = run(
            &w,
            vec![Some(dest.clone()), Some(src.clone())],
            vec![action(0, 1, 0, Action::Copy(c))],
        )
        .await
        .expect("copy")
        .expect("output");
        let (sd, od) = (w.store().diff_dir(&src), w.store().diff_dir(&out));
        let ino = |p: std::path::PathBuf| std::fs::metadata(p).expect("stat").ino();
        assert_eq!(
            ino(od.join("ctx/sub/f")),
            ino(sd.join("ctx/sub/f")),
            "linked"
        );
        assert_eq!(ino(od.join("ctx/g")), ino(od.join("ctx/g2")), "links kept");
        assert_eq!(
            std::fs::read_link(od.join("ctx/l")).expect("symlink"),
            std::path::Path::new("sub/f")
        );
        // a RUN-like write over the layer goes to a new upper (copy-up)
        let st = w.store().prepare(Some(&out)).expect("prepare");
        let m = w.store().mount_rw(&st).expect("mount");
        std::fs::write(m.path().join("ctx/sub/f"), "overwritten").expect("write");
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.path().join("ctx/g"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"+"))
            .expect("append");
        m.unmount().expect("unmount");
        for d in [&sd, &od] {
            assert_eq!(
                std::fs::read_to_string(d.join("ctx/sub/f")).expect("r"),
                "original"
            );
            assert_eq!(std::fs::read_to_string(d.join("ctx/g2")).expect("r"), "g");
        }
        // into a directory that has files: through the overlay, files still linked
        let mut into_etc = copy("/ctx", "/etc/");
        into_etc.dir_copy_contents = true;
        let out3 = run(
            &w,
            vec![Some(dest.clone()), Some(src.clone())],
            vec![action(0, 1, 0, Action::Copy(into_etc))],
        )
        .await
        .expect("copy")
        .expect("output");
        let ed = w.store().diff_dir(&out3);
        assert_eq!(ino(ed.join("etc/sub/f")), ino(sd.join("ctx/sub/f")));
        assert_eq!(ino(ed.join("etc/g2")), ino(sd.join("ctx/g")));
        assert!(!ed.join("etc/passwd").exists(), "lower file not copied up");
        let m = w.store().mount_ro(Some(&out3)).expect("mount");
        assert!(m.path().join("etc/passwd").is_file());
        assert_eq!(
            std::fs::read_to_string(m.path().join("etc/sub/f")).expect("r"),
            "original"
        );
        m.unmount().expect("unmount");
        // missing parents are made as mkdir -p makes them
        let mut deep = copy("/ctx", "/new/deep/");
        deep.dir_copy_contents = true;
        let out4 = run(
            &w,
            vec![Some(dest.clone()), Some(src.clone())],
            vec![action(0, 1, 0, Action::Copy(deep))],
        )
        .await
        .expect("copy")
        .expect("output");
        let nd = w.store().diff_dir(&out4);
        let md = std::fs::metadata(nd.join("new")).expect("new");
        assert_eq!((md.mode() & 0o7777, md.uid()), (0o755, 0));
        assert_eq!(ino(nd.join("new/deep/sub/f")), ino(sd.join("ctx/sub/f")));
        // a copy with an owner override copies bytes
        let mut owned = copy("/ctx/g", "/owned");
        owned.owner = Some(pb::ChownOpt {
            user: Some(pb::UserOpt {
                user: Some(pb::user_opt::User::ById(7)),
            }),
            group: None,
        });
        let out2 = run(
            &w,
            vec![Some(dest), Some(src)],
            vec![action(0, 1, 0, Action::Copy(owned))],
        )
        .await
        .expect("copy")
        .expect("output");
        let md = std::fs::metadata(w.store().diff_dir(&out2).join("owned")).expect("stat");
        assert_ne!(md.ino(), ino(sd.join("ctx/g")));
        assert_eq!((md.uid(), md.len()), (7, 1));
    }
}
