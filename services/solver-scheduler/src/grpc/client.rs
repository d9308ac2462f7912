//! The solver's peers over gRPC.

use crate::Error;
use crate::peer::FsTarget;
use crate::peer::{
    self, ExecEvent, ExecInput, ExecSpec, ExportJob, FrontendOutput, PathEntry, ResolvedImage,
    RunEvent, RunOp, RunOutputs, Selector, SnapshotUsage, Stat, WorkerUsage,
};
use kiln_proto::kiln::exporter::v1::{self as ex, exporter_client::ExporterClient};
use kiln_proto::kiln::frontend::v1::{FrontendRequest, frontend_client::FrontendClient};
use kiln_proto::kiln::worker::v1::{self as wk, worker_client::WorkerClient};
use kiln_proto::pb;
use kiln_session::dial::Channel;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const MAX_MESSAGE: usize = 64 << 20;

/// A failed worker call: `op` names it, the status keeps the worker's whole message.
fn worker_call(op: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let op = op.into();
    move |s| Error::Worker {
        op,
        source: s.into(),
    }
}

/// A failed `Run`: the worker's own failure, or `Unreachable` when the call
/// broke in transport (the status was made here, from a connection error, not
/// sent by the worker).
fn run_failure(name: &str) -> impl Fn(tonic::Status) -> Error + '_ {
    move |s| {
        if std::error::Error::source(&s).is_some() {
            Error::Unreachable {
                op: format!("run {name}"),
                source: s.into(),
            }
        } else {
            Error::Run(s.into())
        }
    }
}

/// A worker-executor reached over gRPC.
#[derive(Clone)]
pub struct GrpcWorker {
    address: String,
    client: WorkerClient<Channel>,
}

impl GrpcWorker {
    pub fn new(address: String, channel: Channel) -> Self {
        GrpcWorker {
            address,
            client: WorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }
}

impl peer::Worker for GrpcWorker {
    fn address(&self) -> String {
        self.address.clone()
    }

