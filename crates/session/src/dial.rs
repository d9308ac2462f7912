//! Addresses of kiln services: `unix:///path`, `tcp://host:port` or
//! `http://host:port`.

use crate::Error;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    pub fn parse(addr: &str) -> Result<Self, Error> {
        if let Some(p) = addr.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(Error::Address {
                    addr: addr.into(),
                    reason: "empty socket path".into(),
                });
            }
            return Ok(Addr::Unix(PathBuf::from(p)));
        }
        for prefix in ["tcp://", "http://"] {
            if let Some(h) = addr.strip_prefix(prefix) {
                return Ok(Addr::Tcp(h.trim_end_matches('/').to_string()));
            }
        }
        Err(Error::Address {
            addr: addr.into(),
            reason: "expected unix://PATH, tcp://HOST:PORT or http://HOST:PORT".into(),
        })
    }
}

/// Opens a gRPC channel to `addr`. The connection is made lazily and
/// re-made after failures.
pub async fn connect(addr: &str) -> Result<Channel, Error> {
    match Addr::parse(addr)? {
        Addr::Tcp(host) => {
            let ep =
                Endpoint::from_shared(format!("http://{host}")).map_err(|e| Error::Address {
                    addr: addr.into(),
                    reason: e.to_string(),
                })?;
            Ok(ep.connect_lazy())
        }
        Addr::Unix(path) => {
            let ep = Endpoint::from_static("http://kiln.sock");
            Ok(
                ep.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(s))
                    }
                })),
            )
        }
    }
}

/// A gRPC channel over this process's stdin and stdout: how a frontend image
/// reaches LLBBridge (the daemon serves it on the other ends of the pipes).
/// One connection only; it is not made again once it breaks.
pub fn stdio() -> Channel {
    let pipes = std::sync::Arc::new(std::sync::Mutex::new(Some(tokio::io::join(
        tokio::io::stdin(),
        tokio::io::stdout(),
    ))));
    Endpoint::from_static("http://stdio").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let io = pipes.lock().ok().and_then(|mut p| p.take());
            async move {
                io.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "the stdio connection to LLBBridge is gone",
                    )
                })
            }
        },
    ))
}
