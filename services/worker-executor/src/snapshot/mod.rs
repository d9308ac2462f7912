//! The snapshot store: immutable filesystem layers chained by parent id.
//!
//! Layout under the worker root:
//! * `snapshots/<id>/{diff,meta.json,layers.json}`: committed snapshots (immutable;
//!   `layers.json`, the memo of the snapshot's layer blobs, is the only file rewritten);
//! * `staging/<id>/{diff,work}`: snapshots being written. A staging dir is renamed into
//!   `snapshots/` only after its meta.json is complete, so a crash never leaves a half
//!   snapshot visible; leftovers are removed when the store opens.
//!
//! Durability without an fsync per snapshot: a commit records in meta.json the boot
//! (`/proc/sys/kernel/random/boot_id`) and the boot-clock time it was written at. A
//! background thread `syncfs`es the store's filesystem every few seconds when something
//! was committed, then records in `synced` the boot and the time the sync started.
//! When the store opens after a reboot, every snapshot written during an earlier boot
//! after that boot's last recorded sync (or whose meta.json is unreadable) may have lost
//! content in the crash, so it is removed, with its children; the solver's records that
//! name it then fail their existence check and the steps run again. Within one boot
//! (a killed daemon), the page cache still holds everything written, so nothing is lost.
//!
//! With containerd (`[worker.containerd]`, [`Store::open_with`]) the snapshot dirs live
//! in containerd's snapshotter (see [`containerd`]): a staging snapshot is an active
//! containerd snapshot whose upper dir is the diff, and a committed one is a containerd
//! snapshot too, with the same parent. kiln's `snapshots/<id>/` then holds meta.json
//! and `diff`, a symlink to containerd's dir, so everything that reads a snapshot by path
//! works the same on both backends. The order of a commit is containerd's first, then
//! kiln's rename; a crash in between leaves a containerd snapshot no kiln meta names,
//! which the next open removes with every staging snapshot of this worker (and drops
//! the kiln snapshots containerd does not hold). The background sync covers the
//! filesystem of containerd's snapshot dirs too.

pub mod containerd;
pub mod copy;
pub mod overlay;

use crate::error::{Error, Result};
use nix::mount::MsFlags;
pub use overlay::{Mounted, Upper};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Where a snapshot's content came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An image layer unpacked from a registry blob.
    Image,
    /// The diff of an exec or file op.
    Built,
    /// A copy of a client's local directory.
    Local,
}

/// A compressed layer blob in the content store and the digest of its uncompressed tar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerBlob {
    pub descriptor: kiln_oci::Descriptor,
    pub diff_id: String,
}

/// meta.json of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub parent: Option<String>,
    pub kind: Kind,
    /// For image layers: the blob the layer was unpacked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<LayerBlob>,
    /// Memoized layer blobs of this snapshot's diff by compression; `None` = empty diff.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, Option<LayerBlob>>,
    /// Digest of the content (see `contenthash`) where the op's definition
    /// does not determine it (local sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_key: Option<String>,
    /// When the snapshot was committed (see the module doc); absent in snapshots
    /// committed with an fsync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<Written>,
    /// Where containerd holds the snapshot (the containerd backend only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containerd: Option<ContainerdRef>,
}

/// A committed snapshot in containerd's snapshotter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ContainerdRef {
    /// containerd's name of the snapshot (`kiln/<id>`)
    pub name: String,
    /// its filesystem dir (what `diff` links to)
    pub dir: PathBuf,
}

/// A boot and a time on its boot clock (`CLOCK_BOOTTIME`, nanoseconds).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub boot: String,
    pub at: u64,
}

impl Written {
    /// This boot, now.
    pub fn now() -> Written {
        let at = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
            t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
        });
        Written {
            boot: boot_id(),
            at,
        }
    }
}

/// The kernel's id of this boot (empty when unknown: then nothing counts as same-boot).
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// The file next to a snapshot's meta.json holding its layer memo.
const LAYERS_MEMO: &str = "layers.json";

/// How often the background thread syncs the store's filesystem after commits.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a snapshot committed at `written` survived the end of its boot: it was
/// written in this boot, or before a sync recorded in `synced` for its boot.
fn durable(written: &Written, synced: Option<&Written>) -> bool {
    let here = boot_id();
    (!here.is_empty() && written.boot == here)
        || synced.is_some_and(|s| s.boot == written.boot && written.at < s.at)
}

