//! The `kiln.worker.v1.Worker` gRPC service over the worker core. This is the only module
//! that names tonic or the generated worker types.

pub mod client;
pub mod convert;
pub mod server;

use crate::Worker;
use kiln_proto::kiln::worker::v1::worker_server::WorkerServer;
use std::future::Future;
use std::sync::Arc;

pub use client::connect;
pub use server::WorkerService;

/// The tonic service for `w`, ready to add to a router.
pub fn server(w: Arc<Worker>) -> WorkerServer<WorkerService> {
    WorkerServer::new(WorkerService::new(w))
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// Serves the worker on `addr` (`unix:///path`, `tcp://host:port`) until `shutdown` resolves.
pub async fn serve(
    w: Arc<Worker>,
    addr: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let router = tonic::transport::Server::builder().add_service(server(w));
    match kiln_session::dial::Addr::parse(addr)? {
        kiln_session::dial::Addr::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)?;
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown,
                )
                .await?;
        }
        kiln_session::dial::Addr::Tcp(host) => {
            let l = tokio::net::TcpListener::bind(&host).await?;
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    shutdown,
                )
                .await?;
        }
    }
    Ok(())
}
