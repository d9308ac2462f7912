//! worker-executor: the kiln worker. It holds filesystem snapshots (overlayfs layers on
//! local disk, in kiln's own store or in containerd's snapshotter), runs single LLB ops on them (image and local sources, exec through runc or
//! as containerd tasks (see [`containerd`]), file ops) and exports snapshots as layer blobs
//! or whole-filesystem tars.
//!
//! It is not a solver: it never sees a whole build graph, caches nothing by op digest and
//! knows nothing of exporters or frontends. Callers hand it one op plus the refs
//! (snapshot ids) of the op's inputs and get back one ref per output. The only module that
//! names tonic or the generated `kiln.worker.v1` types is [`grpc`].

pub mod cachemount;
pub mod cgwarm;
pub mod containerd;
pub mod contenthash;
pub mod emulation;
pub mod error;
pub mod fscopy;
pub mod gc;
pub mod grpc;
pub mod import;
pub mod join;
pub mod layers;
pub mod native;
pub mod network;
pub mod ops;
pub mod rootless;
pub mod rootpath;
pub mod runc;
pub mod runtimedir;
pub mod seccomp;
pub mod snapshot;
pub mod untar;
pub mod users;
pub mod wildcard;

pub use error::{Error, Result};
pub use kiln_llb::pb;
pub use snapshot::LayerBlob;

use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory: snapshots, content store, local-source dirs (runc state and
    /// bundles are in its `runtime`, see [`runtimedir`]).
    pub root: PathBuf,
    /// Address of solver-scheduler's SessionBroker, used to reach client sessions
    /// (`unix:///path`, `tcp://host:port`).
    pub broker: String,
    /// Registry hosts, mirrors and plain-http settings for image pulls.
    pub registry: kiln_registry::RegistryConfig,
    /// The runc binary (default "runc" on PATH).
    pub runc: PathBuf,
    /// Entitlements this worker may grant when a build asks for them
    /// (`network.host`, `security.insecure`; kilnd.toml `insecure-entitlements`).
    pub insecure_entitlements: Vec<String>,
    /// Run exec steps as containerd tasks instead of with runc directly
    /// (kilnd.toml `[worker.containerd]`).
    pub containerd: Option<containerd::ContainerdConfig>,
    /// What exec steps get for a network (kilnd.toml `[worker] networkMode`).
    pub network: network::NetworkConfig,
    /// Rootless mode (`kilnd --rootless`): the process is the mapped root of a user
    /// namespace, so steps get no cgroups and no `/sys`, bind mounts keep the flags the
    /// kernel locks, the network is the daemon's own (or none), and what needs real
    /// root (`security.insecure`, bridge networking) is refused (see [`rootless`]).
    pub rootless: bool,
    /// How snapshots are mounted (kilnd.toml `[worker.oci] snapshotter`).
    pub snapshotter: snapshot::overlay::Snapshotter,
    /// What starts exec steps' containers without containerd (kilnd.toml
    /// `[worker.oci] runtime`).
    pub runtime: native::Runtime,
}

impl Config {
    /// A config with defaults for everything but the state directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Config {
            root: root.into(),
            broker: String::new(),
            registry: kiln_registry::RegistryConfig::default(),
            runc: PathBuf::from("runc"),
            insecure_entitlements: Vec::new(),
            containerd: None,
            network: network::NetworkConfig::default(),
            rootless: false,
            snapshotter: snapshot::overlay::Snapshotter::Auto,
            runtime: native::Runtime::Auto,
        }
    }
}

/// Something that happened while an op ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Output of a process: stream 1 = stdout, 2 = stderr.
    Log { stream: i64, data: Vec<u8> },
    /// Progress of a named sub-task (e.g. a layer download).
    Progress {
        id: String,
        current: i64,
        total: i64,
        completed: bool,
    },
}

/// One op to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub build_id: String,
    /// The client session that local sources are synced from.
    pub session_id: String,
    /// The client session's shared key (its context dir): the persistent
    /// copy of a local source is kept per shared key.
    pub session_shared_key: String,
    /// A short name for logs ("[2/3] RUN echo hi").
    pub name: String,
    pub op: pb::Op,
    /// One ref per `op.inputs` entry; `None` is scratch.
    pub inputs: Vec<Option<String>>,
    /// Entitlements the build request was granted by its client.
    pub entitlements: Vec<String>,
}

