//! The farm: every worker the solver runs steps on, as one [`Worker`].
//!
//! Workers join through `kiln.farm.v1.Farm.Join` (`grpc::farm`); the
//! daemon's own worker, when it has one, is the *home* member. A result is
//! named `SNAPSHOT@WORKER` (the home worker's refs stay bare), so a ref says
//! where it lives and the cache records that hold it need nothing else.
//!
//! For each step the farm picks a worker (`place`), moves the inputs that
//! live elsewhere to it — the worker imports them from their holder by
//! digest (`Worker.Import`), never through the scheduler — and runs it there.
//! A worker that leaves, is killed or goes silent past the keepalive timeout
//! is dropped: its running steps run again elsewhere (at most `retries`
//! times, the reason in the step's log), and a result only it held is made
//! again from the op that made it (the farm keeps each result's lineage
//! while it runs). A step that fails on its own (a non-zero exit) is not
//! retried. A ref whose worker is gone does not exist (a cache miss).

pub mod members;
pub mod place;

use crate::Error;
use crate::peer::{
    ExecEvent, ExecInput, ExecSpec, FsTarget, PathEntry, RunEvent, RunOp, RunOutputs, Selector,
    Stat, Worker, WorkerInfo, WorkerUsage,
};
use kiln_proto::pb;
use members::{Member, Members, Registration, State};
use place::{Filter, NoWorker, Want};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How the farm treats its workers.
#[derive(Debug, Clone)]
pub struct FarmConfig {
    /// how often workers send keepalives
    pub keepalive_interval: Duration,
    /// a worker silent for this long is dropped
    pub timeout: Duration,
    /// how many times a step whose worker was lost runs again
    pub retries: u32,
    /// how long a step waits for a worker that matches it to join
    pub wait_for_worker: Duration,
    /// a worker reporting less free disk gets steps only when no other can
    /// take them (0: disk is not looked at)
    pub min_free_disk: u64,
}

impl Default for FarmConfig {
    fn default() -> Self {
        FarmConfig {
            keepalive_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            retries: 3,
            wait_for_worker: Duration::from_secs(30),
            min_free_disk: 1 << 30,
        }
    }
}

/// Makes the client of a worker that joined, from its address.
pub type Connect<W> = Arc<dyn Fn(&str) -> Result<W, Error> + Send + Sync>;

/// How often a step waiting for a busy farm looks again without being woken.
const BUSY_RECHECK: Duration = Duration::from_millis(250);

/// How many results' lineage the farm keeps (oldest forgotten first).
const LINEAGE: usize = 1 << 16;

/// What made a result: the op, with its inputs as farm refs, and which output.
struct Made {
    op: RunOp,
    output: usize,
}

/// The lineage of recent results, least recently made or used forgotten first.
#[derive(Default)]
struct Lineage {
    /// ref -> what made it, and when it was last made or used
    made: HashMap<String, (Made, u64)>,
    /// (ref, stamp) in stamp order; an entry whose stamp is no longer the
    /// ref's is stale
    order: VecDeque<(String, u64)>,
    stamp: u64,
    /// a result made again after its worker was lost: old ref -> new ref
    again: HashMap<String, String>,
}

impl Lineage {
    fn insert(&mut self, r: String, made: Made) {
        self.stamp += 1;
        self.order.push_back((r.clone(), self.stamp));
        self.made.insert(r, (made, self.stamp));
        self.trim();
    }

    /// `r` was used: it is forgotten last.
    fn touch(&mut self, r: &str) {
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some((_, s)) = self.made.get_mut(r) {
            *s = stamp;
            self.order.push_back((r.to_string(), stamp));
            self.trim();
        }
    }

    fn trim(&mut self) {
        while self.made.len() > LINEAGE || self.order.len() > 2 * LINEAGE {
            let Some((r, stamp)) = self.order.pop_front() else {
                return;
            };
            if self.made.get(&r).is_some_and(|(_, s)| *s == stamp) {
                self.made.remove(&r);
                self.again.remove(&r);
            }
        }
    }
}

/// The farm (see the module doc).
pub struct Farm<W> {
    config: FarmConfig,
    members: Mutex<Members<W>>,
    /// a member joined, left or freed a slot
    changed: Notify,
    connect: Connect<W>,
    home: Option<String>,
    lineage: Mutex<Lineage>,
    /// copies made by imports: farm ref -> member id -> its ref there
    copies: Mutex<HashMap<String, HashMap<String, String>>>,
    /// one re-make of a lost result at a time
    remaking: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    moved: AtomicU64,
    /// how long placement decisions took (see [`Farm::placement_micros`])
    decisions: Histogram,
    /// set when the scheduler shuts down: every worker's stream ends
    closing: tokio::sync::watch::Sender<bool>,
}

