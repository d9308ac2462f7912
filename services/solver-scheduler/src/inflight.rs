//! In-flight dedup: identical vertices of concurrent builds run once.
//!
//! A vertex being computed is keyed by its cache key; a build that needs the
//! same key while it runs joins the running computation instead of starting
//! another. Each computation runs in a task of its own, aborted when the last
//! build waiting for it goes away: a cancelled build stops its steps unless
//! another build shares them.

use crate::step::{Failure, Outcome};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The computation of one vertex, as the step task returns it.
pub(crate) type Computation = BoxFuture<'static, Result<Outcome, Failure>>;

/// A vertex being computed; dropped (and its task aborted) when no build
/// waits for it any more.
pub(crate) struct InFlight {
    /// the computation's result, for every build that joined it
    pub(crate) fut: Shared<Computation>,
    task: tokio::task::AbortHandle,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`Flights::join`] found or started.
pub(crate) struct Joined {
    pub(crate) flight: Arc<InFlight>,
    /// this caller started the computation (others joined it: a cache hit for them)
    pub(crate) leader: bool,
}

/// The computations running now, by cache key.
#[derive(Default)]
pub(crate) struct Flights {
    running: Mutex<HashMap<String, Weak<InFlight>>>,
}

impl Flights {
    /// Joins the computation of `key` if one is running, else starts `start`
    /// in a task of its own.
    pub(crate) fn join(&self, key: &str, start: impl FnOnce() -> Computation) -> Joined {
        let mut map = match self.running.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(flight) = map.get(key).and_then(Weak::upgrade) {
            return Joined {
                flight,
                leader: false,
            };
        }
        map.retain(|_, w| w.strong_count() > 0);
        let handle = tokio::spawn(start());
        let task = handle.abort_handle();
        let fut = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Failure::task_ended("vertex task", &e)))
        }
        .boxed()
        .shared();
        let flight = Arc::new(InFlight { fut, task });
        map.insert(key.to_string(), Arc::downgrade(&flight));
        Joined {
            flight,
            leader: true,
        }
    }
}
