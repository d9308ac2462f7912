//! The gRPC face of the exporter: the `kiln.exporter.v1.Exporter` server over the core, the
//! worker client the core pulls layers through, an exporter client for peers, and the
//! conversions between generated and domain types.

mod client;
mod convert;
mod server;

use std::sync::Arc;

pub use client::{ExporterClient, GrpcWorker};
pub use server::ExporterService;

use kiln_proto::kiln::exporter::v1::exporter_server::ExporterServer;

/// The generated tonic server wrapping the exporter core.
pub fn server(core: Arc<crate::Exporter>) -> ExporterServer<ExporterService> {
    ExporterServer::new(ExporterService::new(core))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Serve the Exporter on `addr` until `shutdown` completes.
pub async fn serve(
    core: Arc<crate::Exporter>,
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(server(core))
        .serve_with_shutdown(addr, shutdown)
        .await
}
