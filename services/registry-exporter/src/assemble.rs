//! Image assembly, shared by the `image`, `oci` and `docker` exporters: the layers of a
//! worker ref plus the frontend's image config become config and manifest blobs (and, for a
//! multi-platform result, an index). Pushing and archiving live with their exporters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures::StreamExt;
use kiln_oci::{
    Descriptor, History, ImageConfig, LayerOptions, Manifest, Platform, RootFs, digest, media_types,
};
use tokio::io::AsyncWriteExt;

use crate::{Error, ExportRequest, WorkerFs, host_platform};
use kiln_oci::bool_attr;

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
    pub(crate) fn layer(self, given: &str) -> String {
        if given.ends_with("zstd") {
            return media_types::OCI_LAYER_ZSTD.into();
        }
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

/// User annotations of an image export, from BuildKit's exporter attrs:
/// `annotation.K=V` and `annotation-manifest.K=V` (on the image manifest),
/// `annotation-manifest-descriptor.K=V` (on the manifest's descriptor in an
/// index), `annotation-index.K=V` and `annotation-index-descriptor.K=V` (on a
/// multi-platform index and its descriptor). A manifest key may name one
/// platform: `annotation-manifest[linux/arm64].K=V`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Annotations {
    /// (platform or none for all, key, value)
    pub manifest: Vec<(Option<String>, String, String)>,
    pub manifest_descriptor: Vec<(Option<String>, String, String)>,
    pub index: BTreeMap<String, String>,
    pub index_descriptor: BTreeMap<String, String>,
}

impl Annotations {
    pub fn from_attrs(attrs: &BTreeMap<String, String>) -> Result<Annotations, Error> {
        let mut a = Annotations::default();
        for (k, v) in attrs {
            let Some(rest) = k.strip_prefix("annotation") else {
                continue;
            };
            let invalid = || Error::InvalidAttr {
                key: k.clone(),
                value: v.clone(),
            };
            let (kind, key) = match rest.split_once('.') {
                Some((kind, key)) if !key.is_empty() => (kind, key.to_string()),
                _ => return Err(invalid()),
            };
            let (kind, platform) = match kind.split_once('[') {
                Some((kind, p)) => {
                    let p = p
                        .strip_suffix(']')
                        .filter(|p| !p.is_empty())
                        .ok_or_else(invalid)?;
                    (kind, Some(p.to_string()))
                }
                None => (kind, None),
            };
            match (kind, platform) {
                ("" | "-manifest", p) => a.manifest.push((p, key, v.clone())),
                ("-manifest-descriptor", p) => a.manifest_descriptor.push((p, key, v.clone())),
                ("-index", None) => {
                    a.index.insert(key, v.clone());
                }
                ("-index-descriptor", None) => {
                    a.index_descriptor.insert(key, v.clone());
                }
                _ => return Err(invalid()),
            }
        }
        Ok(a)
    }

    fn for_platform(
        list: &[(Option<String>, String, String)],
        platform: &str,
    ) -> Option<BTreeMap<String, String>> {
        let m: BTreeMap<String, String> = list
            .iter()
            .filter(|(p, _, _)| p.as_deref().is_none_or(|p| p == platform))
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        (!m.is_empty()).then_some(m)
    }

    /// Puts the manifest annotations into `image`'s manifest (re-encoding it,
    /// so its digest changes) and the descriptor annotations on its descriptor.
    pub fn apply_to_image(&self, image: &mut AssembledImage) -> Result<(), Error> {
        let platform = image
            .manifest_desc
            .platform
            .as_ref()
            .map(|p| match p.variant.as_deref().filter(|v| !v.is_empty()) {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            })
            .unwrap_or_default();
        if let Some(m) = Self::for_platform(&self.manifest, &platform) {
            let mut manifest: Manifest =
                serde_json::from_slice(&image.manifest).map_err(|source| Error::EncodeJson {
                    what: "image manifest",
                    source,
                })?;
            manifest.annotations.get_or_insert_default().extend(m);
            image.manifest = serde_json::to_vec(&manifest).map_err(|source| Error::EncodeJson {
                what: "image manifest",
                source,
            })?;
            image.manifest_desc.digest = digest::sha256(&image.manifest);
            image.manifest_desc.size = image.manifest.len() as u64;
        }
        if let Some(d) = Self::for_platform(&self.manifest_descriptor, &platform) {
            image
                .manifest_desc
                .annotations
                .get_or_insert_default()
                .extend(d);
        }
        Ok(())
    }

