//! Dockerfile → LLB conversion.
//!
//! Placeholder holding the contract until the converter lands; every
//! conversion fails with [`Error::NotImplemented`].

use std::collections::BTreeMap;

/// What the converter needs besides the Dockerfile bytes.
pub struct ConvertOptions {
    pub target: Option<String>,
    pub build_args: BTreeMap<String, String>,
    pub platform: kiln_oci::Platform,
    pub session_id: String,
    pub filename: String,
}

/// A `FROM` image resolved to a pinned reference and its config.
pub struct ResolvedImage {
    pub canonical_ref: String,
    pub digest: String,
    pub config: kiln_oci::ImageConfig,
}

/// Resolves image references for `FROM`.
pub trait ImageResolver: Send + Sync {
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_oci::Platform,
    ) -> impl std::future::Future<Output = Result<ResolvedImage, String>> + Send;
}

/// The LLB definition of the target stage and the image config it produces.
pub struct Converted {
    pub definition: kiln_llb::pb::Definition,
    pub image_config: kiln_oci::ImageConfig,
}

/// Why a Dockerfile could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("convert Dockerfile:1: dockerfile conversion is not implemented yet")]
    NotImplemented,
}

/// Converts a Dockerfile into LLB.
pub async fn convert<R: ImageResolver>(
    _dockerfile: &[u8],
    _opts: &ConvertOptions,
    _resolver: &R,
) -> Result<Converted, Error> {
    Err(Error::NotImplemented)
}
