//! Listening on unix or TCP addresses, and shutting down on a signal.
//!
//! The client listener of a daemon with a certificate serves TLS on `tcp://`
//! ([`serve_client`]): each connection's handshake runs in its own task, the
//! client's certificates reach every request as tonic's `TlsConnectInfo`, and a
//! client speaking plain HTTP/2 gets a gRPC error saying TLS is required.
//! The SessionBroker and the internal APIs listen elsewhere, always plain:
//! `<root>/internal.sock`, or the solver-scheduler's `--internal-addr` (a role
//! started without one keeps a single listener, with a warning, never with TLS).

use anyhow::Context;
pub use futures_shutdown::Shutdown;
use kiln_session::dial::Addr;
use solver_scheduler::grpc::client::{GrpcExporter, GrpcFrontend, GrpcWorker};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A tonic router whose every call gets a span (see [`crate::telemetry`]).
pub type Router = tonic::transport::server::Router<
    tower::layer::util::Stack<crate::telemetry::GrpcTraceLayer, tower::layer::util::Identity>,
>;

/// `tonic::transport::Server::builder()` with a span per call.
pub fn builder() -> tonic::transport::Server<
    tower::layer::util::Stack<crate::telemetry::GrpcTraceLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder().layer(crate::telemetry::GrpcTraceLayer)
}

/// The solver as kilnd wires it: every peer over gRPC.
pub type Solver =
    solver_scheduler::Solver<solver_scheduler::farm::Farm<GrpcWorker>, GrpcFrontend, GrpcExporter>;

mod futures_shutdown {
    use tokio::sync::watch;

    /// Resolves once SIGINT or SIGTERM arrives; clonable.
    #[derive(Clone)]
    pub struct Shutdown(pub watch::Receiver<bool>);

    impl Shutdown {
        pub async fn wait(mut self) {
            while !*self.0.borrow() {
                if self.0.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

pub fn shutdown_signal() -> Shutdown {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: waiting for running builds (a second signal stops at once)");
        let _ = tx.send(true);
        // builds that never end (a client gone silent) would hold a graceful shutdown
        // for ever; kilnd's state survives being stopped at any point, as a crash does
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: stopping now, running builds are abandoned");
        std::process::exit(1);
    });
    Shutdown(rx)
}

/// The user and group kilnd's unix sockets are given (`--group`, `[grpc] uid/gid`).
static SOCKET_OWNER: std::sync::OnceLock<(Option<u32>, Option<u32>)> = std::sync::OnceLock::new();

/// Sets the owner of the unix sockets kilnd listens on from now on.
pub fn set_socket_owner(uid: Option<u32>, gid: Option<u32>) {
    let _ = SOCKET_OWNER.set((uid, gid));
}

pub async fn serve(router: Router, addr: &str, shutdown: Shutdown) -> anyhow::Result<()> {
    match Addr::parse(addr)? {
        Addr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("listen on {}", path.display()))?;
            // kilnd's user and group may connect, whatever the umask (as buildkitd's 0660)
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                    .with_context(|| format!("set the mode of {}", path.display()))?;
                let (uid, gid) = SOCKET_OWNER.get().copied().unwrap_or_default();
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::chown(&path, uid, gid)
                        .with_context(|| format!("set the owner of {}", path.display()))?;
                }
            }
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown.wait(),
                )
                .await
                .with_context(|| format!("serve {addr}"))?;
            let _ = std::fs::remove_file(&path);
        }
        Addr::Tcp(hostport) => {
            let l = tokio::net::TcpListener::bind(&hostport)
                .await
                .with_context(|| format!("listen on {hostport}"))?;
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    shutdown.wait(),
                )
                .await
                .with_context(|| format!("serve {addr}"))?;
        }
    }
    Ok(())
}

/// How long a client may take to start and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// What a plain-text client of a TLS listener is told.
const TLS_REQUIRED: &str = "this kilnd listener requires tls: connect with --tlscacert, --tlscert \
                            and --tlskey (or --tlsdir)";

/// Serves a listener: TLS on `tcp://` when `tls` is given, plain otherwise (a
/// unix socket is always plain, as buildkitd's is). The client listener gets
/// `[grpc.tls]`; the internal ones `[farm.tls]`, whose config requires a
/// client certificate the farm's CA signed.
pub async fn serve_client(
    router: Router,
    addr: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    match (Addr::parse(addr)?, tls) {
        (Addr::Tcp(hostport), Some(config)) => {
            let l = TcpListener::bind(&hostport)
                .await
                .with_context(|| format!("listen on {hostport}"))?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let accept = tokio::spawn(async move {
                loop {
                    let (tcp, peer) = match l.accept().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %kiln_proto::status::Chain(&e), "accept on {hostport}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_tls(&acceptor, tcp))
                            .await
                        {
                            Ok(Ok(Some(stream))) => {
                                let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                            }
                            Ok(Ok(None)) => {
                                tracing::info!("refused plain-text client {peer}: tls required")
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %kiln_proto::status::Chain(&e), "tls handshake with {peer}")
                            }
                            Err(_) => tracing::warn!("tls handshake with {peer}: timed out"),
                        }
                    });
                }
            });
            let served = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    shutdown.wait(),
                )
                .await
                .with_context(|| format!("serve {addr}"));
            accept.abort();
            served
        }
        (Addr::Unix(_), Some(_)) => {
            tracing::warn!("tls is not used on {addr}: unix sockets are plain");
            serve(router, addr, shutdown).await
        }
        (_, None) => serve(router, addr, shutdown).await,
    }
}

/// Completes the TLS handshake of a new connection; `None` for a client that
/// spoke plain HTTP/2 and was told TLS is required.
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
) -> std::io::Result<Option<tokio_rustls::server::TlsStream<TcpStream>>> {
    let _ = tcp.set_nodelay(true);
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    // 0x16: a TLS handshake record; anything else is answered as plain HTTP/2
    if first[0] != 0x16 {
        refuse_plain(tcp).await;
        return Ok(None);
    }
    Ok(Some(acceptor.accept(tcp).await?))
}

/// Answers every call of a plain HTTP/2 connection with gRPC's UNAVAILABLE
/// and [`TLS_REQUIRED`], so the client's user reads why.
async fn refuse_plain(tcp: TcpStream) {
    let peer: Option<SocketAddr> = tcp.peer_addr().ok();
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((_, mut respond))) = conn.accept().await {
        let answer = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header("grpc-message", TLS_REQUIRED)
            .body(());
        if let Ok(answer) = answer
            && respond.send_response(answer, true).is_err()
        {
            tracing::debug!("answer plain-text client {peer:?}: connection gone");
        }
    }
}
