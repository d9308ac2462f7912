//! Tar-stream writers for an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/*`)
//! and a docker-archive (`docker save` format: the OCI layout plus `manifest.json`).
//! Blob files are streamed into the tar, never read whole into memory.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::Serialize;

use crate::digest::hex_part;
use crate::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, Descriptor, Error, Index, media_types,
};

/// Writes an OCI image layout as a tar stream. Add blobs, then `finish` with the manifests.
pub struct OciLayoutWriter<W: Write> {
    tar: tar::Builder<W>,
    blobs: HashSet<String>,
}

impl<W: Write> OciLayoutWriter<W> {
    /// Starts the tar with `oci-layout` and the `blobs/sha256/` directories.
    pub fn new(w: W) -> Result<Self, Error> {
        let mut tar = tar::Builder::new(w);
        append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for dir in ["blobs/", "blobs/sha256/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(&mut h, dir, io::empty())
                .map_err(|source| Error::WriteLayout {
                    name: dir.to_string(),
                    source,
                })?;
        }
        Ok(OciLayoutWriter {
            tar,
            blobs: HashSet::new(),
        })
    }

    /// Stream the blob file at `path` into `blobs/sha256/<hex>` (once per digest).
    pub fn add_blob_file(&mut self, desc: &Descriptor, path: &Path) -> Result<(), Error> {
        let name = self.blob_name(&desc.digest)?;
        if !self.blobs.insert(desc.digest.clone()) {
            return Ok(());
        }
        let err = |source| Error::WriteLayout {
            name: name.clone(),
            source,
        };
        let f = File::open(path).map_err(err)?;
        let mut h = file_header(desc.size);
        self.tar
            .append_data(&mut h, &name, f.take(desc.size))
            .map_err(err)?;
        Ok(())
    }

    /// Write an in-memory blob (config, manifest) into `blobs/sha256/<hex>` (once per digest).
    pub fn add_blob_bytes(&mut self, digest: &str, bytes: &[u8]) -> Result<(), Error> {
        let name = self.blob_name(digest)?;
        if !self.blobs.insert(digest.to_string()) {
            return Ok(());
        }
        append_bytes(&mut self.tar, &name, bytes)
    }

    fn blob_name(&self, digest: &str) -> Result<String, Error> {
        let hex = hex_part(digest).ok_or_else(|| Error::InvalidDigest {
            digest: digest.to_string(),
        })?;
        Ok(format!("blobs/sha256/{hex}"))
    }

    /// Write `index.json` listing `manifests` and return the underlying writer.
    pub fn finish(mut self, manifests: Vec<Descriptor>) -> Result<W, Error> {
        self.write_index(manifests)?;
        self.tar.into_inner().map_err(|source| Error::WriteLayout {
            name: "tar trailer".to_string(),
            source,
        })
    }

    fn write_index(&mut self, manifests: Vec<Descriptor>) -> Result<(), Error> {
        let index = Index {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.to_string()),
            manifests,
            annotations: None,
        };
        let bytes = serde_json::to_vec(&index).map_err(|source| Error::EncodeJson {
            what: "index.json",
            source,
        })?;
        append_bytes(&mut self.tar, "index.json", &bytes)
    }
}

/// The descriptor of a manifest as listed in an OCI layout's index.json: with `name`
/// (a full reference like "docker.io/library/x:latest") it carries
/// `io.containerd.image.name` = name and `org.opencontainers.image.ref.name` = its tag
/// (or the whole name when it has no tag).
pub fn index_entry(manifest: &Descriptor, name: Option<&str>) -> Descriptor {
    let mut d = manifest.clone();
    if let Some(name) = name {
        let mut ann = d.annotations.take().unwrap_or_default();
        ann.insert(
            ANNOTATION_CONTAINERD_IMAGE_NAME.to_string(),
            name.to_string(),
        );
        ann.insert(
            ANNOTATION_REF_NAME.to_string(),
            ref_name_of(name).to_string(),
        );
        d.annotations = Some(ann);
    }
    d
}

/// The tag part of a reference (after the last ':' that follows the last '/'), or the
/// whole reference without a digest.
fn ref_name_of(name: &str) -> &str {
    let name = name.split('@').next().unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.rsplit_once(':') {
        Some((_, tag)) if !tag.is_empty() => tag,
        _ => name,
    }
}

/// Writes a docker-archive tar (`docker load` format): the OCI layout plus `manifest.json`
/// `[{"Config": "blobs/sha256/..", "RepoTags": [..], "Layers": [..]}]`.
pub struct DockerArchiveWriter<W: Write> {
    inner: OciLayoutWriter<W>,
}

#[derive(Serialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
    #[serde(rename = "LayerSources", skip_serializing_if = "BTreeMap::is_empty")]
    layer_sources: BTreeMap<String, Descriptor>,
}

impl<W: Write> DockerArchiveWriter<W> {
    pub fn new(w: W) -> Result<Self, Error> {
        Ok(DockerArchiveWriter {
            inner: OciLayoutWriter::new(w)?,
        })
    }

    pub fn add_blob_file(&mut self, desc: &Descriptor, path: &Path) -> Result<(), Error> {
        self.inner.add_blob_file(desc, path)
    }

    pub fn add_blob_bytes(&mut self, digest: &str, bytes: &[u8]) -> Result<(), Error> {
        self.inner.add_blob_bytes(digest, bytes)
    }

    /// Write `manifest.json` and `index.json`. `repo_tags` are docker names ("name:tag");
    /// `manifest` is the image manifest's descriptor (its blob must have been added).
    pub fn finish(
        mut self,
        manifest: &Descriptor,
        config_digest: &str,
        layer_digests: &[String],
        repo_tags: &[String],
    ) -> Result<W, Error> {
        let config = self.inner.blob_name(config_digest)?;
        let layers = layer_digests
            .iter()
            .map(|d| self.inner.blob_name(d))
            .collect::<Result<Vec<_>, _>>()?;
        let entry = DockerManifestEntry {
            config,
            repo_tags: repo_tags.to_vec(),
            layers,
            layer_sources: BTreeMap::new(),
        };
        let bytes = serde_json::to_vec(&[entry]).map_err(|source| Error::EncodeJson {
            what: "manifest.json",
            source,
        })?;
        append_bytes(&mut self.inner.tar, "manifest.json", &bytes)?;
        let entries = if repo_tags.is_empty() {
            vec![index_entry(manifest, None)]
        } else {
            repo_tags
                .iter()
                .map(|t| index_entry(manifest, Some(t)))
                .collect()
        };
        self.inner.finish(entries)
    }
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> Result<(), Error> {
    let mut h = file_header(bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
        .map_err(|source| Error::WriteLayout {
            name: name.to_string(),
            source,
        })
}