    /// Puts the index annotations into `index` (re-encoding it) and on its descriptor.
    pub fn apply_to_index(&self, index: &mut AssembledIndex) -> Result<(), Error> {
        let encode_err = |source| Error::EncodeJson {
            what: "image index",
            source,
        };
        if !self.index.is_empty() {
            let mut i: kiln_oci::Index =
                serde_json::from_slice(&index.index).map_err(encode_err)?;
            i.annotations
                .get_or_insert_default()
                .extend(self.index.clone());
            index.index = serde_json::to_vec(&i).map_err(encode_err)?;
            index.desc.digest = digest::sha256(&index.index);
            index.desc.size = index.index.len() as u64;
        }
        if !self.index_descriptor.is_empty() {
            index
                .desc
                .annotations
                .get_or_insert_default()
                .extend(self.index_descriptor.clone());
        }
        Ok(())
    }
}

/// The layer options of an image/oci/docker export from its attrs
/// ([`LayerOptions::from_export_attrs`]).
pub fn layer_options(attrs: &BTreeMap<String, String>) -> Result<LayerOptions, Error> {
    LayerOptions::from_export_attrs(attrs).map_err(|key| invalid_attr(attrs, &key))
}

/// `SOURCE_DATE_EPOCH` for this export: the exporter attr `source-date-epoch`, else the
/// frontend's `build-arg:SOURCE_DATE_EPOCH` when the solver forwards it.
pub fn source_date_epoch(attrs: &BTreeMap<String, String>) -> Result<Option<u64>, Error> {
    kiln_oci::source_date_epoch(attrs).map_err(|key| invalid_attr(attrs, &key))
}

fn invalid_attr(attrs: &BTreeMap<String, String>, key: &str) -> Error {
    Error::InvalidAttr {
        key: key.to_string(),
        value: attrs.get(key).cloned().unwrap_or_default(),
    }
}

/// Marks as `empty_layer` the history entries whose snapshot had an empty
/// diff, as BuildKit's exporter does: `empty[i]` is the i-th snapshot of the
/// chain, paired in order with the history entries that claim a layer. When
/// the two do not line up the history is left as it is.
pub fn mark_empty_layers(image_config: &[u8], empty: &[bool]) -> Result<Vec<u8>, Error> {
    if !empty.iter().any(|e| *e) || image_config.is_empty() {
        return Ok(image_config.to_vec());
    }
    let mut v: serde_json::Value = serde_json::from_slice(image_config)
        .map_err(|source| Error::DecodeImageConfig { source })?;
    if let Some(h) = v.get_mut("history").and_then(|h| h.as_array_mut()) {
        let claims: Vec<usize> = h
            .iter()
            .enumerate()
            .filter(|(_, e)| e.get("empty_layer").and_then(|x| x.as_bool()) != Some(true))
            .map(|(i, _)| i)
            .collect();
        if claims.len() == empty.len() {
            for (i, is_empty) in claims.into_iter().zip(empty) {
                if *is_empty && let Some(o) = h[i].as_object_mut() {
                    o.insert("empty_layer".into(), serde_json::Value::Bool(true));
                }
            }
        }
    }
    serde_json::to_vec(&v).map_err(|source| Error::EncodeJson {
        what: "image config",
        source,
    })
}

fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The image config JSON with `created` and the history entries that have no
/// `created` yet (the steps of this build) set to `now`, as BuildKit does
/// without SOURCE_DATE_EPOCH; entries of the base image keep theirs.
pub fn with_build_time(image_config: &[u8], now: u64) -> Result<Vec<u8>, Error> {
    if image_config.is_empty() {
        return with_epoch(image_config, now);
    }
    let mut v: serde_json::Value = serde_json::from_slice(image_config)
        .map_err(|source| Error::DecodeImageConfig { source })?;
    let ts = serde_json::Value::String(rfc3339(now));
    if let Some(obj) = v.as_object_mut() {
        // a frontend that chose a time (SOURCE_DATE_EPOCH) keeps it
        obj.entry("created").or_insert_with(|| ts.clone());
        if let Some(h) = obj.get_mut("history").and_then(|h| h.as_array_mut()) {
            for entry in h.iter_mut().filter_map(|e| e.as_object_mut()) {
                entry.entry("created").or_insert_with(|| ts.clone());
            }
        }
    }
    serde_json::to_vec(&v).map_err(|source| Error::EncodeJson {
        what: "image config",
        source,
    })
}

