//! Control, SessionBroker and LLBBridge servers.

use super::{BUILD_ID_KEY, convert};
use crate::Error;
use crate::build::FrontendResult;
use crate::peer::{Exporter, Frontend, FsTarget, Worker};
use crate::session::Session;
use crate::solve::AbortOnDrop;
use crate::solver::Solver;
use crate::usage::Filter;
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::kiln::session::v1::{ForwardFrame, session_broker_server};
use kiln_proto::moby::buildkit::v1::frontend::{
    self as fe, llb_bridge_server, result::Result as FeResult,
};
use kiln_proto::moby::buildkit::v1::{self as ctl, control_server, types};
use kiln_session::headers;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

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
        let owner = caller_identity(&request);
        let mut req = convert::build_request(request.into_inner());
        req.owner = owner;
        if req.id.is_empty() {
            return Err(Status::invalid_argument("solve request has no ref"));
        }
        let solver = self.solver.clone();
        let id = req.id.clone();
        // a client that goes away (this call is dropped) cancels its build;
        // this call's span is the build's root span
        let task = tokio::spawn(async move { solver.solve(req).await }.in_current_span());
        let _cancel = AbortOnDrop::new(task.abort_handle());
        let r = task
            .await
            .map_err(|e| Status::internal(format!("build task: {e}")));
        if let Ok(b) = self.solver.build(&id, Duration::ZERO).await {
            b.end_span();
        }
        let r = r?;
        match r {
            Ok(resp) => Ok(Response::new(ctl::SolveResponse {
                exporter_response: resp,
            })),
            Err(e) => Err(build_failure(e)),
        }
    }

    type StatusStream = BoxStream<ctl::StatusResponse>;
    async fn status(
        &self,
        request: Request<ctl::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let id = request.into_inner().r#ref;
        // a client asks as it starts its Solve; a build unknown this long after is
        // none (BuildKit gives up after about as long)
        let build = self
            .solver
            .build(&id, Duration::from_secs(6))
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
        // The shared key names the client's dir (the worker keeps one synced copy of a
        // context per key): a client with a certificate gets keys of its own, so another
        // client sending the same key never shares, or plants files in, its copy.
        let shared_key = scoped_shared_key(
            &caller_identity(&request),
            &first_md(md, headers::SESSION_SHAREDKEY),
        );
        let sessions = self.solver.sessions.clone();
        if sessions.contains(&id) {
            return Err(Status::already_exists(format!(
                "a session with id {id:?} is already attached"
            )));
        }
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
                Ok(channel) => {
                    let added = attach_sessions.insert(Session {
                        id: attach_id.clone(),
                        name,
                        shared_key,
                        channel,
                    });
                    if !added {
                        tracing::warn!("session {attach_id}: the id is taken; not attached");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %kiln_proto::status::Chain(&e), "session {attach_id}")
                }
            }
        });
        let out = ReceiverStream::new(out_rx).map(|b| Ok(ctl::BytesMessage { data: b.to_vec() }));
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_workers(
        &self,
        r: Request<ctl::ListWorkersRequest>,
    ) -> Result<Response<ctl::ListWorkersResponse>, Status> {
        // containerd's filter grammar, as BuildKit filters its workers
        let filters = r
            .into_inner()
            .filter
            .iter()
            .map(|f| crate::farm::place::Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(ctl::ListWorkersResponse {
            record: worker_records(&self.solver, &filters),
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

/// A failed build as its client gets it: a failed step or frontend is
/// `Unknown` as in BuildKit (clients print any other code before the message),
/// with its message and the step and source lines in the status details.
fn build_failure(e: Error) -> Status {
    let build_error = matches!(
        e,
        Error::Vertex { .. } | Error::Frontend { .. } | Error::ClientFrontend(_)
    );
    let details = e.details().cloned().unwrap_or_default();
    let s = Status::from(e);
    if build_error && s.code() != tonic::Code::Cancelled {
        let s = Status::with_metadata(tonic::Code::Unknown, s.message(), s.metadata().clone());
        return details.attach(s);
    }
    s
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
        // Answer at once and forward in a task: a session server may send its
        // response headers only with its first message (Go's gRPC does), and a
        // FileSend receiver sends nothing until the caller's first packet, which
        // the caller sends only once this call has answered.
        let (tx, rx) = mpsc::channel::<Result<ForwardFrame, Status>>(32);
        let method = first.method.clone();
        let metadata = first.metadata.clone();
        let task = tokio::spawn(async move {
            let responses = match kiln_session::raw::call(
                session.channel.clone(),
                &method,
                &metadata,
                outbound,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            };
            let mut responses = responses.map(|r| {
                r.map(|b| ForwardFrame {
                    message: b.to_vec(),
                    has_message: true,
                    ..Default::default()
                })
            });
            while let Some(r) = responses.next().await {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let guard = AbortOnDrop::new(task.abort_handle());
        // the forwarded call ends with this one
        let out = ReceiverStream::new(rx).map(move |m| {
            let _ = &guard;
            m
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves `moby.buildkit.v1.frontend.LLBBridge`: to kiln's frontend service on
/// the internal listener, and on the client listener to clients that run their
/// frontend themselves (buildctl, buildx, BuildKit's Go client).
pub struct BridgeService<W, F, E> {
    solver: Arc<Solver<W, F, E>>,
    edge: Edge,
}

/// Whom a [`BridgeService`] answers.
#[derive(Clone)]
enum Edge {
    /// kiln's own services: any build, named by `kiln-build-id`
    Internal,
    /// clients: only a build waiting for its client-side frontend, named by
    /// `buildkit-controlapi-buildid`, and only for the client that started it
    Client,
    /// a frontend image, on its own connection (its stdio): its build only
    Container(Arc<FrontendCall>),
}

/// One run of a frontend image: the build it works for, the inputs it is
/// given and what it returned.
pub struct FrontendCall {
    build: Arc<crate::build::Build>,
    inputs: BTreeMap<String, kiln_proto::pb::Definition>,
    result: std::sync::Mutex<Option<Result<FrontendResult, Error>>>,
    /// notified once the frontend has returned
    pub returned: tokio::sync::Notify,
}

impl FrontendCall {
    pub fn new(
        build: Arc<crate::build::Build>,
        inputs: BTreeMap<String, kiln_proto::pb::Definition>,
    ) -> Arc<FrontendCall> {
        Arc::new(FrontendCall {
            build,
            inputs,
            result: std::sync::Mutex::new(None),
            returned: tokio::sync::Notify::new(),
        })
    }

    /// What the frontend returned, if it did.
    pub fn take_result(&self) -> Option<Result<FrontendResult, Error>> {
        self.result.lock().ok().and_then(|mut r| r.take())
    }
}

/// Serves LLBBridge for a frontend image's run on `conn` (its stdio) until
/// `shutdown` resolves.
pub async fn serve_frontend_bridge<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
    call: Arc<FrontendCall>,
    conn: kiln_session::hijack::Conn,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming =
        futures::stream::iter([Ok::<_, std::io::Error>(conn)]).chain(futures::stream::pending());
    tonic::transport::Server::builder()
        .add_service(bridge(solver, Edge::Container(call)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

fn bridge<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
    edge: Edge,
) -> llb_bridge_server::LlbBridgeServer<BridgeService<W, F, E>> {
    llb_bridge_server::LlbBridgeServer::new(BridgeService { solver, edge })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// LLBBridge for kiln's frontend service (internal listener only).
pub fn bridge_server<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
) -> llb_bridge_server::LlbBridgeServer<BridgeService<W, F, E>> {
    bridge(solver, Edge::Internal)
}

/// LLBBridge for clients' own frontends (the client listener).
pub fn client_bridge_server<W: Worker, F: Frontend, E: Exporter>(
    solver: Arc<Solver<W, F, E>>,
) -> llb_bridge_server::LlbBridgeServer<BridgeService<W, F, E>> {
    bridge(solver, Edge::Client)
}

/// The identity of the client that made a call: the SHA-256 of its TLS
/// certificate, empty on a listener without client certificates.
pub fn caller_identity<T>(r: &Request<T>) -> String {
    // kilnd's TLS listener hands tonic rustls streams, whose certificates tonic
    // puts in each request's extensions
    let certs = r.peer_certs();
    match certs.as_deref().and_then(|c| c.first()) {
        Some(leaf) => kiln_digest::sha256_hex(leaf.as_ref()),
        None => String::new(),
    }
}

/// A session's shared key as the rest of kiln sees it: the client's key,
/// qualified by the caller's identity when it has one.
fn scoped_shared_key(identity: &str, key: &str) -> String {
    if identity.is_empty() {
        key.to_string()
    } else {
        format!("{identity}/{key}")
    }
}

/// gRPC metadata naming the build an LLBBridge call belongs to, as BuildKit's
/// clients send it.
const CLIENT_BUILD_ID_KEY: &str = "buildkit-controlapi-buildid";

impl<W: Worker, F: Frontend, E: Exporter> BridgeService<W, F, E> {
    /// LLBBridge `Solve` of `build`.
    async fn solve_in(
        &self,
        build: Arc<crate::build::Build>,
        r: fe::SolveRequest,
    ) -> Result<Response<fe::SolveResponse>, Status> {
        let result = if r.frontend.is_empty() {
            FrontendResult {
                r#ref: Some(build.add_ref(r.definition.unwrap_or_default())),
                ..Default::default()
            }
        } else {
            self.solver
                .run_frontend(&build, &r.frontend, &r.frontend_opt, r.frontend_inputs)
                .await
                .map_err(build_failure)?
        };
        if r.evaluate || r.r#final {
            let ids: Vec<&str> = result
                .refs
                .values()
                .map(String::as_str)
                .chain(result.r#ref.as_deref())
                .collect();
            for id in ids {
                self.snapshot(&build, id).await?;
            }
        }
        let wire = wire_result(&build, &result)?;
        if r.r#final {
            // an old client's return: this result is what the build exports
            let mut done = result.clone();
            done.metadata
                .extend(exporter_attr_metadata(&r.exporter_attr)?);
            build
                .finish_client_frontend(Ok(done))
                .map_err(Status::from)?;
        }
        if !r.allow_result_return {
            // a client from before results: the ref id alone
            return Ok(Response::new(fe::SolveResponse {
                r#ref: result.r#ref.unwrap_or_default(),
                result: None,
            }));
        }
        Ok(Response::new(fe::SolveResponse {
            r#ref: String::new(),
            result: Some(wire),
        }))
    }

    async fn build<T>(&self, r: &Request<T>) -> Result<Arc<crate::build::Build>, Status> {
        let md = r.metadata();
        let id = match &self.edge {
            Edge::Internal => Some(first_md(md, BUILD_ID_KEY))
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| first_md(md, CLIENT_BUILD_ID_KEY)),
            Edge::Client => first_md(md, CLIENT_BUILD_ID_KEY),
            Edge::Container(call) => return Ok(call.build.clone()),
        };
        if id.is_empty() {
            return Err(Status::invalid_argument(format!(
                "LLBBridge call without a build id ({CLIENT_BUILD_ID_KEY} metadata)"
            )));
        }
        let build = self
            .solver
            .build(&id, Duration::from_secs(3))
            .await
            .map_err(Status::from)?;
        if matches!(self.edge, Edge::Client) {
            if !build.awaits_client_frontend() {
                return Err(Status::from(Error::NotForwarded(id)));
            }
            if caller_identity(r) != build.owner {
                return Err(Status::permission_denied(format!(
                    "build {id:?} was started by another client"
                )));
            }
        }
        Ok(build)
    }

    /// Hands a frontend's result to whoever waits for it: the frontend image's
    /// run, or the build whose client runs the frontend.
    fn deliver(
        &self,
        build: &crate::build::Build,
        r: Result<FrontendResult, Error>,
    ) -> Result<(), Status> {
        match &self.edge {
            Edge::Container(call) => {
                if let Ok(mut slot) = call.result.lock() {
                    *slot = Some(r);
                }
                call.returned.notify_one();
                Ok(())
            }
            _ => build.finish_client_frontend(r).map_err(Status::from),
        }
    }

    /// A result id's snapshot (solved now if it was not yet).
    async fn snapshot(&self, build: &Arc<crate::build::Build>, id: &str) -> Result<String, Status> {
        self.solver.solve_ref(build, id).await.map_err(Status::from)
    }
}

/// LLBBridge capabilities kiln has (Ping). A client checks these before it
/// uses a call or an LLB feature, so only what works is listed.
const FRONTEND_CAPS: &[&str] = &[
    "solve.base",
    "solve.inlinereturn",
    "resolveimage",
    "resolveimage.resolvemode",
    "readfile",
    "return",
    "returnmap",
    "readdir",
    "statfile",
    "proto.refarray",
    "reference.output",
    "frontend.inputs",
    "gateway.solve.metadata",
    "gateway.solve.evaluate",
    "gateway.evaluate",
    "gateway.warnings",
    "frontend.caps",
    "gateway.exec",
    "gateway.exec.extrahosts",
    "gateway.exec.secretenv",
    "gateway.exec.signals",
    "gateway.exec.filesystem",
];

/// BuildKit's `ResolveImageConfigRequest.ResolverType` of an OCI layout.
const RESOLVER_TYPE_OCI_LAYOUT: i32 = 1;

const LLB_CAPS: &[&str] = &[
    "source.image",
    "source.ocilayout",
    "source.image.resolvemode",
    "source.local",
    "source.local.unique",
    "source.local.sessionid",
    "source.local.includepatterns",
    "source.local.followpaths",
    "source.local.excludepatterns",
    "source.local.sharedkeyhint",
    "source.git",
    "source.git.keepgitdir",
    "source.git.fullurl",
    "source.git.checksum",
    "source.git.subdir",
    "source.git.httpauth",
    "source.git.knownsshhosts",
    "source.git.mountsshsock",
    "source.http",
    "source.http.checksum",
    "source.http.perm",
    "soruce.http.uidgid",
    "source.buildop.llbfilename",
    "exec.meta.base",
    "exec.meta.network",
    "exec.meta.network.proxy",
    "exec.meta.proxyenv",
    "exec.meta.security",
    "exec.meta.setsdefaultpath",
    "exec.mount.bind",
    "exec.mount.bind.readwrite-nooutput",
    "exec.mount.cache",
    "exec.mount.cache.sharing",
    "exec.mount.selector",
    "exec.mount.tmpfs",
    "exec.mount.tmpfs.size",
    "exec.mount.secret",
    "exec.mount.ssh",
    "exec.secretenv",
    "exec.validexitcode",
    "file.base",
    "file.rm.wildcard",
    "file.copy.includeexcludepatterns",
    "file.copy.requiredpaths",
    "file.rm.nofollowsymlink",
    "file.copy.alwaysreplaceexistingdestpaths",
    "file.copy.modestring",
    "file.symlink.create",
    "constraints",
    "platform",
    "meta.ignorecache",
    "meta.description",
    "meta.exportcache",
    "mergeop",
    "diffop",
    "exporter.image.annotations",
    "exporter.sourcedateepoch",
    "exporter.multiple",
];

fn caps(ids: &[&str]) -> Vec<kiln_proto::moby::buildkit::v1::apicaps::ApiCap> {
    ids.iter()
        .map(|id| kiln_proto::moby::buildkit::v1::apicaps::ApiCap {
            id: id.to_string(),
            enabled: true,
            ..Default::default()
        })
        .collect()
}

/// A frontend's result as LLBBridge hands it to the frontend: refs with the
/// definitions they stand for.
fn wire_result(build: &crate::build::Build, r: &FrontendResult) -> Result<fe::Result, Status> {
    let wire_ref = |id: &str| -> Result<fe::Ref, Status> {
        Ok(fe::Ref {
            id: id.to_string(),
            def: Some(without_empty_locations(
                build.ref_definition(id).map_err(Status::from)?,
            )),
        })
    };
    let result = if r.refs.is_empty() {
        FeResult::Ref(wire_ref(r.r#ref.as_deref().unwrap_or_default())?)
    } else {
        FeResult::Refs(fe::RefMap {
            refs: r
                .refs
                .iter()
                .map(|(k, id)| Ok((k.clone(), wire_ref(id)?)))
                .collect::<Result<_, Status>>()?,
        })
    };
    Ok(fe::Result {
        result: Some(result),
        metadata: r.metadata.clone(),
    })
}

/// `def` without the empty source-location entries it may hold. BuildKit writes
/// those with an empty value; protobuf (prost) leaves the empty value out, and a
/// Go client decodes the entry as a nil value it then dereferences (buildx
/// `--invoke` panicked). An absent entry means the same and is safe.
fn without_empty_locations(mut def: kiln_proto::pb::Definition) -> kiln_proto::pb::Definition {
    if let Some(src) = &mut def.source {
        src.locations.retain(|_, l| !l.locations.is_empty());
    }
    def
}

/// What a frontend returns (Return, or a `final` Solve), in the solver's terms.
fn returned_result(r: fe::Result) -> FrontendResult {
    let mut out = FrontendResult {
        metadata: r.metadata,
        ..Default::default()
    };
    match r.result {
        Some(FeResult::RefDeprecated(id)) => out.r#ref = Some(id),
        Some(FeResult::Ref(x)) => out.r#ref = Some(x.id),
        Some(FeResult::RefsDeprecated(m)) => out.refs = m.refs,
        Some(FeResult::Refs(m)) => out.refs = m.refs.into_iter().map(|(k, x)| (k, x.id)).collect(),
        None => out.r#ref = Some(String::new()),
    }
    out
}

/// Metadata of a `final` Solve (an old client's return): a JSON object of
/// base64 values, as Go marshals `map[string][]byte`.
fn exporter_attr_metadata(attr: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, Status> {
    use base64::Engine;
    if attr.is_empty() {
        return Ok(BTreeMap::new());
    }
    let m: BTreeMap<String, serde_json::Value> = serde_json::from_slice(attr)
        .map_err(|e| Status::invalid_argument(format!("exporter attributes: {e}")))?;
    Ok(m.into_iter()
        .map(|(k, v)| {
            let bytes = match &v {
                serde_json::Value::String(s) => base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .unwrap_or_else(|_| s.clone().into_bytes()),
                other => other.to_string().into_bytes(),
            };
            (k, bytes)
        })
        .collect())
}

#[tonic::async_trait]
impl<W: Worker, F: Frontend, E: Exporter> llb_bridge_server::LlbBridge for BridgeService<W, F, E> {
    async fn resolve_image_config(
        &self,
        request: Request<fe::ResolveImageConfigRequest>,
    ) -> Result<Response<fe::ResolveImageConfigResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let res = if r.resolver_type == RESOLVER_TYPE_OCI_LAYOUT {
            self.solver
                .resolve_oci_layout(&build, &r.r#ref, r.platform, &r.session_id, &r.store_id)
                .await
        } else {
            self.solver
                .resolve_image(&build, &r.r#ref, r.platform)
                .await
        }
        .map_err(Status::from)?;
        Ok(Response::new(fe::ResolveImageConfigResponse {
            digest: res.digest,
            config: res.config,
            r#ref: res.reference,
        }))
    }

    async fn resolve_source_meta(
        &self,
        request: Request<fe::ResolveSourceMetaRequest>,
    ) -> Result<Response<fe::ResolveSourceMetaResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let mut source = r
            .source
            .ok_or_else(|| Status::invalid_argument("ResolveSourceMeta without a source"))?;
        if let Some(reference) = source
            .identifier
            .strip_prefix(kiln_session::ocilayout::SCHEME)
        {
            let attr = |k: &str| source.attrs.get(k).cloned().unwrap_or_default();
            let (session, store) = (
                attr(kiln_session::ocilayout::ATTR_SESSION),
                attr(kiln_session::ocilayout::ATTR_STORE),
            );
            let res = self
                .solver
                .resolve_oci_layout(&build, reference, r.platform, &session, &store)
                .await
                .map_err(Status::from)?;
            return Ok(Response::new(fe::ResolveSourceMetaResponse {
                source: Some(source),
                image: Some(fe::ResolveSourceImageResponse {
                    digest: res.digest,
                    config: res.config,
                }),
                ..Default::default()
            }));
        }
        let Some(image) = source.identifier.strip_prefix("docker-image://") else {
            // nothing to pin for other sources
            return Ok(Response::new(fe::ResolveSourceMetaResponse {
                source: Some(source),
                ..Default::default()
            }));
        };
        let res = self
            .solver
            .resolve_image(&build, image, r.platform)
            .await
            .map_err(Status::from)?;
        source.identifier = format!("docker-image://{}", res.reference);
        Ok(Response::new(fe::ResolveSourceMetaResponse {
            source: Some(source),
            image: Some(fe::ResolveSourceImageResponse {
                digest: res.digest,
                config: res.config,
            }),
            ..Default::default()
        }))
    }

    async fn solve(
        &self,
        request: Request<fe::SolveRequest>,
    ) -> Result<Response<fe::SolveResponse>, Status> {
        let build = self.build(&request).await?;
        // the client's own frontend works in the build's trace
        let span = match self.edge {
            Edge::Client => tracing::info_span!(
                target: "kiln_trace",
                parent: &build.span(),
                "LLBBridge.Solve",
                otel.name = "LLBBridge.Solve (client frontend)",
            ),
            _ => tracing::Span::current(),
        };
        self.solve_in(build, request.into_inner())
            .instrument(span)
            .await
    }

    async fn read_file(
        &self,
        request: Request<fe::ReadFileRequest>,
    ) -> Result<Response<fe::ReadFileResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let snapshot = self.snapshot(&build, &r.r#ref).await?;
        let (offset, length) = r
            .range
            .map(|x| (x.offset.max(0), x.length.max(0)))
            .unwrap_or((0, 0));
        let data = self
            .solver
            .worker
            .read_file(FsTarget::Ref(&snapshot), &r.file_path, offset, length)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::ReadFileResponse { data }))
    }

    async fn read_dir(
        &self,
        request: Request<fe::ReadDirRequest>,
    ) -> Result<Response<fe::ReadDirResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let snapshot = self.snapshot(&build, &r.r#ref).await?;
        let entries = self
            .solver
            .worker
            .read_dir(FsTarget::Ref(&snapshot), &r.dir_path, &r.include_pattern)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::ReadDirResponse { entries }))
    }

    async fn stat_file(
        &self,
        request: Request<fe::StatFileRequest>,
    ) -> Result<Response<fe::StatFileResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let snapshot = self.snapshot(&build, &r.r#ref).await?;
        let stat = self
            .solver
            .worker
            .stat_file(FsTarget::Ref(&snapshot), &r.path)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::StatFileResponse { stat: Some(stat) }))
    }

    async fn evaluate(
        &self,
        request: Request<fe::EvaluateRequest>,
    ) -> Result<Response<fe::EvaluateResponse>, Status> {
        let build = self.build(&request).await?;
        self.snapshot(&build, &request.into_inner().r#ref).await?;
        Ok(Response::new(fe::EvaluateResponse {}))
    }

    async fn ping(
        &self,
        request: Request<fe::PingRequest>,
    ) -> Result<Response<fe::PongResponse>, Status> {
        self.build(&request).await?;
        Ok(Response::new(fe::PongResponse {
            frontend_api_caps: caps(FRONTEND_CAPS),
            llb_caps: caps(LLB_CAPS),
            workers: worker_records(&self.solver, &[]),
        }))
    }

    async fn r#return(
        &self,
        request: Request<fe::ReturnRequest>,
    ) -> Result<Response<fe::ReturnResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        tracing::debug!(build = %build.id, error = ?r.error, "frontend returned");
        let result = match (r.error, r.result) {
            (Some(e), _) if e.code != 0 => Err(Error::ClientFrontend(convert::remote(e))),
            (_, Some(res)) => Ok(returned_result(res)),
            (_, None) => Ok(FrontendResult {
                r#ref: Some(String::new()),
                ..Default::default()
            }),
        };
        self.deliver(&build, result)?;
        Ok(Response::new(fe::ReturnResponse {}))
    }

    async fn inputs(
        &self,
        request: Request<fe::InputsRequest>,
    ) -> Result<Response<fe::InputsResponse>, Status> {
        let build = self.build(&request).await?;
        let definitions = match &self.edge {
            Edge::Container(call) => call.inputs.clone(),
            _ => build.frontend_inputs.clone(),
        }
        .into_iter()
        .map(|(k, d)| (k, without_empty_locations(d)))
        .collect();
        Ok(Response::new(fe::InputsResponse { definitions }))
    }

    async fn warn(
        &self,
        request: Request<fe::WarnRequest>,
    ) -> Result<Response<fe::WarnResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        build.progress.push(ctl::StatusResponse {
            warnings: vec![ctl::VertexWarning {
                vertex: r.digest,
                level: r.level,
                short: r.short,
                detail: r.detail,
                url: r.url,
                info: r.info,
                ranges: r.ranges,
            }],
            ..Default::default()
        });
        Ok(Response::new(fe::WarnResponse {}))
    }

    async fn new_container(
        &self,
        request: Request<fe::NewContainerRequest>,
    ) -> Result<Response<fe::NewContainerResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        if r.container_id.is_empty() {
            return Err(Status::invalid_argument(
                "NewContainer without a ContainerID",
            ));
        }
        if build.container(&r.container_id).is_ok() {
            return Err(Status::already_exists(format!(
                "container {:?} already exists",
                r.container_id
            )));
        }
        let mut op = kiln_proto::pb::ExecOp {
            // each process brings its own meta; this one only prepares the mounts
            meta: Some(kiln_proto::pb::Meta {
                cwd: "/".into(),
                ..Default::default()
            }),
            network: r.network,
            ..Default::default()
        };
        let mut inputs = Vec::new();
        for mut m in r.mounts {
            // a mount names a result of the build by id (or none: scratch)
            m.input = if m.result_id.is_empty() {
                -1
            } else {
                inputs.push(self.snapshot(&build, &m.result_id).await?);
                inputs.len() as i64 - 1
            };
            // what a container writes is never kept
            m.output = -1;
            op.mounts.push(m);
        }
        if !op.mounts.iter().any(|m| m.dest == "/") {
            return Err(Status::invalid_argument(format!(
                "container {:?} has no root mount",
                r.container_id
            )));
        }
        let worker_id = self
            .solver
            .worker
            .new_container(crate::peer::ExecSpec {
                op,
                inputs,
                session_id: build.session_id.clone(),
                entitlements: build.entitlements.clone(),
                stdin: false,
                container: None,
                tty: false,
            })
            .await
            .map_err(Status::from)?;
        let c = crate::build::Container {
            worker_id: worker_id.clone(),
            extra_hosts: r.extra_hosts,
            hostname: r.hostname,
        };
        if let Err(e) = build.add_container(&r.container_id, c) {
            let _ = self.solver.worker.release_container(&worker_id).await;
            return Err(Status::from(e));
        }
        Ok(Response::new(fe::NewContainerResponse {}))
    }

    async fn release_container(
        &self,
        request: Request<fe::ReleaseContainerRequest>,
    ) -> Result<Response<fe::ReleaseContainerResponse>, Status> {
        let build = self.build(&request).await?;
        let id = request.into_inner().container_id;
        let c = build.container(&id).map_err(Status::from)?;
        build.release_container(&id).map_err(Status::from)?;
        self.solver
            .worker
            .release_container(&c.worker_id)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::ReleaseContainerResponse {}))
    }

    type ExecProcessStream = BoxStream<fe::ExecMessage>;
    async fn exec_process(
        &self,
        request: Request<Streaming<fe::ExecMessage>>,
    ) -> Result<Response<Self::ExecProcessStream>, Status> {
        let build = self.build(&request).await?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<fe::ExecMessage, Status>>(64);
        let task = tokio::spawn(crate::grpc::container::serve_processes(
            self.solver.clone(),
            build,
            inbound,
            tx,
        ));
        let guard = AbortOnDrop::new(task.abort_handle());
        // the processes end with the call
        let out = ReceiverStream::new(rx).map(move |m| {
            let _ = &guard;
            m
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn read_file_container(
        &self,
        request: Request<fe::ReadFileRequest>,
    ) -> Result<Response<fe::ReadFileResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let c = build.container(&r.r#ref).map_err(Status::from)?;
        let (offset, length) = r
            .range
            .map(|x| (x.offset.max(0), x.length.max(0)))
            .unwrap_or((0, 0));
        let target = container_mount(&c, r.mount_index)?;
        let data = self
            .solver
            .worker
            .read_file(target, &r.file_path, offset, length)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::ReadFileResponse { data }))
    }

    async fn read_dir_container(
        &self,
        request: Request<fe::ReadDirRequest>,
    ) -> Result<Response<fe::ReadDirResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let c = build.container(&r.r#ref).map_err(Status::from)?;
        let target = container_mount(&c, r.mount_index)?;
        let entries = self
            .solver
            .worker
            .read_dir(target, &r.dir_path, &r.include_pattern)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::ReadDirResponse { entries }))
    }

    async fn stat_file_container(
        &self,
        request: Request<fe::StatFileRequest>,
    ) -> Result<Response<fe::StatFileResponse>, Status> {
        let build = self.build(&request).await?;
        let r = request.into_inner();
        let c = build.container(&r.r#ref).map_err(Status::from)?;
        let target = container_mount(&c, r.mount_index)?;
        let stat = self
            .solver
            .worker
            .stat_file(target, &r.path)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(fe::StatFileResponse { stat: Some(stat) }))
    }
}

