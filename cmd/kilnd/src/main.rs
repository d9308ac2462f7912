//! `kilnd`: the kiln daemon. With no `--role` it hosts all four services in
//! one process; `--role NAME` runs one of them, pointed at its peers.
//!
//! All-in-one layout: the client API (Control, and LLBBridge for client-side
//! frontends) listens on `--addr`; the internal services (SessionBroker,
//! LLBBridge, Worker, Frontend, Exporter) listen on `<root>/internal.sock`, and
//! the services reach each other there over real gRPC, exactly as they do
//! across hosts. `--role solver-scheduler` splits the same way: the client API
//! on `--addr`, SessionBroker and the internal LLBBridge on `--internal-addr`.
//! The client listener serves TLS with `--tlscert/--tlskey/--tlscacert`; the
//! internal listeners on `tcp://` serve mutual TLS with `[farm.tls]`, which
//! also becomes every service-to-service connection's identity.

mod config;
mod dashboard;
mod debug;
mod farm;
mod memory;
mod serve;
mod telemetry;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use solver_scheduler::grpc::client::GrpcWorker;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    FrontendGateway,
    SolverScheduler,
    WorkerExecutor,
    RegistryExporter,
}

/// The role as its flag names it; `all-in-one` without one.
fn role_name(role: Option<Role>) -> &'static str {
    match role {
        None => "all-in-one",
        Some(Role::FrontendGateway) => "frontend-gateway",
        Some(Role::SolverScheduler) => "solver-scheduler",
        Some(Role::WorkerExecutor) => "worker-executor",
        Some(Role::RegistryExporter) => "registry-exporter",
    }
}

#[derive(Parser, Debug)]
#[command(name = "kilnd", version, about = "The kiln build daemon")]
struct Args {
    /// Listening address (unix:///path or tcp://host:port)
    #[arg(long)]
    addr: Option<String>,
    /// State directory
    #[arg(long)]
    root: Option<PathBuf>,
    /// Config file (TOML, buildkitd.toml keys)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Internal listener of --role solver-scheduler (SessionBroker, LLBBridge for
    /// kiln's services); the other roles' --solver-addr
    #[arg(long)]
    internal_addr: Option<String>,
    /// TLS certificate of the client listener (tcp:// only)
    #[arg(long, value_name = "FILE")]
    tlscert: Option<PathBuf>,
    /// TLS private key of the client listener
    #[arg(long, value_name = "FILE")]
    tlskey: Option<PathBuf>,
    /// CA whose client certificates the client listener requires (mutual TLS)
    #[arg(long, value_name = "FILE")]
    tlscacert: Option<PathBuf>,
    /// Group (name or gid) owning kilnd's unix sockets, so its members may connect
    #[arg(long)]
    group: Option<String>,
    /// Run one service only
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// solver-scheduler address (for the other roles)
    #[arg(long)]
    solver_addr: Option<String>,
    /// worker-executor address (for solver-scheduler)
    #[arg(long)]
    worker_addr: Option<String>,
    /// frontend-gateway address (for solver-scheduler)
    #[arg(long)]
    frontend_addr: Option<String>,
    /// registry-exporter address (for solver-scheduler)
    #[arg(long)]
    exporter_addr: Option<String>,
    /// What exec steps get for a network: auto (bridge when it can be set up, else
    /// host), host, bridge or none; overrides `[worker] networkMode`
    #[arg(long, alias = "oci-worker-net", value_name = "MODE")]
    network_mode: Option<String>,
    /// Run exec steps as tasks of the containerd at this socket (enables
    /// `[worker.containerd]` with this address)
    #[arg(long, value_name = "ADDR")]
    containerd_worker_addr: Option<String>,
    /// worker-executor: join the farm of the solver-scheduler at this internal
    /// address (its --internal-addr); also the worker's --solver-addr
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// worker-executor: the address others reach this worker at (default --addr)
    #[arg(long, value_name = "ADDR")]
    advertise_addr: Option<String>,
    /// worker-executor: a label for LLB worker constraints, KEY=VALUE (repeatable)
    #[arg(
        long = "oci-worker-labels",
        alias = "worker-label",
        value_name = "KEY=VALUE"
    )]
    worker_labels: Vec<String>,
    /// worker-executor in a farm: steps it runs at once (default: its CPUs)
    #[arg(long)]
    capacity: Option<u32>,
    /// Debug listener, HOST:PORT: Prometheus /metrics, health (HTTP /healthz
    /// and gRPC grpc.health.v1), and on a scheduler the farm dashboard at /
    #[arg(long, value_name = "ADDR")]
    debugaddr: Option<String>,
    /// Rootless mode: kilnd runs as the mapped root of a user namespace made by
    /// `rootlesskit` for an ordinary user; state under ~/.local/share/kiln, socket
    /// under $XDG_RUNTIME_DIR/kiln, config ~/.config/kiln/kilnd.toml (the defaults
    /// whenever kilnd runs in a user namespace for a user other than root)
    #[arg(long)]
    rootless: bool,
    /// How snapshots are mounted: auto (overlayfs; for a rootless worker whose kernel
    /// cannot mount it in a user namespace, fuse-overlayfs), overlayfs or
    /// fuse-overlayfs; overrides `[worker.oci] snapshotter`
    #[arg(long = "oci-worker-snapshotter", value_name = "NAME")]
    snapshotter: Option<String>,
    /// What starts exec steps' containers: auto (kiln's own starter; runc when the
    /// worker is rootless or the kernel lacks the new mount API), native or runc;
    /// overrides `[worker.oci] runtime`
    #[arg(long = "oci-worker-runtime", value_name = "NAME")]
    runtime: Option<String>,
    /// Log filter, e.g. info or kiln=debug
    #[arg(long, env = "KILN_LOG", default_value = "info")]
    log: String,
}

