//! The worker's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("snapshot {id} not found")]
    SnapshotNotFound { id: String },
    #[error("container {id} not found (never made, or released)")]
    ContainerNotFound { id: String },
    #[error("invalid snapshot id {id:?}")]
    InvalidRef { id: String },
    #[error("snapshot {id} metadata: {source}")]
    SnapshotMeta {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("decode op: {0}")]
    DecodeOp(#[from] prost::DecodeError),
    #[error("unsupported op: {0}")]
    UnsupportedOp(String),
    #[error("op has {got} inputs but {want} refs were given")]
    InputCount { want: usize, got: usize },
    #[error("invalid op: {0}")]
    InvalidOp(String),
    #[error("syntax error in pattern {pattern:?}")]
    Pattern { pattern: String },
    #[error("unsupported source {identifier:?}")]
    UnsupportedSource { identifier: String },
    #[error("registry {reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: kiln_registry::Error,
    },
    #[error("image {reference}: {reason}")]
    Image { reference: String, reason: String },
    #[error("layer {digest}: {source}")]
    Layer {
        digest: String,
        #[source]
        source: kiln_oci::Error,
    },
    #[error("session sync of local {name:?}: {source}")]
    Session {
        name: String,
        #[source]
        source: kiln_session::Error,
    },
    #[error("runtime spec: {0}")]
    Spec(String),
    #[error("step network: {0}")]
    Network(String),
    #[error("start runc {runc}: {source}")]
    RuncStart {
        runc: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to containerd at {address}: {source}")]
    ContainerdConnect {
        address: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd {op} {id}: {source}")]
    Containerd {
        op: &'static str,
        id: String,
        #[source]
        source: tonic::Status,
    },
    #[error("containerd snapshot {key}: {reason}")]
    ContainerdSnapshot { key: String, reason: String },
    #[error("process {args:?} did not complete successfully: exit code: {code}")]
    ExitCode { args: String, code: i32 },
    #[error("unable to find user {user}: {reason}")]
    User { user: String, reason: String },
    #[error("{action} {path}: {reason}")]
    FileAction {
        action: &'static str,
        path: String,
        reason: String,
    },
    #[error("entitlement {entitlement}: {reason}")]
    Entitlement { entitlement: String, reason: String },
    #[error("ssh agent {id}: {reason}")]
    SshAgent { id: String, reason: String },
    #[error("secret {id}: {reason}")]
    Secret { id: String, reason: String },
    #[error("local source {name:?} without a session")]
    NoSession { name: String },
    #[error("source attribute {key}")]
    SourceAttr {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("git source {remote}: run git")]
    GitRun {
        remote: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http source {url}")]
    HttpRequest {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("git source {remote}: {reason}")]
    Git { remote: String, reason: String },
    #[error("http source {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("invalid digest {digest:?}")]
    InvalidDigest { digest: String },
    #[error("blob {digest} not found")]
    BlobNotFound { digest: String },
    #[error("layer options")]
    LayerOptions {
        #[source]
        source: kiln_oci::Error,
    },
    #[error("layer of snapshot {id}: its thread panicked")]
    LayerPanicked { id: String },
    #[error("background task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    pub(crate) fn file(action: &'static str, path: &str, reason: impl ToString) -> Error {
        Error::FileAction {
            action,
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            Error::SnapshotNotFound { .. }
            | Error::BlobNotFound { .. }
            | Error::ContainerNotFound { .. } => Status::not_found(msg),
            Error::InvalidRef { .. }
            | Error::DecodeOp(_)
            | Error::InvalidOp(_)
            | Error::NoSession { .. }
            | Error::SourceAttr { .. }
            | Error::Pattern { .. }
            | Error::InputCount { .. }
            | Error::InvalidDigest { .. }
            | Error::LayerOptions { .. } => Status::invalid_argument(msg),
            Error::UnsupportedOp(_) | Error::UnsupportedSource { .. } => Status::unimplemented(msg),
            Error::ExitCode { .. } | Error::User { .. } | Error::FileAction { .. } => {
                Status::failed_precondition(msg)
            }
            Error::Registry { .. } | Error::Session { .. } => Status::unavailable(msg),
            Error::Entitlement { .. } => Status::permission_denied(msg),
            Error::Git { .. }
            | Error::GitRun { .. }
            | Error::Http { .. }
            | Error::HttpRequest { .. } => Status::failed_precondition(msg),
            Error::Secret { .. } | Error::SshAgent { .. } => Status::failed_precondition(msg),
            _ => Status::internal(msg),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
