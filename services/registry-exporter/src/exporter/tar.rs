//! The `tar` exporter: the result's filesystem as a tarball sent to the client, straight
//! from the worker; a multi-platform result is one tar with a top directory per platform
//! (`linux_amd64/...`), as BuildKit writes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;

use super::Job;
use super::pipe::{self, FeedReader, FeedRx};
use crate::{ClientSink, Error, FileData, PlatformRef, WorkerFs};

pub(super) async fn export<W: WorkerFs, C: ClientSink>(
    job: &Job<'_, W, C>,
) -> Result<BTreeMap<String, String>, Error> {
    let (req, worker, client) = (job.req, job.worker, job.client);
    let _ = job
        .progress
        .try_send("sending filesystem tarball".to_string());
    if req.platforms.is_empty() {
        let stream = fs_tar_stream(worker, &req.reference).await?;
        client.send_file(req.index, stream).await?;
    } else {
        let (tx, rx) = mpsc::channel(pipe::FEED_CHUNKS);
        let stream = fs_tar_multi(&req.platforms, rx);
        let (pumped, sent) = tokio::join!(
            pipe::pump_fs(worker, &req.platforms, tx),
            client.send_file(req.index, stream)
        );
        sent?;
        pumped?;
    }
    Ok(BTreeMap::new())
}

/// The ref's filesystem as a tar stream straight from the worker (an empty tar for
/// scratch).
async fn fs_tar_stream(worker: &impl WorkerFs, reference: &str) -> Result<FileData, Error> {
    if reference.is_empty() {
        // two zero blocks: an empty tar
        return Ok(Box::new(std::io::Cursor::new(vec![0u8; 1024])));
    }
    let stream = worker
        .export_fs(reference)
        .await?
        .map(|c| c.map_err(|e| std::io::Error::other(kiln_proto::status::chain(&e))));
    Ok(Box::new(StreamReader::new(stream)))
}

/// The filesystems of a multi-platform result as one tar with a top directory per
/// platform (`linux_amd64/...`), streamed.
fn fs_tar_multi(platforms: &[PlatformRef], mut feed: FeedRx) -> FileData {
    let sources: Vec<(String, bool)> = platforms
        .iter()
        .map(|p| (p.dir_name(), !p.reference.is_empty()))
        .collect();
    pipe::spawn_writer("write filesystem tar", move |w| {
        let werr = |source| Error::Io {
            op: "write filesystem tar",
            path: PathBuf::from("<client stream>"),
            source,
        };
        let mut out = tar::Builder::new(w);
        for (dir, has_fs) in sources {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            out.append_data(&mut h, format!("{dir}/"), std::io::empty())
                .map_err(werr)?;
            if !has_fs {
                continue;
            }
            let mut ar = tar::Archive::new(FeedReader::new(&mut feed));
            for entry in ar.entries().map_err(werr)? {
                let mut entry = entry.map_err(werr)?;
                let path = entry.path().map_err(werr)?.into_owned();
                let mut h = entry.header().clone();
                let name = Path::new(&dir).join(&path);
                if let Some(link) = entry.link_name().map_err(werr)? {
                    // hard links name a path in the archive: under the same directory
                    let target = if h.entry_type() == tar::EntryType::Link {
                        Path::new(&dir).join(link.as_ref())
                    } else {
                        link.into_owned()
                    };
                    out.append_link(&mut h, &name, &target).map_err(werr)?;
                    continue;
                }
                out.append_data(&mut h, &name, &mut entry).map_err(werr)?;
            }
            // the rest of this stream (the tar's end blocks) up to its end marker
            std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).map_err(werr)?;
        }
        out.finish().map_err(werr)?;
        Ok(())
    })
}
