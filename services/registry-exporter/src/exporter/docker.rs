//! The `docker` exporter: the image as a docker-archive tarball (`docker load`) sent to the
//! client, streamed as the `oci` exporter streams its layout. A docker archive holds one
//! image: a multi-platform result is refused, as BuildKit refuses it.

use std::collections::BTreeMap;

use kiln_oci::layout::DockerArchiveWriter;
use kiln_registry::Reference;
use tokio::sync::mpsc;

use super::pipe::{self, FeedRx, LayerSource};
use super::{Assembled, Job};
use crate::assemble::AssembledImage;
use crate::{ClientSink, Error, FileData, WorkerFs};

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    if !job.req.platforms.is_empty() {
        return Err(Error::DockerMultiPlatform);
    }
    let assembled = job.assemble().await?;
    let mut response = assembled.response();
    let names = job.names();
    if !names.is_empty() {
        response.insert("image.name".into(), names.join(","));
    }
    let Assembled::Image(image) = assembled else {
        return Err(Error::DockerMultiPlatform);
    };
    let _ = job.progress.try_send("sending docker tarball".to_string());
    let order = pipe::blob_order(std::slice::from_ref(&image));
    let (tx, rx) = mpsc::channel(pipe::FEED_CHUNKS);
    let stream = archive_stream(*image, names, rx);
    job.send_archive(&order, tx, stream).await?;
    Ok(response)
}

/// The archive, produced on a blocking thread as the client reads it; layer bytes come
/// from `feed`. Names become the archive's repo tags in their familiar form.
fn archive_stream(image: AssembledImage, names: Vec<String>, feed: FeedRx) -> FileData {
    pipe::spawn_writer("write image archive", move |w| {
        let oci = |source| Error::Oci {
            op: "write image archive",
            source,
        };
        let mut blobs = LayerSource::new(feed);
        let mut a = DockerArchiveWriter::new(w).map_err(oci)?;
        for l in &image.layers {
            if let Some(r) = blobs.take(l) {
                a.add_blob_reader(l, r).map_err(oci)?;
            }
        }
        a.add_blob_bytes(&image.config_desc.digest, &image.config)
            .map_err(oci)?;
        a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
            .map_err(oci)?;
        let tags: Vec<String> = names
            .iter()
            .map(|n| {
                Reference::parse(n)
                    .map(|r| r.familiar())
                    .unwrap_or_else(|_| n.clone())
            })
            .collect();
        let layer_digests: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
        a.finish(
            &image.manifest_desc,
            &image.config_desc.digest,
            &layer_digests,
            &tags,
        )
        .map_err(oci)?;
        Ok(())
    })
}
