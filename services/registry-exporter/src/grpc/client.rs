//! gRPC clients: the worker (where layers and filesystems come from) and the exporter itself
//! (for peers such as solver-scheduler).

use futures::{StreamExt, TryStreamExt};
use kiln_proto::kiln::exporter::v1 as xpb;
use kiln_proto::kiln::worker::v1 as wpb;
use kiln_proto::kiln::worker::v1::worker_client::WorkerClient;
use kiln_session::dial::Channel;
use std::collections::BTreeMap;

use super::convert;
use crate::{ByteStream, Error, ExportRequest, LayerBlob, ResolvedConfig, WorkerFs};

/// The worker reached over gRPC.
#[derive(Clone)]
pub struct GrpcWorker {
    addr: String,
    client: WorkerClient<Channel>,
}

impl GrpcWorker {
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let channel =
            kiln_session::dial::connect(addr)
                .await
                .map_err(|source| Error::DialWorker {
                    addr: addr.to_string(),
                    source: Box::new(source),
                })?;
        Ok(Self::new(addr, channel))
    }

    pub fn new(addr: &str, channel: Channel) -> Self {
        GrpcWorker {
            addr: addr.to_string(),
            client: WorkerClient::new(channel).max_decoding_message_size(64 << 20),
        }
    }

    fn err(&self, op: &'static str, target: &str, status: tonic::Status) -> Error {
        Error::Worker {
            op,
            target: format!("{target} on {}", self.addr),
            source: status.into(),
        }
    }

    fn chunks(
        &self,
        op: &'static str,
        target: &str,
        s: tonic::codec::Streaming<wpb::Chunk>,
    ) -> ByteStream {
        let me = self.clone();
        let target = target.to_string();
        Box::pin(
            s.map_ok(|c| bytes::Bytes::from(c.data))
                .map_err(move |st| me.err(op, &target, st)),
        )
    }
}

impl WorkerFs for GrpcWorker {
    async fn layers(
        &self,
        reference: &str,
        options: &kiln_oci::LayerOptions,
    ) -> Result<Vec<LayerBlob>, Error> {
        let resp = self
            .client
            .clone()
            .layers(wpb::LayersRequest {
                r#ref: reference.to_string(),
                options: Some(options.into()),
            })
            .await
            .map_err(|s| self.err("layers", reference, s))?;
        Ok(resp
            .into_inner()
            .layers
            .into_iter()
            .map(convert::layer_from_pb)
            .collect())
    }

    async fn read_blob(&self, digest: &str) -> Result<ByteStream, Error> {
        let resp = self
            .client
            .clone()
            .read_blob(wpb::ReadBlobRequest {
                digest: digest.to_string(),
            })
            .await
            .map_err(|s| self.err("read blob", digest, s))?;
        Ok(self.chunks("read blob", digest, resp.into_inner()))
    }

    async fn export_fs(&self, reference: &str) -> Result<ByteStream, Error> {
        let resp = self
            .client
            .clone()
            .export_fs(wpb::ExportFsRequest {
                r#ref: reference.to_string(),
            })
            .await
            .map_err(|s| self.err("export filesystem", reference, s))?;
        Ok(self.chunks("export filesystem", reference, resp.into_inner()))
    }
}

/// A client of the Exporter service, for peers.
#[derive(Clone)]
pub struct ExporterClient {
    inner: xpb::exporter_client::ExporterClient<Channel>,
}

impl ExporterClient {
    pub fn new(channel: Channel) -> Self {
        ExporterClient {
            inner: xpb::exporter_client::ExporterClient::new(channel)
                .max_decoding_message_size(64 << 20),
        }
    }

    pub async fn resolve_image_config(
        &self,
        reference: &str,
        platform: Option<&kiln_oci::Platform>,
    ) -> Result<ResolvedConfig, tonic::Status> {
        let resp = self
            .inner
            .clone()
            .resolve_image_config(xpb::ResolveRequest {
                r#ref: reference.to_string(),
                platform: platform.map(kiln_proto::pb::Platform::from),
                session_id: String::new(),
            })
            .await?
            .into_inner();
        Ok(ResolvedConfig {
            reference: resp.r#ref,
            digest: resp.digest,
            config: resp.config,
        })
    }

    /// Run an export; `on_status` sees each status line. Returns the exporter response.
    pub async fn export(
        &self,
        req: &ExportRequest,
        mut on_status: impl FnMut(String) + Send,
    ) -> Result<BTreeMap<String, String>, tonic::Status> {
        let mut stream = self
            .inner
            .clone()
            .export(convert::export_request_to_pb(req))
            .await?
            .into_inner();
        while let Some(ev) = stream.next().await {
            match ev?.event {
                Some(xpb::export_event::Event::Status(s)) => on_status(s),
                Some(xpb::export_event::Event::Done(d)) => {
                    return Ok(d.response.into_iter().collect());
                }
                None => {}
            }
        }
        Err(tonic::Status::unavailable(
            "exporter stream ended without a result",
        ))
    }
}
