//! `kiln.farm.v1.Farm`: workers join the scheduler's farm (see [`crate::farm`]).
//!
//! One stream per worker: `Register` first (answered with `Registered`, which
//! tells the worker how often to send keepalives and after how long without
//! one it is dropped), then keepalives both ways, `GoingAway` when it drains.
//! The stream ending, or nothing heard for the timeout, drops the worker.

use crate::farm::Farm;
use crate::farm::members::Registration;
use crate::peer::Worker;
use kiln_proto::kiln::farm::v1::{self as fpb, farm_server};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub struct FarmService<W> {
    farm: Arc<Farm<W>>,
}

pub fn farm_server<W: Worker>(farm: Arc<Farm<W>>) -> farm_server::FarmServer<FarmService<W>> {
    farm_server::FarmServer::new(FarmService { farm })
}

/// A worker's registration, checked: its id names its refs, so it must be
/// usable inside one (no `@`, no path characters).
fn registration(r: fpb::Register) -> Result<Registration, Status> {
    let id_ok = !r.id.is_empty()
        && r.id.len() <= 128
        && r.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err(Status::invalid_argument(format!(
            "worker id {:?}: 1 to 128 letters, digits, '-', '_' or '.'",
            r.id
        )));
    }
    kiln_session::dial::Addr::parse(&r.address).map_err(|e| {
        Status::invalid_argument(format!(
            "worker {}: address {:?}: {}",
            r.id,
            r.address,
            kiln_proto::status::chain(&e)
        ))
    })?;
    let platforms = r
        .platforms
        .iter()
        .map(|p| kiln_oci::Platform::from(p).normalized())
        .collect();
    Ok(Registration {
        id: r.id,
        address: r.address,
        platforms,
        labels: r.labels.into_iter().collect(),
        capacity: (r.capacity as usize).max(1),
        free_disk: r.free_disk,
        version: r.version,
    })
}

/// How often a draining worker's steps are looked at.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

type JoinStream = Pin<Box<dyn Stream<Item = Result<fpb::SchedulerMessage, Status>> + Send>>;

fn message(m: fpb::scheduler_message::Message) -> Result<fpb::SchedulerMessage, Status> {
    Ok(fpb::SchedulerMessage { message: Some(m) })
}

#[tonic::async_trait]
impl<W: Worker> farm_server::Farm for FarmService<W> {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        req: Request<Streaming<fpb::WorkerMessage>>,
    ) -> Result<Response<JoinStream>, Status> {
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(fpb::WorkerMessage {
                message: Some(fpb::worker_message::Message::Register(r)),
            }) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a farm stream is register",
                ));
            }
        };
        let reg = registration(first)?;
        let id = reg.id.clone();
        let farm = self.farm.clone();
        let generation = farm.register(reg).map_err(Status::from)?;
        let config = farm.config().clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let _ = tx
            .send(message(fpb::scheduler_message::Message::Registered(
                fpb::Registered {
                    keepalive_interval_ms: config.keepalive_interval.as_millis() as u64,
                    timeout_ms: config.timeout.as_millis() as u64,
                },
            )))
            .await;
        tokio::spawn(async move {
            let mut draining = false;
            let mut told_drained = false;
            let why = loop {
                // a draining worker is told once nothing placed on it still runs
                if draining && !told_drained && farm.running_on(&id) == Some(0) {
                    told_drained = true;
                    let drained = fpb::scheduler_message::Message::Drained(fpb::Drained {});
                    if tx.send(message(drained)).await.is_err() {
                        break "stream closed".to_string();
                    }
                }
                let wait = if draining && !told_drained {
                    DRAIN_POLL
                } else {
                    config.timeout
                };
                let next = tokio::select! {
                    m = tokio::time::timeout(wait, inbound.message()) => m,
                    () = farm.closed() => break "the scheduler shut down".to_string(),
                };
                let m = match next {
                    Err(_) if wait == DRAIN_POLL => continue,
                    Err(_) => break format!("no keepalive for {:?}", config.timeout),
                    Ok(Err(s)) => break format!("stream broke: {}", s.message()),
                    Ok(Ok(None)) => break "it left".to_string(),
                    Ok(Ok(Some(m))) => m,
                };
                match m.message {
                    Some(fpb::worker_message::Message::Keepalive(k)) => {
                        farm.heard(&id, generation, k.free_disk);
                        let reply = fpb::scheduler_message::Message::Keepalive(fpb::Keepalive {
                            running: 0,
                            free_disk: 0,
                        });
                        if tx.send(message(reply)).await.is_err() {
                            break "stream closed".to_string();
                        }
                    }
                    Some(fpb::worker_message::Message::GoingAway(g)) => {
                        tracing::info!(worker = %id, reason = %g.reason, "worker going away");
                        farm.drain(&id, generation);
                        draining = true;
                    }
                    Some(fpb::worker_message::Message::Register(_)) | None => {}
                }
            };
            farm.drop_worker(&id, generation, &why);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
