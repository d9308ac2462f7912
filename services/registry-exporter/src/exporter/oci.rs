//! The `oci` exporter: the image (or multi-platform index) as an OCI image layout tarball
//! sent to the client, written on a blocking thread as the client reads it, with layer
//! bytes streamed from the worker and checked against their descriptors.

use std::collections::BTreeMap;
use std::io::Write;

use kiln_oci::Descriptor;
use kiln_oci::layout::{OciLayoutWriter, index_entry};
use kiln_registry::Reference;
use tokio::sync::mpsc;

use super::pipe::{self, FeedRx, LayerSource};
use super::{Assembled, Job};
use crate::assemble::AssembledImage;
use crate::{ClientSink, Error, FileData, WorkerFs};

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let assembled = job.assemble().await?;
    let mut response = assembled.response();
    let names = job.names();
    if !names.is_empty() {
        response.insert("image.name".into(), names.join(","));
    }
    let _ = job.progress.try_send("sending oci tarball".to_string());
    let order = assembled.blob_order();
    let (tx, rx) = mpsc::channel(pipe::FEED_CHUNKS);
    let stream = layout_stream(assembled, names, rx);
    job.send_archive(&order, tx, stream).await?;
    Ok(response)
}

/// The layout tar, produced on a blocking thread as the client reads it. Layer bytes come
/// from `feed`, which [`pipe::pump_blobs`] fills in [`Assembled::blob_order`].
fn layout_stream(assembled: Assembled, names: Vec<String>, feed: FeedRx) -> FileData {
    pipe::spawn_writer("write image archive", move |w| {
        let mut blobs = LayerSource::new(feed);
        let mut a = OciLayoutWriter::new(w).map_err(oci_err)?;
        let top = match &assembled {
            Assembled::Image(image) => {
                add_image(&mut a, image, &mut blobs)?;
                &image.manifest_desc
            }
            Assembled::Index(index) => {
                for image in &index.images {
                    add_image(&mut a, image, &mut blobs)?;
                }
                a.add_blob_bytes(&index.desc.digest, &index.index)
                    .map_err(oci_err)?;
                &index.desc
            }
        };
        a.finish(index_entries(top, &names)).map_err(oci_err)?;
        Ok(())
    })
}

fn oci_err(source: kiln_oci::Error) -> Error {
    Error::Oci {
        op: "write image archive",
        source,
    }
}

/// An image's layers (each once), config and manifest.
fn add_image<W: Write>(
    a: &mut OciLayoutWriter<W>,
    image: &AssembledImage,
    blobs: &mut LayerSource,
) -> Result<(), Error> {
    for l in &image.layers {
        if let Some(r) = blobs.take(l) {
            a.add_blob_reader(l, r).map_err(oci_err)?;
        }
    }
    a.add_blob_bytes(&image.config_desc.digest, &image.config)
        .map_err(oci_err)?;
    a.add_blob_bytes(&image.manifest_desc.digest, &image.manifest)
        .map_err(oci_err)
}

/// `index.json` entries for `desc`: one per name (annotated), or one bare entry.
fn index_entries(desc: &Descriptor, names: &[String]) -> Vec<Descriptor> {
    if names.is_empty() {
        return vec![index_entry(desc, None)];
    }
    names
        .iter()
        .map(|n| {
            let full = Reference::parse(n)
                .map(|r| r.to_string())
                .unwrap_or_else(|_| n.clone());
            index_entry(desc, Some(&full))
        })
        .collect()
}
