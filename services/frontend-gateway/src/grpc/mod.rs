//! The gRPC edge: the only module naming tonic or generated protobuf types.
//!
//! * [`server`] serves `kiln.frontend.v1.Frontend` over a [`Gateway`].
//! * [`image`] runs the Dockerfile frontend as a frontend image, on stdio.
//! * [`client::GrpcBridge`] is the [`crate::Bridge`] over the solver's
//!   `moby.buildkit.v1.frontend.LLBBridge`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use kiln_session::dial::Channel;

use crate::Gateway;

pub mod client;
mod convert;
pub mod image;
pub mod server;

pub use server::{FrontendService, server};

/// Serves the Frontend service on `addr`, reaching the solver's LLBBridge over
/// `bridge`, until `shutdown` completes.
pub async fn serve(
    bridge: Channel,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let gateway = Arc::new(Gateway::new(client::GrpcBridge::new(bridge)));
    tonic::transport::Server::builder()
        .add_service(server(gateway))
        .serve_with_shutdown(addr, shutdown)
        .await
}
