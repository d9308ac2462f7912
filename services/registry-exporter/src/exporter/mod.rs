//! The exporters, one file per backend, named as BuildKit's `exporter/` names them:
//! - [`image`]: the image (or multi-platform index) named and pushed to registries;
//! - [`oci`] and [`docker`]: the image as an OCI-layout or docker-archive tarball;
//! - [`tar`]: the result's filesystem as a tarball;
//! - [`local`]: the result's filesystem as a directory on the client;
//! - [`cache`]: the build's cache records and their layers, to a registry.
//!
//! Tarballs and directories go to the client session; [`pipe`] streams the worker's bytes
//! into them without writing them to disk. Adding a backend is a file here and an arm in
//! [`Exporter::export`].

mod cache;
mod docker;
mod image;
mod local;
mod oci;
mod pipe;
mod tar;

use std::collections::BTreeMap;
use std::path::Path;

use kiln_oci::Descriptor;
use tokio::sync::mpsc;

use crate::assemble::{self, AssembledImage, AssembledIndex};
use crate::{ClientSink, Error, ExportRequest, Exporter, FileData, WorkerFs};

/// One export being run: what every backend works from.
struct Job<'a, W, C> {
    exporter: &'a Exporter,
    req: &'a ExportRequest,
    worker: &'a W,
    client: &'a C,
    /// status lines shown under the export step
    progress: &'a mpsc::Sender<String>,
    /// scratch space of this export, removed when it ends
    tmp: &'a Path,
}

impl Exporter {
    /// Run one export. Status lines go to `progress`; returns the exporter response map.
    pub async fn export(
        &self,
        req: &ExportRequest,
        worker: &impl WorkerFs,
        client: &impl ClientSink,
        progress: &mpsc::Sender<String>,
    ) -> Result<BTreeMap<String, String>, Error> {
        let work_dir = &self.config().work_dir;
        tokio::fs::create_dir_all(work_dir)
            .await
            .map_err(|source| Error::Io {
                op: "create work dir",
                path: work_dir.clone(),
                source,
            })?;
        let tmp = tempfile::Builder::new()
            .prefix("export-")
            .tempdir_in(work_dir)
            .map_err(|source| Error::Io {
                op: "create temp dir",
                path: work_dir.clone(),
                source,
            })?;
        let job = Job {
            exporter: self,
            req,
            worker,
            client,
            progress,
            tmp: tmp.path(),
        };
        match req.kind.as_str() {
            "image" => image::export(&job).await,
            "oci" => oci::export(&job).await,
            "docker" => docker::export(&job).await,
            "tar" => tar::export(&job).await,
            "local" => local::export(&job).await,
            "cache/registry" | "cache/local" => cache::export(&job).await,
            other => Err(Error::UnknownExporter {
                kind: other.to_string(),
            }),
        }
    }
}

/// The image-format result of an export: one image, or an index with one image per
/// platform.
enum Assembled {
    Image(Box<AssembledImage>),
    Index(Box<AssembledIndex>),
}

impl Assembled {
    /// The exporter response (`containerimage.digest`, ...).
    fn response(&self) -> BTreeMap<String, String> {
        match self {
            Assembled::Image(i) => i.response(),
            Assembled::Index(i) => i.response(),
        }
    }

    /// The distinct layers of its images, in the order the archive writers add them.
    fn blob_order(&self) -> Vec<Descriptor> {
        match self {
            Assembled::Image(i) => pipe::blob_order(std::slice::from_ref(i)),
            Assembled::Index(i) => pipe::blob_order(&i.images),
        }
    }
}

impl<W: WorkerFs, C: ClientSink> Job<'_, W, C> {
    /// The request's image, or with several platforms their index (layers stay on the
    /// worker).
    async fn assemble(&self) -> Result<Assembled, Error> {
        let req = self.req;
        if req.platforms.is_empty() {
            let image = assemble::build(req, self.worker, self.tmp);
            return Ok(Assembled::Image(Box::new(image.await?)));
        }
        let mut images = Vec::new();
        for p in &req.platforms {
            let _ = self.progress.try_send(format!("exporting {}", p.id));
            let one = ExportRequest {
                reference: p.reference.clone(),
                image_config: p.image_config.clone(),
                platforms: Vec::new(),
                ..req.clone()
            };
            let image = assemble::build(&one, self.worker, self.tmp);
            images.push(image.await?);
        }
        let mut index = assemble::assemble_index(images, assemble::media_types_of(&req.attrs))?;
        assemble::Annotations::from_attrs(&req.attrs)?.apply_to_index(&mut index)?;
        Ok(Assembled::Index(Box::new(index)))
    }

    /// The image names of the `name` attr (comma-separated).
    fn names(&self) -> Vec<String> {
        self.req
            .attrs
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

    /// Sends a tarball to the client while the worker's blobs in `order` are fed into it.
    async fn send_archive(
        &self,
        order: &[Descriptor],
        feed: mpsc::Sender<pipe::FeedItem>,
        stream: FileData,
    ) -> Result<(), Error> {
        let (pumped, sent) = tokio::join!(
            pipe::pump_blobs(self.worker, order, feed),
            self.client.send_file(self.req.index, stream)
        );
        sent?;
        pumped
    }
}
