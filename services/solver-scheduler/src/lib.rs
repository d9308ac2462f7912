//! solver-scheduler: the daemon's front door and brain.
//!
//! It serves `moby.buildkit.v1.Control` to clients, owns their sessions
//! (forwarding calls to them for other services through `SessionBroker`),
//! serves `LLBBridge` to frontends, loads LLB definitions into vertex
//! graphs, runs each vertex once on a worker (independent vertices in
//! parallel, results reused by cache key) and hands results to the exporter.
//!
//! It never touches files or registries itself: workers, frontends and the
//! exporter are peers reached through the small traits in [`peer`], whose
//! real implementations are gRPC clients (`grpc::client`).
//!
//! Where things are: [`solver`] runs builds (frontend, solve, export) and
//! [`build`] holds one build's state; [`solve`] schedules an LLB graph's
//! vertices, [`step`] runs one, [`inflight`] shares a running vertex between
//! builds and [`cache`] holds the result records and how cache keys are made;
//! [`usage`] and [`gc`] are `du`, prune and GC; [`explain`] says why a step
//! ran; [`frontend_image`] runs frontend images; [`grpc`] is the wire.

pub mod build;
pub mod cache;
pub mod explain;
pub mod frontend_image;
pub mod gc;
pub mod grpc;
pub mod history;
pub mod inflight;
pub mod peer;
pub mod progress;
pub mod session;
pub mod solve;
pub mod solver;
pub mod step;
pub mod usage;

pub use build::BuildRequest;
pub use solver::Solver;

use std::time::Duration;

/// How the solver is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a build waits for the client's session to attach.
    pub session_wait: Duration,
    /// Worker platforms reported by ListWorkers, e.g. "linux/amd64".
    pub platforms: Vec<String>,
    /// The result cache database (redb); `None` keeps the cache in memory
    /// (lost on restart).
    pub cache_db: Option<std::path::PathBuf>,
    /// GC policies applied, in order, after each build and every
    /// `gc_interval` (none: no automatic GC)
    pub gc: Vec<usage::PruneOptions>,
    pub gc_interval: Duration,
    /// at most this many steps run on workers at once, across builds
    pub max_parallelism: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_wait: Duration::from_secs(10),
            platforms: vec![format!("linux/{}", kiln_oci::host_architecture())],
            cache_db: None,
            gc: vec![],
            gc_interval: Duration::from_secs(60),
            max_parallelism: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid definition: {0}")]
    Definition(#[from] kiln_llb::Error),
    #[error("definition refers to a vertex it does not contain: {0}")]
    MissingVertex(String),
    #[error("no build with id {0:?}")]
    UnknownBuild(String),
    #[error("no session {0:?} attached")]
    NoSession(String),
    #[error(
        "local source {name:?} names session {session:?}, which is not this build's: a build reads only its own client's files"
    )]
    ForeignSession { name: String, session: String },
    #[error("no result with id {0:?} in this build")]
    UnknownRef(String),
    #[error("build {0:?} is not waiting for a client-side frontend")]
    NotForwarded(String),
    #[error("a build with id {0:?} is already running")]
    DuplicateBuild(String),
    #[error("{message}")]
    ClientFrontend { message: String, code: tonic::Code },
    #[error("frontend image {image}: {message}")]
    FrontendImage { image: String, message: String },
    #[error("container {0:?}: {1}")]
    Container(String, String),
    #[error("unsupported exporter {0:?}")]
    UnknownExporter(String),
    #[error("frontend {frontend}: {message}")]
    Frontend {
        frontend: String,
        message: String,
        code: tonic::Code,
    },
    #[error("{message}")]
    Vertex {
        name: String,
        message: String,
        code: tonic::Code,
        /// the source lines (e.g. of the Dockerfile) the vertex came from
        snippet: Option<String>,
    },
    #[error("export to {exporter}: {message}")]
    Export { exporter: String, message: String },
    #[error("worker: {0}")]
    Worker(String),
    #[error("resolve image config for {reference}: {message}")]
    Resolve { reference: String, message: String },
    #[error("session: {0}")]
    Session(#[from] kiln_session::Error),
    #[error("build cancelled")]
    Cancelled,
    #[error("cache store task")]
    StoreTask { source: tokio::task::JoinError },
    #[error("cache store {op}: {source}")]
    CacheStore {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("cache record {id}: {message}")]
    CacheRecord { id: String, message: String },
}

/// gRPC trailer carrying the source lines of a failed step (binary value).
pub const ERROR_SOURCE_KEY: &str = "kiln-error-source-bin";

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        if let Error::Vertex {
            snippet: Some(snippet),
            message,
            code,
            ..
        } = &e
        {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert_bin(
                ERROR_SOURCE_KEY,
                tonic::metadata::MetadataValue::from_bytes(snippet.as_bytes()),
            );
            return tonic::Status::with_metadata(*code, message.clone(), md);
        }
        let code = match &e {
            Error::Definition(_)
            | Error::MissingVertex(_)
            | Error::UnknownExporter(_)
            | Error::Filter { .. } => tonic::Code::InvalidArgument,
            Error::UnknownBuild(_) | Error::UnknownRef(_) => tonic::Code::NotFound,
            Error::ForeignSession { .. } => tonic::Code::PermissionDenied,
            Error::NoSession(_) | Error::NotForwarded(_) => tonic::Code::FailedPrecondition,
            Error::DuplicateBuild(_) => tonic::Code::AlreadyExists,
            Error::Frontend { code, .. }
            | Error::Vertex { code, .. }
            | Error::ClientFrontend { code, .. } => *code,
            Error::Cancelled => tonic::Code::Cancelled,
            Error::Session(_) | Error::Worker(_) | Error::Export { .. } => tonic::Code::Unknown,
            Error::CacheStore { .. } | Error::CacheRecord { .. } | Error::StoreTask { .. } => {
                tonic::Code::Internal
            }
            Error::Resolve { .. } => tonic::Code::NotFound,
            Error::FrontendImage { .. } => tonic::Code::FailedPrecondition,
            Error::Container(..) => tonic::Code::NotFound,
        };
        tonic::Status::new(code, e.to_string())
    }
}