/// The image config JSON with `created` and every history entry's `created` set to `epoch`
/// (RFC 3339, UTC). An empty config becomes this host's default config.
pub fn with_epoch(image_config: &[u8], epoch: u64) -> Result<Vec<u8>, Error> {
    let mut v: serde_json::Value = if image_config.is_empty() {
        let p = host_platform();
        serde_json::json!({"architecture": p.architecture, "os": p.os})
    } else {
        serde_json::from_slice(image_config)
            .map_err(|source| Error::DecodeImageConfig { source })?
    };
    let ts = serde_json::Value::String(rfc3339(epoch));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("created".into(), ts.clone());
        if let Some(h) = obj.get_mut("history").and_then(|h| h.as_array_mut()) {
            for entry in h.iter_mut().filter_map(|e| e.as_object_mut()) {
                entry.insert("created".into(), ts.clone());
            }
        }
    }
    serde_json::to_vec(&v).map_err(|source| Error::EncodeJson {
        what: "image config",
        source,
    })
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(epoch: u64) -> String {
    kiln_oci::rfc3339(i64::try_from(epoch).unwrap_or(i64::MAX))
}

/// The media types an export uses (`oci-mediatypes`, default true).
pub(crate) fn media_types_of(attrs: &BTreeMap<String, String>) -> MediaTypes {
    if bool_attr(attrs, "oci-mediatypes", true) {
        MediaTypes::Oci
    } else {
        MediaTypes::Docker
    }
}

/// `image_config` with an inline build cache (`moby.buildkit.cache.v0`).
fn with_inline_cache(image_config: &[u8], inline: &str) -> Result<Vec<u8>, Error> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(image_config)
        .map_err(|source| Error::DecodeImageConfig { source })?;
    v.insert(
        kiln_oci::cache_config::INLINE_CACHE_KEY.to_string(),
        serde_json::Value::String(inline.to_string()),
    );
    serde_json::to_vec(&v).map_err(|source| Error::EncodeJson {
        what: "image config",
        source,
    })
}

/// The images of a multi-platform result and the index listing them.
#[derive(Clone, Debug)]
pub struct AssembledIndex {
    pub images: Vec<AssembledImage>,
    /// The index JSON (OCI image index or Docker manifest list).
    pub index: Vec<u8>,
    pub desc: Descriptor,
}

impl AssembledIndex {
    /// The exporter response: the index's digest and descriptor.
    pub fn response(&self) -> BTreeMap<String, String> {
        let mut r = BTreeMap::new();
        r.insert("containerimage.digest".into(), self.desc.digest.clone());
        if let Ok(json) = serde_json::to_vec(&self.desc) {
            r.insert(
                "containerimage.descriptor".into(),
                base64::engine::general_purpose::STANDARD.encode(json),
            );
        }
        r
    }
}

/// An index with one entry per image, each carrying its platform.
pub fn assemble_index(
    images: Vec<AssembledImage>,
    media: MediaTypes,
) -> Result<AssembledIndex, Error> {
    let media_type = match media {
        MediaTypes::Oci => media_types::OCI_INDEX,
        MediaTypes::Docker => media_types::DOCKER_MANIFEST_LIST,
    };
    let index = kiln_oci::Index {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        manifests: images.iter().map(|i| i.manifest_desc.clone()).collect(),
        annotations: None,
    };
    let bytes = serde_json::to_vec(&index).map_err(|source| Error::EncodeJson {
        what: "image index",
        source,
    })?;
    let desc = Descriptor {
        media_type: media_type.to_string(),
        digest: digest::sha256(&bytes),
        size: bytes.len() as u64,
        ..Default::default()
    };
    Ok(AssembledIndex {
        images,
        index: bytes,
        desc,
    })
}