const DEFAULT_ROOT: &str = "/var/lib/kiln";

/// Whether the defaults are a rootless daemon's: `--rootless`, or kilnd runs in a user
/// namespace for a user other than root (`$USER`, as rootlesskit keeps it).
fn rootless_defaults(args: &Args) -> bool {
    args.rootless
        || (worker_executor::rootless::in_user_namespace()
            && std::env::var("USER").is_ok_and(|u| !u.is_empty() && u != "root"))
}

/// `$XDG_<KIND>_HOME/kiln`, else `~/<fallback>/kiln`.
fn user_dir(xdg: &str, fallback: &str) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(xdg).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("kiln"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(fallback).join("kiln"))
}

/// The config file: `--config`, else for a rootless daemon
/// `~/.config/kiln/kilnd.toml` when it exists.
fn config_path(args: &Args) -> Option<PathBuf> {
    if let Some(p) = &args.config {
        return Some(p.clone());
    }
    if !rootless_defaults(args) {
        return None;
    }
    user_dir("XDG_CONFIG_HOME", ".config")
        .map(|d| d.join("kilnd.toml"))
        .filter(|p| p.exists())
}

fn main() {
    // before the runtime's threads start allocating
    memory::keep_small();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd: start the runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(daemon());
}

async fn daemon() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `[otel]` of the config, if it reads (run() reports it when not)
    let otel = config_path(&args)
        .and_then(|p| config::load(&p).ok())
        .map(|c| c.otel)
        .unwrap_or_default();
    let telemetry = telemetry::init(&args.log, &otel, role_name(args.role));
    let r = run(args).await;
    telemetry.shutdown().await;
    if let Err(e) = r {
        eprintln!("kilnd: {e:#}");
        std::process::exit(1);
    }
}

