//! `kiln`: the client. Speaks BuildKit's Control API, so it can drive `kilnd`
//! or a `buildkitd`, with `buildctl`'s flags.

mod build;
mod debug;
mod du;
mod gateway;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Build container images with kilnd")]
struct Cli {
    /// Daemon address (unix:///path or tcp://host:port)
    #[arg(long, global = true, env = "KILN_HOST")]
    addr: Option<String>,
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
/// BUILDKIT_HOST, then the default socket.
fn daemon_addr(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("BUILDKIT_HOST").ok())
        .unwrap_or_else(|| "unix:///run/kiln/kilnd.sock".to_string())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let addr = daemon_addr(cli.addr);
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
