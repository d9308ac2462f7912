//! Build progress as `StatusResponse`s, kept for late subscribers.

use kiln_proto::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Progress {
    state: Mutex<State>,
    changed: Notify,
    /// log bytes kept so far, by vertex (a step's log is clipped at [`LOG_LIMIT`])
    logged: Mutex<std::collections::HashMap<String, usize>>,
    /// where logs past [`MEMORY_LOG_BUDGET`] go (none: the system's temp dir)
    spill_dir: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct State {
    kept: Vec<Kept>,
    ended: bool,
    /// log bytes held in memory
    in_memory: usize,
    /// an unnamed file holding the encoded responses past the memory budget
    spill: Option<std::fs::File>,
    spill_len: u64,
}

enum Kept {
    Memory(StatusResponse),
    /// an encoded `StatusResponse` in the spill file
    Spilled {
        offset: u64,
        len: usize,
    },
}

/// The most log a step keeps, as BuildKit clips it; the rest is dropped with a note.
pub const LOG_LIMIT: usize = 2 << 20;
const CLIP_NOTE: &[u8] = b"\n[output clipped, log limit 2MiB reached]\n";
/// Log bytes of one build held in memory; later logs go to a file until the build
/// is forgotten, so a build of many chatty steps costs disk, not the daemon's memory.
pub const MEMORY_LOG_BUDGET: usize = 16 << 20;
/// The most log bytes one `next` call hands out (a late subscriber reads on).
const BATCH_BYTES: usize = 4 << 20;

pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

impl Progress {
    /// Progress whose logs past the memory budget spill into `dir`.
    pub fn spilling_to(dir: Option<std::path::PathBuf>) -> Self {
        Progress {
            spill_dir: dir,
            ..Default::default()
        }
    }

    pub fn push(&self, r: StatusResponse) {
        if let Ok(mut s) = self.state.lock() {
            s.kept.push(Kept::Memory(r));
        }
        self.changed.notify_waiters();
    }

    pub fn vertex(&self, v: Vertex) {
        self.push(StatusResponse {
            vertexes: vec![v],
            ..Default::default()
        });
    }

    pub fn log(&self, vertex: &str, stream: i64, mut msg: Vec<u8>) {
        {
            let Ok(mut logged) = self.logged.lock() else {
                return;
            };
            let kept = logged.entry(vertex.to_string()).or_insert(0);
            if *kept >= LOG_LIMIT {
                return;
            }
            if *kept + msg.len() >= LOG_LIMIT {
                msg.truncate(LOG_LIMIT - *kept);
                msg.extend_from_slice(CLIP_NOTE);
                *kept = LOG_LIMIT;
            } else {
                *kept += msg.len();
            }
        }
        let r = StatusResponse {
            logs: vec![VertexLog {
                vertex: vertex.to_string(),
                timestamp: Some(now()),
                stream,
                msg,
            }],
            ..Default::default()
        };
        if let Ok(mut s) = self.state.lock() {
            let size = r.logs[0].msg.len();
            let kept = if s.in_memory + size <= MEMORY_LOG_BUDGET {
                None
            } else {
                self.spill(&mut s, &r)
            };
            match kept {
                Some(k) => s.kept.push(k),
                None => {
                    s.in_memory += size;
                    s.kept.push(Kept::Memory(r));
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Appends `r` to the spill file; `None` when there is no file to be had (the log
    /// then stays in memory: losing it would be worse).
    fn spill(&self, s: &mut State, r: &StatusResponse) -> Option<Kept> {
        use prost::Message;
        use std::os::unix::fs::FileExt;
        if s.spill.is_none() {
            let dir = self.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
            match tempfile::tempfile_in(&dir) {
                Ok(f) => s.spill = Some(f),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %kiln_proto::status::Chain(&e), "build log spill file");
                    return None;
                }
            }
        }
        let bytes = r.encode_to_vec();
        let offset = s.spill_len;
        let f = s.spill.as_ref()?;
        if let Err(e) = f.write_all_at(&bytes, offset) {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "build log spill");
            return None;
        }
        s.spill_len += bytes.len() as u64;
        Some(Kept::Spilled {
            offset,
            len: bytes.len(),
        })
    }

    /// The response kept at `k`, read back from the spill file where it went.
    fn load(s: &State, k: &Kept) -> Option<StatusResponse> {
        use prost::Message;
        use std::os::unix::fs::FileExt;
        match k {
            Kept::Memory(r) => Some(r.clone()),
            Kept::Spilled { offset, len } => {
                let mut buf = vec![0; *len];
                s.spill.as_ref()?.read_exact_at(&mut buf, *offset).ok()?;
                StatusResponse::decode(buf.as_slice()).ok()
            }
        }
    }

    /// A warning about the build as a whole (clients print it after the build).
    /// It hangs on a step of its own: clients drop warnings of steps they never saw.
    pub fn warn(&self, short: &str) {
        const VERTEX: &str =
            "sha256:0000000000000000000000000000000000000000000000000000000000000001";
        tracing::warn!("{short}");
        let t = now();
        self.push(StatusResponse {
            vertexes: vec![Vertex {
                digest: VERTEX.into(),
                name: "[internal] build options".into(),
                started: Some(t),
                completed: Some(t),
                ..Default::default()
            }],
            warnings: vec![kiln_proto::moby::buildkit::v1::VertexWarning {
                vertex: VERTEX.into(),
                level: 1,
                short: short.as_bytes().to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        });
    }

    /// Byte progress of a sub-task of `vertex` (e.g. a layer download).
    pub fn status(&self, vertex: &str, id: String, current: i64, total: i64, completed: bool) {
        let t = now();
        self.push(StatusResponse {
            statuses: vec![VertexStatus {
                id: id.clone(),
                vertex: vertex.to_string(),
                name: id,
                current,
                total,
                timestamp: Some(t),
                started: Some(t),
                completed: completed.then_some(t),
            }],
            ..Default::default()
        });
    }

    /// `pick` of each response kept in memory (spilled ones are only logs).
    fn in_memory<T>(&self, pick: impl Fn(&StatusResponse) -> Option<T>) -> Vec<T> {
        self.state
            .lock()
            .map(|s| {
                s.kept
                    .iter()
                    .filter_map(|k| match k {
                        Kept::Memory(r) => pick(r),
                        Kept::Spilled { .. } => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every log line kept in memory so far (tests).
    #[cfg(test)]
    pub fn logs(&self) -> Vec<VertexLog> {
        self.in_memory(|r| Some(r.logs.clone()))
            .into_iter()
            .flatten()
            .collect()
    }

    /// How many warnings the build's progress carried so far.
    pub fn warning_count(&self) -> usize {
        self.in_memory(|r| Some(r.warnings.len())).into_iter().sum()
    }

    /// The step records so far (no logs: they can be large).
    pub fn vertices(&self) -> Vec<StatusResponse> {
        self.in_memory(|r| {
            // and the farm's placements and moves (statuses), which the history keeps
            let placed: Vec<_> = r
                .statuses
                .iter()
                .filter(|s| {
                    s.id.starts_with(crate::history::PLACED_ON)
                        || s.id.ends_with(crate::history::MOVED)
                })
                .cloned()
                .collect();
            (!r.vertexes.is_empty() || !placed.is_empty()).then(|| StatusResponse {
                vertexes: r.vertexes.clone(),
                statuses: placed,
                ..Default::default()
            })
        })
    }

    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.ended = true;
        }
        self.changed.notify_waiters();
    }

    /// Responses from index `from` (as many as make about [`BATCH_BYTES`] of logs),
    /// and whether they are the last of an ended build; waits when there is nothing
    /// new yet.
    pub async fn next(&self, from: usize) -> (Vec<StatusResponse>, bool) {
        loop {
            let notified = self.changed.notified();
            {
                let s = match self.state.lock() {
                    Ok(s) => s,
                    Err(_) => return (vec![], true),
                };
                if s.kept.len() > from || s.ended {
                    let mut out = Vec::new();
                    let mut bytes = 0;
                    for k in s.kept.iter().skip(from) {
                        if bytes >= BATCH_BYTES {
                            break;
                        }
                        // one entry out per entry kept: callers count them
                        let r = Self::load(&s, k).unwrap_or_default();
                        bytes += r.logs.iter().map(|l| l.msg.len()).sum::<usize>();
                        out.push(r);
                    }
                    let last = from + out.len() >= s.kept.len();
                    return (out, s.ended && last);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod log_limit_tests {
    use super::*;

    #[test]
    fn a_steps_log_is_clipped_at_the_limit_with_buildkits_note() {
        let p = Progress::default();
        for _ in 0..5 {
            p.log("v1", 1, vec![b'x'; 1 << 20]);
        }
        p.log("v2", 1, b"other step\n".to_vec());
        p.close();
        let all = drain(&p);
        let bytes = |v: &str| -> Vec<u8> {
            all.iter()
                .flat_map(|r| &r.logs)
                .filter(|l| l.vertex == v)
                .flat_map(|l| l.msg.clone())
                .collect()
        };
        let v1 = bytes("v1");
        assert_eq!(v1.len(), LOG_LIMIT + CLIP_NOTE.len());
        assert!(v1.ends_with(b"[output clipped, log limit 2MiB reached]\n"));
        assert_eq!(bytes("v2"), b"other step\n");
    }

    /// Every response, read as a Status subscriber reads them.
    fn drain(p: &Progress) -> Vec<StatusResponse> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut all = Vec::new();
        loop {
            let (items, done) = rt.block_on(p.next(all.len()));
            all.extend(items);
            if done {
                return all;
            }
        }
    }

    #[test]
    fn a_builds_logs_past_the_memory_budget_spill_to_disk_and_read_back_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = Progress::spilling_to(Some(dir.path().to_path_buf()));
        // 40 steps of 1 MiB: more than the build's memory budget
        let steps = 40;
        for i in 0..steps {
            p.vertex(Vertex {
                digest: format!("v{i}"),
                ..Default::default()
            });
            p.log(&format!("v{i}"), 1, vec![b'a' + (i % 26) as u8; 1 << 20]);
        }
        {
            let s = p.state.lock().expect("state");
            assert!(s.in_memory <= MEMORY_LOG_BUDGET, "{}", s.in_memory);
            assert!(s.spill_len >= ((steps << 20) - MEMORY_LOG_BUDGET) as u64);
        }
        assert_eq!(p.vertices().len(), steps);
        p.close();
        let all = drain(&p);
        for i in 0..steps {
            let log: Vec<u8> = all
                .iter()
                .flat_map(|r| &r.logs)
                .filter(|l| l.vertex == format!("v{i}"))
                .flat_map(|l| l.msg.clone())
                .collect();
            assert_eq!(log, vec![b'a' + (i % 26) as u8; 1 << 20], "step {i}");
        }
    }
}
