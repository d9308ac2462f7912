//! Image assembly: layers from the worker + the frontend's config -> config and manifest
//! blobs; pushing the result to registries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures::StreamExt;
use kiln_oci::{Descriptor, History, ImageConfig, Manifest, Platform, RootFs, digest, media_types};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::{Error, ExportRequest, WorkerFs, bool_attr, host_platform};

/// A layer blob as the worker describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlob {
    pub descriptor: Descriptor,
    /// Digest of the uncompressed layer tar.
    pub diff_id: String,
}

/// Which family of media types the image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MediaTypes {
    #[default]
    Oci,
    Docker,
}

impl MediaTypes {
    fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => media_types::OCI_MANIFEST,
            MediaTypes::Docker => media_types::DOCKER_MANIFEST,
        }
    }
    fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => media_types::OCI_CONFIG,
            MediaTypes::Docker => media_types::DOCKER_CONFIG,
        }
    }
    fn layer(self, given: &str) -> String {
        let gzip = given.ends_with("gzip");
        match (self, gzip) {
            (MediaTypes::Oci, true) => media_types::OCI_LAYER_GZIP.into(),
            (MediaTypes::Oci, false) if given == media_types::DOCKER_LAYER => {
                media_types::OCI_LAYER.into()
            }
            (MediaTypes::Docker, true) => media_types::DOCKER_LAYER_GZIP.into(),
            (MediaTypes::Docker, false) if given == media_types::OCI_LAYER => {
                media_types::DOCKER_LAYER.into()
            }
            _ => given.to_string(),
        }
    }
}

/// An assembled image whose blobs are files in `blob_dir` (named by digest hex).
#[derive(Clone, Debug)]
pub struct AssembledImage {
    pub layers: Vec<Descriptor>,
    pub config: Vec<u8>,
    pub config_desc: Descriptor,
    pub manifest: Vec<u8>,
    /// The manifest's descriptor, with the image platform.
    pub manifest_desc: Descriptor,
    pub blob_dir: PathBuf,
}

impl AssembledImage {
    /// Path of a blob file in `blob_dir`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.blob_dir.join(digest.trim_start_matches("sha256:"))
    }

    /// The exporter response keys every image exporter returns.
    pub fn response(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::new();
        r.insert(
            "containerimage.digest".into(),
            self.manifest_desc.digest.clone(),
        );
        r.insert(
            "containerimage.config.digest".into(),
            self.config_desc.digest.clone(),
        );
        let desc = Descriptor {
            platform: None,
            ..self.manifest_desc.clone()
        };
        if let Ok(json) = serde_json::to_vec(&desc) {
            r.insert(
                "containerimage.descriptor".into(),
                base64::engine::general_purpose::STANDARD.encode(json),
            );
        }
        r
    }
}

/// Build the config and manifest for `layers` (in order, bottom first) from the frontend's
/// config JSON (empty = a default config for this host's platform). The config's
/// `rootfs.diff_ids` become the layers' diff ids; history gets an entry per unaccounted layer.
pub fn assemble_image(
    image_config: &[u8],
    layers: &[LayerBlob],
    media: MediaTypes,
    blob_dir: &Path,
) -> Result<AssembledImage, Error> {
    let mut cfg: ImageConfig = if image_config.is_empty() {
        let p = host_platform();
        ImageConfig {
            architecture: p.architecture,
            os: p.os,
            ..Default::default()
        }
    } else {
        serde_json::from_slice(image_config)
            .map_err(|source| Error::DecodeImageConfig { source })?
    };
    cfg.rootfs = RootFs {
        type_: "layers".to_string(),
        diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    let non_empty = cfg
        .history
        .iter()
        .filter(|h| h.empty_layer != Some(true))
        .count();
    for _ in non_empty..layers.len() {
        cfg.history.push(History {
            created: cfg.created.clone(),
            created_by: Some("kiln export".to_string()),
            comment: Some("layer without history".to_string()),
            ..Default::default()
        });
    }
    let config = serde_json::to_vec(&cfg).map_err(|source| Error::EncodeJson {
        what: "image config",
        source,
    })?;
    let config_desc = Descriptor {
        media_type: media.config().to_string(),
        digest: digest::sha256(&config),
        size: config.len() as u64,
        ..Default::default()
    };
    let layer_descs: Vec<Descriptor> = layers
        .iter()
        .map(|l| Descriptor {
            media_type: media.layer(&l.descriptor.media_type),
            ..l.descriptor.clone()
        })
        .collect();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media.manifest().to_string()),
        config: config_desc.clone(),
        layers: layer_descs.clone(),
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| Error::EncodeJson {
        what: "image manifest",
        source,
    })?;
    let platform = Platform {
        architecture: cfg.architecture.clone(),
        os: cfg.os.clone(),
        variant: cfg.variant.clone(),
        ..Default::default()
    };
    let manifest_desc = Descriptor {
        media_type: media.manifest().to_string(),
        digest: digest::sha256(&manifest_bytes),
        size: manifest_bytes.len() as u64,
        platform: Some(platform),
        ..Default::default()
    };
    Ok(AssembledImage {
        layers: layer_descs,
        config,
        config_desc,
        manifest: manifest_bytes,
        manifest_desc,
        blob_dir: blob_dir.to_path_buf(),
    })
}

