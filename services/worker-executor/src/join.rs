//! Joining a farm: the worker's side of `kiln.farm.v1.Farm.Join`.
//!
//! [`join`] keeps one stream open to the scheduler for as long as the worker
//! runs: it registers (id, the address peers reach it at, platforms, labels,
//! capacity, free disk), then sends a keepalive every interval the scheduler
//! asked for. A stream that breaks, or a scheduler silent for its own timeout
//! (a partition), is dropped and dialled again, so a worker that comes back
//! re-registers under the same id and its snapshots are usable again. When the
//! worker is told to leave it sends `GoingAway` (the scheduler places nothing
//! more on it), waits for the scheduler's `Drained` (nothing placed on it still
//! runs) and for its own running steps, and returns.

use crate::Worker;
use kiln_proto::kiln::farm::v1::{self as fpb, farm_client::FarmClient};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How a worker joins a farm.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// the scheduler's internal address (where `Farm` is served)
    pub scheduler: String,
    /// this worker's Worker API address as the others reach it
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// steps it runs at once
    pub capacity: u32,
    /// how long a worker leaving waits for its running steps
    pub drain_timeout: Duration,
}

/// Waits between attempts to reach the scheduler.
const RETRY: Duration = Duration::from_secs(1);
/// Until the scheduler says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one stream ended.
enum Ended {
    /// the worker is leaving and has drained
    Left,
    /// the stream broke or went silent: dial again
    Lost(String),
}

/// Stays joined to the scheduler until `leave` turns true, then drains and returns.
pub async fn join(worker: Arc<Worker>, config: JoinConfig, mut leave: watch::Receiver<bool>) {
    loop {
        match session(&worker, &config, &mut leave).await {
            Ended::Left => return,
            Ended::Lost(why) => {
                tracing::warn!(scheduler = %config.scheduler, "farm stream lost ({why}); joining again");
            }
        }
        if *leave.borrow() {
            drain(&worker, &config).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            Ok(()) = leave.changed() => {}
        }
    }
}

fn register(worker: &Worker, config: &JoinConfig) -> fpb::WorkerMessage {
    fpb::WorkerMessage {
        message: Some(fpb::worker_message::Message::Register(fpb::Register {
            id: worker.id().to_string(),
            address: config.address.clone(),
            platforms: worker
                .platforms()
                .iter()
                .map(kiln_proto::pb::Platform::from)
                .collect(),
            labels: config.labels.clone(),
            capacity: config.capacity,
            free_disk: worker.free_disk(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    }
}

fn keepalive(worker: &Worker) -> fpb::WorkerMessage {
    fpb::WorkerMessage {
        message: Some(fpb::worker_message::Message::Keepalive(fpb::Keepalive {
            running: worker.running_steps() as u32,
            free_disk: worker.free_disk(),
        })),
    }
}

/// One stream to the scheduler, from dial to its end.
async fn session(worker: &Worker, config: &JoinConfig, leave: &mut watch::Receiver<bool>) -> Ended {
    let channel = match kiln_session::dial::connect(&config.scheduler).await {
        Ok(c) => c,
        Err(e) => return Ended::Lost(kiln_proto::status::chain(&e)),
    };
    let (tx, rx) = mpsc::channel(8);
    let _ = tx.send(register(worker, config)).await;
    let mut client = FarmClient::new(channel);
    let call = client.join(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut inbound = match tokio::time::timeout(DEFAULT_TIMEOUT, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return Ended::Lost(s.message().to_string()),
        Err(_) => return Ended::Lost("no answer to register".into()),
    };
    let (mut interval, mut timeout) = (DEFAULT_INTERVAL, DEFAULT_TIMEOUT);
    let mut tick = tokio::time::interval(interval);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    last_heard = tokio::time::Instant::now();
                    if let Some(fpb::scheduler_message::Message::Registered(r)) = m.message {
                        interval = Duration::from_millis(r.keepalive_interval_ms.max(100));
                        timeout = Duration::from_millis(r.timeout_ms.max(500));
                        tick = tokio::time::interval(interval);
                        tracing::info!(scheduler = %config.scheduler, id = worker.id(), "joined the farm");
                    }
                }
                Ok(None) => return Ended::Lost("the scheduler ended the stream".into()),
                Err(s) => return Ended::Lost(s.message().to_string()),
            },
            _ = tick.tick() => {
                if last_heard.elapsed() > timeout {
                    return Ended::Lost(format!("nothing from the scheduler for {timeout:?}"));
                }
                if tx.send(keepalive(worker)).await.is_err() {
                    return Ended::Lost("the stream closed".into());
                }
            }
            Ok(()) = leave.changed() => {
                let going = fpb::WorkerMessage {
                    message: Some(fpb::worker_message::Message::GoingAway(fpb::GoingAway {
                        reason: "the worker is shutting down".into(),
                    })),
                };
                let _ = tx.send(going).await;
                // keep the stream (and its keepalives) up until the scheduler
                // says nothing it placed here still runs (steps it placed may
                // not have reached this worker yet)
                let deadline = tokio::time::Instant::now() + config.drain_timeout;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = tick.tick() => { let _ = tx.send(keepalive(worker)).await; }
                        m = inbound.message() => match m {
                            Ok(Some(fpb::SchedulerMessage {
                                message: Some(fpb::scheduler_message::Message::Drained(_)),
                            })) => break,
                            Ok(Some(_)) => {}
                            // the scheduler is gone: nothing more to tell it
                            _ => break,
                        },
                    }
                }
                drain(worker, config).await;
                return Ended::Left;
            }
        }
    }
}

/// Waits (at most the drain timeout) until no step runs.
async fn drain(worker: &Worker, config: &JoinConfig) {
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    while worker.running_steps() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(
        running = worker.running_steps(),
        "drained: leaving the farm"
    );
}
