//! registry-exporter: resolves image references to their configs and turns build results
//! (a worker's Ref) into images pushed to registries, OCI-layout / docker-archive tarballs,
//! plain filesystem tarballs and local directories sent to the client session.
//!
//! It does not build anything and holds no snapshots: layers and filesystems come from the
//! worker (`WorkerFs`), outputs go to the client through `ClientSink`. `grpc` is the only
//! module naming tonic or generated types.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use kiln_oci::Platform;
use kiln_registry::{Reference, RegistryConfig};
use tokio::sync::mpsc;

mod error;
pub mod grpc;
mod image;
mod output;

pub use error::Error;
pub use image::{AssembledImage, LayerBlob, MediaTypes, assemble_image};

/// Settings of the exporter service.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Registry hosts, mirrors and plain-http settings (kilnd.toml `[registry."host"]`).
    pub registry: RegistryConfig,
    /// gRPC address of solver-scheduler's SessionBroker ("http://host:port" or "unix:///path").
    pub broker: String,
    /// Scratch space for blobs and archives being exported.
    pub work_dir: PathBuf,
}

/// A stream of bytes from the worker.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// What the exporter needs from the worker holding the ref.
pub trait WorkerFs: Send + Sync {
    /// The compressed layer blobs of a ref's chain (empty for scratch).
    fn layers(
        &self,
        reference: &str,
        compression: &str,
    ) -> impl Future<Output = Result<Vec<LayerBlob>, Error>> + Send;
    /// The bytes of one blob named by digest.
    fn read_blob(&self, digest: &str) -> impl Future<Output = Result<ByteStream, Error>> + Send;
    /// The ref's whole filesystem as an uncompressed tar.
    fn export_fs(&self, reference: &str) -> impl Future<Output = Result<ByteStream, Error>> + Send;
}

