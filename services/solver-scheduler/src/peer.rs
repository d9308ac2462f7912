//! The solver's peers, as the solver sees them. The real implementations
//! are gRPC clients in `grpc::client`.

use crate::Error;
pub use kiln_proto::fsutil::types::Stat;
use kiln_proto::pb;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

/// Something a running op reports.
#[derive(Debug, Clone)]
pub enum RunEvent {
    Log {
        stream: i64,
        data: Vec<u8>,
    },
    /// byte progress of a named sub-task (a layer download, ...)
    Progress {
        id: String,
        current: i64,
        total: i64,
        completed: bool,
    },
}

/// One op to run on a worker.
#[derive(Debug, Clone)]
pub struct RunOp {
    pub build_id: String,
    pub session_id: String,
    /// the client session's shared key (its context dir)
    pub session_shared_key: String,
    pub digest: String,
    pub op_bytes: Vec<u8>,
    pub inputs: Vec<String>,
    pub name: String,
    pub entitlements: Vec<String>,
}

/// What a worker produced for an op.
#[derive(Debug, Clone, Default)]
pub struct RunOutputs {
    pub refs: Vec<String>,
    pub content_keys: Vec<String>,
    /// the id of the worker that ran it (empty: the only one)
    pub worker: String,
}

/// One worker as `ListWorkers` shows it.
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub id: String,
    pub address: String,
    pub platforms: Vec<kiln_oci::Platform>,
    pub labels: BTreeMap<String, String>,
    /// "ready" or "draining"
    pub state: String,
    pub running: u32,
    /// steps at once (0: unbounded)
    pub capacity: u32,
    pub version: String,
    /// free disk under its root, as it last reported (0: not known)
    pub free_disk: u64,
}

/// What an import moved.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// the ref on the importing worker
    pub r#ref: String,
    pub bytes_moved: u64,
}

pub trait Worker: Send + Sync + 'static {
    /// gRPC address other services use to reach this worker.
    fn address(&self) -> String;
    /// The id of the worker a bare ref (no `@WORKER`) is on, when known.
    fn home_id(&self) -> Option<String> {
        None
    }
    fn run(
        &self,
        op: RunOp,
        events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> impl Future<Output = Result<RunOutputs, Error>> + Send;
    /// `length` bytes (0: to the end) from `offset` of a file in `r`.
    fn read_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
        offset: i64,
        length: i64,
    ) -> impl Future<Output = Result<Vec<u8>, Error>> + Send {
        let _ = (r, path, offset, length);
        std::future::ready(Err(Error::Unsupported("read files")))
    }
    /// The entries of a directory in `r` (names matching `include` when set).
    fn read_dir(
        &self,
        r: FsTarget<'_>,
        path: &str,
        include: &str,
    ) -> impl Future<Output = Result<Vec<Stat>, Error>> + Send {
        let _ = (r, path, include);
        std::future::ready(Err(Error::Unsupported("list directories")))
    }
    /// Prepares an LLBBridge container's mounts on the worker (`spec.op`'s
    /// mounts over `spec.inputs`); returns the worker's id for it.
    fn new_container(&self, spec: ExecSpec) -> impl Future<Output = Result<String, Error>> + Send {
        let _ = spec;
        std::future::ready(Err(Error::Unsupported("hold containers")))
    }
    /// Unmounts and discards a container.
    fn release_container(&self, id: &str) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = id;
        std::future::ready(Ok(()))
    }
    /// Runs an interactive process on the worker (see [`ExecSpec`]): `input`
    /// feeds it, `events` gets its output as it comes. Returns the exit code.
    fn exec(
        &self,
        spec: ExecSpec,
        input: tokio::sync::mpsc::Receiver<ExecInput>,
        events: tokio::sync::mpsc::Sender<ExecEvent>,
    ) -> impl Future<Output = Result<i32, Error>> + Send {
        let _ = (spec, input, events);
        std::future::ready(Err(Error::Unsupported("run interactive processes")))
    }
    /// The metadata of one path in `r`.
    fn stat_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
    ) -> impl Future<Output = Result<Stat, Error>> + Send {
        let _ = (r, path);
        std::future::ready(Err(Error::Unsupported("stat files")))
    }
    /// Digest of the content at `selectors` in ref `r`.
    fn checksum(
        &self,
        r: &str,
        selectors: &[Selector],
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// Every entry `selectors` reach in ref `r`, with content digest, mode
    /// and owner (for cache-miss explanations).
    fn path_entries(
        &self,
        r: &str,
        selectors: &[Selector],
    ) -> impl Future<Output = Result<Vec<PathEntry>, Error>> + Send;
    /// Whether each ref (with its parent chain) is still held.
    fn exists(&self, refs: &[String]) -> impl Future<Output = Result<Vec<bool>, Error>> + Send;
    /// Disk usage of the given snapshots (all when empty).
    fn usage(&self, refs: &[String]) -> impl Future<Output = Result<WorkerUsage, Error>> + Send {
        let _ = refs;
        std::future::ready(Err(Error::Unsupported("report disk usage")))
    }
    /// Has the worker compute (and keep) the layer blobs of ref `r`'s chain with the
    /// layer `options`, ahead of an export that will ask for them.
    fn prepare_layers(
        &self,
        r: &str,
        options: &kiln_oci::LayerOptions,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = (r, options);
        std::future::ready(Ok(()))
    }
    /// Copies the ref `r` of the worker at `peer` into this worker.
    fn import(&self, peer: &str, r: &str) -> impl Future<Output = Result<Imported, Error>> + Send {
        let _ = (peer, r);
        std::future::ready(Err(Error::Unsupported("import from other workers")))
    }
    /// The workers behind this one (a farm's members); `None`: just this one.
    fn workers(&self) -> Option<Vec<WorkerInfo>> {
        None
    }
    /// One worker's address and its refs for `refs` (moved there as needed):
    /// what an exporter reads from.
    fn gather(
        &self,
        refs: &[String],
    ) -> impl Future<Output = Result<(String, Vec<String>), Error>> + Send {
        std::future::ready(Ok((self.address(), refs.to_vec())))
    }
    /// Removes snapshots created before `before` (unix ns) that `keep` does not reach.
    fn prune(
        &self,
        keep: &[String],
        before: i64,
    ) -> impl Future<Output = Result<WorkerUsage, Error>> + Send {
        let _ = (keep, before);
        std::future::ready(Err(Error::Unsupported("prune")))
    }
}