/// Assemble the image of the request's ref. Its layers stay on the worker: tarballs
/// stream them from there, and a push copies each while the ones before it upload.
pub(crate) async fn build(
    req: &ExportRequest,
    worker: &impl WorkerFs,
    tmp: &Path,
) -> Result<AssembledImage, Error> {
    let media = media_types_of(&req.attrs);
    let options = layer_options(&req.attrs)?;
    let epoch = source_date_epoch(&req.attrs)?;
    let chain = match &req.remote {
        // an imported result: its layers stay in the registry (the push mounts
        // or copies them from there)
        Some(remote) => remote
            .layers
            .iter()
            .map(|d| LayerBlob {
                descriptor: Descriptor {
                    media_type: d.media_type.clone(),
                    digest: d.digest.clone(),
                    size: d.size,
                    ..Default::default()
                },
                diff_id: d
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(crate::cache::UNCOMPRESSED))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect(),
        None if req.reference.is_empty() => Vec::new(),
        None => worker.layers(&req.reference, &options).await?,
    };
    // snapshots with an empty diff have no blob (an empty digest here); the
    // history entries they stand for become empty_layer
    let empty: Vec<bool> = chain
        .iter()
        .map(|l| l.descriptor.digest.is_empty())
        .collect();
    let layers: Vec<LayerBlob> = chain
        .into_iter()
        .filter(|l| !l.descriptor.digest.is_empty())
        .collect();
    let blob_dir = tmp.join("blobs");
    tokio::fs::create_dir_all(&blob_dir)
        .await
        .map_err(|source| Error::Io {
            op: "create blob dir",
            path: blob_dir.clone(),
            source,
        })?;
    let image_config = match epoch {
        Some(e) => with_epoch(&req.image_config, e)?,
        None => {
            // the solver gives every output of a build the same time
            let now = req
                .attrs
                .get("kiln.build-time")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(now_epoch);
            with_build_time(&req.image_config, now)?
        }
    };
    let image_config = mark_empty_layers(&image_config, &empty)?;
    let image_config = if req.cache.is_empty() {
        image_config
    } else {
        let blobs: Vec<String> = layers.iter().map(|l| l.descriptor.digest.clone()).collect();
        match crate::cache::inline_records(&req.cache, &blobs, worker, &options).await? {
            Some(inline) => with_inline_cache(&image_config, &inline)?,
            None => image_config,
        }
    };
    let mut image = assemble_image(&image_config, &layers, media, &blob_dir)?;
    Annotations::from_attrs(&req.attrs)?.apply_to_image(&mut image)?;
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

pub(crate) async fn fetch_layer(
    worker: &impl WorkerFs,
    desc: &Descriptor,
    blob_dir: &Path,
) -> Result<(), Error> {
    let path = blob_dir.join(desc.digest.trim_start_matches("sha256:"));
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        // another platform of this export shares the layer
        return Ok(());
    }
    let werr = |source| Error::Io {
        op: "write layer blob",
        path: path.clone(),
        source,
    };
    let mut stream = worker.read_blob(&desc.digest).await?;
    let mut file = tokio::fs::File::create(&path).await.map_err(werr)?;
    let mut hasher = kiln_oci::digest::Hasher::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(werr)?;
    }
    file.flush().await.map_err(werr)?;
    let size = hasher.size();
    let actual = hasher.finish();
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
    fn empty_snapshots_mark_their_history_entry_empty() {
        let cfg = r#"{"architecture":"amd64","os":"linux","history":[{"created_by":"base"},{"created_by":"ENV x","empty_layer":true},{"created_by":"RUN true"},{"created_by":"RUN echo > /f"}]}"#;
        let out: ImageConfig = serde_json::from_slice(
            &mark_empty_layers(cfg.as_bytes(), &[false, true, false]).expect("mark"),
        )
        .expect("json");
        let flags: Vec<Option<bool>> = out.history.iter().map(|h| h.empty_layer).collect();
        assert_eq!(flags, vec![None, Some(true), Some(true), None]);
        // misaligned history is left alone
        let same = mark_empty_layers(cfg.as_bytes(), &[true, false]).expect("mark");
        assert_eq!(
            same,
            serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(cfg).expect("json"))
                .expect("enc")
        );
    }

    #[test]
    fn build_time_fills_only_missing_created() {
        // a created time the frontend chose is kept
        let cfg = with_build_time(FRONTEND_CONFIG.as_bytes(), 1_700_000_000).expect("time");
        let cfg: ImageConfig = serde_json::from_slice(&cfg).expect("json");
        assert_eq!(cfg.created.as_deref(), Some("2000-01-01T00:00:00Z"));
        assert!(
            cfg.history
                .iter()
                .all(|h| h.created.as_deref() == Some("2023-11-14T22:13:20Z"))
        );
        let base = r#"{"architecture":"amd64","os":"linux","history":[{"created":"2000-01-01T00:00:00Z","created_by":"base"},{"created_by":"RUN x"}]}"#;
        let cfg: ImageConfig =
            serde_json::from_slice(&with_build_time(base.as_bytes(), 1_700_000_000).expect("time"))
                .expect("json");
        assert_eq!(
            cfg.created.as_deref(),
            Some("2023-11-14T22:13:20Z"),
            "a missing created is the build time"
        );
        assert_eq!(
            cfg.history[0].created.as_deref(),
            Some("2000-01-01T00:00:00Z"),
            "base history keeps its time"
        );
        assert_eq!(
            cfg.history[1].created.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }

    #[test]
    fn epoch_sets_created_and_history_and_layer_options_follow_attrs() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        let cfg = with_epoch(FRONTEND_CONFIG.as_bytes(), 1_700_000_000).expect("epoch");
        let cfg: ImageConfig = serde_json::from_slice(&cfg).expect("config");
        assert_eq!(cfg.created.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert!(
            cfg.history
                .iter()
                .all(|h| h.created.as_deref() == Some("2023-11-14T22:13:20Z"))
        );
        let attrs = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let o = layer_options(&attrs(&[
            ("compression", "zstd"),
            ("compression-level", "12"),
            ("force-compression", "true"),
            ("rewrite-timestamp", "true"),
            ("source-date-epoch", "42"),
        ]))
        .expect("options");
        assert_eq!(o.spec(), "zstd;level=12;force;epoch=42");
        assert_eq!(layer_options(&attrs(&[])).expect("default").spec(), "gzip");
        assert!(layer_options(&attrs(&[("compression", "lz4")])).is_err());
        assert!(
            layer_options(&attrs(&[
                ("compression", "gzip"),
                ("compression-level", "12")
            ]))
            .is_err()
        );
        assert_eq!(
            source_date_epoch(&attrs(&[("build-arg:SOURCE_DATE_EPOCH", "7")])).expect("epoch"),
            Some(7)
        );
        assert!(source_date_epoch(&attrs(&[("source-date-epoch", "soon")])).is_err());
    }

    #[test]
    fn annotations_from_attrs_land_on_the_manifest_its_descriptor_and_the_index() {
        let attrs: BTreeMap<String, String> = [
            ("annotation.org.opencontainers.image.title", "app"),
            ("annotation-manifest[linux/arm64].only", "arm"),
            ("annotation-manifest-descriptor.d", "desc"),
            ("annotation-index.i", "idx"),
            ("annotation-index-descriptor.id", "idx-desc"),
            ("push", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let ann = Annotations::from_attrs(&attrs).expect("parse");
        let mut img = assemble_image(
            b"{\"os\":\"linux\",\"architecture\":\"amd64\"}",
            &[layer(1)],
            MediaTypes::Oci,
            Path::new("/b"),
        )
        .expect("assemble");
        let before = img.manifest_desc.digest.clone();
        ann.apply_to_image(&mut img).expect("annotate");
        let m: serde_json::Value = serde_json::from_slice(&img.manifest).expect("manifest");
        assert_eq!(m["annotations"]["org.opencontainers.image.title"], "app");
        assert!(m["annotations"].get("only").is_none(), "arm64 only");
        assert_ne!(img.manifest_desc.digest, before);
        assert_eq!(img.manifest_desc.digest, digest::sha256(&img.manifest));
        assert_eq!(
            img.manifest_desc.annotations.as_ref().expect("desc")["d"],
            "desc"
        );
        let mut index = assemble_index(vec![img], MediaTypes::Oci).expect("index");
        ann.apply_to_index(&mut index).expect("annotate index");
        let i: serde_json::Value = serde_json::from_slice(&index.index).expect("index");
        assert_eq!(i["annotations"]["i"], "idx");
        assert_eq!(i["manifests"][0]["annotations"]["d"], "desc");
        assert_eq!(index.desc.digest, digest::sha256(&index.index));
        assert_eq!(
            index.desc.annotations.as_ref().expect("desc")["id"],
            "idx-desc"
        );
        for bad in [
            "annotation",
            "annotation.",
            "annotation-bogus.k",
            "annotation-index[linux/amd64].k",
        ] {
            let attrs = [(bad.to_string(), "v".to_string())].into_iter().collect();
            assert!(Annotations::from_attrs(&attrs).is_err(), "{bad}");
        }
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