/// Fetch the ref's layers from the worker into `tmp/blobs` and assemble the image.
pub(crate) async fn build(
    req: &ExportRequest,
    worker: &impl WorkerFs,
    tmp: &Path,
    progress: &mpsc::Sender<String>,
) -> Result<AssembledImage, Error> {
    let media = match req.attrs.get("oci-mediatypes") {
        None => MediaTypes::Oci,
        Some(_) if bool_attr(&req.attrs, "oci-mediatypes", true) => MediaTypes::Oci,
        Some(_) => MediaTypes::Docker,
    };
    let compression = req
        .attrs
        .get("compression")
        .map(String::as_str)
        .unwrap_or("gzip");
    let layers = if req.reference.is_empty() {
        Vec::new()
    } else {
        worker.layers(&req.reference, compression).await?
    };
    let blob_dir = tmp.join("blobs");
    tokio::fs::create_dir_all(&blob_dir)
        .await
        .map_err(|source| Error::Io {
            op: "create blob dir",
            path: blob_dir.clone(),
            source,
        })?;
    for (i, layer) in layers.iter().enumerate() {
        let _ = progress.try_send(format!(
            "fetching layer {}/{} {}",
            i + 1,
            layers.len(),
            layer.descriptor.digest
        ));
        fetch_layer(worker, &layer.descriptor, &blob_dir).await?;
    }
    let image = assemble_image(&req.image_config, &layers, media, &blob_dir)?;
    let config_path = image.blob_path(&image.config_desc.digest);
    tokio::fs::write(&config_path, &image.config)
        .await
        .map_err(|source| Error::Io {
            op: "write config blob",
            path: config_path,
            source,
        })?;
    Ok(image)
}

async fn fetch_layer(
    worker: &impl WorkerFs,
    desc: &Descriptor,
    blob_dir: &Path,
) -> Result<(), Error> {
    let path = blob_dir.join(desc.digest.trim_start_matches("sha256:"));
    let werr = |source| Error::Io {
        op: "write layer blob",
        path: path.clone(),
        source,
    };
    let mut stream = worker.read_blob(&desc.digest).await?;
    let mut file = tokio::fs::File::create(&path).await.map_err(werr)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(werr)?;
    }
    file.flush().await.map_err(werr)?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != desc.digest || size != desc.size {
        return Err(Error::LayerMismatch {
            digest: desc.digest.clone(),
            actual,
            size,
            expected_size: desc.size,
        });
    }
    Ok(())
}