    async fn run(
        &self,
        op: RunOp,
        events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<RunOutputs, Error> {
        let mut client = self.client.clone();
        let name = op.name.clone();
        let mut stream = client
            .run(wk::RunRequest {
                build_id: op.build_id,
                session_id: op.session_id,
                session_shared_key: op.session_shared_key,
                op: op.op_bytes,
                digest: op.digest,
                inputs: op.inputs,
                name: op.name,
                entitlements: op.entitlements,
            })
            .await
            .map_err(run_failure(&name))?
            .into_inner();
        let mut outputs = None;
        while let Some(ev) = stream.message().await.map_err(run_failure(&name))? {
            match ev.event {
                Some(wk::run_event::Event::Log(l)) => events(RunEvent::Log {
                    stream: l.stream,
                    data: l.data,
                }),
                Some(wk::run_event::Event::Outputs(o)) => {
                    outputs = Some(RunOutputs {
                        refs: o.refs,
                        content_keys: o.content_keys,
                        worker: String::new(),
                    })
                }
                Some(wk::run_event::Event::Progress(p)) => events(RunEvent::Progress {
                    id: p.id,
                    current: p.current,
                    total: p.total,
                    completed: p.completed,
                }),
                None => {}
            }
        }
        outputs.ok_or_else(|| Error::WorkerReply {
            op: format!("run {name}"),
            problem: "the run ended without outputs",
        })
    }

    async fn import(&self, peer: &str, r: &str) -> Result<peer::Imported, Error> {
        let resp = self
            .client
            .clone()
            .import(wk::ImportRequest {
                peer: peer.to_string(),
                r#ref: r.to_string(),
            })
            .await
            .map_err(|s| {
                let op = format!("import {r} from {peer}");
                if std::error::Error::source(&s).is_some() {
                    Error::Unreachable {
                        op,
                        source: s.into(),
                    }
                } else {
                    worker_call(op)(s)
                }
            })?
            .into_inner();
        Ok(peer::Imported {
            r#ref: resp.r#ref,
            bytes_moved: resp.bytes_moved.max(0) as u64,
        })
    }

    async fn read_file(
        &self,
        r: FsTarget<'_>,
        path: &str,
        offset: i64,
        length: i64,
    ) -> Result<Vec<u8>, Error> {
        let (r, container, mount) = r.parts();
        let resp = self
            .client
            .clone()
            .read_file(with_deadline(
                wk::ReadFileRequest {
                    r#ref: r.to_string(),
                    path: path.to_string(),
                    offset,
                    length,
                    container_id: container.to_string(),
                    mount_index: mount,
                },
                FILE_CALL,
            ))
            .await
            .map_err(worker_call(format!("read {path}")))?;
        Ok(resp.into_inner().data)
    }

    async fn read_dir(
        &self,
        r: FsTarget<'_>,
        path: &str,
        include: &str,
    ) -> Result<Vec<Stat>, Error> {
        let (r, container, mount) = r.parts();
        let resp = self
            .client
            .clone()
            .read_dir(with_deadline(
                wk::ReadDirRequest {
                    r#ref: r.to_string(),
                    path: path.to_string(),
                    include_pattern: include.to_string(),
                    container_id: container.to_string(),
                    mount_index: mount,
                },
                FILE_CALL,
            ))
            .await
            .map_err(worker_call(format!("list {path}")))?;
        Ok(resp.into_inner().entries)
    }

    async fn new_container(&self, spec: ExecSpec) -> Result<String, Error> {
        use prost::Message;
        let resp = self
            .client
            .clone()
            .new_container(wk::NewContainerRequest {
                exec_op: spec.op.encode_to_vec(),
                inputs: spec.inputs,
                session_id: spec.session_id,
                entitlements: spec.entitlements,
            })
            .await
            .map_err(worker_call("new container"))?;
        Ok(resp.into_inner().id)
    }

    async fn release_container(&self, id: &str) -> Result<(), Error> {
        self.client
            .clone()
            .release_container(wk::ReleaseContainerRequest { id: id.to_string() })
            .await
            .map_err(worker_call(format!("release container {id}")))?;
        Ok(())
    }

    async fn exec(
        &self,
        spec: ExecSpec,
        input: tokio::sync::mpsc::Receiver<ExecInput>,
        events: tokio::sync::mpsc::Sender<ExecEvent>,
    ) -> Result<i32, Error> {
        use futures::StreamExt;
        use prost::Message;
        use wk::{exec_input::Input, exec_output::Output};
        let start = wk::ExecInput {
            input: Some(Input::Start(wk::ExecStart {
                exec_op: spec.op.encode_to_vec(),
                inputs: spec.inputs,
                session_id: spec.session_id,
                entitlements: spec.entitlements,
                stdin: spec.stdin,
                container_id: spec.container.unwrap_or_default(),
                tty: spec.tty,
            })),
        };
        let rest = tokio_stream::wrappers::ReceiverStream::new(input).map(|i| wk::ExecInput {
            input: Some(match i {
                ExecInput::Stdin(b) => Input::Stdin(b.to_vec()),
                ExecInput::Eof => Input::StdinEof(true),
                ExecInput::Signal(s) => Input::Signal(s),
                ExecInput::Resize(rows, cols) => Input::Resize(wk::ExecResize { rows, cols }),
            }),
        });
        let outbound = futures::stream::iter([start]).chain(rest);
        let mut stream = self
            .client
            .clone()
            .exec(outbound)
            .await
            .map_err(worker_call("exec"))?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(worker_call("exec"))? {
            match msg.output {
                Some(Output::Started(_)) => {
                    let _ = events.send(ExecEvent::Started).await;
                }
                Some(Output::Data(d)) => {
                    let _ = events
                        .send(ExecEvent::Output {
                            fd: d.fd,
                            data: bytes::Bytes::from(d.data),
                        })
                        .await;
                }
                Some(Output::Exit(x)) => return Ok(x.code),
                None => {}
            }
        }
        Err(Error::WorkerReply {
            op: "exec".into(),
            problem: "the call ended without an exit code",
        })
    }

    async fn stat_file(&self, r: FsTarget<'_>, path: &str) -> Result<Stat, Error> {
        let (r, container, mount) = r.parts();
        let resp = self
            .client
            .clone()
            .stat_file(with_deadline(
                wk::StatFileRequest {
                    r#ref: r.to_string(),
                    path: path.to_string(),
                    container_id: container.to_string(),
                    mount_index: mount,
                },
                FILE_CALL,
            ))
            .await
            .map_err(worker_call(format!("stat {path}")))?;
        resp.into_inner().stat.ok_or_else(|| Error::WorkerReply {
            op: format!("stat {path}"),
            problem: "no metadata in the answer",
        })
    }

    async fn checksum(&self, r: &str, selectors: &[Selector]) -> Result<String, Error> {
        let req = with_deadline(checksum_request(r, selectors, false), TREE_CALL);
        let resp = self
            .client
            .clone()
            .checksum(req)
            .await
            .map_err(worker_call(format!("checksum {r}")))?;
        Ok(resp.into_inner().digest)
    }

    async fn path_entries(&self, r: &str, selectors: &[Selector]) -> Result<Vec<PathEntry>, Error> {
        let req = with_deadline(checksum_request(r, selectors, true), TREE_CALL);
        let resp = self
            .client
            .clone()
            .checksum(req)
            .await
            .map_err(worker_call(format!("list paths of {r}")))?;
        Ok(resp
            .into_inner()
            .entries
            .into_iter()
            .map(|e| PathEntry {
                path: e.path,
                content: e.content,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
            })
            .collect())
    }

    async fn prepare_layers(&self, r: &str, options: &kiln_oci::LayerOptions) -> Result<(), Error> {
        let req = tonic::Request::new(wk::LayersRequest {
            r#ref: r.to_string(),
            options: Some(options.into()),
        });
        self.client
            .clone()
            .layers(req)
            .await
            .map_err(worker_call("layers"))?;
        Ok(())
    }

    async fn exists(&self, refs: &[String]) -> Result<Vec<bool>, Error> {
        let req = with_deadline(
            wk::ExistsRequest {
                refs: refs.to_vec(),
            },
            Duration::from_secs(30),
        );
        let resp = self
            .client
            .clone()
            .exists(req)
            .await
            .map_err(worker_call("exists"))?;
        Ok(resp.into_inner().exists)
    }

    async fn usage(&self, refs: &[String]) -> Result<WorkerUsage, Error> {
        let req = with_deadline(
            wk::UsageRequest {
                refs: refs.to_vec(),
            },
            TREE_CALL,
        );
        let r = self
            .client
            .clone()
            .usage(req)
            .await
            .map_err(worker_call("usage"))?
            .into_inner();
        Ok(WorkerUsage {
            snapshots: r.snapshots.into_iter().map(snapshot_usage).collect(),
            blobs_size: r.blobs_size,
        })
    }

    async fn prune(&self, keep: &[String], before: i64) -> Result<WorkerUsage, Error> {
        let req = with_deadline(
            wk::PruneRequest {
                keep: keep.to_vec(),
                before,
            },
            TREE_CALL,
        );
        let r = self
            .client
            .clone()
            .prune(req)
            .await
            .map_err(worker_call("prune"))?
            .into_inner();
        Ok(WorkerUsage {
            snapshots: r.removed.into_iter().map(snapshot_usage).collect(),
            blobs_size: r.blobs_removed_size,
        })
    }
}

fn snapshot_usage(s: wk::SnapshotUsage) -> SnapshotUsage {
    SnapshotUsage {
        r#ref: s.r#ref,
        parent: s.parent,
        kind: s.kind,
        size: s.size,
        created: s.created,
        description: s.description,
    }
}

/// A frontend-gateway reached over gRPC.
#[derive(Clone)]
pub struct GrpcFrontend {
    client: FrontendClient<Channel>,
}

impl GrpcFrontend {
    pub fn new(channel: Channel) -> Self {
        GrpcFrontend {
            client: FrontendClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
        }
    }
}

impl peer::Frontend for GrpcFrontend {
    async fn solve(
        &self,
        build_id: &str,
        frontend: &str,
        attrs: &BTreeMap<String, String>,
        session_id: &str,
    ) -> Result<FrontendOutput, Error> {
        let resp = self
            .client
            .clone()
            .solve(FrontendRequest {
                build_id: build_id.to_string(),
                frontend: frontend.to_string(),
                attrs: attrs.clone(),
                session_id: session_id.to_string(),
            })
            .await
            .map_err(|s| Error::Frontend {
                frontend: frontend.to_string(),
                source: s.into(),
            })?
            .into_inner();
        Ok(FrontendOutput {
            definition: resp.definition.unwrap_or_default(),
            metadata: resp.metadata,
            refs: resp.refs,
        })
    }
}

/// A registry-exporter reached over gRPC.
#[derive(Clone)]
pub struct GrpcExporter {
    client: ExporterClient<Channel>,
}

impl GrpcExporter {
    pub fn new(channel: Channel) -> Self {
        GrpcExporter {
            client: ExporterClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
        }
    }
}

impl peer::Exporter for GrpcExporter {
    async fn resolve_cache(
        &self,
        r#type: &str,
        attrs: &BTreeMap<String, String>,
        session_id: &str,
    ) -> Result<(Vec<u8>, String, Vec<u8>), Error> {
        let req = with_deadline(
            ex::ResolveCacheRequest {
                r#type: r#type.to_string(),
                attrs: attrs.clone().into_iter().collect(),
                session_id: session_id.to_string(),
            },
            Duration::from_secs(120),
        );
        let r = self
            .client
            .clone()
            .resolve_cache(req)
            .await
            .map_err(|s| Error::Resolve(s.into()))?
            .into_inner();
        Ok((r.config, r.r#ref, r.mounts))
    }

    async fn resolve(
        &self,
        reference: &str,
        platform: Option<pb::Platform>,
        session_id: &str,
    ) -> Result<ResolvedImage, Error> {
        let req = with_deadline(
            ex::ResolveRequest {
                r#ref: reference.to_string(),
                platform,
                session_id: session_id.to_string(),
            },
            Duration::from_secs(120),
        );
        let r = self
            .client
            .clone()
            .resolve_image_config(req)
            .await
            .map_err(|s| Error::Resolve(s.into()))?
            .into_inner();
        Ok(ResolvedImage {
            reference: r.r#ref,
            digest: r.digest,
            config: r.config,
        })
    }

    async fn export(
        &self,
        job: ExportJob,
        status: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<BTreeMap<String, String>, Error> {
        let exporter = job.r#type.clone();
        let mut stream = self
            .client
            .clone()
            .export(ex::ExportRequest {
                build_id: job.build_id,
                session_id: job.session_id,
                worker: job.worker,
                r#ref: job.r#ref,
                r#type: job.r#type,
                attrs: job.attrs,
                image_config: job.image_config,
                index: job.index as i32,
                platforms: job
                    .platforms
                    .into_iter()
                    .map(|p| ex::PlatformRef {
                        id: p.id,
                        r#ref: p.r#ref,
                        image_config: p.image_config,
                    })
                    .collect(),
                cache: job.cache,
                remote: job.remote,
            })
            .await
            .map_err(|s| Error::Export {
                exporter: exporter.clone(),
                source: s.into(),
            })?
            .into_inner();
        let mut response = None;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => match ev.event {
                    Some(ex::export_event::Event::Status(s)) => status(s),
                    Some(ex::export_event::Event::Done(d)) => response = Some(d.response),
                    None => {}
                },
                Ok(None) => break,
                Err(s) => {
                    return Err(Error::Export {
                        exporter,
                        source: s.into(),
                    });
                }
            }
        }
        response.ok_or_else(|| Error::ExportNoResult { exporter })
    }
}

fn checksum_request(r: &str, selectors: &[Selector], entries: bool) -> wk::ChecksumRequest {
    wk::ChecksumRequest {
        r#ref: r.to_string(),
        selectors: selectors
            .iter()
            .map(|s| wk::ChecksumSelector {
                path: s.path.clone(),
                wildcard: s.wildcard,
                follow_links: s.follow_links,
            })
            .collect(),
        entries,
    }
}

/// A call's deadline: a worker file call (read, list, stat).
const FILE_CALL: Duration = Duration::from_secs(60);
/// A call that walks trees or the whole store (checksum, usage, prune).
const TREE_CALL: Duration = Duration::from_secs(600);

/// `msg` as a request that gives up after `deadline`.
fn with_deadline<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(deadline);
    req
}