/// Where tarballs and directories go: the client session.
pub trait ClientSink: Send + Sync {
    fn send_file(
        &self,
        exporter_id: u32,
        file: tokio::fs::File,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    fn send_dir(
        &self,
        exporter_id: u32,
        dir: &Path,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

impl ClientSink for kiln_session::SessionClient {
    async fn send_file(&self, exporter_id: u32, file: tokio::fs::File) -> Result<(), Error> {
        kiln_session::SessionClient::send_file(self, exporter_id, file)
            .await
            .map_err(|source| Error::Session {
                op: "send file",
                source,
            })
    }
    async fn send_dir(&self, exporter_id: u32, dir: &Path) -> Result<(), Error> {
        kiln_session::SessionClient::send_dir(self, exporter_id, dir)
            .await
            .map_err(|source| Error::Session {
                op: "send directory",
                source,
            })
    }
}

/// One export request (the domain form of `kiln.exporter.v1.ExportRequest`).
#[derive(Clone, Debug, Default)]
pub struct ExportRequest {
    pub build_id: String,
    pub session_id: String,
    /// gRPC address of the worker holding `reference`.
    pub worker: String,
    /// The worker ref to export; empty = scratch.
    pub reference: String,
    /// "image", "oci", "docker", "tar" or "local".
    pub kind: String,
    pub attrs: BTreeMap<String, String>,
    /// Image config JSON from the frontend (may be empty).
    pub image_config: Vec<u8>,
    /// Index of this exporter in the client's request (`exporter-id`).
    pub index: u32,
}

/// A resolved image config.
#[derive(Clone, Debug)]
pub struct ResolvedConfig {
    /// Canonical reference, e.g. docker.io/library/busybox:latest
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Raw config JSON.
    pub config: Vec<u8>,
}

/// The exporter core.
pub struct Exporter {
    config: Config,
    registry: kiln_registry::Client,
}

impl Exporter {
    pub fn new(config: Config) -> Result<Self, Error> {
        let registry = kiln_registry::Client::new(config.registry.clone())
            .map_err(|source| Error::RegistryClient { source })?;
        Ok(Exporter { config, registry })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &kiln_registry::Client {
        &self.registry
    }

    /// Resolve `reference` for `platform` (default: this host's) to its manifest digest and config.
    pub async fn resolve_image_config(
        &self,
        reference: &str,
        platform: Option<Platform>,
    ) -> Result<ResolvedConfig, Error> {
        let r = Reference::parse(reference).map_err(|source| Error::ParseReference {
            reference: reference.to_string(),
            source,
        })?;
        let platform = platform.unwrap_or_else(host_platform);
        let resolved = self
            .registry
            .resolve(&r, &platform)
            .await
            .map_err(|source| Error::ResolveImage {
                reference: r.to_string(),
                source,
            })?;
        let mut canonical = r.clone();
        canonical.digest = None;
        if canonical.tag.is_none() {
            canonical.digest = r.digest.clone();
        }
        Ok(ResolvedConfig {
            reference: canonical.to_string(),
            digest: resolved.manifest_digest,
            config: resolved.config,
        })
    }

    /// Run one export. Status lines go to `progress`; returns the exporter response map.
    pub async fn export(
        &self,
        req: &ExportRequest,
        worker: &impl WorkerFs,
        client: &impl ClientSink,
        progress: &mpsc::Sender<String>,
    ) -> Result<BTreeMap<String, String>, Error> {
        tokio::fs::create_dir_all(&self.config.work_dir)
            .await
            .map_err(|source| Error::Io {
                op: "create work dir",
                path: self.config.work_dir.clone(),
                source,
            })?;
        let tmp = tempfile::Builder::new()
            .prefix("export-")
            .tempdir_in(&self.config.work_dir)
            .map_err(|source| Error::Io {
                op: "create temp dir",
                path: self.config.work_dir.clone(),
                source,
            })?;
        match req.kind.as_str() {
            "image" | "oci" | "docker" => {
                let image = image::build(req, worker, tmp.path(), progress).await?;
                let mut response = image.response();
                let names = names(&req.attrs);
                match req.kind.as_str() {
                    "image" => {
                        if !names.is_empty() {
                            response.insert("image.name".into(), names.join(","));
                        }
                        if bool_attr(&req.attrs, "push", false) {
                            for name in &names {
                                let _ = progress.try_send(format!("pushing {name}"));
                                image::push(&self.registry, name, &image).await?;
                            }
                        }
                    }
                    kind => {
                        if !names.is_empty() {
                            response.insert("image.name".into(), names.join(","));
                        }
                        let _ = progress.try_send(format!("sending {kind} tarball"));
                        let file =
                            output::write_archive(kind == "docker", &image, &names, tmp.path())
                                .await?;
                        client.send_file(req.index, file).await?;
                    }
                }
                Ok(response)
            }
            "tar" => {
                let _ = progress.try_send("sending filesystem tarball".to_string());
                let file = output::fs_tar(worker, &req.reference, tmp.path()).await?;
                client.send_file(req.index, file).await?;
                Ok(BTreeMap::new())
            }
            "local" => {
                let _ = progress.try_send("copying files to client".to_string());
                let dir = output::fs_dir(worker, &req.reference, tmp.path()).await?;
                client.send_dir(req.index, &dir).await?;
                Ok(BTreeMap::new())
            }
            other => Err(Error::UnknownExporter {
                kind: other.to_string(),
            }),
        }
    }
}

/// The platform of this host in OCI terms.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform::new("linux", arch, None)
}

fn names(attrs: &BTreeMap<String, String>) -> Vec<String> {
    attrs
        .get("name")
        .map(|n| {
            n.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn bool_attr(attrs: &BTreeMap<String, String>, key: &str, default: bool) -> bool {
    match attrs.get(key).map(String::as_str) {
        Some("true") | Some("1") | Some("") => true,
        Some("false") | Some("0") => false,
        _ => default,
    }
}
