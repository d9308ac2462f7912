//! Turning an uncompressed layer tar into a (compressed) layer blob.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::DigestWriter;
use crate::{Descriptor, Error, media_types};

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Gzip,
    Uncompressed,
}

impl Compression {
    /// Parse a compression name as used by BuildKit attrs ("gzip", "uncompressed").
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "" | "gzip" => Some(Compression::Gzip),
            "uncompressed" | "none" => Some(Compression::Uncompressed),
            _ => None,
        }
    }

    /// The OCI layer media type of a blob compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media_types::OCI_LAYER_GZIP,
            Compression::Uncompressed => media_types::OCI_LAYER,
        }
    }

    /// The Docker layer media type of a blob compressed this way.
    pub fn docker_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media_types::DOCKER_LAYER_GZIP,
            Compression::Uncompressed => media_types::DOCKER_LAYER,
        }
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Compress the uncompressed layer tar at `uncompressed` into a blob.
///
/// When `out` is an existing directory the blob is written there as `<hex>` of its digest,
/// otherwise to the file `out`. Returns the diff id (digest of the uncompressed tar) and the
/// blob's descriptor (OCI media type). Synchronous: async callers use `spawn_blocking`.
pub fn compress_layer(
    uncompressed: &Path,
    out: &Path,
    compression: Compression,
) -> Result<(String, Descriptor), Error> {
    let err = |source: io::Error| Error::CompressLayer {
        path: uncompressed.to_path_buf(),
        source,
    };
    let into_dir = out.is_dir();
    let tmp: PathBuf = if into_dir {
        out.join(format!(
            ".tmp-layer-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    } else {
        out.to_path_buf()
    };
    let result = (|| {
        let mut src = File::open(uncompressed)?;
        let blob = DigestWriter::new(BufWriter::new(File::create(&tmp)?));
        let (blob_digest, size, diff_id) = match compression {
            Compression::Gzip => {
                let gz = flate2::write::GzEncoder::new(blob, flate2::Compression::default());
                let mut diff = DigestWriter::new(gz);
                io::copy(&mut src, &mut diff)?;
                let (gz, diff_id, _) = diff.finish();
                let blob = gz.finish()?;
                let (mut inner, digest, size) = blob.finish();
                inner.flush()?;
                (digest, size, diff_id)
            }
            Compression::Uncompressed => {
                let mut blob = blob;
                io::copy(&mut src, &mut blob)?;
                let (mut inner, digest, size) = blob.finish();
                inner.flush()?;
                (digest.clone(), size, digest)
            }
        };
        Ok::<_, io::Error>((blob_digest, size, diff_id))
    })();
    let (digest, size, diff_id) = match result {
        Ok(v) => v,
        Err(e) => {
            if into_dir {
                let _ = fs::remove_file(&tmp);
            }
            return Err(err(e));
        }
    };
    if into_dir {
        let hex = digest.trim_start_matches("sha256:");
        fs::rename(&tmp, out.join(hex)).map_err(err)?;
    }
    let desc = Descriptor {
        media_type: compression.oci_media_type().to_string(),
        digest,
        size,
        ..Default::default()
    };
    Ok((diff_id, desc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn gzip_layer_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar_path = dir.path().join("layer.tar");
        let data = b"not really a tar but bytes".repeat(100);
        fs::write(&tar_path, &data).expect("write");
        let blobs = dir.path().join("blobs");
        fs::create_dir(&blobs).expect("mkdir");
        let (diff_id, desc) =
            compress_layer(&tar_path, &blobs, Compression::Gzip).expect("compress");
        assert_eq!(diff_id, crate::digest::sha256(&data));
        let blob_path = blobs.join(desc.digest.trim_start_matches("sha256:"));
        let blob = fs::read(&blob_path).expect("blob");
        assert_eq!(desc.size, blob.len() as u64);
        assert_eq!(desc.digest, crate::digest::sha256(&blob));
        assert_eq!(desc.media_type, media_types::OCI_LAYER_GZIP);
        let mut plain = Vec::new();
        crate::layer::decompress(std::io::Cursor::new(blob))
            .expect("detect")
            .read_to_end(&mut plain)
            .expect("gunzip");
        assert_eq!(plain, data);
        assert_eq!(
            fs::read_dir(&blobs).expect("ls").count(),
            1,
            "no temp files left"
        );

        let (diff_id2, desc2) = compress_layer(
            &tar_path,
            &dir.path().join("u.blob"),
            Compression::Uncompressed,
        )
        .expect("uncompressed");
        assert_eq!(diff_id2, diff_id);
        assert_eq!(desc2.digest, diff_id);
    }
}