struct Settings {
    addr: String,
    root: PathBuf,
    file: config::FileConfig,
    peers: config::Peers,
    /// the client listener's TLS, files read
    tls: Option<Arc<rustls::ServerConfig>>,
    /// `[farm.tls]`: the internal listeners' mutual TLS on `tcp://`
    internal_tls: Option<Arc<rustls::ServerConfig>>,
    /// `--network-mode`
    network_mode: Option<String>,
    /// `--rootless` or `[worker.oci] rootless`
    rootless: bool,
    /// `--oci-worker-snapshotter` or `[worker.oci] snapshotter`
    snapshotter: worker_executor::snapshot::overlay::Snapshotter,
    /// `--oci-worker-runtime` or `[worker.oci] runtime`
    runtime: worker_executor::native::Runtime,
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let mut file = match config_path(args) {
        Some(p) => config::load(&p)?,
        None => config::FileConfig::default(),
    };
    // as buildkitd: rootless by default in a user namespace for a user other than root
    let user_defaults = rootless_defaults(args);
    let rootless = match file.worker.oci.rootless {
        Some(r) => r || args.rootless,
        None => user_defaults,
    };
    if let Some(a) = &args.containerd_worker_addr {
        file.worker.containerd.enabled = true;
        file.worker.containerd.address = Some(a.clone());
    }
    let addr = args
        .addr
        .clone()
        .or_else(|| file.grpc.address.first().cloned())
        .or_else(|| {
            user_defaults
                .then(kiln_session::dial::user_address)
                .flatten()
        })
        .unwrap_or_else(|| kiln_session::dial::SYSTEM_ADDRESS.to_string());
    let snapshotter = args
        .snapshotter
        .as_deref()
        .or(file.worker.oci.snapshotter.as_deref())
        .unwrap_or("auto")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{e}"))?;
    let runtime = args
        .runtime
        .as_deref()
        .or(file.worker.oci.runtime.as_deref())
        .unwrap_or("auto")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("[worker.oci] runtime: {e}"))?;
    let root = args
        .root
        .clone()
        .or_else(|| file.root.clone())
        .or_else(|| {
            user_defaults
                .then(|| user_dir("XDG_DATA_HOME", ".local/share"))
                .flatten()
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    let mut peers = file.peers.clone();
    peers.solver = args.solver_addr.clone().or(peers.solver);
    peers.worker = args.worker_addr.clone().or(peers.worker);
    peers.frontend = args.frontend_addr.clone().or(peers.frontend);
    peers.exporter = args.exporter_addr.clone().or(peers.exporter);
    let t = &file.grpc.tls;
    let tls = kiln_session::tls::ServerTls::from_parts(
        args.tlscert.clone().or_else(|| t.cert.clone()),
        args.tlskey.clone().or_else(|| t.key.clone()),
        args.tlscacert.clone().or_else(|| t.ca.clone()),
    )?
    .map(|t| t.config())
    .transpose()?;
    let gid = match &args.group {
        Some(g) => Some(group_id(g)?),
        None => file.grpc.gid,
    };
    serve::set_socket_owner(file.grpc.uid, gid);
    let internal_tls = farm::internal_tls(&file)?;
    Ok(Settings {
        addr,
        root,
        file,
        peers,
        tls,
        internal_tls,
        network_mode: args.network_mode.clone(),
        rootless,
        snapshotter,
        runtime,
    })
}

/// A worker runs as root, or rootless as the mapped root of a user namespace; anything
/// else fails here, saying how to start it.
fn check_privilege(rootless: bool) -> anyhow::Result<()> {
    if rootless {
        if let Some(p) = worker_executor::rootless::start_problem() {
            anyhow::bail!("{p}");
        }
        tracing::info!(
            ids = %worker_executor::rootless::IdMap::uids().describe(),
            "rootless: root in steps is the user kilnd runs for; other ids map to its subordinate ids"
        );
        tracing::warn!(
            "rootless: steps run in kilnd's own cgroup, without cgroups of their own (their memory and CPU are counted, and limited, with kilnd's)"
        );
    } else if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "kilnd's worker needs root, or rootless mode: {}",
            worker_executor::rootless::start_problem().unwrap_or_default()
        );
    }
    Ok(())
}

