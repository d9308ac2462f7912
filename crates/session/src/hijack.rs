//! Turning a stream of `BytesMessage`s into a byte pipe that HTTP/2 can run
//! on, in both directions.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::replay::Replay;

const PIPE_BUFFER: usize = 256 * 1024;
const CHUNK: usize = 32 * 1024;

/// One end of a hijacked session stream: bytes written here leave as
/// messages, incoming messages can be read here.
pub type Conn = Replay<DuplexStream>;

/// Joins an incoming message stream and an outgoing message sender into a
/// [`Conn`]. Pump tasks run until either side closes.
pub fn join<S, E>(incoming: S, outgoing: mpsc::Sender<Bytes>) -> Conn
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
    let (mut rd, mut wr) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut incoming = incoming;
        while let Some(msg) = incoming.next().await {
            match msg {
                Ok(data) => {
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("session stream ended: {e}");
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if outgoing
                        .send(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    Replay::new(Vec::new(), ours)
}

/// A gRPC channel whose single connection is `conn` (the daemon side of a
/// session). Reconnects are refused: a session lives as long as its stream.
pub async fn channel(conn: Conn) -> Result<tonic::transport::Channel, crate::Error> {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(conn)));
    tonic::transport::Endpoint::from_static("http://session")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let c = slot.lock().ok().and_then(|mut g| g.take());
            async move {
                c.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotConnected, "session is closed")
                })
            }
        }))
        .await
        .map_err(|source| crate::Error::Connect {
            addr: "session".into(),
            source,
        })
}
