//! `kiln`: the client. Speaks BuildKit's Control API, so it can drive `kilnd`
//! or a `buildkitd`, with `buildctl`'s flags.

mod build;
mod debug;
mod du;
mod gateway;
mod progress;
mod source;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kiln_session::tls::ClientTls;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Build container images with kilnd")]
struct Cli {
    /// Daemon address (unix:///path or tcp://host:port)
    #[arg(long, global = true, env = "KILN_HOST")]
    addr: Option<String>,
    /// CA certificate to verify the daemon with (tcp:// addresses)
    #[arg(long, global = true, value_name = "FILE")]
    tlscacert: Option<PathBuf>,
    /// Client certificate (tcp:// addresses)
    #[arg(long, global = true, value_name = "FILE")]
    tlscert: Option<PathBuf>,
    /// Client private key (tcp:// addresses)
    #[arg(long, global = true, value_name = "FILE")]
    tlskey: Option<PathBuf>,
    /// Server name to verify the daemon's certificate for (default: the address's host)
    #[arg(long, global = true, value_name = "NAME")]
    tlsservername: Option<String>,
    /// Directory holding ca.pem, cert.pem and key.pem (or ca.crt, tls.crt, tls.key)
    #[arg(long, global = true, value_name = "DIR")]
    tlsdir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a Dockerfile or an LLB definition
    Build(Box<build::BuildArgs>),
    /// Show the build cache's disk usage
    Du(du::DuArgs),
    /// Remove build cache
    Prune(du::PruneArgs),
    /// Show daemon and worker information
    Debug {
        #[command(subcommand)]
        what: debug::DebugCommand,
    },
}

/// The daemon address: --addr, then KILN_HOST (via clap), then
/// BUILDKIT_HOST, then the system socket, else a rootless daemon's under
/// `$XDG_RUNTIME_DIR` when only that one exists.
fn daemon_addr(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("BUILDKIT_HOST").ok())
        .unwrap_or_else(kiln_session::dial::default_address)
}

/// The daemon to talk to: its address and, for `tcp://`, the TLS settings.
pub struct Daemon {
    addr: String,
    tls: Option<ClientTls>,
}

impl Daemon {
    /// A gRPC channel to the daemon; with TLS, the handshake has been made.
    pub async fn connect(&self) -> anyhow::Result<kiln_session::dial::Channel> {
        Ok(kiln_session::dial::connect_with(&self.addr, self.tls.as_ref()).await?)
    }
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// buildctl's TLS flags: `--tlsdir`, or the files one by one; TLS is on when
/// any of them is given.
fn client_tls(cli: &Cli) -> anyhow::Result<Option<ClientTls>> {
    let files = cli.tlscacert.is_some() || cli.tlscert.is_some() || cli.tlskey.is_some();
    let mut tls = match &cli.tlsdir {
        Some(_) if files => {
            anyhow::bail!("--tlsdir and --tlscacert/--tlscert/--tlskey cannot be given together")
        }
        Some(dir) => ClientTls::from_dir(dir).context("--tlsdir")?,
        None if files => ClientTls {
            ca: cli.tlscacert.clone(),
            cert: cli.tlscert.clone(),
            key: cli.tlskey.clone(),
            server_name: None,
        },
        None => return Ok(None),
    };
    tls.server_name = cli.tlsservername.clone();
    Ok(Some(tls))
}

/// The caller's trace context from `TRACEPARENT` (and `TRACESTATE`), as
/// the environment carries it to a command: sent on every call to the
/// daemon, so the build's spans join the caller's trace.
static TRACE_CONTEXT: std::sync::OnceLock<Vec<(&'static str, http::HeaderValue)>> =
    std::sync::OnceLock::new();

fn trace_parent() {
    let Some(parent) = std::env::var("TRACEPARENT")
        .ok()
        .filter(|v| valid_traceparent(v.trim()))
    else {
        return;
    };
    let mut headers = Vec::new();
    if let Ok(v) = http::HeaderValue::from_str(parent.trim()) {
        headers.push(("traceparent", v));
    }
    if let Some(v) = std::env::var("TRACESTATE")
        .ok()
        .and_then(|v| http::HeaderValue::from_str(v.trim()).ok())
    {
        headers.push(("tracestate", v));
    }
    let _ = TRACE_CONTEXT.set(headers);
    kiln_session::dial::set_request_hook(|h| {
        for (k, v) in TRACE_CONTEXT.get().into_iter().flatten() {
            h.insert(*k, v.clone());
        }
    });
}

/// W3C trace context's `VERSION-TRACEID-SPANID-FLAGS` (hex, ids not all zero).
fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    trace_parent();
    let tls = match client_tls(&cli) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let addr = Daemon {
        addr: daemon_addr(cli.addr),
        tls,
    };
    let r = match cli.command {
        Command::Build(args) => build::run(&addr, *args).await,
        Command::Du(args) => du::du(&addr, args).await,
        Command::Prune(args) => du::prune(&addr, args).await,
        Command::Debug { what } => debug::run(&addr, what).await,
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod trace_tests {
    use super::valid_traceparent;

    #[test]
    fn traceparent_is_checked() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        // all-zero ids, a bad version, short fields
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"
        ));
        assert!(!valid_traceparent(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent("00-4bf92f35-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(""));
    }
}
