//! The generated `Worker` trait implemented over the core.

use super::convert;
use crate::Worker;
use bytes::Bytes;
use futures::Stream;
use kiln_proto::kiln::worker::v1 as wpb;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

pub struct WorkerService {
    core: Arc<Worker>,
}

impl WorkerService {
    pub fn new(core: Arc<Worker>) -> Self {
        WorkerService { core }
    }
}

/// A response stream fed by a task; the task is aborted when the client goes away.
pub struct TaskStream<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    task: tokio::task::AbortHandle,
}

impl<T> Stream for TaskStream<T> {
    type Item = Result<T, Status>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl<T> Drop for TaskStream<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `tokio::spawn` in the current span (the call's, so the work's own calls
/// stay in its trace).
fn spawn_traced<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(f))
}

fn chunks(mut rx: mpsc::Receiver<crate::Result<Bytes>>) -> TaskStream<wpb::Chunk> {
    let (tx, out) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            let msg = item
                .map(|b| wpb::Chunk { data: b.to_vec() })
                .map_err(Status::from);
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    TaskStream {
        rx: out,
        task: task.abort_handle(),
    }
}

/// What a file call reads: a container's mount when it names one, else a ref.
fn fs_target<'a>(r: &'a str, container: &'a str, mount: u32) -> crate::FsTarget<'a> {
    if container.is_empty() {
        crate::FsTarget::Ref((!r.is_empty()).then_some(r))
    } else {
        crate::FsTarget::Container {
            id: container,
            mount,
        }
    }
}

#[tonic::async_trait]
impl wpb::worker_server::Worker for WorkerService {
    async fn info(
        &self,
        _: Request<wpb::InfoRequest>,
    ) -> Result<Response<wpb::InfoResponse>, Status> {
        Ok(Response::new(wpb::InfoResponse {
            id: self.core.id().to_string(),
            platforms: self
                .core
                .platforms()
                .into_iter()
                .map(|p| kiln_proto::pb::Platform::from(&p))
                .collect(),
            labels: [(
                "org.mobyproject.buildkit.worker.executor".to_string(),
                "oci".to_string(),
            )]
            .into(),
        }))
    }

    type RunStream = TaskStream<wpb::RunEvent>;

