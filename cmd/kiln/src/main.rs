//! `kiln`: the client. Speaks BuildKit's Control API, so it can drive `kilnd`
//! or a `buildkitd`, with `buildctl`'s flags.

mod build;
mod du;
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
        what: DebugCommand,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// List the daemon's workers
    Workers,
    /// Show the daemon's version
    Info,
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
        Command::Debug { what } => debug(&addr, what).await,
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn debug(addr: &str, what: DebugCommand) -> anyhow::Result<()> {
    use kiln_proto::moby::buildkit::v1::{
        InfoRequest, ListWorkersRequest, control_client::ControlClient,
    };
    let mut c = ControlClient::new(kiln_session::dial::connect(addr).await?);
    match what {
        DebugCommand::Info => {
            let v = c
                .info(InfoRequest {})
                .await?
                .into_inner()
                .buildkit_version
                .unwrap_or_default();
            println!("BuildKit: {} {} {}", v.package, v.version, v.revision);
        }
        DebugCommand::Workers => {
            let w = c
                .list_workers(ListWorkersRequest { filter: vec![] })
                .await?
                .into_inner();
            println!("ID\tPLATFORMS");
            for r in w.record {
                let p: Vec<String> = r
                    .platforms
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}{}",
                            p.os,
                            p.architecture,
                            if p.variant.is_empty() {
                                String::new()
                            } else {
                                format!("/{}", p.variant)
                            }
                        )
                    })
                    .collect();
                println!("{}\t{}", r.id, p.join(","));
            }
        }
    }
    Ok(())
}
