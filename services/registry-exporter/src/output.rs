//! Tarball and directory outputs: OCI layout / docker-archive of an assembled image, and the
//! worker's filesystem as a tar or an unpacked directory.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use kiln_oci::layout::{DockerArchiveWriter, OciLayoutWriter, index_entry};
use kiln_registry::Reference;
use tokio::io::AsyncWriteExt;

use crate::{AssembledImage, Error, WorkerFs};

/// Write the image as an OCI layout tar (or a docker-archive when `docker`) into `tmp` and
/// open it for reading.
pub(crate) async fn write_archive(
    docker: bool,
    image: &AssembledImage,
    names: &[String],
    tmp: &Path,
) -> Result<tokio::fs::File, Error> {
    let path = tmp.join(if docker { "docker.tar" } else { "oci.tar" });
    let image = image.clone();
    let names = names.to_vec();
    let out = path.clone();
    tokio::task::spawn_blocking(move || write_archive_sync(docker, &image, &names, &out))
        .await
        .map_err(|source| Error::Join {
            op: "write image archive",
            source,
        })??;
    tokio::fs::File::open(&path)
        .await
        .map_err(|source| Error::Io {
            op: "open image archive",
            path,
            source,
        })
}

fn write_archive_sync(
    docker: bool,
    image: &AssembledImage,
    names: &[String],
    out: &Path,
) -> Result<(), Error> {
    let file = std::fs::File::create(out).map_err(|source| Error::Io {
        op: "create image archive",
        path: out.to_path_buf(),
        source,
    })?;
    let w = std::io::BufWriter::new(file);
    let oci = |source| Error::Oci {
        op: "write image archive",
        source,
    };
    let parsed: Vec<Option<Reference>> = names.iter().map(|n| Reference::parse(n).ok()).collect();
    let w = if docker {
        let mut a = DockerArchiveWriter::new(w).map_err(oci)?;
        for l in &image.layers {
            a.add_blob_file(l, &image.blob_path(&l.digest))
                .map_err(oci)?;
        }
        a.add_blob_bytes(&image.config_desc.digest, &image.config)
            .map_err(oci)?;
        a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
            .map_err(oci)?;
        let tags: Vec<String> = names
            .iter()
            .zip(&parsed)
            .map(|(n, r)| {
                r.as_ref()
                    .map(Reference::familiar)
                    .unwrap_or_else(|| n.clone())
            })
            .collect();
        let layer_digests: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
        a.finish(
            &image.manifest_desc,
            &image.config_desc.digest,
            &layer_digests,
            &tags,
        )
        .map_err(oci)?
    } else {
        let mut a = OciLayoutWriter::new(w).map_err(oci)?;
        for l in &image.layers {
            a.add_blob_file(l, &image.blob_path(&l.digest))
                .map_err(oci)?;
        }
        a.add_blob_bytes(&image.config_desc.digest, &image.config)
            .map_err(oci)?;
        a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
            .map_err(oci)?;
        let entries = if names.is_empty() {
            vec![index_entry(&image.manifest_desc, None)]
        } else {
            names
                .iter()
                .zip(&parsed)
                .map(|(n, r)| {
                    let full = r
                        .as_ref()
                        .map(Reference::to_string)
                        .unwrap_or_else(|| n.clone());
                    index_entry(&image.manifest_desc, Some(&full))
                })
                .collect()
        };
        a.finish(entries).map_err(oci)?
    };
    w.into_inner()
        .map_err(|e| Error::Io {
            op: "flush image archive",
            path: out.to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(|source| Error::Io {
            op: "sync image archive",
            path: out.to_path_buf(),
            source,
        })
}

/// The ref's filesystem as a tar file in `tmp` (an empty tar for scratch), opened for reading.
pub(crate) async fn fs_tar(
    worker: &impl WorkerFs,
    reference: &str,
    tmp: &Path,
) -> Result<tokio::fs::File, Error> {
    let path = tmp.join("fs.tar");
    let werr = |source| Error::Io {
        op: "write filesystem tar",
        path: path.clone(),
        source,
    };
    let mut file = tokio::fs::File::create(&path).await.map_err(werr)?;
    if reference.is_empty() {
        // two zero blocks: an empty tar
        file.write_all(&[0u8; 1024]).await.map_err(werr)?;
    } else {
        let mut stream = worker.export_fs(reference).await?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await.map_err(werr)?;
        }
    }
    file.flush().await.map_err(werr)?;
    drop(file);
    tokio::fs::File::open(&path)
        .await
        .map_err(|source| Error::Io {
            op: "open filesystem tar",
            path,
            source,
        })
}

/// The ref's filesystem unpacked into `tmp/rootfs`.
pub(crate) async fn fs_dir(
    worker: &impl WorkerFs,
    reference: &str,
    tmp: &Path,
) -> Result<PathBuf, Error> {
    let file = fs_tar(worker, reference, tmp).await?.into_std().await;
    let dir = tmp.join("rootfs");
    let root = dir.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "create output dir",
            path: root.clone(),
            source,
        })?;
        kiln_oci::layer::apply(std::io::BufReader::new(file), &root).map_err(|source| Error::Oci {
            op: "unpack filesystem",
            source,
        })
    })
    .await
    .map_err(|source| Error::Join {
        op: "unpack filesystem",
        source,
    })??;
    Ok(dir)
}
