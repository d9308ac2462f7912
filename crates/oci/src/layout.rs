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
        if self.blobs.contains(&desc.digest) {
            return Ok(());
        }
        let f = File::open(path).map_err(|source| Error::WriteLayout {
            name: path.display().to_string(),
            source,
        })?;
        self.add_blob_reader(desc, f)
    }

    /// Stream `desc.size` bytes of `r` into `blobs/sha256/<hex>` (once per digest). The
    /// reader must yield exactly that many bytes (a short one fails the write; readers that
    /// verify the digest fail it at their end).
    pub fn add_blob_reader(&mut self, desc: &Descriptor, r: impl Read) -> Result<(), Error> {
        let name = self.blob_name(&desc.digest)?;
        if !self.blobs.insert(desc.digest.clone()) {
            return Ok(());
        }
        let err = |source| Error::WriteLayout {
            name: name.clone(),
            source,
        };
        let mut h = file_header(desc.size);
        let mut exact = ExactReader {
            inner: r,
            left: desc.size,
        };
        self.tar
            .append_data(&mut h, &name, &mut exact)
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

    pub fn add_blob_reader(&mut self, desc: &Descriptor, r: impl Read) -> Result<(), Error> {
        self.inner.add_blob_reader(desc, r)
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

/// Passes on exactly `left` bytes and reads its reader to its end (so a verifying reader
/// sees the end): a reader shorter or longer than the tar header says fails, since either
/// would corrupt the archive.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob ended {} bytes short", self.left),
            ));
        }
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "blob is longer than its descriptor says",
            ));
        }
        self.left -= n as u64;
        Ok(n)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compression, ImageConfig, Manifest, Platform, RootFs, compress_layer, digest};
    use std::fs;
    use std::process::Command;

    struct Built {
        _dir: tempfile::TempDir,
        layer: Descriptor,
        layer_path: std::path::PathBuf,
        config: Vec<u8>,
        config_desc: Descriptor,
        manifest: Vec<u8>,
        manifest_desc: Descriptor,
    }

    fn build_image() -> Built {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc")).expect("mkdir");
        fs::write(tree.join("etc/hello"), b"hello from kiln\n").expect("write");
        let tar_path = dir.path().join("layer.tar");
        crate::layer::tar_dir(&tree, fs::File::create(&tar_path).expect("create")).expect("tar");
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).expect("mkdir");
        let (diff_id, layer) = compress_layer(&tar_path, &blobs, Compression::Gzip).expect("gzip");
        let layer_path = blobs.join(layer.digest.trim_start_matches("sha256:"));
        let platform = Platform::new("linux", "amd64", None);
        let cfg = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            rootfs: RootFs {
                type_: "layers".into(),
                diff_ids: vec![diff_id],
            },
            ..Default::default()
        };
        let config = serde_json::to_vec(&cfg).expect("config");
        let config_desc = Descriptor {
            media_type: media_types::OCI_CONFIG.into(),
            digest: digest::sha256(&config),
            size: config.len() as u64,
            ..Default::default()
        };
        let m = Manifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.into()),
            config: config_desc.clone(),
            layers: vec![layer.clone()],
            annotations: None,
        };
        let manifest = serde_json::to_vec(&m).expect("manifest");
        let manifest_desc = Descriptor {
            media_type: media_types::OCI_MANIFEST.into(),
            digest: digest::sha256(&manifest),
            size: manifest.len() as u64,
            platform: Some(platform),
            ..Default::default()
        };
        Built {
            _dir: dir,
            layer,
            layer_path,
            config,
            config_desc,
            manifest,
            manifest_desc,
        }
    }

    impl Built {
        /// Adds the layer, config and manifest blobs.
        fn add_blobs(&self, w: &mut OciLayoutWriter<fs::File>) {
            w.add_blob_file(&self.layer, &self.layer_path)
                .expect("layer");
            w.add_blob_bytes(&self.config_desc.digest, &self.config)
                .expect("config");
            w.add_blob_bytes(&self.manifest_desc.digest, &self.manifest)
                .expect("manifest");
        }
    }

    fn tool(name: &str) -> Option<std::path::PathBuf> {
        let p = Path::new("/usr/bin").join(name);
        p.exists().then_some(p)
    }

    /// `skopeo inspect ARGS` as JSON; None (the check skipped) without skopeo.
    fn skopeo_inspect(args: &[&str]) -> Option<serde_json::Value> {
        let Some(skopeo) = tool("skopeo") else {
            eprintln!("skopeo missing: skipped");
            return None;
        };
        let o = Command::new(skopeo)
            .arg("inspect")
            .args(args)
            .output()
            .expect("skopeo");
        assert!(
            o.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Some(serde_json::from_slice(&o.stdout).expect("skopeo json"))
    }

    #[test]
    fn oci_layout_tar_is_read_by_umoci_and_skopeo() {
        let img = build_image();
        let out = tempfile::tempdir().expect("out");
        let tar_path = out.path().join("image.tar");
        let mut w =
            OciLayoutWriter::new(fs::File::create(&tar_path).expect("create")).expect("new");
        img.add_blobs(&mut w);
        w.finish(vec![index_entry(
            &img.manifest_desc,
            Some("docker.io/library/kiln-test:v1"),
        )])
        .expect("finish");

        // Structure check with our own reader.
        let mut ar = tar::Archive::new(fs::File::open(&tar_path).expect("open"));
        let extracted = out.path().join("layout");
        ar.unpack(&extracted).expect("unpack");
        assert_eq!(
            fs::read_to_string(extracted.join("oci-layout")).expect("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let index: Index =
            serde_json::from_slice(&fs::read(extracted.join("index.json")).expect("index"))
                .expect("parse index");
        let ann = index.manifests[0].annotations.clone().expect("annotations");
        assert_eq!(ann[ANNOTATION_REF_NAME], "v1");
        assert_eq!(
            ann[ANNOTATION_CONTAINERD_IMAGE_NAME],
            "docker.io/library/kiln-test:v1"
        );
        for d in [&img.layer, &img.config_desc, &img.manifest_desc] {
            let blob = fs::read(
                extracted
                    .join("blobs/sha256")
                    .join(hex_part(&d.digest).expect("hex")),
            )
            .expect("blob");
            assert_eq!(digest::sha256(&blob), d.digest);
        }

        if let Some(umoci) = tool("umoci") {
            let o = Command::new(umoci)
                .arg("ls")
                .arg("--layout")
                .arg(&extracted)
                .output()
                .expect("umoci");
            assert!(
                o.status.success(),
                "umoci ls: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(String::from_utf8_lossy(&o.stdout).contains("v1"));
        } else {
            eprintln!("umoci missing: skipped");
        }
        if let Some(v) = skopeo_inspect(&[&format!("oci-archive:{}", tar_path.display())]) {
            assert_eq!(v["Digest"], img.manifest_desc.digest.as_str());
            assert_eq!(v["Layers"][0], img.layer.digest.as_str());
        }
    }

    #[test]
    fn docker_archive_is_read_by_skopeo() {
        let img = build_image();
        let out = tempfile::tempdir().expect("out");
        let tar_path = out.path().join("docker.tar");
        let mut w =
            DockerArchiveWriter::new(fs::File::create(&tar_path).expect("create")).expect("new");
        img.add_blobs(&mut w.inner);
        w.finish(
            &img.manifest_desc,
            &img.config_desc.digest,
            std::slice::from_ref(&img.layer.digest),
            &["kiln-test:latest".to_string()],
        )
        .expect("finish");

        let mut ar = tar::Archive::new(fs::File::open(&tar_path).expect("open"));
        let extracted = out.path().join("x");
        ar.unpack(&extracted).expect("unpack");
        let m: serde_json::Value = serde_json::from_slice(
            &fs::read(extracted.join("manifest.json")).expect("manifest.json"),
        )
        .expect("json");
        assert_eq!(m[0]["RepoTags"][0], "kiln-test:latest");
        let cfg_path = m[0]["Config"].as_str().expect("Config");
        assert_eq!(
            fs::read(extracted.join(cfg_path)).expect("config"),
            img.config
        );

        let archive = format!("docker-archive:{}", tar_path.display());
        if let Some(v) = skopeo_inspect(&["--config", &archive]) {
            let ours: serde_json::Value = serde_json::from_slice(&img.config).expect("config json");
            assert_eq!(v["rootfs"], ours["rootfs"]);
        }
    }

    #[test]
    fn blob_readers_must_fill_the_entry() {
        let data = b"layer bytes".repeat(100);
        let desc = Descriptor {
            media_type: media_types::OCI_LAYER.into(),
            digest: digest::sha256(&data),
            size: data.len() as u64,
            ..Default::default()
        };
        let mut w = OciLayoutWriter::new(Vec::new()).expect("writer");
        w.add_blob_reader(&desc, &data[..]).expect("full blob");
        // the same digest again is skipped without reading
        w.add_blob_reader(&desc, io::empty()).expect("dedup");
        let tar = w.finish(Vec::new()).expect("finish");
        let mut a = tar::Archive::new(&tar[..]);
        let mut found = false;
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            if e.path().expect("path").to_string_lossy()
                == format!("blobs/sha256/{}", &desc.digest[7..])
            {
                let mut v = Vec::new();
                e.read_to_end(&mut v).expect("read");
                assert_eq!(v, data);
                found = true;
            }
        }
        assert!(found);

        let mut w = OciLayoutWriter::new(Vec::new()).expect("writer");
        let err = w
            .add_blob_reader(&desc, &data[..10])
            .expect_err("short blob");
        assert!(matches!(err, Error::WriteLayout { .. }), "{err}");
        let longer = [&data[..], b"!"].concat();
        let mut w = OciLayoutWriter::new(Vec::new()).expect("writer");
        assert!(w.add_blob_reader(&desc, &longer[..]).is_err(), "long blob");
    }
}
