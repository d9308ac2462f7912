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
pub mod farm;
pub mod frontend_image;
pub mod gc;
pub mod grpc;
pub mod history;
pub mod inflight;
pub mod peer;
pub mod progress;
pub mod remote;
pub mod session;
pub mod solve;
pub mod solver;
pub mod step;
pub mod usage;

pub use build::BuildRequest;
pub use solver::Solver;

use kiln_proto::status::{Details, Remote};
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
    /// build caches every build imports and exports besides its own
    /// (`[[remote-cache.import]]`, `[[remote-cache.export]]` in kilnd.toml)
    pub cache_imports: Vec<remote::CacheEntry>,
    pub cache_exports: Vec<remote::CacheEntry>,
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
            cache_imports: vec![],
            cache_exports: vec![],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid definition")]
    Definition(#[from] kiln_llb::Error),
    #[error("definition refers to a vertex it does not contain: {0}")]
    MissingVertex(String),
    #[error("no build with id {0:?}")]
    UnknownBuild(String),
    #[error("no session {0:?} attached")]
    NoSession(String),
    #[error(
        "source {name:?} names session {session:?}, which is not this build's: a build reads only its own client's files"
    )]
    ForeignSession { name: String, session: String },
    /// An image in an OCI layout the client serves (`oci-layout://`).
    #[error("{reference}")]
    OciLayout {
        reference: String,
        #[source]
        source: kiln_session::Error,
    },
    #[error("source {0:?}: only kiln itself loads imported build caches")]
    CacheSource(String),
    #[error("no result with id {0:?} in this build")]
    UnknownRef(String),
    #[error("build {0:?} is not waiting for a client-side frontend")]
    NotForwarded(String),
    #[error("a build with id {0:?} is already running")]
    DuplicateBuild(String),
    /// The frontend the client runs returned an error (LLBBridge `Return`).
    #[error(transparent)]
    ClientFrontend(Remote),
    #[error("frontend image {image}: {message}")]
    FrontendImage { image: String, message: String },
    #[error("container {0:?}: {1}")]
    Container(String, String),
    #[error("unsupported exporter {0:?}")]
    UnknownExporter(String),
    /// A cache export or import the client asked for is not valid.
    #[error("{0}")]
    CacheOption(String),
    /// The frontend service failed (its details, where a step or a
    /// Dockerfile line is known, pass on to the client).
    #[error("frontend {frontend}")]
    Frontend {
        frontend: String,
        #[source]
        source: Remote,
    },
    /// A step of the build failed: `message` is what the client reads (the
    /// worker's, or the whole chain of a failure here), `details` the
    /// step's digest and the source lines it came from.
    #[error("{message}")]
    Vertex {
        name: String,
        message: String,
        code: tonic::Code,
        details: Details,
    },
    #[error("export to {exporter}")]
    Export {
        exporter: String,
        #[source]
        source: Remote,
    },
    #[error("export to {exporter}: the exporter ended without a result")]
    ExportNoResult { exporter: String },
    /// A step the worker ran (or could not run) failed; its message as the
    /// worker gave it.
    #[error(transparent)]
    Run(Remote),
    /// A worker could not be reached: its connection broke or was refused
    /// (not a failure the worker reported).
    #[error("worker {op}: connection lost")]
    Unreachable {
        op: String,
        #[source]
        source: Remote,
    },
    /// The farm could not place or keep a step.
    #[error("{0}")]
    Farm(String),
    /// Another worker call failed.
    #[error("worker {op}")]
    Worker {
        op: String,
        #[source]
        source: Remote,
    },
    /// The worker answered a call in a way the protocol does not allow.
    #[error("worker {op}: {problem}")]
    WorkerReply { op: String, problem: &'static str },
    /// A worker without this call (only the gRPC worker has them all).
    #[error("this worker cannot {0}")]
    Unsupported(&'static str),
    /// The exporter's answer to a resolve, which names the image itself.
    #[error(transparent)]
    Resolve(Remote),
    #[error("session")]
    Session(#[from] kiln_session::Error),
    #[error("build cancelled")]
    Cancelled,
    #[error("cache store task")]
    StoreTask { source: tokio::task::JoinError },
    #[error("cache store {op}")]
    CacheStore {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("filter {filter:?}: {message}")]
    Filter { filter: String, message: String },
    #[error("duration in filter {filter:?}")]
    FilterDuration {
        filter: String,
        source: kiln_units::Error,
    },
    #[error("cache record {id}: {message}")]
    CacheRecord { id: String, message: String },
}

impl Error {
    /// The status details the error carries: a failed step's digest and
    /// source lines, or what a frontend sent.
    /// Whether the worker was lost rather than the call failing on its own.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Worker { source, .. } => source.code == tonic::Code::Unavailable,
            _ => false,
        }
    }

    pub fn details(&self) -> Option<&Details> {
        match self {
            Error::Vertex { details, .. } => Some(details),
            Error::Frontend { source, .. } | Error::ClientFrontend(source) => Some(&source.details),
            _ => None,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Definition(_)
            | Error::MissingVertex(_)
            | Error::UnknownExporter(_)
            | Error::CacheOption(_)
            | Error::Filter { .. }
            | Error::FilterDuration { .. } => tonic::Code::InvalidArgument,
            Error::UnknownBuild(_) | Error::UnknownRef(_) => tonic::Code::NotFound,
            Error::ForeignSession { .. } | Error::CacheSource(_) => tonic::Code::PermissionDenied,
            Error::NoSession(_) | Error::NotForwarded(_) => tonic::Code::FailedPrecondition,
            Error::DuplicateBuild(_) => tonic::Code::AlreadyExists,
            Error::Vertex { code, .. } => *code,
            Error::Frontend { source, .. } | Error::ClientFrontend(source) | Error::Run(source) => {
                source.code
            }
            Error::Cancelled => tonic::Code::Cancelled,
            Error::Session(_)
            | Error::Worker { .. }
            | Error::WorkerReply { .. }
            | Error::Unreachable { .. }
            | Error::Export { .. }
            | Error::ExportNoResult { .. } => tonic::Code::Unknown,
            Error::Unsupported(_) => tonic::Code::Unimplemented,
            Error::CacheStore { .. } | Error::CacheRecord { .. } | Error::StoreTask { .. } => {
                tonic::Code::Internal
            }
            Error::Resolve(_) | Error::OciLayout { .. } => tonic::Code::NotFound,
            Error::FrontendImage { .. } => tonic::Code::FailedPrecondition,
            Error::Container(..) => tonic::Code::NotFound,
            Error::Farm(_) => tonic::Code::Unavailable,
        };
        let status = kiln_proto::status::from_error(code, &e);
        match e.details() {
            Some(details) => details.attach(status),
            None => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::status::SourceLocation;

    fn details() -> Details {
        Details {
            vertex: Some("sha256:abc".into()),
            sources: vec![SourceLocation {
                info: kiln_proto::pb::SourceInfo {
                    filename: "Dockerfile".into(),
                    data: b"FROM busybox\nRUN false\n".to_vec(),
                    ..Default::default()
                },
                ranges: vec![],
            }],
        }
    }

    #[test]
    fn a_failed_step_and_a_frontend_failure_carry_their_details() {
        let step = Error::Vertex {
            name: "RUN false".into(),
            message: "process did not complete successfully: exit code: 1".into(),
            code: tonic::Code::Unknown,
            details: details(),
        };
        let s = tonic::Status::from(step);
        assert_eq!(
            s.message(),
            "process did not complete successfully: exit code: 1"
        );
        assert_eq!(Details::of(&s), details());
        // a frontend's details pass through the solver unchanged, its message
        // keeps the frontend's whole text
        let from_frontend = Remote::from(details().attach(tonic::Status::invalid_argument(
            "dockerfile parse error on line 2: unknown instruction: RUNN",
        )));
        let s = tonic::Status::from(Error::Frontend {
            frontend: "dockerfile.v0".into(),
            source: from_frontend,
        });
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "frontend dockerfile.v0: dockerfile parse error on line 2: unknown instruction: RUNN"
        );
        assert_eq!(Details::of(&s), details());
    }

    #[test]
    fn a_worker_error_keeps_its_whole_message() {
        let e = Error::Worker {
            op: "checksum r1".into(),
            source: tonic::Status::unavailable("dial worker: connection refused").into(),
        };
        assert_eq!(
            tonic::Status::from(e).message(),
            "worker checksum r1: dial worker: connection refused"
        );
    }
}
