//! The `local` exporter: the result's filesystem unpacked into a directory and sent to the
//! client session (one subdirectory per platform for a multi-platform result).

use std::collections::BTreeMap;
use std::path::Path;

use super::Job;
use super::pipe::BlockingStreamReader;
use crate::{ClientSink, Error, WorkerFs};

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let req = job.req;
    let _ = job.progress.try_send("copying files to client".to_string());
    let dir = job.tmp.join("rootfs");
    if req.platforms.is_empty() {
        fs_dir(job.worker, &req.reference, &dir).await?;
    } else {
        for p in &req.platforms {
            fs_dir(job.worker, &p.reference, &dir.join(p.dir_name())).await?;
        }
    }
    job.client.send_dir(req.index, &dir).await?;
    Ok(BTreeMap::new())
}

/// The ref's filesystem unpacked into `dir`, streamed from the worker (no tar on disk).
async fn fs_dir(worker: &impl WorkerFs, reference: &str, dir: &Path) -> Result<(), Error> {
    let root = dir.to_path_buf();
    tokio::fs::create_dir_all(&root)
        .await
        .map_err(|source| Error::Io {
            op: "create output dir",
            path: root.clone(),
            source,
        })?;
    if reference.is_empty() {
        return Ok(());
    }
    let stream = worker.export_fs(reference).await?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let reader = BlockingStreamReader::new(stream, &handle);
        kiln_oci::layer::apply(std::io::BufReader::new(reader), &root).map_err(|source| {
            Error::Oci {
                op: "unpack filesystem",
                source,
            }
        })
    })
    .await
    .map_err(|source| Error::Join {
        op: "unpack filesystem",
        source,
    })??;
    Ok(())
}
