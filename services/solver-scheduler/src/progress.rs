//! Build progress as `StatusResponse`s, kept for late subscribers.

use kiln_proto::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Progress {
    state: Mutex<(Vec<StatusResponse>, bool)>,
    changed: Notify,
}

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

    pub fn log(&self, vertex: &str, stream: i64, msg: Vec<u8>) {
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
