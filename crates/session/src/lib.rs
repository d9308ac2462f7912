//! Client sessions: the back-channel a build uses to reach files and
//! credentials on the client, and the fsutil file-transfer protocol.
//!
//! A client (`kiln` or BuildKit's `buildctl`) opens `Control.Session`, a
//! bidirectional stream of `BytesMessage`s that carries one HTTP/2
//! connection; the client serves gRPC on it (FileSync, FileSend, Health) and
//! the daemon is the gRPC client ([`hijack`]). Files move with the fsutil
//! DiffCopy packet protocol ([`filesync`]). Services other than the solver
//! reach a session through the solver's `SessionBroker` ([`SessionClient`]).
//!
//! This crate does not own sessions (the solver does) and knows nothing of
//! builds.

pub mod attachable;
pub mod auth;
pub mod content;
pub mod dial;
pub mod filesync;
pub mod hijack;
pub mod ocilayout;
pub mod raw;
mod replay;
pub mod tls;

mod client;

pub use client::{SessionClient, SyncOptions, credentials_via};
pub use replay::Replay;

use std::path::PathBuf;

/// gRPC metadata keys of the Control.Session call (BuildKit's names).
pub mod headers {
    pub const SESSION_UUID: &str = "x-docker-expose-session-uuid";
    pub const SESSION_NAME: &str = "x-docker-expose-session-name";
    pub const SESSION_SHAREDKEY: &str = "x-docker-expose-session-sharedkey";
    pub const SESSION_METHOD: &str = "x-docker-expose-session-grpc-method";
    /// FileSync.DiffCopy: which of the client's local dirs to send.
    pub const DIR_NAME: &str = "dir-name";
    pub const INCLUDE_PATTERNS: &str = "include-patterns";
    pub const EXCLUDE_PATTERNS: &str = "exclude-patterns";
    pub const FOLLOW_PATHS: &str = "followpaths";
    /// FileSend.DiffCopy: which exporter of the request this output belongs to.
    pub const EXPORTER_ID: &str = "buildkit-attachable-exporter-id";
    /// SSH.ForwardAgent: which of the client's agents to reach.
    pub const SSH_ID: &str = "buildkit.ssh.id";
}

/// gRPC methods a session may expose.
pub mod methods {
    pub const FILESYNC_DIFFCOPY: &str = "/moby.filesync.v1.FileSync/DiffCopy";
    pub const FILESEND_DIFFCOPY: &str = "/moby.filesync.v1.FileSend/DiffCopy";
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    pub const SECRETS_GETSECRET: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";
    pub const SSH_CHECKAGENT: &str = "/moby.sshforward.v1.SSH/CheckAgent";
    pub const SSH_FORWARDAGENT: &str = "/moby.sshforward.v1.SSH/ForwardAgent";
    pub const AUTH_CREDENTIALS: &str = "/moby.filesync.v1.Auth/Credentials";
    pub const CONTENT_INFO: &str = "/containerd.services.content.v1.Content/Info";
    pub const CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
    pub const CONTENT_WRITE: &str = "/containerd.services.content.v1.Content/Write";
    /// Every method of the content service a client serves for local caches.
    pub const CONTENT: &[&str] = &[
        CONTENT_INFO,
        "/containerd.services.content.v1.Content/Update",
        "/containerd.services.content.v1.Content/List",
        "/containerd.services.content.v1.Content/Delete",
        CONTENT_READ,
        "/containerd.services.content.v1.Content/Status",
        "/containerd.services.content.v1.Content/ListStatuses",
        CONTENT_WRITE,
        "/containerd.services.content.v1.Content/Abort",
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A session call failed; the status the other end sent.
    #[error("session call {method}")]
    Call {
        method: String,
        #[source]
        source: Box<kiln_proto::status::Remote>,
    },
    /// The other end broke the protocol (the message says how).
    #[error("file transfer: {0}")]
    Protocol(String),
    /// A message from the other end that does not decode.
    #[error("decode {what}")]
    Decode {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    /// A blocking task of a transfer panicked or was cancelled.
    #[error("{task} task")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("invalid session method {method:?}")]
    Method {
        method: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("error from peer: {0}")]
    Peer(String),
    /// An OCI layout the client serves that does not hold what was named.
    #[error("{0}")]
    Layout(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid pattern {pattern:?}")]
    Pattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("path {0:?} escapes the destination")]
    Escape(String),
    /// A file transfer that goes beyond one of the receiver's limits
    /// (`filesync::MAX_*`): `what` says what went beyond it.
    #[error("{what} (the limit is {limit})")]
    Limit { what: String, limit: usize },
    #[error("connect to {addr}")]
    Dial {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls handshake with {addr}: {reason}")]
    TlsHandshake { addr: String, reason: String },
    #[error("read tls {what} {path}: {reason}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("tls directory {dir} has no {names}")]
    TlsDir { dir: PathBuf, names: String },
    #[error("tls certificate {cert} and key {key}")]
    TlsKeyPair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("tls settings: {0}")]
    TlsIncomplete(&'static str),
    #[error("no system ca certificates to verify the daemon with (give --tlscacert)")]
    TlsNoRoots,
    #[error("tls protocol versions")]
    TlsSetup(#[source] Box<rustls::Error>),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Call { source, .. } => source.code,
            Error::Address { .. }
            | Error::Pattern { .. }
            | Error::Escape(_)
            | Error::Method { .. } => tonic::Code::InvalidArgument,
            Error::Connect { .. } => tonic::Code::Unavailable,
            Error::Limit { .. } => tonic::Code::ResourceExhausted,
            _ => tonic::Code::Internal,
        };
        kiln_proto::status::from_error(code, &e)
    }
}