/// Push the image's blobs (existing ones skipped) and manifest to `name`.
pub(crate) async fn push(
    registry: &kiln_registry::Client,
    name: &str,
    image: &AssembledImage,
) -> Result<(), Error> {
    let r = kiln_registry::Reference::parse(name).map_err(|source| Error::ParseReference {
        reference: name.to_string(),
        source: Box::new(source),
    })?;
    for desc in image
        .layers
        .iter()
        .chain(std::iter::once(&image.config_desc))
    {
        registry
            .push_blob(&r, desc, &image.blob_path(&desc.digest))
            .await
            .map_err(|source| Error::PushBlob {
                reference: r.to_string(),
                digest: desc.digest.clone(),
                source: Box::new(source),
            })?;
    }
    registry
        .push_manifest(&r, &image.manifest_desc.media_type, image.manifest.clone())
        .await
        .map_err(|source| Error::PushManifest {
            reference: r.to_string(),
            source: Box::new(source),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerBlob {
        LayerBlob {
            descriptor: Descriptor {
                media_type: media_types::OCI_LAYER_GZIP.into(),
                digest: digest::sha256(&[n]),
                size: 10 + u64::from(n),
                ..Default::default()
            },
            diff_id: digest::sha256(&[n, n]),
        }
    }

    const FRONTEND_CONFIG: &str = r#"{"created":"2000-01-01T00:00:00Z","architecture":"arm64","os":"linux","variant":"v8",
        "config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:stale"]},
        "history":[{"created_by":"base"},{"created_by":"ENV x","empty_layer":true},{"created_by":"RUN y"}]}"#;

    #[test]
    fn assembled_digests_are_consistent_and_diff_ids_filled() {
        let layers = [layer(1), layer(2)];
        let img = assemble_image(
            FRONTEND_CONFIG.as_bytes(),
            &layers,
            MediaTypes::Oci,
            Path::new("/b"),
        )
        .expect("assemble");
        let cfg: ImageConfig = serde_json::from_slice(&img.config).expect("config");
        assert_eq!(
            cfg.rootfs.diff_ids,
            vec![layers[0].diff_id.clone(), layers[1].diff_id.clone()]
        );
        assert_eq!(cfg.history.len(), 3, "history already covers both layers");
        assert_eq!(cfg.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(img.config_desc.digest, digest::sha256(&img.config));
        assert_eq!(img.config_desc.size, img.config.len() as u64);
        assert_eq!(img.config_desc.media_type, media_types::OCI_CONFIG);
        let m: Manifest = serde_json::from_slice(&img.manifest).expect("manifest");
        assert_eq!(m.config, img.config_desc);
        assert_eq!(
            m.layers,
            vec![layers[0].descriptor.clone(), layers[1].descriptor.clone()]
        );
        assert_eq!(img.manifest_desc.digest, digest::sha256(&img.manifest));
        assert_eq!(
            img.manifest_desc.platform,
            Some(Platform::new("linux", "arm64", Some("v8")))
        );
        assert_eq!(
            img.blob_path(&m.layers[0].digest),
            Path::new("/b").join(&m.layers[0].digest[7..])
        );

        let resp = img.response();
        assert_eq!(resp["containerimage.digest"], img.manifest_desc.digest);
        assert_eq!(resp["containerimage.config.digest"], img.config_desc.digest);
        let desc = base64::engine::general_purpose::STANDARD
            .decode(&resp["containerimage.descriptor"])
            .expect("base64");
        let desc: Descriptor = serde_json::from_slice(&desc).expect("descriptor json");
        assert_eq!(desc.digest, img.manifest_desc.digest);
        assert_eq!(desc.media_type, media_types::OCI_MANIFEST);
    }

    #[test]
    fn docker_media_types_and_scratch() {
        let img = assemble_image(
            FRONTEND_CONFIG.as_bytes(),
            &[layer(1)],
            MediaTypes::Docker,
            Path::new("/b"),
        )
        .expect("assemble");
        let m: serde_json::Value = serde_json::from_slice(&img.manifest).expect("manifest");
        assert_eq!(m["mediaType"], media_types::DOCKER_MANIFEST);
        assert_eq!(m["config"]["mediaType"], media_types::DOCKER_CONFIG);
        assert_eq!(m["layers"][0]["mediaType"], media_types::DOCKER_LAYER_GZIP);

        let scratch = assemble_image(b"", &[], MediaTypes::Oci, Path::new("/b")).expect("scratch");
        let cfg: serde_json::Value = serde_json::from_slice(&scratch.config).expect("config");
        assert_eq!(
            cfg["rootfs"],
            serde_json::json!({"type": "layers", "diff_ids": []})
        );
        assert_eq!(cfg["os"], "linux");
        let m: Manifest = serde_json::from_slice(&scratch.manifest).expect("manifest");
        assert!(m.layers.is_empty());
    }

    #[test]
    fn missing_history_is_padded() {
        let img = assemble_image(
            b"{\"os\":\"linux\",\"architecture\":\"amd64\"}",
            &[layer(1), layer(2)],
            MediaTypes::Oci,
            Path::new("/b"),
        )
        .expect("assemble");
        let cfg: ImageConfig = serde_json::from_slice(&img.config).expect("config");
        assert_eq!(cfg.history.len(), 2);
        assert!(matches!(
            assemble_image(b"{not json", &[], MediaTypes::Oci, Path::new("/b")),
            Err(Error::DecodeImageConfig { .. })
        ));
    }
}