/// A group given by name (from the host's group database) or number.
fn group_id(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(grp)) => Ok(grp.gid.as_raw()),
        Ok(None) => anyhow::bail!("--group {g:?}: no such group"),
        Err(e) => anyhow::bail!("--group {g:?}: {e}"),
    }
}

/// Starts the debug listener when `--debugaddr` (or `[debug] address`, or
/// `[grpc] debugAddress`) names one; it serves until the process ends.
async fn start_debug(
    args: &Args,
    s: &Settings,
    solver: Option<Arc<serve::Solver>>,
    stopping: &serve::Shutdown,
) -> anyhow::Result<()> {
    let addr = args
        .debugaddr
        .clone()
        .or_else(|| s.file.debug.address.clone())
        .or_else(|| s.file.grpc.debug_address.clone());
    let Some(addr) = addr.filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    let d = debug::Debug::new(role_name(args.role), solver, stopping.clone());
    debug::listen(&addr, d).await?;
    Ok(())
}

/// Where `--role solver-scheduler` serves the internal APIs: `--internal-addr`,
/// else `[peers] solver` (where the other roles reach it), unless that is the
/// client listener itself (the layout before the split).
fn internal_addr(args: &Args, s: &Settings) -> Option<String> {
    args.internal_addr
        .clone()
        .or_else(|| s.peers.solver.clone())
        .filter(|a| *a != s.addr)
}

fn need(v: &Option<String>, flag: &str, role: &str) -> anyhow::Result<String> {
    v.clone()
        .with_context(|| format!("--role {role} needs {flag} (or [peers] in the config)"))
}

fn worker_core(s: &Settings, broker: String) -> anyhow::Result<Arc<worker_executor::Worker>> {
    let mut c = worker_executor::Config::new(s.root.join("worker"));
    c.broker = broker;
    c.registry = s.file.registry.clone();
    if let Some(b) = &s.file.worker.oci.binary {
        c.runc = b.clone();
    }
    for e in &s.file.insecure_entitlements {
        if !matches!(e.as_str(), "network.host" | "security.insecure") {
            anyhow::bail!(
                "insecure-entitlements: unknown entitlement {e:?} (network.host, security.insecure)"
            );
        }
    }
    c.insecure_entitlements = s.file.insecure_entitlements.clone();
    c.containerd = s.file.worker.containerd.to_config()?;
    c.network = s.file.worker.network(s.network_mode.as_deref())?;
    c.rootless = s.rootless;
    c.snapshotter = s.snapshotter;
    c.runtime = s.runtime;
    if s.rootless && c.containerd.is_some() {
        anyhow::bail!(
            "rootless mode runs steps with runc; the containerd worker ([worker.containerd]) is not available rootless"
        );
    }
    Ok(Arc::new(
        worker_executor::Worker::new(c).context("start worker")?,
    ))
}

fn exporter_core(s: &Settings, broker: String) -> anyhow::Result<Arc<registry_exporter::Exporter>> {
    let c = registry_exporter::Config {
        registry: s.file.registry.clone(),
        broker,
        work_dir: s.root.join("exporter"),
    };
    std::fs::create_dir_all(&c.work_dir)
        .with_context(|| format!("create {}", c.work_dir.display()))?;
    Ok(Arc::new(
        registry_exporter::Exporter::new(c).context("start exporter")?,
    ))
}

async fn frontend_core(
    solver: &str,
) -> anyhow::Result<Arc<frontend_gateway::Gateway<frontend_gateway::grpc::client::GrpcBridge>>> {
    let ch = kiln_session::dial::connect(solver).await?;
    Ok(Arc::new(frontend_gateway::Gateway::new(
        frontend_gateway::grpc::client::GrpcBridge::new(ch),
    )))
}

