//! Build progress as `StatusResponse`s, kept for late subscribers.

use kiln_proto::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Progress {
    state: Mutex<(Vec<StatusResponse>, bool)>,
    changed: Notify,
    /// log bytes kept so far, by vertex (a step's log is clipped at [`LOG_LIMIT`])
    logged: Mutex<std::collections::HashMap<String, usize>>,
}

/// The most log a step keeps, as BuildKit clips it; the rest is dropped with a note.
pub const LOG_LIMIT: usize = 2 << 20;
const CLIP_NOTE: &[u8] = b"\n[output clipped, log limit 2MiB reached]\n";

pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

impl Progress {
    pub fn push(&self, r: StatusResponse) {
        if let Ok(mut s) = self.state.lock() {
            s.0.push(r);
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
        self.push(StatusResponse {
            logs: vec![VertexLog {
                vertex: vertex.to_string(),
                timestamp: Some(now()),
                stream,
                msg,
            }],
            ..Default::default()
        });
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

    /// Every response so far.
    pub fn all(&self) -> Vec<StatusResponse> {
        self.state.lock().map(|s| s.0.clone()).unwrap_or_default()
    }

    pub fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.1 = true;
        }
        self.changed.notify_waiters();
    }

    /// Responses from index `from`, and whether the build has ended; waits
    /// when there is nothing new yet.
    pub async fn next(&self, from: usize) -> (Vec<StatusResponse>, bool) {
        loop {
            let notified = self.changed.notified();
            {
                let s = match self.state.lock() {
                    Ok(s) => s,
                    Err(_) => return (vec![], true),
                };
                if s.0.len() > from || s.1 {
                    return (s.0[from.min(s.0.len())..].to_vec(), s.1);
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
        let bytes = |v: &str| -> Vec<u8> {
            p.all()
                .iter()
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
}
