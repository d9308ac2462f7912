use std::io;
use std::path::PathBuf;

/// Errors of kiln-oci operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read layer tar")]
    ReadLayer { source: io::Error },
    #[error("layer entry {entry:?} is unsafe: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },
    #[error("apply layer entry {entry:?}")]
    ApplyEntry { entry: String, source: io::Error },
    #[error("walk {path}")]
    WalkDir { path: PathBuf, source: io::Error },
    #[error("write tar entry for {path}")]
    WriteTarEntry { path: PathBuf, source: io::Error },
    #[error("detect compression")]
    DetectCompression { source: io::Error },
    #[error("unsupported layer compression {kind}")]
    UnsupportedCompression { kind: &'static str },
    #[error("compress layer {path}")]
    CompressLayer { path: PathBuf, source: io::Error },
    #[error("write layout entry {name}")]
    WriteLayout { name: String, source: io::Error },
    #[error("encode {what} json")]
    EncodeJson {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("invalid layer options {spec:?}")]
    InvalidLayerSpec { spec: String },
    #[error("invalid digest {digest:?}")]
    InvalidDigest { digest: String },
}
