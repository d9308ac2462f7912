//! The workers of the farm: who is there, in what state, how busy.

use super::place::Candidate;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::watch;

/// A worker's state as `ListWorkers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// takes steps
    Ready,
    /// finishes its steps, takes no new ones
    Draining,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }
}

/// What a worker says of itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub address: String,
    pub platforms: Vec<kiln_oci::Platform>,
    pub labels: BTreeMap<String, String>,
    pub capacity: usize,
    pub free_disk: u64,
    pub version: String,
}

/// One worker of the farm.
pub(crate) struct Member<W> {
    pub reg: Registration,
    pub worker: Arc<W>,
    pub state: State,
    /// steps the farm placed on it that have not ended
    pub running: usize,
    /// changes with each registration: a stream's end drops only its own
    pub generation: u64,
    /// turns true when this generation is dropped: its steps stop waiting
    pub lost: watch::Sender<bool>,
    /// the home worker (the daemon's own): never dropped, its refs unqualified
    pub home: bool,
}

impl<W> Member<W> {
    /// What placement knows of the member; `min_free_disk` 0 (or a worker
    /// that reports none) never counts as short of disk.
    pub fn candidate(&self, holds: usize, min_free_disk: u64) -> Candidate<'_> {
        Candidate {
            id: &self.reg.id,
            platforms: &self.reg.platforms,
            labels: &self.reg.labels,
            running: self.running,
            capacity: self.reg.capacity,
            holds,
            low_disk: self.reg.free_disk > 0 && self.reg.free_disk < min_free_disk,
        }
    }
}

/// The members by id.
pub(crate) struct Members<W> {
    pub by_id: HashMap<String, Member<W>>,
    next_generation: u64,
}

impl<W> Default for Members<W> {
    fn default() -> Self {
        Members {
            by_id: HashMap::new(),
            next_generation: 1,
        }
    }
}

impl<W> Members<W> {
    /// Adds or replaces a worker; returns its generation. A worker that
    /// registers again (after a partition or a restart) keeps its count of
    /// running steps; its earlier generation's waiters are told it was lost
    /// only if it restarted (a new address means a new process may be there).
    pub fn insert(&mut self, reg: Registration, worker: Arc<W>, home: bool) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        let (lost, _) = watch::channel(false);
        let running = match self.by_id.remove(&reg.id) {
            Some(old) => {
                let _ = old.lost.send(true);
                old.running
            }
            None => 0,
        };
        self.by_id.insert(
            reg.id.clone(),
            Member {
                reg,
                worker,
                state: State::Ready,
                running,
                generation,
                lost,
                home,
            },
        );
        generation
    }

    /// Drops the worker `id` if `generation` is still its current one.
    pub fn remove(&mut self, id: &str, generation: u64) -> bool {
        match self.by_id.get(id) {
            Some(m) if m.generation == generation && !m.home => {
                if let Some(m) = self.by_id.remove(id) {
                    let _ = m.lost.send(true);
                }
                true
            }
            _ => false,
        }
    }
}
