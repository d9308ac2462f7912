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

mod assemble;
pub mod cache;
mod error;
mod exporter;
pub mod grpc;

pub use assemble::{AssembledImage, AssembledIndex, LayerBlob, MediaTypes, assemble_image};
pub use error::Error;

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

/// The bytes of a file sent to the client, read as they are produced.
pub type FileData = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// A stream of bytes from the worker.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// What the exporter needs from the worker holding the ref.
pub trait WorkerFs: Send + Sync {
    /// The compressed layer blobs of a ref's chain (empty for scratch).
    fn layers(
        &self,
        reference: &str,
        options: &kiln_oci::LayerOptions,
    ) -> impl Future<Output = Result<Vec<LayerBlob>, Error>> + Send;
    /// The bytes of one blob named by digest.
    fn read_blob(&self, digest: &str) -> impl Future<Output = Result<ByteStream, Error>> + Send;
    /// The ref's whole filesystem as an uncompressed tar.
    fn export_fs(&self, reference: &str) -> impl Future<Output = Result<ByteStream, Error>> + Send;
}

/// Where tarballs and directories go: the client session.
pub trait ClientSink: Send + Sync {
    /// Stream `data` to the client as one file (tarball exporters).
    fn send_file(
        &self,
        exporter_id: u32,
        data: FileData,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    fn send_dir(
        &self,
        exporter_id: u32,
        dir: &Path,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// The client's registry credentials for `host` (session Auth attachable); `None` when
    /// it has none.
    fn credentials(&self, host: &str) -> impl Future<Output = Option<(String, String)>> + Send {
        let _ = host;
        async { None }
    }
    /// The size of blob `digest` in the client's content store `store`
    /// (`local:DIR`, a local build cache); `None` when it lacks it.
    fn content_size(
        &self,
        store: &str,
        digest: &str,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send {
        let _ = digest;
        let store = store.to_string();
        async move { Err(no_store(&store)) }
    }
    /// Blob `digest` of the client's content store `store`, read whole (at
    /// most `limit` bytes): small blobs only (manifests, configs).
    fn content_read(
        &self,
        store: &str,
        digest: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<u8>, Error>> + Send {
        let _ = (digest, limit);
        let store = store.to_string();
        async move { Err(no_store(&store)) }
    }
    /// Writes blob `digest` (`size` bytes from `data`) into the client's
    /// content store `store`.
    fn content_write(
        &self,
        store: &str,
        digest: &str,
        size: u64,
        data: FileData,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = (digest, size, data);
        let store = store.to_string();
        async move { Err(no_store(&store)) }
    }
}

pub(crate) fn no_store(store: &str) -> Error {
    Error::Cache {
        reference: store.to_string(),
        reason: "the build has no client session to write it to".into(),
    }
}

impl ClientSink for kiln_session::SessionClient {
    async fn send_file(&self, exporter_id: u32, data: FileData) -> Result<(), Error> {
        kiln_session::SessionClient::send_file(self, exporter_id, data)
            .await
            .map_err(|source| Error::Session {
                op: "send file",
                source: Box::new(source),
            })
    }
    async fn send_dir(&self, exporter_id: u32, dir: &Path) -> Result<(), Error> {
        kiln_session::SessionClient::send_dir(self, exporter_id, dir)
            .await
            .map_err(|source| Error::Session {
                op: "send directory",
                source: Box::new(source),
            })
    }
    async fn content_size(&self, store: &str, digest: &str) -> Result<Option<u64>, Error> {
        kiln_session::SessionClient::content_size(self, store, digest)
            .await
            .map_err(|source| Error::Session {
                op: "look up a blob in the client's cache directory",
                source: Box::new(source),
            })
    }
    async fn content_read(&self, store: &str, digest: &str, limit: u64) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        kiln_session::SessionClient::content_read(self, store, digest, limit, |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .await
        .map_err(|source| Error::Session {
            op: "read a blob from the client's cache directory",
            source: Box::new(source),
        })?;
        Ok(out)
    }
    async fn content_write(
        &self,
        store: &str,
        digest: &str,
        size: u64,
        data: FileData,
    ) -> Result<(), Error> {
        kiln_session::SessionClient::content_write(self, store, digest, size, data)
            .await
            .map(|_| ())
            .map_err(|source| Error::Session {
                op: "write a blob into the client's cache directory",
                source: Box::new(source),
            })
    }
    async fn credentials(&self, host: &str) -> Option<(String, String)> {
        match kiln_session::SessionClient::credentials(self, host).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    host,
                    "asking the client for credentials: {}",
                    kiln_proto::status::chain(&e)
                );
                None
            }
        }
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
    /// A multi-platform result, in the frontend's order; when non-empty `reference` and
    /// `image_config` are unused.
    pub platforms: Vec<PlatformRef>,
    /// The build's cache records (`cache/registry` exports).
    pub cache: Vec<cache::CacheNode>,
    /// Cache mounts written with them: (id, worker ref of a snapshot of it).
    pub cache_mounts: Vec<(String, String)>,
    /// The result is an imported one no worker holds: its layers, in a
    /// registry repository (an image push mounts or copies them from there).
    pub remote: Option<RemoteLayers>,
}

/// Layers of a result that live in a registry, not on the worker.
#[derive(Clone, Debug, Default)]
pub struct RemoteLayers {
    /// the repository holding them
    pub repository: String,
    /// bottom first, each with its diffID (`containerd.io/uncompressed`)
    pub layers: Vec<kiln_oci::Descriptor>,
}

/// One platform of a multi-platform result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformRef {
    /// `os/arch[/variant]`, e.g. "linux/arm64".
    pub id: String,
    /// The worker ref of its result; empty = scratch.
    pub reference: String,
    /// Its image config JSON.
    pub image_config: Vec<u8>,
}

impl PlatformRef {
    /// The directory name of this platform in local and tar outputs (`linux_arm64`), as
    /// BuildKit names them.
    pub fn dir_name(&self) -> String {
        self.id.replace('/', "_")
    }
}

/// A resolved image config.
#[derive(Clone, Debug)]
pub struct ResolvedConfig {
    /// Canonical reference, e.g. docker.io/library/busybox:latest
    pub reference: String,
    /// What the reference resolved to: a multi-platform image's index, else
    /// its manifest.
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
        let registry = kiln_registry::Client::new(config.registry.clone()).map_err(|source| {
            Error::RegistryClient {
                source: Box::new(source),
            }
        })?;
        Ok(Exporter { config, registry })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &kiln_registry::Client {
        &self.registry
    }