/// An interactive process: a frontend image's entrypoint, or a process in an
/// LLBBridge container. Nothing it writes is kept.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// its process (meta), mounts, network and security mode
    pub op: pb::ExecOp,
    /// the refs its mounts' inputs name (empty: scratch)
    pub inputs: Vec<String>,
    pub session_id: String,
    pub entitlements: Vec<String>,
    /// whether it reads stdin
    pub stdin: bool,
    /// run in this worker container (then only `op`'s meta, security mode and
    /// secret env count)
    pub container: Option<String>,
    /// on a terminal (in a container only)
    pub tty: bool,
}

/// What a file call reads on a worker.
#[derive(Debug, Clone, Copy)]
pub enum FsTarget<'a> {
    /// a snapshot (empty: scratch)
    Ref(&'a str),
    /// mount `mount` of a worker container, as its processes left it
    Container { id: &'a str, mount: u32 },
}

impl<'a> FsTarget<'a> {
    /// The wire fields: (ref, container id, mount index).
    pub fn parts(self) -> (&'a str, &'a str, u32) {
        match self {
            FsTarget::Ref(r) => (r, "", 0),
            FsTarget::Container { id, mount } => ("", id, mount),
        }
    }
}

/// What goes to an interactive process.
#[derive(Debug, Clone)]
pub enum ExecInput {
    Stdin(bytes::Bytes),
    /// no more stdin
    Eof,
    /// e.g. "SIGTERM"
    Signal(String),
    /// the terminal's new size: rows, columns
    Resize(u32, u32),
}

/// What an interactive process reports while it runs.
#[derive(Debug, Clone)]
pub enum ExecEvent {
    /// the container is being started
    Started,
    /// output: fd 1 stdout, 2 stderr
    Output { fd: u32, data: bytes::Bytes },
}

/// A path an op reads from one of its inputs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub path: String,
    pub wildcard: bool,
    pub follow_links: bool,
}

/// A file, directory or symlink an op reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry {
    pub path: String,
    pub content: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One snapshot's disk usage.
#[derive(Debug, Clone, Default)]
pub struct SnapshotUsage {
    pub r#ref: String,
    pub parent: String,
    pub kind: String,
    pub size: i64,
    pub created: i64,
    /// the cache id of a cache mount
    pub description: String,
}

/// Snapshots (listed or removed) and content-store bytes.
#[derive(Debug, Clone, Default)]
pub struct WorkerUsage {
    pub snapshots: Vec<SnapshotUsage>,
    pub blobs_size: i64,
}

/// A frontend's answer.
#[derive(Debug, Clone, Default)]
pub struct FrontendOutput {
    pub definition: pb::Definition,
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// A multi-platform result: platform id -> definition (metadata `refs.platforms`).
    pub refs: BTreeMap<String, pb::Definition>,
}

pub trait Frontend: Send + Sync + 'static {
    fn solve(
        &self,
        build_id: &str,
        frontend: &str,
        attrs: &BTreeMap<String, String>,
        session_id: &str,
    ) -> impl Future<Output = Result<FrontendOutput, Error>> + Send;
}

#[derive(Debug, Clone)]
pub struct ExportJob {
    pub build_id: String,
    pub session_id: String,
    pub worker: String,
    pub r#ref: String,
    pub r#type: String,
    pub attrs: BTreeMap<String, String>,
    pub image_config: Vec<u8>,
    pub index: u32,
    /// A multi-platform result, in the frontend's order (`r#ref` is then unused).
    pub platforms: Vec<PlatformJob>,
    /// the records a cache export writes, or an image embeds (inline cache)
    pub cache: Option<kiln_proto::kiln::exporter::v1::CacheGraph>,
    /// the result is an imported one not loaded: its layers in a registry
    pub remote: Option<kiln_proto::kiln::exporter::v1::RemoteLayers>,
}

/// One platform of a multi-platform export.
#[derive(Debug, Clone)]
pub struct PlatformJob {
    /// e.g. "linux/arm64"
    pub id: String,
    pub r#ref: String,
    pub image_config: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: String,
    pub digest: String,
    pub config: Vec<u8>,
}

pub trait Exporter: Send + Sync + 'static {
    /// `session_id` is the build's client session, asked for registry credentials.
    fn resolve(
        &self,
        reference: &str,
        platform: Option<pb::Platform>,
        session_id: &str,
    ) -> impl Future<Output = Result<ResolvedImage, Error>> + Send;
    fn export(
        &self,
        job: ExportJob,
        status: Arc<dyn Fn(String) + Send + Sync>,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, Error>> + Send;
    /// An imported build cache (`--import-cache` entry of `type` with
    /// `attrs`): its cache config (every layer described), the repository
    /// its blobs come from, and the cache mounts it carries (a JSON array of
    /// layer descriptors).
    fn resolve_cache(
        &self,
        r#type: &str,
        attrs: &BTreeMap<String, String>,
        session_id: &str,
    ) -> impl Future<Output = Result<(Vec<u8>, String, Vec<u8>), Error>> + Send;
}
