//! Addresses of kiln services: `unix:///path`, `tcp://host:port` or
//! `http://host:port`, and the [`Channel`] every service-to-service call
//! goes through (it adds the caller's trace context to each request once
//! [`set_request_hook`] was called).

use crate::Error;
use crate::tls::{ClientTls, Connector};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tonic::transport::{Endpoint, Uri};

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

/// A gRPC channel between kiln's services: tonic's, with the process's
/// request hook (see [`set_request_hook`]) run on each request's headers.
#[derive(Clone, Debug)]
pub struct Channel(tonic::transport::Channel);

impl From<tonic::transport::Channel> for Channel {
    fn from(c: tonic::transport::Channel) -> Self {
        Channel(c)
    }
}

/// Called with the headers of every request a [`Channel`] sends, set once at
/// start: kilnd puts the current span's W3C trace context there.
static REQUEST_HOOK: std::sync::OnceLock<fn(&mut http::HeaderMap)> = std::sync::OnceLock::new();

/// The daemon's socket when kilnd runs as root.
pub const SYSTEM_ADDRESS: &str = "unix:///run/kiln/kilnd.sock";

/// The socket of a rootless kilnd: `$XDG_RUNTIME_DIR/kiln/kilnd.sock` (the first dir
/// of the list), or `None` without `XDG_RUNTIME_DIR`.
pub fn user_address() -> Option<String> {
    let dirs = std::env::var("XDG_RUNTIME_DIR").ok()?;
    let dir = dirs.split(':').next().filter(|d| !d.is_empty())?;
    Some(format!("unix://{dir}/kiln/kilnd.sock"))
}

/// Where a client finds the daemon when told nothing: the system socket, else a
/// rootless daemon's ([`user_address`]) when only that one exists.
pub fn default_address() -> String {
    let exists = |a: &str| {
        a.strip_prefix("unix://")
            .is_some_and(|p| std::path::Path::new(p).exists())
    };
    match user_address() {
        Some(user) if !exists(SYSTEM_ADDRESS) && exists(&user) => user,
        _ => SYSTEM_ADDRESS.to_string(),
    }
}

/// Makes every [`Channel`] call `hook` on each request's headers before
/// sending it (nothing is called while none is set).
pub fn set_request_hook(hook: fn(&mut http::HeaderMap)) {
    let _ = REQUEST_HOOK.set(hook);
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(hook) = REQUEST_HOOK.get() {
            hook(request.headers_mut());
        }
        self.0.call(request)
    }
}

/// The TLS identity kiln's services use with each other (`[farm.tls]`), set
/// once at start: then every service-to-service `tcp://` connection is mutual TLS.
static INTERNAL_TLS: std::sync::OnceLock<ClientTls> = std::sync::OnceLock::new();

/// Makes every later [`connect`]/[`connect_lazy`] to a `tcp://` address use
/// `tls` (a certificate the other services' CA signed, and that CA).
pub fn set_internal_tls(tls: ClientTls) {
    let _ = INTERNAL_TLS.set(tls);
}

/// Opens a gRPC channel to `addr`. The connection is made lazily and
/// re-made after failures. Service-to-service connections use this (over
/// mutual TLS once [`set_internal_tls`] was called).
pub async fn connect(addr: &str) -> Result<Channel, Error> {
    // lazy either way: a service may start before the peer it dials
    connect_lazy(addr)
}

/// Opens a gRPC channel to `addr`, over TLS with `tls` for a `tcp://` address
/// (a unix socket is always plain, as with buildctl). With TLS the first
/// connection is made here, so a refused handshake is reported by this call
/// with its reason; later ones are made when needed.
pub async fn connect_with(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, Error> {
    raw_connect_with(addr, tls).await.map(Channel)
}

async fn raw_connect_with(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Channel, Error> {
    if let (Addr::Tcp(host), Some(tls)) = (Addr::parse(addr)?, tls) {
        let connector = Connector::new(tls, &host)?;
        let first = connector.connect(&host).await?;
        // the connection just checked serves the first request
        let first = Arc::new(Mutex::new(Some(first)));
        let ep = tcp_endpoint(addr, &host)?;
        return Ok(
            ep.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let (connector, host) = (connector.clone(), host.clone());
                let ready = first.lock().ok().and_then(|mut f| f.take());
                async move {
                    let conn = match ready {
                        Some(c) => c,
                        None => connector
                            .connect(&host)
                            .await
                            .map_err(std::io::Error::other)?,
                    };
                    Ok::<_, std::io::Error>(TokioIo::new(conn))
                }
            })),
        );
    }
    raw_connect_lazy(addr)
}

/// A plain gRPC channel to `addr` that connects when first used (and again
/// after a connection breaks).
pub fn connect_lazy(addr: &str) -> Result<Channel, Error> {
    raw_connect_lazy(addr).map(Channel)
}

fn raw_connect_lazy(addr: &str) -> Result<tonic::transport::Channel, Error> {
    if let (Addr::Tcp(host), Some(tls)) = (Addr::parse(addr)?, INTERNAL_TLS.get()) {
        let connector = Connector::new(tls, &host)?;
        return Ok(
            tcp_endpoint(addr, &host)?.connect_with_connector_lazy(tower::service_fn(
                move |_: Uri| {
                    let (connector, host) = (connector.clone(), host.clone());
                    async move {
                        let conn = connector
                            .connect(&host)
                            .await
                            .map_err(std::io::Error::other)?;
                        Ok::<_, std::io::Error>(TokioIo::new(conn))
                    }
                },
            )),
        );
    }
    match Addr::parse(addr)? {
        Addr::Tcp(host) => Ok(tcp_endpoint(addr, &host)?.connect_lazy()),
        Addr::Unix(path) => {
            let ep = with_windows(Endpoint::from_static("http://kiln.sock"));
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

/// HTTP/2 receive windows big enough for bulk data (blobs, layers, files):
/// with the 64 KiB default every 64 KiB received waits for a round trip.
fn with_windows(e: Endpoint) -> Endpoint {
    e.initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
}

/// The gRPC endpoint for `host` (`addr` with its scheme, for the error).
fn tcp_endpoint(addr: &str, host: &str) -> Result<Endpoint, Error> {
    Endpoint::from_shared(format!("http://{host}"))
        // an unreachable host (a partitioned farm worker) fails a call, not hangs it
        .map(|e| with_windows(e.connect_timeout(std::time::Duration::from_secs(5))))
        .map_err(|e| Error::Address {
            addr: addr.into(),
            reason: e.to_string(),
        })
}

/// A gRPC channel over this process's stdin and stdout: how a frontend image
/// reaches LLBBridge (the daemon serves it on the other ends of the pipes).
/// One connection only; it is not made again once it breaks.
pub fn stdio() -> Channel {
    Channel(raw_stdio())
}

fn raw_stdio() -> tonic::transport::Channel {
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