    async fn run(
        &self,
        req: Request<wpb::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let req = convert::run_request(req.into_inner())?;
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(64);
        let task = spawn_traced(async move {
            let (etx, mut erx) = mpsc::channel(64);
            let fwd_tx = tx.clone();
            let fwd = tokio::spawn(async move {
                while let Some(ev) = erx.recv().await {
                    if fwd_tx.send(Ok(convert::event(ev))).await.is_err() {
                        return;
                    }
                }
            });
            let res = core.run(req, etx).await;
            let _ = fwd.await;
            let msg = res
                .map(|refs| {
                    let keys = refs
                        .iter()
                        .map(|r| {
                            r.as_deref()
                                .and_then(|id| core.store().meta(id).ok())
                                .and_then(|m| m.content_key)
                                .unwrap_or_default()
                        })
                        .collect();
                    convert::outputs(refs, keys)
                })
                .map_err(Status::from);
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(TaskStream {
            rx,
            task: task.abort_handle(),
        }))
    }

    type ExecStream = TaskStream<wpb::ExecOutput>;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<wpb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        use prost::Message;
        use wpb::{exec_input::Input, exec_output::Output};
        let mut inbound = req.into_inner();
        let Some(Input::Start(start)) = inbound.message().await?.and_then(|m| m.input) else {
            return Err(Status::invalid_argument(
                "an exec starts with its start message",
            ));
        };
        let op = crate::pb::ExecOp::decode(start.exec_op.as_slice())
            .map_err(|e| Status::from(crate::Error::DecodeOp(e)))?;
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(64);
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
        let (sig_tx, sig_rx) = mpsc::channel::<String>(4);
        let (resize_tx, resize_rx) = mpsc::channel::<(u32, u32)>(4);
        let (out_tx, mut out_rx) = mpsc::channel::<(u32, Bytes)>(64);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = spawn_traced(async move {
            // the caller's input: stdin and signals, until it ends or says eof
            let input = tokio::spawn(async move {
                let mut stdin = Some(stdin_tx);
                while let Ok(Some(m)) = inbound.message().await {
                    match m.input {
                        Some(Input::Stdin(b)) => {
                            if let Some(s) = &stdin {
                                let _ = s.send(Bytes::from(b)).await;
                            }
                        }
                        Some(Input::StdinEof(_)) => stdin = None,
                        Some(Input::Signal(sig)) => {
                            let _ = sig_tx.send(sig).await;
                        }
                        Some(Input::Resize(r)) => {
                            let _ = resize_tx.send((r.rows, r.cols)).await;
                        }
                        Some(Input::Start(_)) | None => {}
                    }
                }
            });
            let fwd_tx = tx.clone();
            let fwd = tokio::spawn(async move {
                if started_rx.await.is_ok() {
                    let _ = fwd_tx
                        .send(Ok(wpb::ExecOutput {
                            output: Some(Output::Started(wpb::ExecStarted {})),
                        }))
                        .await;
                }
                while let Some((fd, data)) = out_rx.recv().await {
                    let msg = wpb::ExecOutput {
                        output: Some(Output::Data(wpb::ExecData {
                            fd,
                            data: data.to_vec(),
                        })),
                    };
                    if fwd_tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            });
            let inputs: Vec<Option<String>> = start
                .inputs
                .iter()
                .map(|r| convert::ref_from_wire(r))
                .collect();
            let stdio = crate::runc::Stdio {
                stdin: start.stdin.then_some(stdin_rx),
                output: out_tx,
                signals: sig_rx,
                tty: start.tty && !start.container_id.is_empty(),
                resize: resize_rx,
            };
            let res = if start.container_id.is_empty() {
                core.exec(
                    &op,
                    &inputs,
                    &start.session_id,
                    &start.entitlements,
                    stdio,
                    started_tx,
                )
                .await
            } else {
                let meta = op.meta.clone().unwrap_or_default();
                let process = crate::ops::exec::ContainerProcess {
                    meta: &meta,
                    secretenv: &op.secretenv,
                    session_id: &start.session_id,
                    security: op.security,
                    tty: start.tty,
                };
                core.exec_in_container(&start.container_id, &process, stdio, started_tx)
                    .await
            };
            let _ = fwd.await;
            input.abort();
            let msg = res
                .map(|code| wpb::ExecOutput {
                    output: Some(Output::Exit(wpb::ExecExit { code })),
                })
                .map_err(Status::from);
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(TaskStream {
            rx,
            task: task.abort_handle(),
        }))
    }

    async fn new_container(
        &self,
        req: Request<wpb::NewContainerRequest>,
    ) -> Result<Response<wpb::NewContainerResponse>, Status> {
        use prost::Message;
        let req = req.into_inner();
        let op = crate::pb::ExecOp::decode(req.exec_op.as_slice())
            .map_err(|e| Status::from(crate::Error::DecodeOp(e)))?;
        let inputs: Vec<Option<String>> = req
            .inputs
            .iter()
            .map(|r| convert::ref_from_wire(r))
            .collect();
        let id = self
            .core
            .new_container(&op, &inputs, &req.session_id, &req.entitlements)
            .await?;
        Ok(Response::new(wpb::NewContainerResponse { id }))
    }

    async fn release_container(
        &self,
        req: Request<wpb::ReleaseContainerRequest>,
    ) -> Result<Response<wpb::ReleaseContainerResponse>, Status> {
        self.core.release_container(&req.into_inner().id).await?;
        Ok(Response::new(wpb::ReleaseContainerResponse {}))
    }

    async fn read_file(
        &self,
        req: Request<wpb::ReadFileRequest>,
    ) -> Result<Response<wpb::ReadFileResponse>, Status> {
        let req = req.into_inner();
        let data = self
            .core
            .read_file(
                fs_target(&req.r#ref, &req.container_id, req.mount_index),
                &req.path,
                req.offset.max(0) as u64,
                (req.length > 0).then_some(req.length as u64),
            )
            .await?;
        Ok(Response::new(wpb::ReadFileResponse { data }))
    }

    async fn read_dir(
        &self,
        req: Request<wpb::ReadDirRequest>,
    ) -> Result<Response<wpb::ReadDirResponse>, Status> {
        let req = req.into_inner();
        let entries = self
            .core
            .read_dir(
                fs_target(&req.r#ref, &req.container_id, req.mount_index),
                &req.path,
                &req.include_pattern,
            )
            .await?;
        Ok(Response::new(wpb::ReadDirResponse { entries }))
    }

    async fn stat_file(
        &self,
        req: Request<wpb::StatFileRequest>,
    ) -> Result<Response<wpb::StatFileResponse>, Status> {
        let req = req.into_inner();
        let stat = self
            .core
            .stat_file(
                fs_target(&req.r#ref, &req.container_id, req.mount_index),
                &req.path,
            )
            .await?;
        Ok(Response::new(wpb::StatFileResponse { stat: Some(stat) }))
    }

    async fn layers(
        &self,
        req: Request<wpb::LayersRequest>,
    ) -> Result<Response<wpb::LayersResponse>, Status> {
        let req = req.into_inner();
        let options = kiln_oci::LayerOptions::try_from(&req.options.unwrap_or_default())
            .map_err(|e| kiln_proto::status::from_error(tonic::Code::InvalidArgument, &e))?;
        let layers = self
            .core
            .layer_chain(convert::ref_from_wire(&req.r#ref).as_deref(), &options)
            .await?;
        Ok(Response::new(wpb::LayersResponse {
            layers: layers
                .into_iter()
                .map(|l| match l {
                    Some(l) => convert::layer(l),
                    None => wpb::Layer {
                        empty: true,
                        ..Default::default()
                    },
                })
                .collect(),
        }))
    }

    type ReadBlobStream = TaskStream<wpb::Chunk>;

    async fn read_blob(
        &self,
        req: Request<wpb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let rx = self.core.read_blob(&req.into_inner().digest).await?;
        Ok(Response::new(chunks(rx)))
    }

    type ExportFsStream = TaskStream<wpb::Chunk>;

    async fn export_fs(
        &self,
        req: Request<wpb::ExportFsRequest>,
    ) -> Result<Response<Self::ExportFsStream>, Status> {
        let rx = self
            .core
            .export_fs(convert::ref_from_wire(&req.into_inner().r#ref).as_deref())
            .await?;
        Ok(Response::new(chunks(rx)))
    }

    async fn checksum(
        &self,
        req: Request<wpb::ChecksumRequest>,
    ) -> Result<Response<wpb::ChecksumResponse>, Status> {
        let req = req.into_inner();
        let selectors = req
            .selectors
            .into_iter()
            .map(|s| crate::contenthash::Selector {
                path: s.path,
                wildcard: s.wildcard,
                follow_links: s.follow_links,
            })
            .collect::<Vec<_>>();
        let r = convert::ref_from_wire(&req.r#ref);
        let entries = if req.entries {
            let e = self
                .core
                .path_entries(r.as_deref(), selectors.clone())
                .await?;
            e.into_iter()
                .map(|e| wpb::PathEntry {
                    path: e.path,
                    content: e.content,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                })
                .collect()
        } else {
            vec![]
        };
        let digest = self.core.checksum(r.as_deref(), selectors).await?;
        Ok(Response::new(wpb::ChecksumResponse { digest, entries }))
    }

    async fn exists(
        &self,
        req: Request<wpb::ExistsRequest>,
    ) -> Result<Response<wpb::ExistsResponse>, Status> {
        let exists = self.core.exists(&req.into_inner().refs);
        Ok(Response::new(wpb::ExistsResponse { exists }))
    }

    async fn usage(
        &self,
        req: Request<wpb::UsageRequest>,
    ) -> Result<Response<wpb::UsageResponse>, Status> {
        let u = self.core.usage(&req.into_inner().refs).await?;
        Ok(Response::new(wpb::UsageResponse {
            snapshots: u.snapshots.iter().map(snapshot_usage).collect(),
            blobs_size: u.blobs_size,
        }))
    }

    async fn prune(
        &self,
        req: Request<wpb::PruneRequest>,
    ) -> Result<Response<wpb::PruneResponse>, Status> {
        let req = req.into_inner();
        let u = self.core.prune(&req.keep, req.before).await?;
        Ok(Response::new(wpb::PruneResponse {
            removed: u.snapshots.iter().map(snapshot_usage).collect(),
            blobs_removed_size: u.blobs_size,
        }))
    }

    async fn import(
        &self,
        req: Request<wpb::ImportRequest>,
    ) -> Result<Response<wpb::ImportResponse>, Status> {
        let req = req.into_inner();
        let done = self
            .core
            .import(
                &req.peer,
                convert::ref_from_wire(&req.r#ref).as_deref().unwrap_or(""),
            )
            .await?;
        Ok(Response::new(wpb::ImportResponse {
            r#ref: done.r#ref.unwrap_or_default(),
            bytes_moved: done.bytes_moved as i64,
            layers_moved: done.layers_moved,
        }))
    }
}

fn snapshot_usage(s: &crate::gc::SnapshotUsage) -> wpb::SnapshotUsage {
    wpb::SnapshotUsage {
        r#ref: s.id.clone(),
        parent: s.parent.clone().unwrap_or_default(),
        kind: s.kind_name().to_string(),
        description: s.cache_mount.clone().unwrap_or_default(),
        size: s.size,
        created: s.created,
    }
}