/// Ends every worker's farm stream once kilnd is told to shut down, so the
/// internal listener's graceful shutdown is not held up by them.
fn close_farm_on(shutdown: &serve::Shutdown, solver: &std::sync::Arc<serve::Solver>) {
    let (shutdown, farm) = (shutdown.clone(), solver.worker.clone());
    tokio::spawn(async move {
        shutdown.wait().await;
        farm.close();
    });
}

async fn solver_core(
    s: &Settings,
    home: Option<(solver_scheduler::farm::members::Registration, GrpcWorker)>,
    frontend: &str,
    exporter: &str,
) -> anyhow::Result<Arc<serve::Solver>> {
    use solver_scheduler::grpc::client::{GrpcExporter, GrpcFrontend};
    let w = farm::farm(&s.file, home)?;
    let f = GrpcFrontend::new(kiln_session::dial::connect(frontend).await?);
    let e = GrpcExporter::new(kiln_session::dial::connect(exporter).await?);
    let config = solver_scheduler::Config {
        // the result cache survives restarts (and kill -9: redb commits are atomic)
        cache_db: Some(s.root.join("solver").join("cache.redb")),
        gc: s.file.worker.oci.gc_policies()?,
        max_parallelism: s.file.worker.oci.max_parallelism,
        cache_imports: cache_entries(&s.file.remote_cache.import)?,
        cache_exports: cache_entries(&s.file.remote_cache.export)?,
        ..Default::default()
    };
    solver_scheduler::remote::export_specs(&config.cache_exports)
        .and_then(|_| solver_scheduler::remote::check_imports(&config.cache_imports))
        .context("kilnd.toml [remote-cache]")?;
    Ok(Arc::new(
        solver_scheduler::Solver::new(config, w, f, e).context("start solver")?,
    ))
}

/// kilnd.toml's default caches, checked as a build's own are.
fn cache_entries(
    tables: &[std::collections::BTreeMap<String, String>],
) -> anyhow::Result<Vec<solver_scheduler::remote::CacheEntry>> {
    tables
        .iter()
        .map(|t| {
            let e = solver_scheduler::remote::CacheEntry::from_table(t.clone());
            if e.r#type.is_empty() {
                anyhow::bail!("kilnd.toml [[remote-cache]] entry {t:?} has no type");
            }
            Ok(e)
        })
        .collect()
}

