//! Connecting to a remote worker.

use kiln_proto::kiln::worker::v1::worker_client::WorkerClient;
use kiln_session::dial::Channel;

/// A gRPC client for the worker at `addr` (`unix:///path`, `tcp://host:port`).
pub async fn connect(addr: &str) -> Result<WorkerClient<Channel>, kiln_session::Error> {
    let ch = kiln_session::dial::connect(addr).await?;
    Ok(WorkerClient::new(ch).max_decoding_message_size(64 * 1024 * 1024))
}