/// syncfs(2) of the filesystem holding `dir`.
fn syncfs(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(Error::io("open", dir))?;
    nix::unistd::syncfs(&d).map_err(|e| Error::io("syncfs", dir)(e.into()))
}

/// Whether two paths are on the same filesystem (unknown counts as different).
fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// Syncs the store's filesystem (and `also`'s, containerd's snapshot dirs, when it is
/// another one) and records it in `synced_file`.
fn sync_now(root: &Path, also: Option<&Path>, synced_file: &Path) -> Result<()> {
    let start = Written::now();
    syncfs(root)?;
    if let Some(d) = also.filter(|d| !same_fs(root, d)) {
        syncfs(d)?;
    }
    let bytes = serde_json::to_vec(&start).map_err(|source| Error::SnapshotMeta {
        id: "synced".into(),
        source,
    })?;
    write_atomic(synced_file, &bytes)
}

/// Syncs every [`SYNC_INTERVAL`] while something was committed since the last sync;
/// ends when the store (every clone of it) is gone.
fn spawn_syncer(
    root: PathBuf,
    also: Arc<OnceLock<PathBuf>>,
    synced_file: PathBuf,
    dirty: std::sync::Weak<std::sync::atomic::AtomicBool>,
    syncs: Arc<Syncs>,
) {
    use std::sync::atomic::Ordering;
    let spawned = std::thread::Builder::new()
        .name("snapshot-sync".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SYNC_INTERVAL);
                let Some(flag) = dirty.upgrade() else { return };
                if flag.swap(false, Ordering::AcqRel) {
                    let n = syncs.started.fetch_add(1, Ordering::AcqRel) + 1;
                    match sync_now(&root, also.get().map(PathBuf::as_path), &synced_file) {
                        Ok(()) => syncs.done.store(n, Ordering::Release),
                        Err(e) => {
                            flag.store(true, Ordering::Release);
                            tracing::warn!(error = %kiln_proto::status::Chain(&e), "sync snapshots");
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %kiln_proto::status::Chain(&e), "start the snapshot sync thread");
    }
}

/// Where a committed snapshot sits in its chain.
#[derive(Debug, Clone)]
struct Link {
    parent: Option<String>,
    dir: PathBuf,
}

/// Background syncs of the store: how many started, and the number of the
/// last one that completed.
#[derive(Debug, Default)]
struct Syncs {
    started: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

/// A snapshot being written: its `diff` dir is an overlay upper (or a plain dir).
#[derive(Debug)]
pub struct Staging {
    id: String,
    /// kiln's dir of the snapshot (with the containerd backend, made at commit)
    dir: PathBuf,
    /// the snapshot this one is a diff over
    parent: Option<String>,
    committed: bool,
    /// recorded in the snapshot's metadata at commit
    pub content_key: Option<String>,
    /// the active containerd snapshot holding the diff (the containerd backend)
    active: Option<Active>,
}

/// An active snapshot in containerd.
#[derive(Debug)]
struct Active {
    snapshots: Arc<containerd::Snapshots>,
    key: String,
    dirs: containerd::UpperDirs,
}

impl Staging {
    /// The meta.json of the snapshot this staging snapshot commits to (written now).
    fn meta_json(
        &mut self,
        kind: Kind,
        blob: Option<LayerBlob>,
        containerd: Option<ContainerdRef>,
    ) -> Result<Vec<u8>> {
        let meta = Meta {
            id: self.id.clone(),
            parent: self.parent.clone(),
            kind,
            blob,
            layers: BTreeMap::new(),
            content_key: self.content_key.take(),
            written: Some(Written::now()),
            containerd,
        };
        serde_json::to_vec_pretty(&meta).map_err(|source| Error::SnapshotMeta {
            id: meta.id.clone(),
            source,
        })
    }

    pub fn diff(&self) -> PathBuf {
        match &self.active {
            Some(a) => a.dirs.diff.clone(),
            None => self.dir.join("diff"),
        }
    }
    pub fn work(&self) -> PathBuf {
        match &self.active {
            Some(a) => a.dirs.work.clone(),
            None => self.dir.join("work"),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(a) = &self.active {
            if let Err(e) = a.snapshots.remove(&a.key) {
                tracing::warn!(key = a.key, error = %kiln_proto::status::Chain(&e), "remove staging snapshot");
            }
            if let Err(e) = std::fs::remove_dir_all(&self.dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %self.dir.display(), error = %kiln_proto::status::Chain(&e), "remove staging snapshot");
            }
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %kiln_proto::status::Chain(&e), "remove staging snapshot");
        }
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    snapshots: PathBuf,
    staging: PathBuf,
    mnt: PathBuf,
    /// Something was committed since the last sync (see the module doc).
    dirty: Arc<std::sync::atomic::AtomicBool>,
    syncs: Arc<Syncs>,
    /// Parent and diff dir of each snapshot read so far (ids are never reused, so
    /// neither ever changes).
    links: Arc<std::sync::Mutex<std::collections::HashMap<String, Link>>>,
    /// containerd's snapshotter, which holds the snapshot dirs (the containerd backend)
    containerd: Option<Arc<containerd::Snapshots>>,
    /// A dir on the filesystem of containerd's snapshot dirs, once known (synced too).
    containerd_fs: Arc<OnceLock<PathBuf>>,
}

/// How many ancestors `id` has, following `parent_of`; stops after `limit` steps, so a
/// cycle in bad metadata cannot hang. Removing deepest first takes children before
/// their parents.
pub(crate) fn chain_depth<'a>(
    id: &'a str,
    parent_of: impl Fn(&'a str) -> Option<&'a str>,
    limit: usize,
) -> usize {
    let (mut depth, mut next) = (0, parent_of(id));
    while let Some(p) = next.filter(|_| depth <= limit) {
        depth += 1;
        next = parent_of(p);
    }
    depth
}

/// Checks that a ref is a snapshot id we could have produced (no path tricks).
/// Mount flags of the views kiln reads and writes itself (never a step's).
const HOST_VIEW: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

pub fn check_id(id: &str) -> Result<()> {
    if uuid::Uuid::parse_str(id).is_ok() && !id.contains('/') {
        Ok(())
    } else {
        Err(Error::InvalidRef { id: id.to_string() })
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    let mut f = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename", path))
}

impl Store {
    /// Opens (creating) the store under `root` and discards unfinished snapshots, and
    /// the mounts a killed worker left under `root`.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_with(root, None)
    }

    /// Like [`Store::open`]; with `containerd`, snapshots are kept in its snapshotter
    /// (see the module doc), and what an earlier run left there is removed.
    pub fn open_with(root: &Path, containerd: Option<containerd::Snapshots>) -> Result<Store> {
        // absolute, so overlay options stay valid from any working directory
        let root = &std::path::absolute(root).map_err(Error::io("resolve", root))?;
        let s = Store {
            snapshots: root.join("snapshots"),
            staging: root.join("staging"),
            mnt: root.join("mnt"),
            dirty: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            syncs: Arc::default(),
            links: Arc::default(),
            containerd: containerd.map(Arc::new),
            containerd_fs: Arc::new(OnceLock::new()),
        };
        overlay::unmount_all_under(root);
        if let Ok(rd) = std::fs::read_dir(&s.mnt) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        // Unfinished snapshots of an earlier run go. The staging dir is moved
        // aside first: a step the killed worker started may still be writing
        // into it until its container is reaped, and must not make this start
        // fail. What cannot be removed now goes on a later start.
        if s.staging.exists() {
            let aside = root.join(format!("staging.old-{}", uuid::Uuid::new_v4().simple()));
            std::fs::rename(&s.staging, &aside).map_err(Error::io("clear staging", &s.staging))?;
        }
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("staging.old-")
                    && let Err(err) = std::fs::remove_dir_all(e.path())
                {
                    tracing::warn!(dir = %e.path().display(), error = %kiln_proto::status::Chain(&err), "left for a later start");
                }
            }
        }
        for d in [&s.snapshots, &s.staging, &s.mnt] {
            std::fs::create_dir_all(d).map_err(Error::io("create", d))?;
        }
        let synced_file = root.join("synced");
        let synced: Option<Written> = std::fs::read(&synced_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let rebooted = synced.as_ref().is_none_or(|w| w.boot != boot_id());
        if rebooted {
            s.drop_lost(synced.as_ref())?;
        }
        if let Some(ctr) = &s.containerd {
            s.reconcile(ctr)?;
        }
        if rebooted {
            sync_now(
                root,
                s.containerd_fs.get().map(PathBuf::as_path),
                &synced_file,
            )?;
        }
        spawn_syncer(
            root.to_path_buf(),
            s.containerd_fs.clone(),
            synced_file,
            Arc::downgrade(&s.dirty),
            s.syncs.clone(),
        );
        Ok(s)
    }

    /// The containerd backend: removes what an earlier run left in containerd, and drops
    /// the kiln snapshots containerd does not hold (made on the runc backend, or lost
    /// with containerd's state).
    fn reconcile(&self, ctr: &containerd::Snapshots) -> Result<()> {
        let rd = std::fs::read_dir(&self.snapshots).map_err(Error::io("read", &self.snapshots))?;
        let kiln: std::collections::BTreeSet<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let held: std::collections::BTreeSet<String> = ctr
            .reconcile(&|id| kiln.contains(id))?
            .into_iter()
            .collect();
        for id in kiln.difference(&held) {
            tracing::warn!(id, "dropping a snapshot containerd does not hold");
            let d = self.snapshots.join(id);
            std::fs::remove_dir_all(&d).map_err(Error::io("remove snapshot", &d))?;
        }
        if let Some(m) = held.iter().find_map(|id| self.meta(id).ok()) {
            self.learn_containerd_fs(m.containerd.as_ref().map(|c| c.dir.as_path()));
        }
        Ok(())
    }

    /// Remembers the filesystem of containerd's snapshot dirs from one snapshot's dir
    /// (`.../snapshots/<n>/fs`) for the background sync.
    fn learn_containerd_fs(&self, dir: Option<&Path>) {
        if self.containerd_fs.get().is_none()
            && let Some(d) = dir.and_then(Path::parent).and_then(Path::parent)
        {
            let _ = self.containerd_fs.set(d.to_path_buf());
        }
    }

    /// containerd's snapshotter, when the store keeps its snapshots there.
    pub fn containerd(&self) -> Option<&containerd::Snapshots> {
        self.containerd.as_deref()
    }

    /// Starts a new snapshot, a diff over `parent`.
    pub fn prepare(&self, parent: Option<&str>) -> Result<Staging> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.staging.join(&id);
        if let Some(ctr) = &self.containerd {
            let key = ctr.staging_key(&id);
            let parent_name = parent.map(containerd::Snapshots::name);
            let dirs = ctr.prepare(&key, parent_name.as_deref())?;
            self.learn_containerd_fs(Some(&dirs.diff));
            return Ok(Staging {
                id,
                dir,
                parent: parent.map(str::to_string),
                committed: false,
                content_key: None,
                active: Some(Active {
                    snapshots: ctr.clone(),
                    key,
                    dirs,
                }),
            });
        }
        let st = Staging {
            id,
            dir,
            parent: parent.map(str::to_string),
            committed: false,
            content_key: None,
            active: None,
        };
        for d in [st.diff(), st.work()] {
            std::fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        Ok(st)
    }

    /// Makes a staging snapshot immutable and visible. Its mounts must be gone.
    pub fn commit(
        &self,
        mut staging: Staging,
        kind: Kind,
        blob: Option<LayerBlob>,
    ) -> Result<String> {
        if staging.active.is_some() {
            return self.commit_containerd(staging, kind, blob);
        }
        let work = staging.work();
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(Error::io("remove workdir", &work))?;
        }
        let bytes = staging.meta_json(kind, blob, None)?;
        // no fsync: the background sync and the check on open after a reboot make
        // it safe (see the module doc)
        let path = staging.dir.join("meta.json");
        std::fs::write(&path, &bytes).map_err(Error::io("write", &path))?;
        let dest = self.snapshots.join(&staging.id);
        std::fs::rename(&staging.dir, &dest).map_err(Error::io("commit snapshot", &dest))?;
        staging.committed = true;
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(staging.id.clone())
    }

    /// [`Store::commit`] on the containerd backend: containerd's commit, then kiln's
    /// meta.json and `diff` link, renamed into `snapshots/`.
    fn commit_containerd(
        &self,
        mut staging: Staging,
        kind: Kind,
        blob: Option<LayerBlob>,
    ) -> Result<String> {
        let Some(active) = staging.active.as_ref() else {
            return Err(Error::ContainerdSnapshot {
                key: staging.id.clone(),
                reason: "not a containerd staging snapshot".into(),
            });
        };
        let name = containerd::Snapshots::name(&staging.id);
        let (snapshots, dir) = (active.snapshots.clone(), active.dirs.diff.clone());
        snapshots.commit(&name, &active.key)?;
        // the active snapshot is gone now: nothing left for the drop to remove
        staging.committed = true;
        let bytes = staging.meta_json(
            kind,
            blob,
            Some(ContainerdRef {
                name: name.clone(),
                dir: dir.clone(),
            }),
        );
        let written = (|| -> Result<()> {
            let bytes = bytes?;
            std::fs::create_dir_all(&staging.dir).map_err(Error::io("create", &staging.dir))?;
            let path = staging.dir.join("meta.json");
            std::fs::write(&path, &bytes).map_err(Error::io("write", &path))?;
            let link = staging.dir.join("diff");
            std::os::unix::fs::symlink(&dir, &link).map_err(Error::io("link", &link))?;
            let dest = self.snapshots.join(&staging.id);
            std::fs::rename(&staging.dir, &dest).map_err(Error::io("commit snapshot", &dest))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&staging.dir);
            if let Err(e) = snapshots.remove(&name) {
                tracing::warn!(name, error = %kiln_proto::status::Chain(&e), "remove a snapshot kiln failed to commit");
            }
            return Err(e);
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(staging.id.clone())
    }

    /// Removes the committed snapshot `id`, whose children must be gone. kiln's dir is
    /// first moved into `staging/` (cleared at start), so a crash never leaves half of
    /// it visible. Returns `false`, keeping it, when containerd refuses because a
    /// snapshot still being written has it as its parent.
    pub fn remove(&self, id: &str) -> Result<bool> {
        check_id(id)?;
        let dir = self.dir(id);
        let aside = self.staging.join(format!("pruned-{id}"));
        std::fs::rename(&dir, &aside).map_err(Error::io("prune snapshot", &dir))?;
        if let Some(ctr) = &self.containerd
            && let Err(e) = ctr.remove(&containerd::Snapshots::name(id))
        {
            std::fs::rename(&aside, &dir).map_err(Error::io("restore snapshot", &dir))?;
            return match e {
                Error::Containerd { source, .. }
                    if source.code() == tonic::Code::FailedPrecondition =>
                {
                    tracing::info!(id, error = %kiln_proto::status::Chain(&source), "snapshot in use: kept");
                    Ok(false)
                }
                e => Err(e),
            };
        }
        std::fs::remove_dir_all(&aside).map_err(Error::io("remove", &aside))?;
        Ok(true)
    }

    /// After a reboot: removes the snapshots that may have lost content (see the
    /// module doc) and their descendants.
    fn drop_lost(&self, synced: Option<&Written>) -> Result<()> {
        let mut parents: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut lost: Vec<String> = Vec::new();
        let rd = std::fs::read_dir(&self.snapshots).map_err(Error::io("read", &self.snapshots))?;
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            match self.meta(&id) {
                Ok(m) if m.written.as_ref().is_none_or(|w| durable(w, synced)) => {
                    parents.insert(id, m.parent);
                }
                _ => lost.push(id),
            }
        }
        // descendants of a lost snapshot are lost too
        let mut gone: std::collections::BTreeSet<String> = lost.iter().cloned().collect();
        loop {
            let more: Vec<String> = parents
                .iter()
                .filter(|(id, p)| {
                    !gone.contains(*id) && p.as_ref().is_some_and(|p| gone.contains(p))
                })
                .map(|(id, _)| id.clone())
                .collect();
            if more.is_empty() {
                break;
            }
            gone.extend(more);
        }
        for id in &gone {
            tracing::warn!(
                id,
                "removing a snapshot written before a crash and never synced"
            );
            let d = self.snapshots.join(id);
            std::fs::remove_dir_all(&d).map_err(Error::io("remove lost snapshot", &d))?;
        }
        Ok(())
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.snapshots.join(id)
    }

    /// The dir holding snapshot `id`'s own files (containerd's dir on that backend:
    /// `diff` is a link to it).
    pub fn diff_dir(&self, id: &str) -> PathBuf {
        let diff = self.snapshots.join(id).join("diff");
        match std::fs::read_link(&diff) {
            Ok(target) => target,
            Err(_) => diff,
        }
    }

    /// [`Store::diff_dir`] of a snapshot whose meta is at hand.
    fn diff_dir_of(&self, m: &Meta) -> PathBuf {
        match &m.containerd {
            Some(c) => c.dir.clone(),
            None => self.snapshots.join(&m.id).join("diff"),
        }
    }

    pub fn meta(&self, id: &str) -> Result<Meta> {
        check_id(id)?;
        let p = self.dir(id).join("meta.json");
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound { id: id.to_string() });
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "read",
                    path: p,
                    source: e,
                });
            }
        };
        let mut meta: Meta =
            serde_json::from_slice(&bytes).map_err(|source| Error::SnapshotMeta {
                id: id.to_string(),
                source,
            })?;
        // the layer memo; an unreadable one is as good as none
        if let Ok(b) = std::fs::read(self.dir(id).join(LAYERS_MEMO))
            && let Ok(memo) = serde_json::from_slice::<BTreeMap<String, Option<LayerBlob>>>(&b)
        {
            meta.layers.extend(memo);
        }
        Ok(meta)
    }

    /// Records a committed snapshot's layer memo (`meta.layers`) next to its meta.json,
    /// which never changes after the commit. Not synced: the memo must only name blobs
    /// already on disk ([`Store::wait_synced`]); losing it in a crash costs a recompute.
    pub fn update_meta(&self, meta: &Meta) -> Result<()> {
        check_id(&meta.id)?;
        let bytes = serde_json::to_vec(&meta.layers).map_err(|source| Error::SnapshotMeta {
            id: meta.id.clone(),
            source,
        })?;
        let path = self.dir(&meta.id).join(LAYERS_MEMO);
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, &bytes).map_err(Error::io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io("rename", &path))
    }

    /// Asks for a background sync of the store's filesystem and waits (at most
    /// `timeout`) until one that started after this call has completed: what was
    /// written before it is then on disk. False on timeout.
    pub fn wait_synced(&self, timeout: std::time::Duration) -> bool {
        use std::sync::atomic::Ordering;
        let after = self.syncs.started.load(Ordering::Acquire);
        self.dirty.store(true, Ordering::Release);
        let started = std::time::Instant::now();
        while self.syncs.done.load(Ordering::Acquire) <= after {
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    /// The parent and diff dir of `id`, from memory after the first read.
    fn link(&self, id: &str) -> Result<Link> {
        let known = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(l) = known {
            return Ok(l);
        }
        let m = self.meta(id)?;
        let l = Link {
            dir: self.diff_dir_of(&m),
            parent: m.parent,
        };
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), l.clone());
        Ok(l)
    }

    /// Whether `top` and its whole parent chain are committed here: a stat of each
    /// meta.json, with parent links read once and kept in memory.
    pub fn chain_exists(&self, top: &str) -> bool {
        self.lowers(Some(top)).is_ok()
    }

    /// The chain ending at `top`, top first. `None` (scratch) is the empty chain.
    pub fn chain(&self, top: Option<&str>) -> Result<Vec<Meta>> {
        let mut out = Vec::new();
        let mut next = top.map(str::to_string);
        while let Some(id) = next {
            let m = self.meta(&id)?;
            next = m.parent.clone();
            out.push(m);
        }
        Ok(out)
    }

    /// The diff dirs of the chain ending at `top`, top first; an error when a snapshot
    /// of it is gone (a stat of each meta.json, parent links from memory).
    fn lowers(&self, top: Option<&str>) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut next = top.map(str::to_string);
        while let Some(id) = next.take() {
            check_id(&id)?;
            if !self.dir(&id).join("meta.json").exists() {
                return Err(Error::SnapshotNotFound { id });
            }
            let l = self.link(&id)?;
            out.push(l.dir);
            next = l.parent;
        }
        Ok(out)
    }

    /// Mounts the chain ending at `top` read-only, for kiln itself to read:
    /// `nosuid,nodev`, so no set-id file or device node of a build is live on the host.
    pub fn mount_ro(&self, top: Option<&str>) -> Result<Mounted> {
        overlay::mount(&self.mnt, &self.lowers(top)?, None, HOST_VIEW)
    }

    /// Mounts the chain ending at `top` read-only for a step's container, where set-id
    /// files work as in the image (runc mounts it into the step's own namespace).
    pub fn mount_ro_for_step(&self, top: Option<&str>) -> Result<Mounted> {
        overlay::mount(&self.mnt, &self.lowers(top)?, None, MsFlags::empty())
    }

    /// Mounts the chain `staging` is prepared over with `staging` as the writable
    /// upper, for kiln itself to write (`nosuid,nodev`).
    pub fn mount_rw(&self, staging: &Staging) -> Result<Mounted> {
        self.mount_upper(staging, false, HOST_VIEW)
    }

    /// A step's writable mount: like [`Store::mount_rw`] but with set-id files and
    /// devices working, and the unmount does not sync the upper's whole filesystem
    /// (overlayfs `volatile`): the snapshot committed from it is made durable like
    /// every other one (see the module doc).
    pub fn mount_rw_for_step(&self, staging: &Staging) -> Result<Mounted> {
        self.mount_upper(staging, true, MsFlags::empty())
    }

    fn mount_upper(&self, staging: &Staging, volatile: bool, extra: MsFlags) -> Result<Mounted> {
        let (diff, work) = (staging.diff(), staging.work());
        let t0 = std::time::Instant::now();
        let lowers = self.lowers(staging.parent.as_deref())?;
        let t_chain = t0.elapsed();
        let m = overlay::mount(
            &self.mnt,
            &lowers,
            Some(Upper {
                diff: &diff,
                work: &work,
                volatile,
            }),
            extra,
        );
        tracing::debug!(
            target: "kiln_timing",
            "overlay of {} lowers: chain {} ms, mount {} ms",
            lowers.len(),
            t_chain.as_millis(),
            (t0.elapsed() - t_chain).as_millis()
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depth_counts_ancestors_and_ends_on_a_cycle() {
        let parents: std::collections::HashMap<&str, &str> =
            [("c", "b"), ("b", "a"), ("x", "y"), ("y", "x")].into();
        let parent_of = |id: &str| parents.get(id).copied();
        assert_eq!(chain_depth("a", parent_of, 4), 0);
        assert_eq!(chain_depth("c", parent_of, 4), 2);
        assert!(chain_depth("x", parent_of, 4) <= 5);
    }

    #[test]
    fn layer_memo_lives_beside_meta_and_waits_for_a_sync() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Store::open(tmp.path()).expect("open");
        let st = s.prepare(None).expect("prepare");
        std::fs::write(st.diff().join("f"), "x").expect("write");
        let id = s.commit(st, Kind::Built, None).expect("commit");
        let meta_json = std::fs::read(s.dir(&id).join("meta.json")).expect("meta");
        let mut m = s.meta(&id).expect("meta");
        m.layers.insert("gzip".into(), None);
        s.update_meta(&m).expect("memo");
        // meta.json is never rewritten; the memo reads back
        assert_eq!(
            std::fs::read(s.dir(&id).join("meta.json")).expect("meta"),
            meta_json
        );
        assert_eq!(s.meta(&id).expect("meta").layers.get("gzip"), Some(&None));
        // an unreadable memo is no memo, not a broken snapshot
        std::fs::write(s.dir(&id).join(LAYERS_MEMO), "{trunc").expect("write");
        assert!(s.meta(&id).expect("meta").layers.is_empty());
        // a sync asked for now completes
        assert!(s.wait_synced(SYNC_INTERVAL * 3));
    }

    #[test]
    fn opening_clears_unfinished_snapshots_of_an_earlier_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let left = root.join("staging/abc/diff/deep");
        std::fs::create_dir_all(&left).expect("mkdir");
        std::fs::write(left.join("f"), "half written").expect("write");
        std::fs::create_dir_all(root.join("staging.old-1/x")).expect("mkdir");
        let _s = Store::open(root).expect("open");
        let names: Vec<String> = std::fs::read_dir(root)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("staging.old-")),
            "{names:?}"
        );
        assert_eq!(
            std::fs::read_dir(root.join("staging"))
                .expect("staging")
                .count(),
            0
        );
    }

    #[test]
    fn overlay_chain_shows_upper_over_lower_and_records_whiteouts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let s1 = store.prepare(None).expect("prepare");
        std::fs::write(s1.diff().join("a"), "1").expect("write");
        std::fs::write(s1.diff().join("b"), "1").expect("write");
        let id1 = store.commit(s1, Kind::Built, None).expect("commit");

        let s2 = store.prepare(Some(&id1)).expect("prepare");
        let m = store.mount_rw(&s2).expect("mount");
        assert_eq!(
            std::fs::read_to_string(m.path().join("a")).expect("read"),
            "1"
        );
        std::fs::write(m.path().join("a"), "2").expect("write");
        std::fs::remove_file(m.path().join("b")).expect("rm");
        m.unmount().expect("unmount");
        let upper = s2.diff();
        use std::os::unix::fs::FileTypeExt;
        let wh = std::fs::symlink_metadata(upper.join("b")).expect("whiteout");
        assert!(wh.file_type().is_char_device());
        let id2 = store.commit(s2, Kind::Built, None).expect("commit");
        assert!(!upper.exists(), "staging dir moved away");

        let ro = store.mount_ro(Some(&id2)).expect("mount ro");
        assert_eq!(
            std::fs::read_to_string(ro.path().join("a")).expect("read"),
            "2"
        );
        assert!(!ro.path().join("b").exists());
        assert!(
            std::fs::write(ro.path().join("c"), "x").is_err(),
            "read-only"
        );
        let single = store.mount_ro(Some(&id1)).expect("bind ro");
        assert!(
            std::fs::write(single.path().join("c"), "x").is_err(),
            "read-only bind"
        );
        assert_eq!(store.chain(Some(&id2)).expect("chain").len(), 2);
    }

    #[test]
    fn after_a_reboot_snapshots_written_after_the_last_sync_are_removed_with_children() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let commit = |parent: Option<&str>| {
            let st = store.prepare(parent).expect("prepare");
            std::fs::write(st.diff().join("f"), "x").expect("write");
            store.commit(st, Kind::Built, None).expect("commit")
        };
        let old = commit(None);
        let unsynced = commit(None);
        let child = commit(Some(&unsynced));
        let legacy = commit(None);
        // as if written during an earlier boot whose last sync started at t=100
        let rewrite = |id: &str, written: Option<Written>| {
            let mut m = store.meta(id).expect("meta");
            m.written = written;
            let bytes = serde_json::to_vec(&m).expect("json");
            write_atomic(&store.dir(id).join("meta.json"), &bytes).expect("rewrite");
        };
        let earlier = |at| {
            Some(Written {
                boot: "earlier-boot".into(),
                at,
            })
        };
        rewrite(&old, earlier(50));
        rewrite(&unsynced, earlier(150));
        rewrite(&legacy, None);
        std::fs::write(
            tmp.path().join("synced"),
            serde_json::to_vec(&earlier(100)).expect("json"),
        )
        .expect("write synced");
        drop(store);
        let store = Store::open(tmp.path()).expect("reopen");
        assert!(store.meta(&old).is_ok(), "synced before the crash");
        assert!(store.meta(&legacy).is_ok(), "committed with an fsync");
        assert!(matches!(
            store.meta(&unsynced),
            Err(Error::SnapshotNotFound { .. })
        ));
        assert!(
            !store.dir(&child).exists(),
            "a child of a lost snapshot goes too"
        );
        // the sync on open is recorded for this boot: a second open keeps everything
        let synced: Written =
            serde_json::from_slice(&std::fs::read(tmp.path().join("synced")).expect("synced"))
                .expect("json");
        assert_eq!(synced.boot, boot_id());
        drop(store);
        let store = Store::open(tmp.path()).expect("reopen");
        assert!(store.meta(&old).is_ok());
    }

    #[test]
    fn uncommitted_snapshots_vanish() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let s = store.prepare(None).expect("prepare");
        let dir = s.diff();
        drop(s);
        assert!(!dir.exists());
        assert!(matches!(
            store.meta("../etc"),
            Err(Error::InvalidRef { .. })
        ));
    }
}
