//! Control, SessionBroker and LLBBridge servers.

use super::{BUILD_ID_KEY, convert};
use crate::Error;
use crate::build::Solver;
use crate::peer::{Exporter, Frontend, Worker};
use crate::session::Session;
use crate::usage::Filter;
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::kiln::session::v1::{ForwardFrame, session_broker_server};
use kiln_proto::moby::buildkit::v1::frontend::{
    self as fe, llb_bridge_server, result::Result as FeResult,
};
use kiln_proto::moby::buildkit::v1::{self as ctl, control_server, types};
use kiln_session::headers;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Serves `moby.buildkit.v1.Control`.
pub struct ControlService<W, F, E> {
    solver: Arc<Solver<W, F, E>>,
}

pub fn control_server<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
) -> control_server::ControlServer<ControlService<W, F, E>> {
    control_server::ControlServer::new(ControlService { solver })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn first_md(md: &tonic::metadata::MetadataMap, key: &str) -> String {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tonic::async_trait]
impl<W: Worker, F: Frontend, E: Exporter> control_server::Control for ControlService<W, F, E> {
    async fn disk_usage(
        &self,
        r: Request<ctl::DiskUsageRequest>,
    ) -> Result<Response<ctl::DiskUsageResponse>, Status> {
        let r = r.into_inner();
        let filter = Filter::parse(&r.filter).map_err(Status::from)?;
        let now = crate::cache::unix_nanos();
        let items = self.solver.usage().await.map_err(Status::from)?;
        let record = items
            .iter()
            .filter(|i| r.age_limit <= 0 || now - i.last_used <= r.age_limit)
            .filter(|i| filter.matches(i, now))
            .map(convert::usage_record)
            .collect();
        Ok(Response::new(ctl::DiskUsageResponse { record }))
    }

    type PruneStream = BoxStream<ctl::UsageRecord>;
    async fn prune(
        &self,
        r: Request<ctl::PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        let r = r.into_inner();
        let opts = convert::prune_options(&r).map_err(Status::from)?;
        let removed = self.solver.prune(&opts).await.map_err(Status::from)?;
        let out: Vec<Result<ctl::UsageRecord, Status>> = removed
            .iter()
            .map(|r| Ok(convert::usage_record(r)))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(out))))
    }

    type ListenBuildHistoryStream = BoxStream<ctl::BuildHistoryEvent>;
    /// Sends the running builds (`ActiveOnly`: STARTED events) or the
    /// finished ones (COMPLETE events, oldest first; one with `Ref`), then
    /// ends the stream.
    async fn listen_build_history(
        &self,
        r: Request<ctl::BuildHistoryRequest>,
    ) -> Result<Response<Self::ListenBuildHistoryStream>, Status> {
        let r = r.into_inner();
        let events: Vec<Result<ctl::BuildHistoryEvent, Status>> = if r.active_only {
            self.solver
                .active_builds()
                .into_iter()
                .filter(|(id, _)| r.r#ref.is_empty() || *id == r.r#ref)
                .map(|(id, started)| {
                    Ok(ctl::BuildHistoryEvent {
                        r#type: ctl::BuildHistoryEventType::Started as i32,
                        record: Some(ctl::BuildHistoryRecord {
                            r#ref: id,
                            created_at: Some(convert::timestamp(started)),
                            ..Default::default()
                        }),
                    })
                })
                .collect()
        } else {
            let all = self.solver.history().await.map_err(Status::from)?;
            if !r.r#ref.is_empty() && !all.iter().any(|h| h.r#ref == r.r#ref) {
                return Err(Status::not_found(format!(
                    "no build {:?} in the history",
                    r.r#ref
                )));
            }
            all.iter()
                .filter(|h| r.r#ref.is_empty() || h.r#ref == r.r#ref)
                .map(|h| {
                    Ok(ctl::BuildHistoryEvent {
                        r#type: ctl::BuildHistoryEventType::Complete as i32,
                        record: Some(convert::history_record(h)),
                    })
                })
                .collect()
        };
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn solve(
        &self,
        request: Request<ctl::SolveRequest>,
    ) -> Result<Response<ctl::SolveResponse>, Status> {
        let req = convert::build_request(request.into_inner());
        if req.id.is_empty() {
            return Err(Status::invalid_argument("solve request has no ref"));
        }
        let solver = self.solver.clone();
        // a client that goes away (this call is dropped) cancels its build
        let task = tokio::spawn(async move { solver.solve(req).await });
        let _cancel = AbortOnDrop(task.abort_handle());
        let r = task
            .await
            .map_err(|e| Status::internal(format!("build task: {e}")))?;
        match r {
            Ok(resp) => Ok(Response::new(ctl::SolveResponse {
                exporter_response: resp,
            })),
            Err(e) => Err(Status::from(e)),
        }
    }

    type StatusStream = BoxStream<ctl::StatusResponse>;
    async fn status(
        &self,
        request: Request<ctl::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let id = request.into_inner().r#ref;
        let build = self
            .solver
            .build(&id, Duration::from_secs(30))
            .await
            .map_err(Status::from)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut from = 0;
            loop {
                let (items, done) = build.progress.next(from).await;
                from += items.len();
                for it in items {
                    if tx.send(Ok(it)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SessionStream = BoxStream<ctl::BytesMessage>;
    async fn session(
        &self,
        request: Request<Streaming<ctl::BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let md = request.metadata();
        let id = first_md(md, headers::SESSION_UUID);
        if id.is_empty() {
            return Err(Status::invalid_argument("session has no id"));
        }
        let name = first_md(md, headers::SESSION_NAME);
        let shared_key = first_md(md, headers::SESSION_SHAREDKEY);
        let sessions = self.solver.sessions.clone();
        let end_id = id.clone();
        let end_sessions = sessions.clone();
        let incoming = request
            .into_inner()
            .map(|r| r.map(|m| Bytes::from(m.data)))
            .chain(futures::stream::once(async move {
                end_sessions.remove(&end_id);
                Err(Status::cancelled("session closed"))
            }));
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(64);
        let conn = kiln_session::hijack::join(Box::pin(incoming), out_tx);
        let attach_sessions = sessions.clone();
        let attach_id = id.clone();
        tokio::spawn(async move {
            match kiln_session::hijack::channel(conn).await {
                Ok(channel) => attach_sessions.insert(Session {
                    id: attach_id,
                    name,
                    shared_key,
                    channel,
                }),
                Err(e) => tracing::warn!("session {attach_id}: {e}"),
            }
        });
        let out = ReceiverStream::new(out_rx).map(|b| Ok(ctl::BytesMessage { data: b.to_vec() }));
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_workers(
        &self,
        _r: Request<ctl::ListWorkersRequest>,
    ) -> Result<Response<ctl::ListWorkersResponse>, Status> {
        let platforms = self
            .solver
            .config
            .platforms
            .iter()
            .map(|p| {
                let mut it = p.split('/');
                kiln_proto::pb::Platform {
                    os: it.next().unwrap_or_default().to_string(),
                    architecture: it.next().unwrap_or_default().to_string(),
                    variant: it.next().unwrap_or_default().to_string(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(Response::new(ctl::ListWorkersResponse {
            record: vec![types::WorkerRecord {
                id: self.solver.worker.address(),
                labels: [(
                    "org.mobyproject.buildkit.worker.executor".to_string(),
                    "oci".to_string(),
                )]
                .into(),
                platforms,
                ..Default::default()
            }],
        }))
    }

    async fn info(
        &self,
        _r: Request<ctl::InfoRequest>,
    ) -> Result<Response<ctl::InfoResponse>, Status> {
        Ok(Response::new(ctl::InfoResponse {
            buildkit_version: Some(types::BuildkitVersion {
                package: "kiln".into(),
                version: VERSION.into(),
                revision: String::new(),
            }),
        }))
    }
}

/// Serves `kiln.session.v1.SessionBroker`: forwards calls to sessions.
pub struct BrokerService<W, F, E> {
    solver: Arc<Solver<W, F, E>>,
}

pub fn broker_server<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
) -> session_broker_server::SessionBrokerServer<BrokerService<W, F, E>> {
    session_broker_server::SessionBrokerServer::new(BrokerService { solver })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[tonic::async_trait]
impl<W: Worker, F: Frontend, E: Exporter> session_broker_server::SessionBroker
    for BrokerService<W, F, E>
{
    type ForwardStream = BoxStream<ForwardFrame>;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("forward stream closed before its first frame")
        })?;
        let session = self
            .solver
            .sessions
            .get(&first.session_id, self.solver.config.session_wait)
            .await
            .ok_or_else(|| Status::from(Error::NoSession(first.session_id.clone())))?;
        let first_msg = first
            .has_message
            .then(|| Bytes::from(first.message.clone()));
        let rest = inbound.filter_map(|f| async move {
            match f {
                Ok(f) if f.has_message => Some(Bytes::from(f.message)),
                _ => None,
            }
        });
        let outbound = futures::stream::iter(first_msg).chain(rest);
        let responses = kiln_session::raw::call(
            session.channel.clone(),
            &first.method,
            &first.metadata,
            outbound,
        )
        .await
        .map_err(Status::from)?;
        let out = responses.map(|r| {
            r.map(|b| ForwardFrame {
                message: b.to_vec(),
                has_message: true,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves `moby.buildkit.v1.frontend.LLBBridge` to frontends.
pub struct BridgeService<W, F, E> {
    solver: Arc<Solver<W, F, E>>,
}

pub fn bridge_server<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
) -> llb_bridge_server::LlbBridgeServer<BridgeService<W, F, E>> {
    llb_bridge_server::LlbBridgeServer::new(BridgeService { solver })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

impl<W: Worker, F: Frontend, E: Exporter> BridgeService<W, F, E> {
    async fn build<T>(&self, r: &Request<T>) -> Result<Arc<crate::build::Build>, Status> {
        let id = first_md(r.metadata(), BUILD_ID_KEY);
        self.solver
            .build(&id, Duration::from_secs(1))
            .await
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl<W: Worker, F: Frontend, E: Exporter> llb_bridge_server::LlbBridge for BridgeService<W, F, E> {
    async fn resolve_image_config(
        &self,
        request: Request<fe::ResolveImageConfigRequest>,
    ) -> Result<Response<fe::ResolveImageConfigResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let started = crate::progress::now();
        let name = format!("[internal] load metadata for {}", r.r#ref);
        let digest = format!(
            "sha256:{}",
            hex_sha(&format!("resolve:{}:{}", build.id, r.r#ref))
        );
        let res = self
            .solver
            .exporter()
            .resolve(&r.r#ref, r.platform, &build.session_id)
            .await;
        build.progress.vertex(ctl::Vertex {
            digest,
            name,
            started: Some(started),
            completed: Some(crate::progress::now()),
            error: res
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            ..Default::default()
        });
        let res = res.map_err(Status::from)?;
        Ok(Response::new(fe::ResolveImageConfigResponse {
            digest: res.digest,
            config: res.config,
            r#ref: res.reference,
        }))
    }

    async fn solve(
        &self,
        request: Request<fe::SolveRequest>,
    ) -> Result<Response<fe::SolveResponse>, Status> {
        let build = self.build(&request).await?;
        let def = request.into_inner().definition.unwrap_or_default();
        let worker_ref = self
            .solver
            .solve_definition(&build, &def)
            .await
            .map_err(Status::from)?;
        let id = build.add_ref(worker_ref);
        Ok(Response::new(fe::SolveResponse {
            r#ref: String::new(),
            result: Some(fe::Result {
                result: Some(FeResult::Ref(fe::Ref { id, def: None })),
                metadata: Default::default(),
            }),
        }))
    }

    async fn read_file(
        &self,
        request: Request<fe::ReadFileRequest>,
    ) -> Result<Response<fe::ReadFileResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let worker_ref = build.worker_ref(&r.r#ref).map_err(Status::from)?;
        let mut data = self
            .solver
            .worker
            .read_file(&worker_ref, &r.file_path)
            .await
            .map_err(Status::from)?;
        if let Some(range) = r.range {
            let start = (range.offset.max(0) as usize).min(data.len());
            let end = if range.length > 0 {
                (start + range.length as usize).min(data.len())
            } else {
                data.len()
            };
            data = data[start..end].to_vec();
        }
        Ok(Response::new(fe::ReadFileResponse { data }))
    }

    async fn ping(
        &self,
        _r: Request<fe::PingRequest>,
    ) -> Result<Response<fe::PongResponse>, Status> {
        Ok(Response::new(fe::PongResponse::default()))
    }
}

fn hex_sha(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
