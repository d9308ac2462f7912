//! OCI distribution client for kiln: image references with Docker normalisation, per-host
//! registry settings (mirrors, plain http), resolving a tag to a platform manifest and config,
//! streamed blob pulls with digest verification, and blob/manifest pushes.
//!
//! It is not a content store: callers decide where blobs live. It does not unpack layers
//! (see kiln-oci).

mod client;
mod config;
mod error;
#[cfg(feature = "local-registry")]
pub mod local_registry;
mod reference;

pub use client::{Client, Credentials, PushOutcome, Resolved, describe_challenge};
pub use config::{HostConfig, RegistryConfig, is_loopback};
pub use error::Error;
pub use reference::{DOCKER_HUB, DOCKER_HUB_API_HOST, Reference, is_registry_host};
