use std::io;
use std::path::PathBuf;

/// Errors of exporter operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create registry client")]
    RegistryClient { source: Box<kiln_registry::Error> },
    #[error("parse image reference {reference:?}")]
    ParseReference {
        reference: String,
        source: Box<kiln_registry::Error>,
    },
    #[error("resolve image {reference}")]
    ResolveImage {
        reference: String,
        source: Box<kiln_registry::Error>,
    },
    #[error(
        "the docker exporter cannot export a multi-platform result (manifest list); use type=oci or type=image"
    )]
    DockerMultiPlatform,
    #[error("unknown exporter type {kind:?}")]
    UnknownExporter { kind: String },
    #[error("invalid exporter attribute {key}={value:?}")]
    InvalidAttr { key: String, value: String },
    #[error("decode image config from the frontend")]
    DecodeImageConfig { source: serde_json::Error },
    #[error("encode {what}")]
    EncodeJson {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("connect to worker {addr}")]
    DialWorker {
        addr: String,
        source: Box<kiln_session::Error>,
    },
    #[error("connect to session broker {addr}")]
    DialBroker {
        addr: String,
        source: Box<kiln_session::Error>,
    },
    /// A worker call failed; the worker's own status, passed on.
    #[error("worker {op} {target}")]
    Worker {
        op: &'static str,
        target: String,
        source: kiln_proto::status::Remote,
    },
    #[error(
        "layer {digest} from worker has digest {actual} and size {size}, expected size {expected_size}"
    )]
    LayerMismatch {
        digest: String,
        actual: String,
        size: u64,
        expected_size: u64,
    },
    #[error("{op}")]
    Session {
        op: &'static str,
        source: Box<kiln_session::Error>,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{op}")]
    Oci {
        op: &'static str,
        source: kiln_oci::Error,
    },
    #[error("push blob {digest} to {reference}")]
    PushBlob {
        reference: String,
        digest: String,
        source: Box<kiln_registry::Error>,
    },
    #[error("push manifest to {reference}")]
    PushManifest {
        reference: String,
        source: Box<kiln_registry::Error>,
    },
    #[error("write blob {digest} of the build cache to {target}")]
    CacheWrite {
        target: String,
        digest: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("build cache {reference}: {reason}")]
    Cache { reference: String, reason: String },
    #[error("background task for {op} failed")]
    Join {
        op: &'static str,
        source: tokio::task::JoinError,
    },
}