/// A container's mount as the worker names it.
fn container_mount(c: &crate::build::Container, mount: i32) -> Result<FsTarget<'_>, Status> {
    let mount = u32::try_from(mount)
        .map_err(|_| Status::invalid_argument(format!("mount index {mount}")))?;
    Ok(FsTarget::Container {
        id: &c.worker_id,
        mount,
    })
}

/// The workers ListWorkers and Ping report.
fn worker_records<W: Worker, F: Frontend, E: Exporter>(
    solver: &Solver<W, F, E>,
    filters: &[crate::farm::place::Filter],
) -> Vec<types::WorkerRecord> {
    solver
        .worker_infos()
        .into_iter()
        .filter(|w| {
            let c = crate::farm::place::Candidate {
                id: &w.id,
                platforms: &w.platforms,
                labels: &w.labels,
                running: 0,
                capacity: 1,
                holds: 0,
                low_disk: false,
            };
            filters.is_empty() || filters.iter().any(|f| f.matches(&c))
        })
        .map(|w| {
            let mut labels = w.labels;
            labels
                .entry(crate::solver::WORKER_EXECUTOR_LABEL.to_string())
                .or_insert_with(|| "oci".to_string());
            // the farm's view of the worker, beside the labels it registered
            labels.insert("kiln.worker.state".into(), w.state);
            if !w.address.is_empty() {
                labels.insert("kiln.worker.address".into(), w.address);
            }
            if w.capacity > 0 {
                labels.insert("kiln.worker.capacity".into(), w.capacity.to_string());
            }
            labels.insert("kiln.worker.running".into(), w.running.to_string());
            types::WorkerRecord {
                id: w.id,
                labels,
                platforms: w
                    .platforms
                    .iter()
                    .map(kiln_proto::pb::Platform::from)
                    .collect(),
                buildkit_version: Some(types::BuildkitVersion {
                    package: "kiln".into(),
                    version: if w.version.is_empty() {
                        VERSION.into()
                    } else {
                        w.version
                    },
                    revision: String::new(),
                }),
                ..Default::default()
            }
        })
        .collect()
}