    /// The registry client, with `credentials` (the client's) for `r`'s
    /// registry when given.
    pub(crate) fn registry_as(
        &self,
        r: &Reference,
        credentials: Option<(String, String)>,
    ) -> kiln_registry::Client {
        match credentials {
            Some(c) => {
                let host = r.registry.clone();
                self.registry
                    .clone()
                    .with_credentials(std::sync::Arc::new(move |h: &str| {
                        (h == host).then(|| c.clone())
                    }))
            }
            None => self.registry.clone(),
        }
    }

    /// Resolve `reference` for `platform` (default: this host's) to its digest
    /// (an index's, for a multi-platform image) and the platform's config.
    pub async fn resolve_image_config(
        &self,
        reference: &str,
        platform: Option<Platform>,
    ) -> Result<ResolvedConfig, Error> {
        self.resolve_image_config_as(reference, platform, None)
            .await
    }

    /// As [`Exporter::resolve_image_config`], authenticating with `credentials`
    /// (the client's, for the reference's registry) when given.
    pub async fn resolve_image_config_as(
        &self,
        reference: &str,
        platform: Option<Platform>,
        credentials: Option<(String, String)>,
    ) -> Result<ResolvedConfig, Error> {
        let r = Reference::parse(reference).map_err(|source| Error::ParseReference {
            reference: reference.to_string(),
            source: Box::new(source),
        })?;
        let platform = platform.unwrap_or_else(host_platform);
        let registry = self.registry_as(&r, credentials);
        let resolved =
            registry
                .resolve(&r, &platform)
                .await
                .map_err(|source| Error::ResolveImage {
                    reference: r.to_string(),
                    source: Box::new(source),
                })?;
        let mut canonical = r.clone();
        canonical.digest = None;
        if canonical.tag.is_none() {
            canonical.digest = r.digest.clone();
        }
        Ok(ResolvedConfig {
            reference: canonical.to_string(),
            // a multi-platform image is pinned by its index, as BuildKit's
            // frontend pins it: the same LLB, the same cache keys
            digest: resolved.digest,
            config: resolved.config,
        })
    }
}

/// The platform of this host in OCI terms.
pub fn host_platform() -> Platform {
    Platform::host()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    use kiln_oci::{Descriptor, digest::sha256, media_types};

    fn fs_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "etc", std::io::empty()).expect("dir");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(6);
        b.append_data(&mut h, "etc/hello", &b"hello\n"[..])
            .expect("file");
        b.into_inner().expect("tar")
    }

    struct FakeWorker {
        fs: Vec<u8>,
        blob: Vec<u8>,
        layer: LayerBlob,
    }

    impl FakeWorker {
        fn new() -> Self {
            let fs = fs_tar();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&fs).expect("gzip");
            let blob = gz.finish().expect("gzip");
            let layer = LayerBlob {
                descriptor: Descriptor {
                    media_type: media_types::OCI_LAYER_GZIP.into(),
                    digest: sha256(&blob),
                    size: blob.len() as u64,
                    ..Default::default()
                },
                diff_id: sha256(&fs),
            };
            FakeWorker { fs, blob, layer }
        }
    }

    fn one_chunk_stream(data: Vec<u8>) -> ByteStream {
        Box::pin(futures::stream::iter(vec![Ok(Bytes::from(data))]))
    }

    impl WorkerFs for FakeWorker {
        async fn layers(
            &self,
            reference: &str,
            _options: &kiln_oci::LayerOptions,
        ) -> Result<Vec<LayerBlob>, Error> {
            assert_eq!(reference, "ref1");
            Ok(vec![self.layer.clone()])
        }
        async fn read_blob(&self, digest: &str) -> Result<ByteStream, Error> {
            assert_eq!(digest, self.layer.descriptor.digest);
            Ok(one_chunk_stream(self.blob.clone()))
        }
        async fn export_fs(&self, _reference: &str) -> Result<ByteStream, Error> {
            Ok(one_chunk_stream(self.fs.clone()))
        }
    }

    #[derive(Default)]
    struct FakeSink {
        files: Mutex<Vec<(u32, Vec<u8>)>>,
        dirs: Mutex<Vec<(u32, Vec<String>)>>,
    }

    impl ClientSink for FakeSink {
        async fn send_file(&self, exporter_id: u32, mut file: FileData) -> Result<(), Error> {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf).await.expect("read");
            self.files.lock().expect("lock").push((exporter_id, buf));
            Ok(())
        }
        async fn send_dir(&self, exporter_id: u32, dir: &Path) -> Result<(), Error> {
            let mut names: Vec<String> = walkdir_names(dir);
            names.sort();
            let content = std::fs::read_to_string(dir.join("etc/hello")).expect("hello");
            names.push(content);
            self.dirs.lock().expect("lock").push((exporter_id, names));
            Ok(())
        }
    }

    fn walkdir_names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("ls") {
            let p = e.expect("entry").path();
            out.push(p.strip_prefix(dir).expect("prefix").display().to_string());
            if p.is_dir() {
                for c in walkdir_names(&p) {
                    out.push(format!(
                        "{}/{c}",
                        p.file_name().expect("name").to_string_lossy()
                    ));
                }
            }
        }
        out
    }

    fn exporter(work: &Path, registry: RegistryConfig) -> Exporter {
        Exporter::new(Config {
            registry,
            broker: String::new(),
            work_dir: work.join("work"),
        })
        .expect("exporter")
    }

    fn request(kind: &str, reference: &str, attrs: &[(&str, &str)]) -> ExportRequest {
        ExportRequest {
            reference: reference.into(),
            kind: kind.into(),
            attrs: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            image_config: br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["cat","/etc/hello"]},"history":[{"created_by":"COPY hello"}]}"#.to_vec(),
            index: 2,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn oci_export_sends_a_layout_skopeo_can_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = exporter(dir.path(), RegistryConfig::default());
        let (w, sink) = (FakeWorker::new(), FakeSink::default());
        let (ptx, _prx) = mpsc::channel(64);
        let resp = ex
            .export(
                &request("oci", "ref1", &[("name", "kiln/t:v1")]),
                &w,
                &sink,
                &ptx,
            )
            .await
            .expect("export");
        let files = sink.files.lock().expect("lock").clone();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, 2);
        let tar_path = dir.path().join("out.tar");
        std::fs::write(&tar_path, &files[0].1).expect("write");
        let mut ar = tar::Archive::new(&files[0].1[..]);
        let layout = dir.path().join("layout");
        ar.unpack(&layout).expect("unpack");
        let index: kiln_oci::Index =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
                .expect("json");
        assert_eq!(index.manifests[0].digest, resp["containerimage.digest"]);
        let ann = index.manifests[0].annotations.clone().expect("annotations");
        assert_eq!(
            ann[kiln_oci::ANNOTATION_CONTAINERD_IMAGE_NAME],
            "docker.io/kiln/t:v1"
        );
        assert_eq!(ann[kiln_oci::ANNOTATION_REF_NAME], "v1");
        let cfg_digest = &resp["containerimage.config.digest"];
        let cfg: kiln_oci::ImageConfig = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(&cfg_digest[7..])).expect("config"),
        )
        .expect("config json");
        assert_eq!(cfg.rootfs.diff_ids, vec![w.layer.diff_id.clone()]);
        assert!(
            !dir.path()
                .join("work")
                .read_dir()
                .expect("ls")
                .any(|_| true),
            "temp dir removed"
        );

        if Path::new("/usr/bin/skopeo").exists() {
            let o = std::process::Command::new("/usr/bin/skopeo")
                .arg("inspect")
                .arg(format!("oci-archive:{}", tar_path.display()))
                .output()
                .expect("skopeo");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
            assert_eq!(v["Digest"], resp["containerimage.digest"].as_str());
        }
    }

    #[tokio::test]
    async fn local_and_tar_exports_send_the_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = exporter(dir.path(), RegistryConfig::default());
        let (w, sink) = (FakeWorker::new(), FakeSink::default());
        let (ptx, _prx) = mpsc::channel(64);
        ex.export(&request("local", "ref1", &[]), &w, &sink, &ptx)
            .await
            .expect("local");
        assert_eq!(
            sink.dirs.lock().expect("lock").clone(),
            vec![(
                2,
                vec![
                    "etc".to_string(),
                    "etc/hello".to_string(),
                    "hello\n".to_string()
                ]
            )]
        );
        ex.export(&request("tar", "ref1", &[]), &w, &sink, &ptx)
            .await
            .expect("tar");
        ex.export(&request("tar", "", &[]), &w, &sink, &ptx)
            .await
            .expect("scratch tar");
        let files = sink.files.lock().expect("lock").clone();
        assert_eq!(files[0].1, w.fs);
        assert_eq!(files[1].1, vec![0u8; 1024]);
        let err = ex
            .export(&request("zip", "ref1", &[]), &w, &sink, &ptx)
            .await
            .expect_err("unknown");
        assert!(matches!(err, Error::UnknownExporter { .. }));
    }

    #[tokio::test]
    async fn image_export_pushes_to_a_registry() {
        let Some(registry) = kiln_registry::local_registry::LocalRegistry::start().await else {
            return;
        };
        let addr = &registry.addr;
        let dir = tempfile::tempdir().expect("tempdir");
        let ex = exporter(dir.path(), RegistryConfig::default());
        let (w, sink) = (FakeWorker::new(), FakeSink::default());
        let (ptx, _prx) = mpsc::channel(64);
        let names = format!("{addr}/kiln/app:v1,{addr}/kiln/app:v2");
        let result = ex
            .export(
                &request(
                    "image",
                    "ref1",
                    &[
                        ("name", &names),
                        ("push", "true"),
                        ("oci-mediatypes", "false"),
                    ],
                ),
                &w,
                &sink,
                &ptx,
            )
            .await;
        let resolved = match &result {
            Ok(_) => {
                ex.resolve_image_config(&format!("{addr}/kiln/app:v2"), None)
                    .await
            }
            Err(_) => Err(Error::UnknownExporter {
                kind: String::new(),
            }),
        };
        let resp = result.expect("export image");
        assert_eq!(resp["image.name"], names);
        let resolved = resolved.expect("resolve pushed image");
        assert_eq!(resolved.digest, resp["containerimage.digest"]);
        assert_eq!(resolved.reference, format!("{addr}/kiln/app:v2"));
        let cfg: kiln_oci::ImageConfig = serde_json::from_slice(&resolved.config).expect("config");
        assert_eq!(cfg.rootfs.diff_ids, vec![w.layer.diff_id.clone()]);
        assert_eq!(
            cfg.config.cmd,
            Some(vec!["cat".to_string(), "/etc/hello".to_string()])
        );
        assert!(sink.files.lock().expect("lock").is_empty());
    }
}