/// Counts of durations by whole microsecond, up to 10 ms (longer ones in the last).
struct Histogram(Vec<AtomicU64>);

impl Histogram {
    const MAX_MICROS: usize = 10_000;

    fn new() -> Self {
        Histogram((0..=Self::MAX_MICROS).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, d: Duration) {
        let us = (d.as_micros() as usize).min(Self::MAX_MICROS);
        self.0[us].fetch_add(1, Ordering::Relaxed);
    }

    /// (count, the `q` quantile in microseconds)
    fn quantile(&self, q: f64) -> (u64, u64) {
        let counts: Vec<u64> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let want = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (us, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want.max(1) {
                return (total, us as u64);
            }
        }
        (total, Self::MAX_MICROS as u64)
    }
}

/// A step looking for a slot: counted in `kiln_queue_length` while it
/// waits, its wait observed in `kiln_queue_wait_seconds` when it ends.
struct Queued {
    since: std::time::Instant,
    waiting: bool,
}

impl Queued {
    fn new() -> Queued {
        Queued {
            since: std::time::Instant::now(),
            waiting: false,
        }
    }

    fn waiting(&mut self) {
        if !std::mem::replace(&mut self.waiting, true) {
            kiln_metrics::QUEUE_LENGTH.add(&[], 1.0);
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.waiting {
            kiln_metrics::QUEUE_LENGTH.add(&[], -1.0);
        }
        kiln_metrics::QUEUE_WAIT.observe(&[], self.since.elapsed().as_secs_f64());
    }
}

/// A step slot on a member, held while the step runs there.
struct Slot<'a, W> {
    farm: &'a Farm<W>,
    id: String,
    home: bool,
    worker: Arc<W>,
    lost: watch::Receiver<bool>,
}

impl<W> Drop for Slot<'_, W> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.farm.members.lock()
            && let Some(member) = m.by_id.get_mut(&self.id)
        {
            member.running = member.running.saturating_sub(1);
        }
        // one freed slot wakes one waiting step (a queue of thousands is not
        // woken whole); a waiter it does not suit looks again soon
        self.farm.changed.notify_one();
    }
}

/// `SNAPSHOT@WORKER` split: (worker id, or `None` for the home worker; snapshot).
pub fn split_ref(r: &str) -> (Option<&str>, &str) {
    match r.rsplit_once('@') {
        Some((local, worker)) => (Some(worker), local),
        None => (None, r),
    }
}

