//! OCI image types and layer handling for kiln: manifests, indexes, image configs (serde),
//! layer tars with overlay whiteouts, compression, digests and OCI-layout / docker-archive
//! tar writers.
//!
//! This crate is pure: no tokio, no network. Everything here is synchronous; async callers
//! run the heavy functions (tar, compression, hashing) on `spawn_blocking`.

pub mod cache_config;
mod compress;
mod error;
pub mod idmap;
mod image;
/// sha256 digests (the `kiln-digest` crate), where kiln-oci's users expect them.
pub use kiln_digest as digest;
pub mod layer;
pub mod layout;
mod platform;
#[cfg(any(test, feature = "raw-tar"))]
pub mod raw_tar;

pub use compress::{
    Compression, DEFAULT_GZIP_LEVEL, LayerOptions, ParallelGzEncoder, bool_attr, compress_layer,
    compress_stream, recompress_blob, source_date_epoch, write_layer_blob,
};
pub use error::Error;
pub use image::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, ContainerConfig, Descriptor,
    EmptyObject, History, ImageConfig, Index, Manifest, RootFs, media_types, rfc3339,
};
pub use platform::{Platform, PlatformError, host_architecture};