/// `--worker-addr`'s worker as the scheduler's home member: its id and
/// platforms asked with `Info` (its address stands for its id while it does
/// not answer yet).
async fn remote_home(
    address: &str,
) -> anyhow::Result<(solver_scheduler::farm::members::Registration, GrpcWorker)> {
    use kiln_proto::kiln::worker::v1::{InfoRequest, worker_client::WorkerClient};
    let ch = kiln_session::dial::connect(address).await?;
    let info = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        WorkerClient::new(ch.clone()).info(InfoRequest {}),
    )
    .await;
    let (id, platforms, labels) = match info {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            let platforms = r.platforms.iter().map(kiln_oci::Platform::from).collect();
            (r.id, platforms, r.labels.into_iter().collect())
        }
        _ => (
            address
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect(),
            vec![kiln_oci::Platform::host()],
            Default::default(),
        ),
    };
    let mut labels: std::collections::BTreeMap<String, String> = labels;
    labels
        .entry(solver_scheduler::solver::WORKER_EXECUTOR_LABEL.to_string())
        .or_insert_with(|| "oci".to_string());
    let reg = farm::home_registration(id, address, platforms, labels);
    Ok((reg, GrpcWorker::new(address.to_string(), ch)))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let s = settings(&args)?;
    if matches!(args.role, None | Some(Role::WorkerExecutor)) {
        check_privilege(s.rootless)?;
    }
    std::fs::create_dir_all(&s.root).with_context(|| format!("create {}", s.root.display()))?;
    // build contexts, secrets in bundles and snapshots are kilnd's alone
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&s.root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("make {} private", s.root.display()))?;
    }
    let shutdown = serve::shutdown_signal();
    if let Some(role @ (Role::WorkerExecutor | Role::FrontendGateway | Role::RegistryExporter)) =
        args.role
        && s.tls.is_some()
    {
        tracing::warn!(
            "tls settings apply to the client listener only; --role {} serves {} plain",
            role_name(Some(role)),
            s.addr
        );
    }
    match args.role {
        None => {
            let internal = format!("unix://{}", s.root.join("internal.sock").display());
            let worker = worker_core(&s, internal.clone())?;
            let home = farm::home_registration(
                worker.id().to_string(),
                &internal,
                worker.platforms(),
                farm::labels(&s.file, &args.worker_labels)?,
            );
            let home_client = GrpcWorker::new(
                internal.clone(),
                kiln_session::dial::connect(&internal).await?,
            );
            let solver = solver_core(&s, Some((home, home_client)), &internal, &internal).await?;
            close_farm_on(&shutdown, &solver);
            start_debug(&args, &s, Some(solver.clone()), &shutdown).await?;
            let exporter = exporter_core(&s, internal.clone())?;
            let frontend = frontend_core(&internal).await?;
            let internal_router = serve::builder()
                .add_service(solver_scheduler::grpc::broker_server(solver.clone()))
                .add_service(solver_scheduler::grpc::bridge_server(solver.clone()))
                .add_service(solver_scheduler::grpc::farm_server(solver.worker.clone()))
                .add_service(worker_executor::grpc::server(worker))
                .add_service(frontend_gateway::grpc::server::server(frontend))
                .add_service(registry_exporter::grpc::server(exporter));
            // workers on other hosts join here (and reach the session broker)
            let farm_listener = args.internal_addr.clone().map(|addr| {
                let router = serve::builder()
                    .add_service(solver_scheduler::grpc::broker_server(solver.clone()))
                    .add_service(solver_scheduler::grpc::bridge_server(solver.clone()))
                    .add_service(solver_scheduler::grpc::farm_server(solver.worker.clone()));
                let shutdown = shutdown.clone();
                let tls = s.internal_tls.clone();
                tokio::spawn(async move { serve::serve_client(router, &addr, tls, shutdown).await })
            });
            // clients get Control and, for frontends they run themselves, LLBBridge
            let public_router = serve::builder()
                .add_service(solver_scheduler::grpc::control_server(solver.clone()))
                .add_service(solver_scheduler::grpc::client_bridge_server(solver.clone()));
            tracing::info!(
                "kilnd all-in-one listening on {} (root {})",
                s.addr,
                s.root.display()
            );
            let (a, b) = tokio::join!(
                serve::serve(internal_router, &internal, shutdown.clone()),
                serve::serve_client(public_router, &s.addr, s.tls.clone(), shutdown.clone()),
            );
            a?;
            b?;
            if let Some(l) = farm_listener {
                l.await.context("farm listener")??;
            }
        }
        Some(Role::SolverScheduler) => {
            let role = "solver-scheduler";
            // without --worker-addr, every worker joins (--join)
            let home = match &s.peers.worker {
                Some(w) => Some(remote_home(w).await?),
                None => None,
            };
            let solver = solver_core(
                &s,
                home,
                &need(&s.peers.frontend, "--frontend-addr", role)?,
                &need(&s.peers.exporter, "--exporter-addr", role)?,
            )
            .await?;
            close_farm_on(&shutdown, &solver);
            start_debug(&args, &s, Some(solver.clone()), &shutdown).await?;
            let client_router = serve::builder()
                .add_service(solver_scheduler::grpc::control_server(solver.clone()));
            let internal_services = (
                solver_scheduler::grpc::broker_server(solver.clone()),
                solver_scheduler::grpc::bridge_server(solver.clone()),
                solver_scheduler::grpc::farm_server(solver.worker.clone()),
            );
            match internal_addr(&args, &s) {
                Some(internal) => {
                    let client_router = client_router
                        .add_service(solver_scheduler::grpc::client_bridge_server(solver));
                    let internal_router = serve::builder()
                        .add_service(internal_services.0)
                        .add_service(internal_services.1)
                        .add_service(internal_services.2);
                    tracing::info!(
                        "kilnd {role} listening on {} (internal: {internal})",
                        s.addr
                    );
                    let (a, b) = tokio::join!(
                        serve::serve_client(
                            internal_router,
                            &internal,
                            s.internal_tls.clone(),
                            shutdown.clone()
                        ),
                        serve::serve_client(client_router, &s.addr, s.tls.clone(), shutdown),
                    );
                    a?;
                    b?;
                }
                None => {
                    anyhow::ensure!(
                        s.tls.is_none(),
                        "--role {role} with tls needs --internal-addr: the session broker \
                         and the internal LLBBridge are never served on a tls client listener"
                    );
                    tracing::warn!(
                        "kilnd {role}: no --internal-addr, so the session broker and the internal \
                         LLBBridge are served on the client listener {}; give --internal-addr \
                         and point the other roles' --solver-addr at it",
                        s.addr
                    );
                    // one LLBBridge per path: the internal one, as before the split
                    let router = client_router
                        .add_service(internal_services.0)
                        .add_service(internal_services.1)
                        .add_service(internal_services.2);
                    serve::serve(router, &s.addr, shutdown).await?;
                }
            }
        }
        Some(Role::WorkerExecutor) => {
            start_debug(&args, &s, None, &shutdown).await?;
            let join = args.join.clone().or_else(|| s.file.farm.join.clone());
            let solver = s.peers.solver.clone().or_else(|| join.clone());
            let worker = worker_core(
                &s,
                need(&solver, "--solver-addr (or --join)", "worker-executor")?,
            )?;
            let router =
                serve::builder().add_service(worker_executor::grpc::server(worker.clone()));
            tracing::info!("kilnd worker-executor listening on {}", s.addr);
            match join {
                None => {
                    serve::serve_client(router, &s.addr, s.internal_tls.clone(), shutdown).await?
                }
                Some(join) => {
                    let config = farm::join_config(
                        &s.file,
                        &join,
                        &s.addr,
                        args.advertise_addr.as_deref(),
                        args.capacity,
                        farm::labels(&s.file, &args.worker_labels)?,
                    )?;
                    // on a signal the worker drains (finishes its steps, takes
                    // no new ones), then stops serving
                    let leave = shutdown.0.clone();
                    let (stop, stopped) = tokio::sync::watch::channel(false);
                    let joined = tokio::spawn(async move {
                        worker_executor::join::join(worker, config, leave).await;
                        let _ = stop.send(true);
                    });
                    serve::serve_client(
                        router,
                        &s.addr,
                        s.internal_tls.clone(),
                        serve::Shutdown(stopped),
                    )
                    .await?;
                    joined.abort();
                }
            }
        }
        Some(Role::FrontendGateway) => {
            start_debug(&args, &s, None, &shutdown).await?;
            let frontend =
                frontend_core(&need(&s.peers.solver, "--solver-addr", "frontend-gateway")?).await?;
            let router =
                serve::builder().add_service(frontend_gateway::grpc::server::server(frontend));
            tracing::info!("kilnd frontend-gateway listening on {}", s.addr);
            serve::serve_client(router, &s.addr, s.internal_tls.clone(), shutdown).await?;
        }
        Some(Role::RegistryExporter) => {
            start_debug(&args, &s, None, &shutdown).await?;
            let exporter = exporter_core(
                &s,
                need(&s.peers.solver, "--solver-addr", "registry-exporter")?,
            )?;
            let router = serve::builder().add_service(registry_exporter::grpc::server(exporter));
            tracing::info!("kilnd registry-exporter listening on {}", s.addr);
            serve::serve_client(router, &s.addr, s.internal_tls.clone(), shutdown).await?;
        }
    }
    Ok(())
}
