//! The result cache: which worker refs hold the outputs of a vertex with a
//! given cache key, how those keys are made, and what builds share while
//! they solve.
//!
//! - [`store`]: cache records and their storage ([`CacheStore`]; redb on
//!   disk, or memory), with build history and step records beside them;
//! - [`key`]: cache keys (definition, content and output keys, and the paths
//!   an op reads from each input);
//! - [`Cache`]: the store, the vertices computing now (see
//!   [`crate::inflight`]), memoized content checksums and the
//!   `max-parallelism` limit, shared by every build of a solver.

pub mod key;
pub mod store;

pub use store::{CacheRecord, CacheStore, MemoryStore, RedbStore, unix_nanos};

use crate::Error;
use crate::inflight::{Computation, Flights, Joined};
use crate::peer::Selector;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A content checksum of some paths of a worker ref.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ChecksumKey {
    r#ref: String,
    selectors: Vec<Selector>,
}

/// The most content checksums remembered (the memo starts over beyond it).
const CHECKSUMS_MAX: usize = 10_000;

/// The result cache: records in a [`CacheStore`], vertices running now
/// (shared by every build that needs the same cache key) and memoized
/// content checksums (snapshots are immutable).
pub struct Cache {
    store: Arc<dyn CacheStore>,
    inflight: Flights,
    checksums: Mutex<HashMap<ChecksumKey, String>>,
    /// `max-parallelism`: permits for steps running on workers
    pub(crate) limit: Option<Arc<tokio::sync::Semaphore>>,
}

impl Cache {
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        Cache {
            store,
            inflight: Flights::default(),
            checksums: Mutex::new(HashMap::new()),
            limit: None,
        }
    }

    /// At most `n` steps run on workers at once (cache lookups do not count).
    pub fn with_parallelism(mut self, n: Option<usize>) -> Self {
        self.limit = n
            .filter(|n| *n > 0)
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        self
    }

    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.store
    }

    /// Runs `f` on the store in a blocking thread (redb commits fsync).
    pub async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn CacheStore) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|source| Error::StoreTask { source })?
    }

    /// Joins the computation of `key` if one is running, else starts `start`.
    pub(crate) fn join(&self, key: &str, start: impl FnOnce() -> Computation) -> Joined {
        self.inflight.join(key, start)
    }

    /// The remembered checksum of `sel` in ref `r`.
    pub(crate) fn memo(&self, r: &str, sel: &[Selector]) -> Option<String> {
        let key = ChecksumKey {
            r#ref: r.to_string(),
            selectors: sel.to_vec(),
        };
        self.checksums.lock().ok()?.get(&key).cloned()
    }

    pub(crate) fn remember(&self, r: &str, sel: &[Selector], digest: &str) {
        if let Ok(mut m) = self.checksums.lock() {
            if m.len() > CHECKSUMS_MAX {
                m.clear();
            }
            let key = ChecksumKey {
                r#ref: r.to_string(),
                selectors: sel.to_vec(),
            };
            m.insert(key, digest.to_string());
        }
    }
}
