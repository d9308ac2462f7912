//! The stdio FIFOs of a containerd task: created here, opened for writing by the shim,
//! read line by line (lines cut and clipped as [`crate::runc::LogLines`] does) into
//! [`Event::Log`]s.

use crate::Event;
use crate::error::{Error, Result};
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a finished task's output may take to drain before it is given up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A thread reading one FIFO until every writer has closed it.
pub(super) struct Reader {
    handle: tokio::task::JoinHandle<()>,
}

impl Reader {
    /// Creates the FIFO at `path` and starts reading it; lines go to `events` as `stream`.
    pub(super) fn spawn(path: &Path, stream: i64, events: mpsc::Sender<Event>) -> Result<Reader> {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| Error::Io {
                op: "mkfifo",
                path: path.to_path_buf(),
                source: e.into(),
            },
        )?;
        let path = path.to_path_buf();
        let handle = tokio::task::spawn_blocking(move || {
            // blocks until the shim (or `unblock`) opens the write side
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %kiln_proto::status::Chain(&e), "open stdio fifo");
                    return;
                }
            };
            let mut r = std::io::BufReader::new(f);
            let mut lines = crate::runc::LogLines::default();
            loop {
                let buf = match r.fill_buf() {
                    Ok([]) | Err(_) => break,
                    Ok(b) => b,
                };
                let (took, line) = lines.take(buf);
                r.consume(took);
                if let Some(data) = line {
                    // keep reading even when nobody listens, so the shim never blocks
                    let _ = events.blocking_send(Event::Log { stream, data });
                }
            }
            if let Some(data) = lines.finish() {
                let _ = events.blocking_send(Event::Log { stream, data });
            }
        });
        Ok(Reader { handle })
    }

    /// Waits until the FIFO is drained (all writers closed).
    pub(super) async fn finish(self) {
        if tokio::time::timeout(DRAIN_TIMEOUT, self.handle)
            .await
            .is_err()
        {
            tracing::warn!("task output did not drain in time");
        }
    }
}

/// Opens and closes the write side of `path` without blocking, so a reader still waiting
/// in `open` returns and sees end of file. Does nothing when no reader waits.
pub(super) fn unblock(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}
