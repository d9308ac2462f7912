//! The generated `Exporter` trait implemented over the core.

use std::path::Path;
use std::sync::Arc;

use kiln_proto::kiln::exporter::v1 as xpb;
use kiln_proto::kiln::exporter::v1::exporter_server::Exporter as ExporterRpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::client::GrpcWorker;
use super::convert;
use crate::{ClientSink, Error, Exporter};

pub struct ExporterService {
    core: Arc<Exporter>,
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

impl ExporterService {
    pub fn new(core: Arc<Exporter>) -> Self {
        ExporterService { core }
    }
}

/// The client session, dialled only for exporters that send output to the client.
enum Sink {
    Session(kiln_session::SessionClient),
    None,
}

impl ClientSink for Sink {
    async fn send_file(&self, exporter_id: u32, file: crate::FileData) -> Result<(), Error> {
        match self {
            Sink::Session(s) => ClientSink::send_file(s, exporter_id, file).await,
            Sink::None => Ok(()),
        }
    }
    async fn send_dir(&self, exporter_id: u32, dir: &Path) -> Result<(), Error> {
        match self {
            Sink::Session(s) => ClientSink::send_dir(s, exporter_id, dir).await,
            Sink::None => Ok(()),
        }
    }
    async fn credentials(&self, host: &str) -> Option<(String, String)> {
        match self {
            Sink::Session(s) => ClientSink::credentials(s, host).await,
            Sink::None => None,
        }
    }
    async fn content_size(&self, store: &str, digest: &str) -> Result<Option<u64>, Error> {
        match self {
            Sink::Session(s) => ClientSink::content_size(s, store, digest).await,
            Sink::None => Err(crate::no_store(store)),
        }
    }
    async fn content_read(&self, store: &str, digest: &str, limit: u64) -> Result<Vec<u8>, Error> {
        match self {
            Sink::Session(s) => ClientSink::content_read(s, store, digest, limit).await,
            Sink::None => Err(crate::no_store(store)),
        }
    }
    async fn content_write(
        &self,
        store: &str,
        digest: &str,
        size: u64,
        data: crate::FileData,
    ) -> Result<(), Error> {
        match self {
            Sink::Session(s) => ClientSink::content_write(s, store, digest, size, data).await,
            Sink::None => Err(crate::no_store(store)),
        }
    }
}

fn resolved_cache(
    config: &kiln_oci::cache_config::CacheConfig,
    repository: String,
    mounts: &[kiln_oci::Descriptor],
) -> Result<Response<xpb::ResolveCacheResponse>, Status> {
    let encode = |e: serde_json::Error| Status::internal(format!("encode cache config: {e}"));
    Ok(Response::new(xpb::ResolveCacheResponse {
        config: serde_json::to_vec(config).map_err(encode)?,
        r#ref: repository,
        mounts: if mounts.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(mounts).map_err(encode)?
        },
    }))
}

fn status_event(s: String) -> xpb::ExportEvent {
    xpb::ExportEvent {
        event: Some(xpb::export_event::Event::Status(s)),
    }
}

#[tonic::async_trait]
impl ExporterRpc for ExporterService {
    async fn resolve_image_config(
        &self,
        request: Request<xpb::ResolveRequest>,
    ) -> Result<Response<xpb::ResolveResponse>, Status> {
        let req = request.into_inner();
        let host = kiln_registry::Reference::parse(&req.r#ref)
            .map(|r| r.registry)
            .unwrap_or_default();
        let credentials =
            kiln_session::credentials_via(&self.core.config().broker, &req.session_id, &host).await;
        let resolved = self
            .core
            .resolve_image_config_as(
                &req.r#ref,
                convert::platform_from_pb(req.platform),
                credentials,
            )
            .await?;
        Ok(Response::new(xpb::ResolveResponse {
            r#ref: resolved.reference,
            digest: resolved.digest,
            config: resolved.config,
        }))
    }

    async fn resolve_cache(
        &self,
        request: Request<xpb::ResolveCacheRequest>,
    ) -> Result<Response<xpb::ResolveCacheResponse>, Status> {
        let req = request.into_inner();
        if req.r#type == "local" {
            let src = req.attrs.get("src").cloned().unwrap_or_default();
            let digest = req.attrs.get("digest").cloned().unwrap_or_default();
            if digest.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "local cache import from {src} requires the digest of its manifest (the client reads it from index.json)"
                )));
            }
            let store = format!("{}{src}", kiln_session::content::LOCAL_PREFIX);
            let broker = &self.core.config().broker;
            let channel = kiln_session::dial::connect(broker).await.map_err(|e| {
                Status::unavailable(format!("connect to session broker {broker}: {e}"))
            })?;
            let session = kiln_session::SessionClient::new(channel, req.session_id.clone());
            let (config, mounts) =
                crate::cache::read_local_cache(&session, &store, &digest).await?;
            return resolved_cache(&config, store, &mounts);
        }
        if req.r#type != "registry" {
            return Err(Status::unimplemented(format!(
                "kiln cannot import a build cache of type {:?}",
                req.r#type
            )));
        }
        let reference = req.attrs.get("ref").cloned().unwrap_or_default();
        let host = kiln_registry::Reference::parse(&reference)
            .map(|r| r.registry)
            .unwrap_or_default();
        let credentials =
            kiln_session::credentials_via(&self.core.config().broker, &req.session_id, &host).await;
        let resolved = self.core.resolve_cache(&reference, credentials).await?;
        resolved_cache(&resolved.config, resolved.repository, &resolved.mounts)
    }

    type ExportStream = ReceiverStream<Result<xpb::ExportEvent, Status>>;

    async fn export(
        &self,
        request: Request<xpb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let req = convert::export_request_from_pb(request.into_inner());
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(16);
        spawn_traced(async move {
            let span = tracing::info_span!("export", build_id = %req.build_id, kind = %req.kind);
            let _ = span;
            let result = async {
                let worker = GrpcWorker::connect(&req.worker).await?;
                // image pushes ask the session for registry credentials
                let needs_session = req.kind != "image"
                    || req
                        .attrs
                        .get("push")
                        .is_some_and(|v| v == "true" || v == "1");
                let sink = if !needs_session || req.session_id.is_empty() {
                    Sink::None
                } else {
                    let broker = &core.config().broker;
                    let channel = kiln_session::dial::connect(broker)
                        .await
                        .map_err(|source| Error::DialBroker {
                            addr: broker.clone(),
                            source: Box::new(source),
                        })?;
                    Sink::Session(kiln_session::SessionClient::new(
                        channel,
                        req.session_id.clone(),
                    ))
                };
                let (ptx, mut prx) = mpsc::channel::<String>(16);
                let run = async move {
                    let ptx = ptx;
                    core.export(&req, &worker, &sink, &ptx).await
                };
                let forward = async {
                    while let Some(s) = prx.recv().await {
                        let _ = tx.send(Ok(status_event(s))).await;
                    }
                };
                let (res, ()) = tokio::join!(run, forward);
                res
            }
            .await;
            let msg = match result {
                Ok(response) => Ok(xpb::ExportEvent {
                    event: Some(xpb::export_event::Event::Done(xpb::Done {
                        response: response.into_iter().collect(),
                    })),
                }),
                Err(e) => {
                    tracing::warn!(error = %kiln_proto::status::Chain(&e), "export failed");
                    Err(Status::from(e))
                }
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
