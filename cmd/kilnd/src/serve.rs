//! Listening on unix or TCP addresses, and shutting down on a signal.

use anyhow::Context;
use futures_shutdown::Shutdown;
use kiln_session::dial::Addr;
use solver_scheduler::grpc::client::{GrpcExporter, GrpcFrontend, GrpcWorker};
use tonic::transport::server::Router;

/// The solver as kilnd wires it: every peer over gRPC.
pub type Solver = solver_scheduler::Solver<GrpcWorker, GrpcFrontend, GrpcExporter>;

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
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    Shutdown(rx)
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