/// Resolves when `lost` turns true (never, if its sender is gone without it).
async fn lost(mut lost: watch::Receiver<bool>) {
    if lost.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl<W: Worker> Farm<W> {
    pub fn new(config: FarmConfig, connect: Connect<W>) -> Self {
        Farm {
            config,
            members: Mutex::new(Members::default()),
            changed: Notify::new(),
            connect,
            home: None,
            lineage: Mutex::new(Lineage::default()),
            copies: Mutex::new(HashMap::new()),
            remaking: Mutex::new(HashMap::new()),
            moved: AtomicU64::new(0),
            decisions: Histogram::new(),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The scheduler is shutting down: every worker's `Join` stream ends (the
    /// workers dial again, to whichever scheduler comes up), so the server's
    /// graceful shutdown does not wait on streams that never end by themselves.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Farm::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Placement decisions so far and the `q` quantile of their duration (µs).
    pub fn placement_micros(&self, q: f64) -> (u64, u64) {
        self.decisions.quantile(q)
    }

    /// A farm whose home member is `worker` (the daemon's own; never dropped).
    pub fn with_home(
        config: FarmConfig,
        connect: Connect<W>,
        reg: Registration,
        worker: W,
    ) -> Self {
        let mut farm = Farm::new(config, connect);
        farm.home = Some(reg.id.clone());
        if let Ok(mut m) = farm.members.lock() {
            m.insert(reg, Arc::new(worker), true);
        }
        farm
    }

    pub fn config(&self) -> &FarmConfig {
        &self.config
    }

    /// Blob bytes moved between workers so far.
    pub fn bytes_moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// A worker joins (or joins again); returns its generation.
    pub fn register(&self, reg: Registration) -> Result<u64, Error> {
        if self.home.as_deref() == Some(reg.id.as_str()) {
            return Err(Error::Farm(format!(
                "worker {} has the id of this daemon's own worker",
                reg.id
            )));
        }
        let worker = Arc::new((self.connect)(&reg.address)?);
        tracing::info!(id = %reg.id, address = %reg.address, capacity = reg.capacity, labels = ?reg.labels, "worker joined the farm");
        let generation = self
            .members
            .lock()
            .map(|mut m| m.insert(reg, worker, false))
            .unwrap_or_default();
        self.changed.notify_waiters();
        Ok(generation)
    }

    /// A keepalive from a worker: the free disk it reports.
    pub fn heard(&self, id: &str, generation: u64, free_disk: u64) {
        if let Ok(mut m) = self.members.lock()
            && let Some(member) = m.by_id.get_mut(id)
            && member.generation == generation
        {
            member.reg.free_disk = free_disk;
        }
    }

    /// The worker is leaving: no new steps go to it.
    pub fn drain(&self, id: &str, generation: u64) {
        if let Ok(mut m) = self.members.lock()
            && let Some(member) = m.by_id.get_mut(id)
            && member.generation == generation
        {
            tracing::info!(id, "worker draining");
            member.state = State::Draining;
        }
        self.changed.notify_waiters();
    }

    /// Steps placed on worker `id` that have not ended (`None`: not a member).
    pub fn running_on(&self, id: &str) -> Option<usize> {
        self.members
            .lock()
            .ok()
            .and_then(|m| m.by_id.get(id).map(|mm| mm.running))
    }

    /// Drops a worker (its stream ended or went silent); its steps run elsewhere.
    pub fn drop_worker(&self, id: &str, generation: u64, why: &str) {
        let removed = self
            .members
            .lock()
            .map(|mut m| m.remove(id, generation))
            .unwrap_or(false);
        if removed {
            tracing::warn!(id, why, "worker dropped from the farm");
            if let Ok(mut c) = self.copies.lock() {
                for held in c.values_mut() {
                    held.remove(id);
                }
            }
            self.changed.notify_waiters();
        }
    }

    /// The farm ref of `local` on member `id`.
    fn qualify(&self, id: &str, local: &str) -> String {
        if local.is_empty() || self.home.as_deref() == Some(id) {
            local.to_string()
        } else {
            format!("{local}@{id}")
        }
    }

    /// The member id a ref lives on.
    fn owner<'r>(&'r self, r: &'r str) -> (Option<&'r str>, &'r str) {
        match split_ref(r) {
            (None, local) => (self.home.as_deref(), local),
            split => split,
        }
    }

    /// The worker holding `r` and its ref there.
    fn locate(&self, r: &str) -> Result<(Arc<W>, String), Error> {
        let (owner, local) = self.owner(r);
        let gone = || {
            Error::Farm(format!(
                "no worker holds {r}: its worker is not in the farm"
            ))
        };
        if let Some(w) = owner.and_then(|o| self.worker_of(o)) {
            return Ok((w, local.to_string()));
        }
        self.stand_in(r)
            .map(|(_, w, local)| (w, local))
            .ok_or_else(gone)
    }

    /// A copy of `r` an import left on a worker still in the farm (the one
    /// with the lowest id): what serves `r` once its own worker is gone, so
    /// it need not be made again.
    fn stand_in(&self, r: &str) -> Option<(String, Arc<W>, String)> {
        let mut held: Vec<(String, String)> = self
            .copies
            .lock()
            .ok()?
            .get(r)?
            .iter()
            .map(|(id, local)| (id.clone(), local.clone()))
            .collect();
        held.sort();
        held.into_iter()
            .find_map(|(id, local)| Some((id.clone(), self.worker_of(&id)?, local)))
    }

    /// The worker holding `r` and its ref there; a result whose worker is
    /// gone is made again first (when the farm knows how it was made).
    async fn holder(&self, r: &str) -> Result<(Arc<W>, String), Error> {
        let current = self.current(r);
        match self.locate(&current) {
            Ok(found) => Ok(found),
            Err(e) => {
                let known = self
                    .lineage
                    .lock()
                    .map(|l| l.made.contains_key(&current))
                    .unwrap_or(false);
                if !known {
                    return Err(e);
                }
                let again = self.remake(&current).await?;
                self.locate(&again)
            }
        }
    }

    /// The latest ref of a result that may have been made again.
    fn current(&self, r: &str) -> String {
        let mut r = r.to_string();
        if let Ok(l) = self.lineage.lock() {
            // bounded: each re-make is a new ref
            for _ in 0..16 {
                match l.again.get(&r) {
                    Some(n) => r = n.clone(),
                    None => break,
                }
            }
        }
        r
    }

    /// Waits for a slot on the best member for a step (see `place`).
    async fn acquire(
        &self,
        want: &Want,
        inputs: &[String],
        avoid: &HashSet<String>,
    ) -> Result<Slot<'_, W>, Error> {
        let deadline = tokio::time::Instant::now() + self.config.wait_for_worker;
        let mut queued = Queued::new();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let started = std::time::Instant::now();
            let outcome = self.try_acquire(want, inputs, avoid);
            self.decisions.record(started.elapsed());
            match outcome {
                Ok(slot) => return Ok(slot),
                Err(NoWorker::AllBusy) => {
                    queued.waiting();
                    // a slot freed for a step this one cannot use is passed on
                    // by the periodic look
                    let _ = tokio::time::timeout(BUSY_RECHECK, notified).await;
                }
                Err(NoWorker::NoMatch) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(Error::Farm(format!(
                            "no worker in the farm can run this step ({}) after waiting {:?}",
                            describe(want),
                            self.config.wait_for_worker
                        )));
                    }
                }
            }
        }
    }

    fn try_acquire(
        &self,
        want: &Want,
        inputs: &[String],
        avoid: &HashSet<String>,
    ) -> Result<Slot<'_, W>, NoWorker> {
        let copies = self.copies.lock().map_err(|_| NoWorker::NoMatch)?;
        let owners: Vec<(Option<&str>, &String)> =
            inputs.iter().map(|i| (self.owner(i).0, i)).collect();
        let mut m = self.members.lock().map_err(|_| NoWorker::NoMatch)?;
        let ready = |mm: &Member<W>| mm.state == State::Ready;
        // a worker a step was lost on is avoided while another may take it
        let avoiding = m
            .by_id
            .values()
            .any(|mm| ready(mm) && !avoid.contains(&mm.reg.id));
        let members: Vec<&Member<W>> = m
            .by_id
            .values()
            .filter(|mm| ready(mm) && !(avoiding && avoid.contains(&mm.reg.id)))
            .collect();
        let candidates: Vec<_> = members
            .iter()
            .map(|mm| {
                let id = mm.reg.id.as_str();
                let holds = owners
                    .iter()
                    .filter(|(o, r)| {
                        *o == Some(id) || copies.get(*r).is_some_and(|c| c.contains_key(id))
                    })
                    .count();
                mm.candidate(holds, self.config.min_free_disk)
            })
            .collect();
        let i = place::choose(&candidates, want)?;
        let id = candidates[i].id.to_string();
        drop(candidates);
        drop(members);
        let member = m.by_id.get_mut(&id).ok_or(NoWorker::NoMatch)?;
        member.running += 1;
        Ok(Slot {
            farm: self,
            home: member.home,
            worker: member.worker.clone(),
            lost: member.lost.subscribe(),
            id,
        })
    }

    /// Whether more than one worker could take steps (then placements are shown).
    fn shows_placement(&self) -> bool {
        self.members
            .lock()
            .map(|m| m.by_id.len() > 1)
            .unwrap_or(false)
    }

    /// The inputs of a step as refs on the slot's worker: imported from their
    /// holders, or made again when their holder is gone.
    async fn localize(
        &self,
        slot: &Slot<'_, W>,
        inputs: &[String],
        events: &Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<Vec<String>, Error> {
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            out.push(self.localize_one(slot, input, events).await?);
        }
        Ok(out)
    }

    async fn localize_one(
        &self,
        slot: &Slot<'_, W>,
        input: &str,
        events: &Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<String, Error> {
        if input.is_empty() {
            return Ok(String::new());
        }
        let mut r = self.current(input);
        // a holder lost mid-import means a re-make, then one more try
        for _ in 0..=self.config.retries {
            let (owner, local) = self.owner(&r);
            if owner == Some(slot.id.as_str()) || (owner.is_none() && slot.home) {
                return Ok(local.to_string());
            }
            if let Some(l) = self
                .copies
                .lock()
                .ok()
                .and_then(|c| c.get(&r).and_then(|h| h.get(&slot.id).cloned()))
            {
                return Ok(l);
            }
            let holder = owner.and_then(|o| {
                self.members.lock().ok().and_then(|m| {
                    m.by_id
                        .get(o)
                        .map(|mm| (o.to_string(), mm.reg.address.clone()))
                })
            });
            let Some((holder, address)) = holder else {
                r = self.remake(&r).await?;
                continue;
            };
            match slot.worker.import(&address, local).await {
                Ok(done) => {
                    self.moved.fetch_add(done.bytes_moved, Ordering::Relaxed);
                    kiln_metrics::MOVED_BYTES.add(&[], done.bytes_moved as f64);
                    if self.shows_placement() {
                        events(RunEvent::Progress {
                            id: format!(
                                "input {} from worker {holder}: {}{}",
                                short(local),
                                done.bytes_moved,
                                crate::history::MOVED
                            ),
                            current: done.bytes_moved as i64,
                            total: done.bytes_moved as i64,
                            completed: true,
                        });
                    }
                    if let Ok(mut c) = self.copies.lock() {
                        c.entry(r.clone())
                            .or_default()
                            .insert(slot.id.clone(), done.r#ref.clone());
                    }
                    return Ok(done.r#ref);
                }
                Err(e) if self.is_gone(&holder) || e.is_unreachable() => {
                    tracing::warn!(input = %r, holder, error = %kiln_proto::status::Chain(&e), "input's worker unreachable: making it again");
                    r = self.remake(&r).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Farm(format!(
            "input {input} could not be brought to worker {}",
            slot.id
        )))
    }

    fn is_gone(&self, id: &str) -> bool {
        self.members
            .lock()
            .map(|m| !m.by_id.contains_key(id))
            .unwrap_or(true)
    }

    /// Makes a result again whose worker is gone, from the op that made it.
    fn remake<'a>(
        &'a self,
        r: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, Error>> + Send + 'a>> {
        Box::pin(async move {
            let lock = self
                .remaking
                .lock()
                .map(|mut m| m.entry(r.to_string()).or_default().clone())
                .unwrap_or_default();
            let _one = lock.lock().await;
            let current = self.current(r);
            if current != r {
                return Ok(current);
            }
            let made = self
                .lineage
                .lock()
                .ok()
                .and_then(|l| l.made.get(r).map(|(m, _)| (m.op.clone(), m.output)));
            let Some((op, output)) = made else {
                return Err(Error::Farm(format!(
                    "the worker holding {r} is gone, and the farm does not know how it was made"
                )));
            };
            tracing::info!(r, step = %op.name, "making a lost result again");
            let quiet: Arc<dyn Fn(RunEvent) + Send + Sync> = Arc::new(|_| {});
            let out = self.run_step(op, quiet).await?;
            let again = out.refs.get(output).cloned().unwrap_or_default();
            if let Ok(mut l) = self.lineage.lock() {
                l.again.insert(r.to_string(), again.clone());
            }
            if let Ok(mut m) = self.remaking.lock() {
                m.remove(r);
            }
            Ok(again)
        })
    }

    fn record_lineage(&self, op: &RunOp, refs: &[String]) {
        let Ok(mut l) = self.lineage.lock() else {
            return;
        };
        for input in &op.inputs {
            l.touch(input);
        }
        for (i, r) in refs.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            l.insert(
                r.clone(),
                Made {
                    op: op.clone(),
                    output: i,
                },
            );
        }
    }

    /// Places and runs one step, again elsewhere when its worker is lost.
    fn run_step<'a>(
        &'a self,
        op: RunOp,
        events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Pin<Box<dyn Future<Output = Result<RunOutputs, Error>> + Send + 'a>> {
        Box::pin(async move {
            let want = want_of(&op.op_bytes)?;
            let mut avoid = HashSet::new();
            let mut attempt = 0;
            loop {
                let slot = self.acquire(&want, &op.inputs, &avoid).await?;
                let r = async {
                    let inputs = self.localize(&slot, &op.inputs, &events).await?;
                    if self.shows_placement() {
                        events(RunEvent::Progress {
                            id: format!("{}{}", crate::history::PLACED_ON, slot.id),
                            current: 0,
                            total: 0,
                            completed: true,
                        });
                    }
                    let local = RunOp {
                        inputs,
                        ..op.clone()
                    };
                    slot.worker.run(local, events.clone()).await
                };
                let r = tokio::select! {
                    r = r => r,
                    () = lost(slot.lost.clone()) => Err(Error::Farm(format!("worker {} was dropped from the farm", slot.id))),
                };
                match r {
                    Ok(mut out) => {
                        out.refs = out.refs.iter().map(|l| self.qualify(&slot.id, l)).collect();
                        out.worker = slot.id.clone();
                        self.record_lineage(&op, &out.refs);
                        return Ok(out);
                    }
                    Err(e)
                        if *slot.lost.borrow() || e.is_unreachable() || self.is_gone(&slot.id) =>
                    {
                        attempt += 1;
                        let why = kiln_proto::status::chain(&e);
                        if attempt > self.config.retries {
                            return Err(Error::Farm(format!(
                                "step lost its worker {} times; the last: worker {}: {why}",
                                attempt, slot.id
                            )));
                        }
                        events(RunEvent::Log {
                            stream: 2,
                            data: format!(
                                "worker {} lost ({why}): the step runs again elsewhere (retry {attempt} of {})\n",
                                slot.id, self.config.retries
                            )
                            .into_bytes(),
                        });
                        tracing::warn!(step = %op.name, worker = %slot.id, error = why, attempt, "step's worker lost: running it again");
                        avoid.insert(slot.id.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    }

    /// Refs grouped by the member holding them: member id -> (index, local ref).
    fn by_member(&self, refs: &[String]) -> HashMap<Option<String>, Vec<(usize, String)>> {
        let mut out: HashMap<Option<String>, Vec<(usize, String)>> = HashMap::new();
        for (i, r) in refs.iter().enumerate() {
            let (owner, local) = self.owner(r);
            out.entry(owner.map(str::to_string))
                .or_default()
                .push((i, local.to_string()));
        }
        out
    }

    fn worker_of(&self, id: &str) -> Option<Arc<W>> {
        self.members
            .lock()
            .ok()
            .and_then(|m| m.by_id.get(id).map(|mm| mm.worker.clone()))
    }

    fn live_members(&self) -> Vec<(String, Arc<W>)> {
        self.members
            .lock()
            .map(|m| {
                let mut v: Vec<_> = m
                    .by_id
                    .values()
                    .map(|mm| (mm.reg.id.clone(), mm.worker.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            })
            .unwrap_or_default()
    }

    /// A member for an interactive process over `inputs`, with the inputs moved there.
    async fn for_process(&self, inputs: &[String]) -> Result<(Slot<'_, W>, Vec<String>), Error> {
        let slot = self
            .acquire(&Want::default(), inputs, &HashSet::new())
            .await?;
        let quiet: Arc<dyn Fn(RunEvent) + Send + Sync> = Arc::new(|_| {});
        let local = self.localize(&slot, inputs, &quiet).await?;
        Ok((slot, local))
    }
}

fn short(r: &str) -> &str {
    r.get(..12).unwrap_or(r)
}

fn describe(want: &Want) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &want.platform {
        parts.push(format!("platform {p}"));
    }
    if !want.filters.is_empty() {
        parts.push(format!(
            "{} worker constraint filter(s)",
            want.filters.len()
        ));
    }
    if parts.is_empty() {
        "any worker".into()
    } else {
        parts.join(", ")
    }
}

/// What an op asks of its worker: an exec op's platform, and its constraints.
pub fn want_of(op_bytes: &[u8]) -> Result<Want, Error> {
    use prost::Message;
    let op =
        pb::Op::decode(op_bytes).map_err(|e| Error::Farm(format!("decode the step's op: {e}")))?;
    want_of_op(&op)
}

/// [`want_of`] for a decoded op (its constraint filters come from the client).
pub fn want_of_op(op: &pb::Op) -> Result<Want, Error> {
    let platform = match (&op.op, &op.platform) {
        (Some(pb::op::Op::Exec(_)), Some(p)) if !p.os.is_empty() && !p.architecture.is_empty() => {
            Some(kiln_oci::Platform::from(p).normalized())
        }
        _ => None,
    };
    let filters = op
        .constraints
        .iter()
        .flat_map(|c| c.filter.iter())
        .map(|f| Filter::parse(f).map_err(Error::Farm))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Want { platform, filters })
}

/// A container id on a member: `ID@WORKER` (bare on the home worker).
fn container_target<'a>(farm_home: Option<&'a str>, id: &'a str) -> (Option<&'a str>, &'a str) {
    match split_ref(id) {
        (None, local) => (farm_home, local),
        s => s,
    }
}

impl<W: Worker> Worker for Farm<W> {
    fn home_id(&self) -> Option<String> {
        self.home.clone()
    }

    fn address(&self) -> String {
        let home = self.home.as_deref().and_then(|h| self.worker_of(h));
        match home {
            Some(w) => w.address(),
            None => "farm".into(),
        }
    }

    async fn run(
        &self,
        op: RunOp,
        events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<RunOutputs, Error> {
        self.run_step(op, events).await
    }

    async fn read_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
        offset: i64,
        length: i64,
    ) -> Result<Vec<u8>, Error> {
        let (w, t) = self.fs_target(r).await?;
        w.read_file(t.as_target(), path, offset, length).await
    }

    async fn read_dir(
        &self,
        r: FsTarget<'_>,
        path: &str,
        include: &str,
    ) -> Result<Vec<Stat>, Error> {
        let (w, t) = self.fs_target(r).await?;
        w.read_dir(t.as_target(), path, include).await
    }

    async fn stat_file(&self, r: FsTarget<'_>, path: &str) -> Result<Stat, Error> {
        let (w, t) = self.fs_target(r).await?;
        w.stat_file(t.as_target(), path).await
    }

    async fn new_container(&self, spec: ExecSpec) -> Result<String, Error> {
        let (slot, inputs) = self.for_process(&spec.inputs).await?;
        let id = slot
            .worker
            .new_container(ExecSpec { inputs, ..spec })
            .await?;
        Ok(self.qualify(&slot.id, &id))
    }

    async fn release_container(&self, id: &str) -> Result<(), Error> {
        let (w, local) = self.container(id)?;
        w.release_container(&local).await
    }

    async fn exec(
        &self,
        spec: ExecSpec,
        input: tokio::sync::mpsc::Receiver<ExecInput>,
        events: tokio::sync::mpsc::Sender<ExecEvent>,
    ) -> Result<i32, Error> {
        if let Some(c) = spec.container.clone() {
            let (w, local) = self.container(&c)?;
            return w
                .exec(
                    ExecSpec {
                        container: Some(local),
                        ..spec
                    },
                    input,
                    events,
                )
                .await;
        }
        let (slot, inputs) = self.for_process(&spec.inputs).await?;
        slot.worker
            .exec(ExecSpec { inputs, ..spec }, input, events)
            .await
    }

    async fn checksum(&self, r: &str, selectors: &[Selector]) -> Result<String, Error> {
        let (w, local) = self.holder(r).await?;
        w.checksum(&local, selectors).await
    }

    async fn path_entries(&self, r: &str, selectors: &[Selector]) -> Result<Vec<PathEntry>, Error> {
        let (w, local) = self.holder(r).await?;
        w.path_entries(&local, selectors).await
    }

    async fn exists(&self, refs: &[String]) -> Result<Vec<bool>, Error> {
        let mut out = vec![false; refs.len()];
        for (owner, group) in self.by_member(refs) {
            // a ref whose worker is gone exists where a copy of it does;
            // without one it is a miss, never an error
            let Some(w) = owner.as_deref().and_then(|o| self.worker_of(o)) else {
                for (i, _) in &group {
                    if let Some((id, w, local)) = self.stand_in(&refs[*i]) {
                        match w.exists(std::slice::from_ref(&local)).await {
                            Ok(found) => out[*i] = found.first().copied().unwrap_or(false),
                            Err(e) => {
                                tracing::warn!(worker = id, error = %kiln_proto::status::Chain(&e), "worker unreachable: its copy counts as missing");
                            }
                        }
                    }
                }
                continue;
            };
            let locals: Vec<String> = group.iter().map(|(_, l)| l.clone()).collect();
            match w.exists(&locals).await {
                Ok(found) => {
                    for ((i, _), f) in group.iter().zip(found) {
                        out[*i] = f;
                    }
                }
                Err(e) if owner != self.home => {
                    tracing::warn!(worker = ?owner, error = %kiln_proto::status::Chain(&e), "worker unreachable: its results count as missing");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn usage(&self, refs: &[String]) -> Result<WorkerUsage, Error> {
        let mut total = WorkerUsage::default();
        let groups: Vec<(String, Arc<W>, Vec<String>)> = if refs.is_empty() {
            self.live_members()
                .into_iter()
                .map(|(id, w)| (id, w, vec![]))
                .collect()
        } else {
            self.by_member(refs)
                .into_iter()
                .filter_map(|(o, g)| {
                    let o = o?;
                    let w = self.worker_of(&o)?;
                    Some((o, w, g.iter().map(|(_, l)| l.clone()).collect()))
                })
                .collect()
        };
        for (id, w, locals) in groups {
            let u = match w.usage(&locals).await {
                Ok(u) => u,
                Err(e) if self.home.as_deref() != Some(id.as_str()) => {
                    tracing::warn!(worker = id, error = %kiln_proto::status::Chain(&e), "worker's disk usage left out");
                    continue;
                }
                Err(e) => return Err(e),
            };
            total.blobs_size += u.blobs_size;
            total.snapshots.extend(u.snapshots.into_iter().map(|mut s| {
                s.r#ref = self.qualify(&id, &s.r#ref);
                s.parent = self.qualify(&id, &s.parent);
                s
            }));
        }
        Ok(total)
    }

    async fn prepare_layers(&self, r: &str, options: &kiln_oci::LayerOptions) -> Result<(), Error> {
        let (w, local) = self.holder(r).await?;
        w.prepare_layers(&local, options).await
    }

    async fn prune(&self, keep: &[String], before: i64) -> Result<WorkerUsage, Error> {
        let kept = self.by_member(keep);
        let mut total = WorkerUsage::default();
        for (id, w) in self.live_members() {
            let mut local: Vec<String> = kept
                .get(&Some(id.clone()))
                .map(|g| g.iter().map(|(_, l)| l.clone()).collect())
                .unwrap_or_default();
            // a copy imported here is kept as long as the result it copies is
            if let Ok(c) = self.copies.lock() {
                local.extend(
                    keep.iter()
                        .filter_map(|k| c.get(k).and_then(|h| h.get(&id)).cloned()),
                );
            }
            let u = match w.prune(&local, before).await {
                Ok(u) => u,
                Err(e) if self.home.as_deref() != Some(id.as_str()) => {
                    tracing::warn!(worker = id, error = %kiln_proto::status::Chain(&e), "worker not pruned");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Ok(mut c) = self.copies.lock() {
                let removed: HashSet<&str> = u.snapshots.iter().map(|s| s.r#ref.as_str()).collect();
                for held in c.values_mut() {
                    if held.get(&id).is_some_and(|l| removed.contains(l.as_str())) {
                        held.remove(&id);
                    }
                }
            }
            total.blobs_size += u.blobs_size;
            total.snapshots.extend(u.snapshots.into_iter().map(|mut s| {
                s.r#ref = self.qualify(&id, &s.r#ref);
                s.parent = self.qualify(&id, &s.parent);
                s
            }));
        }
        Ok(total)
    }

    fn workers(&self) -> Option<Vec<WorkerInfo>> {
        let Ok(m) = self.members.lock() else {
            return Some(vec![]);
        };
        let mut v: Vec<WorkerInfo> = m
            .by_id
            .values()
            .map(|mm| WorkerInfo {
                id: mm.reg.id.clone(),
                address: mm.worker.address(),
                platforms: mm.reg.platforms.clone(),
                labels: mm.reg.labels.clone(),
                state: mm.state.name().to_string(),
                running: mm.running as u32,
                // 0: unbounded (the home worker)
                capacity: u32::try_from(mm.reg.capacity).unwrap_or(0),
                version: mm.reg.version.clone(),
                free_disk: mm.reg.free_disk,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Some(v)
    }

    async fn gather(&self, refs: &[String]) -> Result<(String, Vec<String>), Error> {
        let refs: Vec<String> = refs.iter().map(|r| self.current(r)).collect();
        let wanted: Vec<String> = refs.iter().filter(|r| !r.is_empty()).cloned().collect();
        let (slot, locals) = self.for_process(&wanted).await?;
        let mut it = locals.into_iter();
        let out = refs
            .iter()
            .map(|r| {
                if r.is_empty() {
                    String::new()
                } else {
                    it.next().unwrap_or_default()
                }
            })
            .collect();
        Ok((slot.worker.address(), out))
    }
}

/// A file call's target on the worker that holds it.
enum LocalTarget {
    Ref(String),
    Container(String, u32),
}

impl LocalTarget {
    fn as_target(&self) -> FsTarget<'_> {
        match self {
            LocalTarget::Ref(r) => FsTarget::Ref(r),
            LocalTarget::Container(id, mount) => FsTarget::Container { id, mount: *mount },
        }
    }
}

impl<W: Worker> Farm<W> {
    /// The worker a file call on `r` goes to, and `r` as that worker names it
    /// (scratch: any worker).
    async fn fs_target(&self, r: FsTarget<'_>) -> Result<(Arc<W>, LocalTarget), Error> {
        match r {
            FsTarget::Ref(r) if !r.is_empty() => {
                let (w, local) = self.holder(r).await?;
                Ok((w, LocalTarget::Ref(local)))
            }
            FsTarget::Container { id, mount } => {
                let (w, local) = self.container(id)?;
                Ok((w, LocalTarget::Container(local, mount)))
            }
            FsTarget::Ref(_) => Ok((self.any()?, LocalTarget::Ref(String::new()))),
        }
    }

    fn container(&self, id: &str) -> Result<(Arc<W>, String), Error> {
        let (owner, local) = container_target(self.home.as_deref(), id);
        let w = owner.and_then(|o| self.worker_of(o)).ok_or_else(|| {
            Error::Container(id.to_string(), "its worker is not in the farm".into())
        })?;
        Ok((w, local.to_string()))
    }

    /// Some worker, for a call about scratch.
    fn any(&self) -> Result<Arc<W>, Error> {
        self.live_members()
            .into_iter()
            .next()
            .map(|(_, w)| w)
            .ok_or_else(|| Error::Farm("no worker in the farm".into()))
    }
}

#[cfg(test)]
mod tests;
