use std::io;
use std::path::PathBuf;

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("parse image reference {reference:?}: {reason}")]
    ParseReference {
        reference: String,
        reason: &'static str,
    },
    #[error("build http client")]
    BuildClient { source: reqwest::Error },
    #[error("request {method} {url}")]
    Request {
        method: String,
        url: String,
        source: reqwest::Error,
    },
    #[error("{method} {url}: unexpected status {status}: {body}")]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("fetch token from {realm}")]
    Token {
        realm: String,
        source: reqwest::Error,
    },
    #[error("token response from {realm} is not JSON")]
    DecodeToken {
        realm: String,
        source: serde_json::Error,
    },
    #[error("token response from {realm} has no token")]
    TokenMissing { realm: String },
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("decode manifest of {reference}")]
    DecodeManifest {
        reference: String,
        source: serde_json::Error,
    },
    #[error("{reference}: manifest media type {media_type:?} is not supported")]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: no manifest for platform {platform}")]
    NoMatchingPlatform { reference: String, platform: String },
    #[error("{what} of {reference}: expected digest {expected}, got {actual}")]
    DigestMismatch {
        what: &'static str,
        reference: String,
        expected: String,
        actual: String,
    },
    #[error(
        "blob {digest}: expected {expected_size} bytes, got {actual_size} bytes with digest {actual_digest}"
    )]
    BlobMismatch {
        digest: String,
        expected_size: u64,
        actual_size: u64,
        actual_digest: String,
    },
    #[error("write blob {path}")]
    WriteBlob { path: PathBuf, source: io::Error },
    #[error("read blob {path}")]
    ReadBlob { path: PathBuf, source: io::Error },
    #[error("upload of {digest} to {reference}: registry gave no upload location")]
    UploadLocation { reference: String, digest: String },
    #[error("read CA certificates {path} for {host}")]
    ReadCa {
        host: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("CA certificates {path} for {host}")]
    ParseCa {
        host: String,
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("invalid url {url}")]
    Url { url: String },
}