/// The worker core. Cheap to share behind an `Arc`.
pub struct Worker {
    config: Config,
    id: String,
    store: snapshot::Store,
    registry: kiln_registry::Client,
    /// Locks of image pulls, by what they guard: one pull per image reference, one
    /// download per blob, one unpack per layer chain; unrelated pulls never wait on
    /// each other (a slow registry holds up only its own images).
    pull_locks: KeyedLocks,
    /// One lock per snapshot and layer options: a layer blob is computed once.
    layer_locks: KeyedLocks,
    /// Records computed layer blobs in snapshot meta (see [`layers::MemoWriter`]).
    memo: Arc<layers::MemoWriter>,
    /// Uncompressed layers streamed from their snapshots (see [`layers::Streamed`]).
    streamed: Arc<layers::Streamed>,
    /// Clients of the other workers of the farm (imports).
    peers: import::Peers,
    /// Steps (`run`) in progress, as the farm is told.
    steps: ops::Activity,
    /// Persistent `type=cache` mount dirs.
    cache_mounts: cachemount::CacheMounts,
    /// The persistent dirs local sources sync into.
    synced_dirs: ops::source::local::SyncedDirs,
    /// Per-file digest tables of synced dirs and the snapshots made from them.
    sums: Arc<contenthash::SumTables>,
    /// Where exec steps run: runc or containerd.
    executor: ops::exec::Executor,
    /// runc state and step bundles (on a tmpfs when there is one).
    runtime: runtimedir::RuntimeDir,
    /// runs interactive processes (frontend images, LLBBridge containers)
    interactive: runc::Runc,
    /// what steps get for a network (the worker's mode, resolved at start)
    networking: network::Networking,
    /// ops and layer computations running now, for housekeeping that waits
    /// for a quiet moment
    activity: ops::Activity,
    /// LLBBridge containers, by id: mounts kept until released
    containers: std::sync::Mutex<HashMap<String, Arc<ops::exec::Container>>>,
    /// the host's platform and the emulated ones (binfmt_misc)
    emulation: emulation::Emulation,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("root", &self.config.root)
            .finish()
    }
}

