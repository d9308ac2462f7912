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
    /// Adds a session; false (and nothing changes) when its id is taken: one
    /// client cannot take over another's session.
    pub fn insert(&self, s: Session) -> bool {
        let added = match self.sessions.lock() {
            Ok(mut m) if !m.contains_key(&s.id) => {
                m.insert(s.id.clone(), s);
                true
            }
            _ => false,
        };
        self.changed.notify_waiters();
        added
    }

    pub fn contains(&self, id: &str) -> bool {
        self.sessions.lock().is_ok_and(|m| m.contains_key(id))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, name: &str) -> Session {
        Session {
            id: id.into(),
            name: name.into(),
            shared_key: String::new(),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        }
    }

    #[tokio::test]
    async fn a_taken_session_id_is_not_taken_over() {
        let m = SessionManager::default();
        assert!(m.insert(session("s1", "first")));
        assert!(!m.insert(session("s1", "intruder")));
        let s = m.get("s1", Duration::ZERO).await.expect("session");
        assert_eq!(s.name, "first");
    }
}
