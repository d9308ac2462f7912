//! Sessions attached by clients, by id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tonic::transport::Channel;

/// An attached client session: a gRPC channel to the services the client
/// serves on its `Control.Session` stream.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub shared_key: String,
    pub channel: Channel,
}

#[derive(Default)]
pub struct SessionManager {
    sessions: Mutex<HashMap<String, Session>>,
    changed: Notify,
}

impl SessionManager {
    pub fn insert(&self, s: Session) {
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(s.id.clone(), s);
        }
        self.changed.notify_waiters();
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut m) = self.sessions.lock() {
            m.remove(id);
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session with `id`, waiting up to `wait` for it to attach.
    pub async fn get(&self, id: &str, wait: Duration) -> Option<Session> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(s) = self.sessions.lock().ok().and_then(|m| m.get(id).cloned()) {
                return Some(s);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}