impl Worker {
    /// Opens the worker's state under `config.root`, creating it when missing.
    pub fn new(config: Config) -> Result<Worker> {
        let root = &config.root;
        for d in [
            root.join("content/blobs/sha256"),
            root.join("local"),
            root.join("tmp"),
            root.join("image-layers"),
        ] {
            std::fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        let root = std::fs::canonicalize(root).map_err(Error::io("canonicalize", root))?;
        let config = Config { root, ..config };
        let id_file = config.root.join("worker-id");
        let id = match std::fs::read_to_string(&id_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                snapshot::write_atomic(&id_file, id.as_bytes())?;
                id
            }
        };
        let registry = kiln_registry::Client::new(config.registry.clone()).map_err(|source| {
            Error::Registry {
                reference: "client".into(),
                source,
            }
        })?;
        // containers a killed worker left are stopped before its unfinished
        // snapshots are cleared (runc: here; containerd: when the snapshotter connects)
        let runtime = runtimedir::RuntimeDir::open(&config.root)?;
        // its first write may wait a grace period: here, not in the first step
        cgwarm::global();
        let executor = ops::exec::Executor::from_config(&config, &id, &runtime);
        let interactive = executor.interactive(&config, &runtime);
        let containerd = match &config.containerd {
            Some(c) => Some(snapshot::containerd::Snapshots::connect(c, &id)?),
            None => None,
        };
        let backend = snapshot::overlay::choose(
            config.snapshotter,
            &config.root.join("tmp"),
            config.rootless,
        )?;
        if backend == snapshot::overlay::Backend::Fuse && config.containerd.is_some() {
            return Err(Error::Snapshotter(
                "fuse-overlayfs snapshots are for runc workers; the containerd worker uses containerd's snapshotter".into(),
            ));
        }
        let store = snapshot::Store::open_with(&config.root, containerd)?;
        let memo = Arc::new(layers::MemoWriter::start(store.clone()));
        let networking = network::Networking::start(&config.network, config.rootless)?;
        Ok(Worker {
            id,
            store,
            registry,
            pull_locks: KeyedLocks::default(),
            layer_locks: KeyedLocks::default(),
            memo,
            streamed: Default::default(),
            peers: Default::default(),
            steps: ops::Activity::default(),
            cache_mounts: cachemount::CacheMounts::new(config.root.join("cache-mounts")),
            synced_dirs: Default::default(),
            sums: Default::default(),
            executor,
            runtime,
            interactive,
            networking,
            activity: ops::Activity::default(),
            containers: std::sync::Mutex::new(HashMap::new()),
            emulation: emulation::Emulation::new(emulation::BINFMT_MISC, config.root.join("tmp")),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A stable id for this worker (kept in `<root>/worker-id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Steps running now.
    pub fn running_steps(&self) -> usize {
        self.steps.count()
    }

    /// Bytes free on the filesystem of the worker's root.
    pub fn free_disk(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.config.root)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    }

    /// Platforms this worker can run: the host's, then those emulated through
    /// binfmt_misc (see [`emulation`]).
    pub fn platforms(&self) -> Vec<kiln_oci::Platform> {
        self.emulation.platforms()
    }

    /// Whether this worker can run steps of `platform` (see [`emulation`]).
    pub fn can_run(&self, platform: &kiln_oci::Platform) -> Result<()> {
        self.emulation.check(platform)
    }

    /// Where runc's state and the bundles of running steps are.
    pub fn runtime(&self) -> &runtimedir::RuntimeDir {
        &self.runtime
    }

    /// What steps get for a network.
    pub fn networking(&self) -> &network::Networking {
        &self.networking
    }

    pub fn store(&self) -> &snapshot::Store {
        &self.store
    }

    /// Runs one op; `events` receives process output and progress while it runs.
    /// Returns one ref per output (`None` = scratch). Dropping the future cancels the op
    /// (a running container is killed).
    pub async fn run(
        &self,
        req: RunRequest,
        events: mpsc::Sender<Event>,
    ) -> Result<Vec<Option<String>>> {
        let _step = self.steps.start();
        ops::run_op(self, req, events).await
    }

    /// Runs an interactive process: `exec`'s meta in a container over its mounts
    /// (inputs are refs of this worker), stdio streamed; nothing it writes is
    /// kept. `started` fires once the container is being created. Returns the
    /// exit code; dropping the future kills the process.
    pub async fn exec(
        &self,
        exec: &pb::ExecOp,
        inputs: &[Option<String>],
        session_id: &str,
        entitlements: &[String],
        stdio: runc::Stdio,
        started: tokio::sync::oneshot::Sender<()>,
    ) -> Result<i32> {
        let cx = ops::exec::ExecContext {
            inputs,
            session_id,
            entitlements,
        };
        ops::exec::run_interactive(self, exec, &cx, stdio, started).await
    }

    /// Prepares an LLBBridge container: `exec`'s mounts (inputs are refs of this
    /// worker), kept until [`Self::release_container`]. Returns its id.
    pub async fn new_container(
        &self,
        exec: &pb::ExecOp,
        inputs: &[Option<String>],
        session_id: &str,
        entitlements: &[String],
    ) -> Result<String> {
        let cx = ops::exec::ExecContext {
            inputs,
            session_id,
            entitlements,
        };
        let c = ops::exec::new_container(self, exec, &cx).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.containers
            .lock()
            .map_err(|_| Error::InvalidOp("containers lock poisoned".into()))?
            .insert(id.clone(), Arc::new(c));
        Ok(id)
    }

    fn container(&self, id: &str) -> Result<Arc<ops::exec::Container>> {
        self.containers
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| Error::ContainerNotFound { id: id.to_string() })
    }

    /// Unmounts and discards a container (its running processes keep their
    /// mounts until they end).
    pub async fn release_container(&self, id: &str) -> Result<()> {
        let c = self
            .containers
            .lock()
            .ok()
            .and_then(|mut m| m.remove(id))
            .ok_or_else(|| Error::ContainerNotFound { id: id.to_string() })?;
        tokio::task::spawn_blocking(move || drop(c)).await?;
        Ok(())
    }

    /// Runs a process in a container, stdio streamed; returns its exit code.
    pub async fn exec_in_container(
        &self,
        id: &str,
        process: &ops::exec::ContainerProcess<'_>,
        stdio: runc::Stdio,
        started: tokio::sync::oneshot::Sender<()>,
    ) -> Result<i32> {
        let c = self.container(id)?;
        ops::exec::run_in_container(self, &c, process, stdio, started).await
    }

    /// The host path of a container's mount, for reading it as it is now.
    fn container_mount(
        &self,
        id: &str,
        mount: u32,
    ) -> Result<(Arc<ops::exec::Container>, PathBuf)> {
        let c = self.container(id)?;
        let path = c
            .mount_path(mount as usize)
            .ok_or_else(|| {
                Error::InvalidOp(format!("container {id} has no mount {mount} to read"))
            })?
            .to_path_buf();
        Ok((c, path))
    }

    /// Reads `length` bytes (all, when `None`) from `offset` of a file inside a ref's
    /// filesystem (the path cannot escape the root). At most [`READ_FILE_LIMIT`] bytes
    /// come back in one read: a longer read is refused, not buffered.
    pub async fn read_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let path = path.to_string();
        self.in_ref(r, move |root| {
            use std::os::unix::fs::OpenOptionsExt;
            let p = rootpath::resolve(root, &path, true).map_err(Error::io("resolve", &path))?;
            // a FIFO or a device would block or never end: regular files only
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p)
                .map_err(Error::io("read", &path))?;
            let md = f.metadata().map_err(Error::io("stat", &path))?;
            if !md.is_file() {
                return Err(Error::file("read", &path, "not a regular file"));
            }
            let size = md.len();
            let want = length.unwrap_or(size.saturating_sub(offset));
            if want.min(size.saturating_sub(offset)) > READ_FILE_LIMIT {
                return Err(Error::file(
                    "read",
                    &path,
                    format!(
                        "{want} bytes asked for at once; read at most {READ_FILE_LIMIT} per call"
                    ),
                ));
            }
            f.seek(std::io::SeekFrom::Start(offset))
                .map_err(Error::io("seek", &path))?;
            let mut data = Vec::new();
            f.take(want)
                .read_to_end(&mut data)
                .map_err(Error::io("read", &path))?;
            Ok(data)
        })
        .await
    }

    /// The entries of a directory inside a ref (sorted by name; names matching
    /// `include`, a shell pattern, when given), with fsutil's metadata.
    pub async fn read_dir(
        &self,
        r: FsTarget<'_>,
        path: &str,
        include: &str,
    ) -> Result<Vec<kiln_proto::fsutil::types::Stat>> {
        let pattern = if include.is_empty() {
            None
        } else {
            Some(
                globset::Glob::new(include)
                    .map_err(|source| Error::ReadDirPattern {
                        pattern: include.to_string(),
                        source,
                    })?
                    .compile_matcher(),
            )
        };
        let path = path.to_string();
        self.in_ref(r, move |root| {
            let dir = rootpath::resolve(root, &path, true).map_err(Error::io("resolve", &path))?;
            let mut out = Vec::new();
            for e in std::fs::read_dir(&dir).map_err(Error::io("read dir", &path))? {
                let e = e.map_err(Error::io("read dir", &path))?;
                let name = e.file_name().to_string_lossy().to_string();
                if pattern.as_ref().is_some_and(|m| !m.is_match(&name)) {
                    continue;
                }
                out.push(stat_entry(&e.path(), &name)?);
            }
            out.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(out)
        })
        .await
    }

    /// fsutil's metadata of one path inside a ref (a final symlink is not followed).
    pub async fn stat_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
    ) -> Result<kiln_proto::fsutil::types::Stat> {
        let path = path.to_string();
        self.in_ref(r, move |root| {
            let p = rootpath::resolve(root, &path, false).map_err(Error::io("resolve", &path))?;
            stat_entry(&p, path.trim_start_matches('/'))
        })
        .await
    }

    /// Runs `f` on a blocking thread with a view of `target`: a read-only
    /// mount of a ref (scratch when `None`), or a container's mount as it is.
    async fn in_ref<T: Send + 'static>(
        &self,
        target: FsTarget<'_>,
        f: impl FnOnce(&std::path::Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match target {
            FsTarget::Ref(r) => {
                let top = r.map(str::to_string);
                let w = self.blocking_store();
                tokio::task::spawn_blocking(move || {
                    let m = w.mount_ro(top.as_deref())?;
                    let out = f(m.path());
                    m.unmount()?;
                    out
                })
                .await?
            }
            FsTarget::Container { id, mount } => {
                let (c, root) = self.container_mount(id, mount)?;
                tokio::task::spawn_blocking(move || {
                    let out = f(&root);
                    drop(c);
                    out
                })
                .await?
            }
        }
    }

    /// Digest of what `selectors` reach in a ref's filesystem (see
    /// [`contenthash::paths`]).
    pub async fn checksum(
        &self,
        r: Option<&str>,
        selectors: Vec<contenthash::Selector>,
    ) -> Result<String> {
        let top = r.map(str::to_string);
        let store = self.blocking_store();
        let lent = r.and_then(|id| self.sums.snapshot(id));
        tokio::task::spawn_blocking(move || {
            // one snapshot with no parent is its own view: no mount needed
            let single = match top.as_deref() {
                Some(id) if store.meta(id)?.parent.is_none() => {
                    let d = store.diff_dir(id);
                    Some(std::fs::canonicalize(&d).map_err(Error::io("resolve", &d))?)
                }
                _ => None,
            };
            let (digest, stats) = match single {
                Some(dir) => contenthash::paths_in(&dir, &selectors, lent.as_deref())?,
                None => {
                    let m = store.mount_ro(top.as_deref())?;
                    let digest = contenthash::paths_in(m.path(), &selectors, lent.as_deref());
                    m.unmount()?;
                    digest?
                }
            };
            tracing::debug!(target: "kiln_timing", ?stats, "checksum of {top:?}");
            Ok(digest)
        })
        .await?
    }

    /// The layer blobs of a ref's chain, root first (computed and memoized on first use).
    pub async fn layers(
        &self,
        r: Option<&str>,
        options: &kiln_oci::LayerOptions,
    ) -> Result<Vec<LayerBlob>> {
        layers::layers(self, r, options).await
    }

    /// One entry per snapshot of the chain (root first), `None` for an empty diff.
    pub async fn layer_chain(
        &self,
        r: Option<&str>,
        options: &kiln_oci::LayerOptions,
    ) -> Result<Vec<Option<LayerBlob>>> {
        layers::layer_chain(self, r, options).await
    }

    /// The file of a blob in the content store.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = kiln_digest::hex_part(digest).ok_or_else(|| Error::InvalidDigest {
            digest: digest.to_string(),
        })?;
        Ok(self.config.root.join("content/blobs/sha256").join(hex))
    }

    /// Streams a blob in 64 KiB chunks.
    pub async fn read_blob(&self, digest: &str) -> Result<mpsc::Receiver<Result<Bytes>>> {
        use std::io::Read;
        let path = self.blob_path(digest)?;
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some((snapshot, clamp)) = self.streamed.get(digest) {
                    let (tx, rx) = mpsc::channel(4);
                    let (store, digest) = (self.store.clone(), digest.to_string());
                    tokio::task::spawn_blocking(move || {
                        layers::stream_layer(&store, &snapshot, clamp, &digest, tx, BLOB_CHUNK)
                    });
                    return Ok(rx);
                }
                return Err(Error::BlobNotFound {
                    digest: digest.to_string(),
                });
            }
            Err(e) => {
                return Err(Error::Io {
                    op: "open",
                    path,
                    source: e,
                });
            }
        };
        // read on a blocking thread in big chunks: a blob may be gigabytes
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut buf = vec![0u8; BLOB_CHUNK];
                let mut n = 0;
                let item = loop {
                    match f.read(&mut buf[n..]) {
                        Ok(0) => break Ok(()),
                        Ok(k) => {
                            n += k;
                            if n == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            break Err(Error::Io {
                                op: "read",
                                path: path.clone(),
                                source: e,
                            });
                        }
                    }
                };
                let item = match item {
                    Ok(()) if n == 0 => return,
                    Ok(()) => {
                        buf.truncate(n);
                        Ok(Bytes::from(buf))
                    }
                    Err(e) => Err(e),
                };
                let last = item.as_ref().map_or(true, |b| b.len() < BLOB_CHUNK);
                if tx.blocking_send(item).is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Streams a ref's whole filesystem as an uncompressed tar.
    pub async fn export_fs(&self, r: Option<&str>) -> Result<mpsc::Receiver<Result<Bytes>>> {
        let top = r.map(str::to_string);
        let store = self.blocking_store();
        let m = tokio::task::spawn_blocking(move || store.mount_ro(top.as_deref())).await??;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut w = layers::ChannelWriter::new(tx.clone());
            let res = kiln_oci::layer::tar_dir(m.path(), &mut w)
                .map_err(|source| Error::Layer {
                    digest: "export".into(),
                    source,
                })
                .and_then(|()| w.flush_chunk());
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(e));
            }
            drop(m);
        });
        Ok(rx)
    }

    /// A handle on the snapshot store usable from blocking threads.
    fn blocking_store(&self) -> snapshot::Store {
        self.store.clone()
    }

    /// The pull lock named `key` (see `pull_locks`).
    fn pull_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        self.pull_locks.get(key)
    }
}

/// The size of the chunks a blob is streamed in.
const BLOB_CHUNK: usize = 1 << 20;

/// Async locks by name, made on first use.
#[derive(Debug, Default)]
struct KeyedLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    fn get(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 1024 {
            // locks nobody holds or waits for
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        map.entry(key).or_default().clone()
    }
}

/// What a file read looks into.
#[derive(Debug, Clone, Copy)]
pub enum FsTarget<'a> {
    /// a ref's filesystem (`None`: scratch)
    Ref(Option<&'a str>),
    /// mount `mount` of an LLBBridge container, as its processes left it
    Container { id: &'a str, mount: u32 },
}

/// The most one ReadFile call returns (it travels as one gRPC message).
pub const READ_FILE_LIMIT: u64 = 16 << 20;

/// fsutil's metadata of `path` (not following a final symlink), named `name`.
fn stat_entry(path: &std::path::Path, name: &str) -> Result<kiln_proto::fsutil::types::Stat> {
    let md = std::fs::symlink_metadata(path).map_err(Error::io("stat", path))?;
    let link = if md.file_type().is_symlink() {
        Some(
            std::fs::read_link(path)
                .map_err(Error::io("read link", path))?
                .to_string_lossy()
                .to_string(),
        )
    } else {
        None
    };
    Ok(kiln_session::filesync::stat_of_path(path, name, &md, link))
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// An exec op running `script` with /bin/sh on input 0 as its rootfs.
    pub fn exec_op(script: &str, user: &str, valid: Vec<i32>) -> crate::pb::Op {
        let root = crate::pb::Input {
            digest: "sha256:root".into(),
            index: 0,
        };
        kiln_llb::exec_op(
            root,
            crate::pb::Meta {
                args: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: user.into(),
                valid_exit_codes: valid,
                ..Default::default()
            },
        )
    }

    use crate::snapshot::Kind;

    pub fn worker() -> (tempfile::TempDir, Worker) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let w = Worker::new(Config::new(tmp.path().join("root"))).expect("worker");
        (tmp, w)
    }

    /// Commits a snapshot whose diff is filled by `fill`.
    pub fn snapshot(
        w: &Worker,
        parent: Option<&str>,
        fill: impl FnOnce(&std::path::Path),
    ) -> String {
        let st = w.store().prepare(parent).expect("prepare");
        fill(&st.diff());
        w.store().commit(st, Kind::Built, None).expect("commit")
    }

    /// A busybox rootfs (static busybox from the host) with /etc/passwd and /etc/group.
    pub fn busybox(w: &Worker) -> String {
        snapshot(w, None, busybox_into)
    }

    /// Fills `d` with a busybox rootfs (see [`busybox`]).
    pub fn busybox_into(d: &std::path::Path) {
        std::fs::create_dir_all(d.join("bin")).expect("mkdir");
        std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        std::fs::copy("/bin/busybox", d.join("bin/busybox")).expect("copy busybox");
        let list = std::process::Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("busybox --list");
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            if name != "busybox" {
                std::os::unix::fs::symlink("busybox", d.join("bin").join(name)).expect("symlink");
            }
        }
        std::fs::write(
            d.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(d.join("etc/group"), "root:x:0:\nalice:x:1001:\n").expect("group");
    }
}
