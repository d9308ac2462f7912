//! Exec ops: mount the inputs, write a runc bundle, run it (with kiln's own container
//! starter, runc, or as a containerd task), commit the writable mounts.

use crate::cachemount::{Lease, Sharing};
use crate::containerd::Containerd;
use crate::error::{Error, Result};
use crate::network::{self, Networking};
use crate::ops::input_ref;
use crate::pb::{self, MountType, NetMode, SecurityMode};
use crate::runc::{self, ExtraMount, ProcessSpec, Runc};
use crate::snapshot::{Kind, Mounted, Staging, Store};
use crate::{Event, RunRequest, Worker, fscopy, rootpath, users};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Where a prepared step runs. Everything else about an exec (mounts, spec, outputs) is
/// the same for every executor.
#[derive(Debug)]
pub enum Executor {
    /// `runc run` of the bundle, with runc's state in the worker's runtime dir.
    Runc(Runc),
    /// A containerd container and task (runc shim) with the bundle's spec.
    Containerd(Containerd),
    /// kiln's own container starter, with the bundle's spec (runc for interactive
    /// processes).
    Native(crate::native::Native, Runc),
}

impl Executor {
    /// The executor `config` selects for the worker `worker_id`. Containers and bundles
    /// an earlier run of this worker left behind are removed (containerd's on connect).
    pub fn from_config(
        config: &crate::Config,
        worker_id: &str,
        runtime: &crate::runtimedir::RuntimeDir,
    ) -> Executor {
        let runc_at = |state: PathBuf| Runc::new(config.runc.clone(), state);
        let executor = match &config.containerd {
            Some(c) => Executor::Containerd(Containerd::new(c.clone(), worker_id)),
            None => {
                // state an older kiln kept on disk, under the root
                let legacy = config.root.join("runc");
                if legacy.exists() {
                    runc_at(legacy.clone()).reap();
                    let _ = std::fs::remove_dir_all(&legacy);
                }
                let runc = runc_at(runtime.runc_state());
                runc.reap();
                native_or(runc, config)
            }
        };
        // bundles of steps a killed worker was running (their mounts are gone already:
        // the snapshot store detached everything under the root when it opened)
        for dir in [config.root.join("tmp"), runtime.path().to_path_buf()] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("exec-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        executor
    }

    /// The runc that runs interactive processes (frontend images, LLBBridge
    /// containers) with their stdio streamed: the runc executor's own, or on the
    /// containerd executor runc directly, with its state in the runtime dir.
    pub fn interactive(
        &self,
        config: &crate::Config,
        runtime: &crate::runtimedir::RuntimeDir,
    ) -> Runc {
        match self {
            Executor::Runc(r) | Executor::Native(_, r) => r.clone(),
            Executor::Containerd(_) => {
                let r = Runc::new(config.runc.clone(), runtime.runc_state());
                r.reap();
                r
            }
        }
    }

    /// Runs the bundle at `bundle` (its config.json is `spec`) as container `id`;
    /// returns the exit code. Dropping the future kills and removes the container.
    async fn run(
        &self,
        id: &str,
        bundle: &Path,
        spec: &oci_spec::runtime::Spec,
        events: &mpsc::Sender<Event>,
    ) -> Result<i32> {
        match self {
            Executor::Runc(r) => r.run(id, bundle, events).await,
            Executor::Containerd(c) => c.run(id, spec, bundle, events).await,
            Executor::Native(n, _) => n.run(id, spec, events).await,
        }
    }
}

/// kiln's own starter when the config asks for it (or leaves it to kiln) and the host
/// has what it needs; else `runc`. A rootless worker always uses runc.
fn native_or(runc: Runc, config: &crate::Config) -> Executor {
    use crate::native::Runtime;
    if config.runtime == Runtime::Runc || config.rootless {
        if config.rootless && config.runtime == Runtime::Native {
            tracing::warn!(
                "a rootless worker runs steps with runc ([worker.oci] runtime = \"native\" is for root)"
            );
        }
        return Executor::Runc(runc);
    }
    match crate::native::Native::new() {
        Ok(n) => {
            tracing::info!("exec steps start with kiln's own container starter");
            Executor::Native(n, runc)
        }
        Err(reason) => {
            if config.runtime == Runtime::Native {
                tracing::warn!(%reason, "kiln's own container starter is not available here; steps run with runc");
            } else {
                tracing::info!(%reason, "steps run with runc");
            }
            Executor::Runc(runc)
        }
    }
}

pub const ENTITLEMENT_NETWORK_HOST: &str = "network.host";
pub const ENTITLEMENT_SECURITY_INSECURE: &str = "security.insecure";

/// Fails unless both the worker's config and the build request grant `entitlement`.
fn check_entitlement(w: &Worker, granted: &[String], entitlement: &str) -> Result<()> {
    if w.config().rootless && entitlement == ENTITLEMENT_SECURITY_INSECURE {
        return Err(Error::Entitlement {
            entitlement: entitlement.to_string(),
            reason: "not available on a rootless worker: a step cannot hold more privilege \
                than the user kilnd runs as"
                .into(),
        });
    }
    if !w
        .config()
        .insecure_entitlements
        .iter()
        .any(|e| e == entitlement)
    {
        return Err(Error::Entitlement {
            entitlement: entitlement.to_string(),
            reason: "not allowed by build daemon configuration".into(),
        });
    }
    if !granted.iter().any(|e| e == entitlement) {
        return Err(Error::Entitlement {
            entitlement: entitlement.to_string(),
            reason: "not granted by the build request (--allow)".into(),
        });
    }
    Ok(())
}

/// Secret values of one exec, fetched from the client session. Never logged.
#[derive(Default)]
struct Secrets {
    /// by mount index; `None` = optional and missing
    files: HashMap<usize, Option<Vec<u8>>>,
    /// `NAME=value` entries for the process environment
    env: Vec<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

impl Secrets {
    fn is_empty(&self) -> bool {
        self.files.values().all(Option::is_none) && self.env.is_empty()
    }
}

async fn fetch_secrets(w: &Worker, e: &pb::ExecOp, session_id: &str) -> Result<Secrets> {
    let mut out = Secrets::default();
    let wanted_files: Vec<(usize, &pb::SecretOpt)> = e
        .mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| m.mount_type == MountType::Secret as i32)
        .filter_map(|(i, m)| m.secret_opt.as_ref().map(|s| (i, s)))
        .collect();
    if wanted_files.is_empty() && e.secretenv.is_empty() {
        return Ok(out);
    }
    let secret_err = |id: &str, reason: String| Error::Secret {
        id: id.to_string(),
        reason,
    };
    let client = session_client(w, session_id)
        .await
        .map_err(|source| Error::SecretSession {
            id: "*".into(),
            source,
        })?;
    let mut cache: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    let mut get = async |id: &str, optional: bool| -> Result<Option<Vec<u8>>> {
        if !cache.contains_key(id) {
            tracing::debug!(id, "fetching secret");
            let v = match &client {
                Some(c) => c
                    .get_secret(id)
                    .await
                    .map_err(|source| Error::SecretSession {
                        id: id.to_string(),
                        source,
                    })?,
                None => None,
            };
            tracing::debug!(id, found = v.is_some(), "fetched secret");
            cache.insert(id.to_string(), v);
        }
        match cache.get(id).cloned().flatten() {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(secret_err(id, "not found".into())),
        }
    };
    for (i, s) in wanted_files {
        let v = get(&s.id, s.optional).await?;
        out.files.insert(i, v);
    }
    for se in &e.secretenv {
        if let Some(v) = get(&se.id, se.optional).await? {
            let v = String::from_utf8(v)
                .map_err(|_| secret_err(&se.id, "not valid UTF-8 for an env secret".into()))?;
            out.env.push(format!("{}={v}", se.name));
        }
    }
    Ok(out)
}

/// SSH agent sockets of one exec: each connection to a socket is forwarded to the
/// client's agent through the session. The accept loops stop when this drops.
struct SshAgents {
    sockets: HashMap<usize, PathBuf>,
    tasks: Vec<tokio::task::AbortHandle>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for SshAgents {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn ssh_agents(w: &Worker, e: &pb::ExecOp, session_id: &str) -> Result<SshAgents> {
    let mut out = SshAgents {
        sockets: HashMap::new(),
        tasks: Vec::new(),
        _dir: None,
    };
    let wanted: Vec<(usize, pb::SshOpt)> = e
        .mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| m.mount_type == MountType::Ssh as i32)
        .map(|(i, m)| (i, m.ssh_opt.clone().unwrap_or_default()))
        .collect();
    if wanted.is_empty() {
        return Ok(out);
    }
    let ssh_err = |id: &str, reason: String| Error::SshAgent {
        id: id.to_string(),
        reason,
    };
    let client = session_client(w, session_id)
        .await
        .map_err(|source| Error::SshAgentSession {
            id: "*".into(),
            source,
        })?;
    let tmp = w.config().root.join("tmp");
    let dir = tempfile::Builder::new()
        .prefix("ssh-")
        .tempdir_in(&tmp)
        .map_err(Error::io("create", &tmp))?;
    for (i, opt) in wanted {
        let id = if opt.id.is_empty() {
            "default".to_string()
        } else {
            opt.id.clone()
        };
        let present = agent_present(client.as_ref(), &id).await?;
        let Some(client) = client.clone().filter(|_| present) else {
            if opt.optional {
                continue;
            }
            return Err(ssh_err(
                &id,
                "no agent in the client session (kiln build --ssh)".into(),
            ));
        };
        let path = dir.path().join(format!("agent-{i}.sock"));
        let listener = tokio::net::UnixListener::bind(&path).map_err(Error::io("listen", &path))?;
        kiln_oci::idmap::lchown(&path, opt.uid, opt.gid).map_err(Error::io("chown", &path))?;
        let mode = if opt.mode == 0 {
            0o600
        } else {
            opt.mode & 0o7777
        };
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
        )
        .map_err(Error::io("chmod", &path))?;
        let task = serve_agent(listener, client, id);
        out.tasks.push(task.abort_handle());
        out.sockets.insert(i, path);
    }
    out._dir = Some(dir);
    Ok(out)
}

/// Whether the client session forwards the SSH agent `id` (no session: no).
pub(crate) async fn agent_present(
    client: Option<&kiln_session::SessionClient>,
    id: &str,
) -> Result<bool> {
    match client {
        Some(c) => c
            .check_ssh_agent(id)
            .await
            .map_err(|source| Error::SshAgentSession {
                id: id.to_string(),
                source,
            }),
        None => Ok(false),
    }
}

/// Forwards each connection to `listener` to the client's SSH agent `id`,
/// until the task is aborted.
pub(crate) fn serve_agent(
    listener: tokio::net::UnixListener,
    client: kiln_session::SessionClient,
    id: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((conn, _)) = listener.accept().await {
            let (client, id) = (client.clone(), id.clone());
            conns.spawn(async move {
                if let Err(e) = client.forward_ssh_agent(&id, conn).await {
                    tracing::debug!(id, error = %kiln_proto::status::Chain(&e), "ssh agent forward");
                }
            });
        }
    })
}

/// A tmpfs mounted over a directory (a bundle that holds secrets, when the runtime dir is
/// on disk); unmounted on drop.
struct TmpfsGuard {
    path: PathBuf,
}

impl TmpfsGuard {
    fn mount(path: &Path) -> Result<TmpfsGuard> {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=0700,size=16m"),
        )
        .map_err(|source| Error::Mount {
            target: path.to_path_buf(),
            source,
        })?;
        Ok(TmpfsGuard {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %self.path.display(), error = %kiln_proto::status::Chain(&e), "unmount secrets tmpfs");
        }
    }
}

/// A mount whose writes become an output snapshot.
struct Writable {
    output: i64,
    staging: Staging,
    mounted: Mounted,
}

/// Everything mounted for one exec; dropping it unmounts and discards.
struct Prepared {
    writable: Vec<Writable>,
    /// Keeps read-only mounts alive for the run.
    _readonly: Vec<Mounted>,
    rootfs: PathBuf,
    /// Index into `writable` of the root mount, when it has an upper.
    root_writable: Option<usize>,
    /// Paths (relative to the rootfs) that did not exist before the run: mount stubs.
    stubs: Vec<PathBuf>,
    /// Cache mount dirs in use by this run.
    _leases: Vec<Lease>,
    /// A tmpfs over a bundle that holds secrets on a disk runtime dir (dropped before
    /// `bundle`).
    _bundle_tmpfs: Option<TmpfsGuard>,
    bundle: tempfile::TempDir,
    /// The runtime spec written to the bundle's config.json.
    spec: oci_spec::runtime::Spec,
    /// What the spec was made of: another process over the same mounts (an
    /// LLBBridge container's) gets its own spec from it.
    process: ProcessSpec,
    /// The host path of each bind mount, by mount index (the root's is the rootfs).
    mount_paths: HashMap<usize, PathBuf>,
    /// The step's network namespace on the bridge, removed when this drops (or kept
    /// for the next step, see [`Prepared::ran`]).
    network: Option<network::StepNetwork>,
}

/// The first missing component of `dest` inside `root`, and every path below it down to
/// `dest` (relative to root, shallowest first). `dest` is resolved inside the root first
/// (as runc does), so a symlinked parent such as `/var -> /host-var` never reaches the
/// host.
fn missing_components(root: &Path, dest: &str) -> Vec<PathBuf> {
    let Ok(resolved) = rootpath::resolve(root, dest, true) else {
        return Vec::new();
    };
    let Ok(rel) = resolved.strip_prefix(root) else {
        return Vec::new();
    };
    let mut cur = PathBuf::new();
    let mut out = Vec::new();
    for c in rel.components() {
        if let std::path::Component::Normal(n) = c {
            cur.push(n);
            if !out.is_empty() || std::fs::symlink_metadata(root.join(&cur)).is_err() {
                out.push(cur.clone());
            }
        }
    }
    out
}

/// True when no component of `rel` below `base` is a symlink (so `base.join(rel)` stays
/// under `base`).
fn no_symlink_parents(base: &Path, rel: &Path) -> bool {
    let mut cur = base.to_path_buf();
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        if i + 1 < n && std::fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            return false;
        }
    }
    true
}

/// Removes mount stubs from an upper dir: entries that did not exist before the run and are
/// now empty dirs or empty files; then copied-up parents left empty by that.
fn remove_stubs(upper: &Path, stubs: &[PathBuf]) {
    let mut sorted: Vec<&PathBuf> = stubs.iter().collect();
    sorted.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    sorted.dedup();
    for rel in &sorted {
        if !no_symlink_parents(upper, rel) {
            continue;
        }
        let p = upper.join(rel);
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let _ = if md.is_dir() {
            std::fs::remove_dir(&p)
        } else if md.is_file() && md.len() == 0 {
            std::fs::remove_file(&p)
        } else {
            Ok(())
        };
    }
    for rel in &sorted {
        let mut parent = rel.parent();
        while let Some(par) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if !no_symlink_parents(upper, par) {
                break;
            }
            let p = upper.join(par);
            let empty = std::fs::read_dir(&p)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            let opaque = xattr_opaque(&p);
            if !empty || opaque || std::fs::remove_dir(&p).is_err() {
                break;
            }
            parent = par.parent();
        }
    }
}

fn xattr_opaque(p: &Path) -> bool {
    xattr::get(p, crate::rootless::overlay_opaque_xattr())
        .is_ok_and(|v| v.is_some_and(|v| !v.is_empty()))
}

/// The step's `/etc/resolv.conf`: the host's; in a network of its own without the
/// host's loopback nameservers.
fn resolv_conf(own_network: bool) -> Vec<u8> {
    let host = std::fs::read("/etc/resolv.conf")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| b"nameserver 8.8.8.8\nnameserver 8.8.4.4\n".to_vec());
    if own_network {
        network::bridge_resolv_conf(&String::from_utf8_lossy(&host)).into_bytes()
    } else {
        host
    }
}

/// The network namespace of an exec: `--network=host` and `--network=none` as asked,
/// otherwise what the worker's network mode gives (on the bridge: a namespace of its own,
/// made here and removed when the returned guard drops).
fn step_network(
    networking: &Networking,
    mode: i32,
) -> Result<(runc::Network, Option<network::StepNetwork>)> {
    Ok(match NetMode::try_from(mode).unwrap_or(NetMode::Unset) {
        NetMode::Host => (runc::Network::Host, None),
        NetMode::None => (runc::Network::Loopback, None),
        NetMode::Unset => match networking {
            Networking::Host => (runc::Network::Host, None),
            Networking::None => (runc::Network::Loopback, None),
            Networking::Bridge(b) => {
                let n = b.attach()?;
                (runc::Network::Join(n.path().to_path_buf()), Some(n))
            }
        },
    })
}

/// What a step's mounts and process are made from, gathered (asynchronously)
/// before the blocking [`prepare`].
struct StepParts {
    exec: pb::ExecOp,
    inputs: Vec<Option<String>>,
    /// acquired cache mounts, by mount index
    leases: HashMap<usize, Lease>,
    secrets: Secrets,
    /// forwarded ssh agent sockets, by mount index
    ssh_sockets: HashMap<usize, PathBuf>,
}

/// The parts of the worker a step is prepared with.
struct StepHost {
    store: Store,
    runtime: crate::runtimedir::RuntimeDir,
    networking: Networking,
    rootless: bool,
}

/// A step's network, made on a thread of its own while the mounts are, and how
/// long it took.
type NetworkJob = std::thread::JoinHandle<Result<(StepNet, std::time::Duration)>>;
type StepNet = (runc::Network, Option<network::StepNetwork>);

fn timed_network(networking: &Networking, mode: i32) -> Result<(StepNet, std::time::Duration)> {
    let t = std::time::Instant::now();
    step_network(networking, mode).map(|n| (n, t.elapsed()))
}

fn prepare(host: &StepHost, mut parts: StepParts) -> Result<Prepared> {
    let e = parts.exec.clone();
    let meta = e
        .meta
        .as_ref()
        .ok_or_else(|| Error::InvalidOp("exec without meta".into()))?;
    let t0 = std::time::Instant::now();
    // a bridge network is made while the mounts are (a dropped handle's network is
    // removed when its thread ends)
    let net_job: Option<NetworkJob> = (matches!(host.networking, Networking::Bridge(_))
        && e.network == NetMode::Unset as i32)
        .then(|| {
            let networking = host.networking.clone();
            std::thread::spawn(move || timed_network(&networking, NetMode::Unset as i32))
        });
    let mut p = Prepared::new(&host.runtime, !parts.secrets.is_empty())?;
    let extra = p.mount_all(&host.store, &mut parts)?;
    if p.rootfs.as_os_str().is_empty() {
        return Err(Error::InvalidOp("exec has no root mount".into()));
    }
    let t_mounts = t0.elapsed();
    let identity = users::resolve_user(&p.rootfs, &meta.user)?;
    for dest in runc::SYSTEM_MOUNTS
        .iter()
        .copied()
        .chain(extra.iter().map(ExtraMount::dest))
    {
        p.stubs.extend(missing_components(&p.rootfs, dest));
    }
    let t_wait = std::time::Instant::now();
    let ((net, step_net), t_net) = match net_job {
        Some(job) => job.join().map_err(|_| Error::NetworkThreadPanicked)??,
        None => timed_network(&host.networking, e.network)?,
    };
    let t_wait = t_wait.elapsed();
    p.network = step_net;
    let (resolv_conf, hosts) = p.write_etc_files(meta, &net)?;
    let mut env = meta.env.clone();
    env.extend(
        meta.proxy_env
            .as_ref()
            .map(proxy_env_list)
            .unwrap_or_default(),
    );
    env.extend(parts.secrets.env.iter().cloned());
    let process = ProcessSpec {
        args: meta.args.clone(),
        env,
        cwd: meta.cwd.clone(),
        identity,
        hostname: meta.hostname.clone(),
        network: net,
        privileged: e.security == SecurityMode::Insecure as i32,
        rootfs: p.rootfs.clone(),
        readonly_rootfs: p.root_writable.is_none(),
        mounts: extra,
        resolv_conf,
        hosts,
        terminal: false,
        rootless: host.rootless,
    };
    p.spec = write_spec(p.bundle.path(), &process)?;
    p.process = process;
    tracing::debug!(
        target: "kiln_timing",
        "exec prepare: mounts {} ms, network {} us (waited {} us), user/stubs/bundle {} ms",
        t_mounts.as_millis(),
        t_net.as_micros(),
        t_wait.as_micros(),
        (t0.elapsed() - t_mounts - t_wait).as_millis()
    );
    Ok(p)
}

impl Prepared {
    /// Its container has exited and is removed: a bridge network of a step that could
    /// not change it goes to the next step.
    fn ran(&mut self) {
        if !self.process.privileged
            && let Some(n) = &mut self.network
        {
            n.reuse();
        }
    }

    /// An empty step in a new bundle under the runtime dir.
    fn new(runtime: &crate::runtimedir::RuntimeDir, with_secrets: bool) -> Result<Prepared> {
        let bundle = tempfile::Builder::new()
            .prefix("exec-")
            .tempdir_in(runtime.path())
            .map_err(Error::io("create bundle", runtime.path()))?;
        // secrets never touch a disk: the runtime dir is a tmpfs, or one goes over the bundle
        let bundle_tmpfs = if !with_secrets || runtime.is_tmpfs() {
            None
        } else {
            Some(TmpfsGuard::mount(bundle.path())?)
        };
        Ok(Prepared {
            writable: Vec::new(),
            _readonly: Vec::new(),
            rootfs: PathBuf::new(),
            root_writable: None,
            stubs: Vec::new(),
            _leases: Vec::new(),
            _bundle_tmpfs: bundle_tmpfs,
            bundle,
            spec: oci_spec::runtime::Spec::default(),
            process: ProcessSpec::default(),
            mount_paths: HashMap::new(),
            network: None,
        })
    }

    /// Makes every mount of the step, the root first; returns those the runtime
    /// spec adds over the rootfs.
    fn mount_all(&mut self, store: &Store, parts: &mut StepParts) -> Result<Vec<ExtraMount>> {
        let mut extra = Vec::new();
        let exec = parts.exec.clone();
        let mut mounts: Vec<(usize, &pb::Mount)> = exec.mounts.iter().enumerate().collect();
        mounts.sort_by_key(|(_, m)| m.dest != "/");
        for (index, m) in mounts {
            let dest = m.dest.clone();
            match MountType::try_from(m.mount_type).unwrap_or(MountType::Bind) {
                MountType::Bind => {
                    if let Some(bind) = self.bind(store, &parts.inputs, index, m)? {
                        extra.push(bind);
                    }
                }
                MountType::Tmpfs => extra.push(ExtraMount::Tmpfs {
                    dest,
                    size: m.tmpfs_opt.map(|t| t.size),
                }),
                MountType::Cache => {
                    let lease = parts.leases.remove(&index).ok_or_else(|| {
                        Error::InvalidOp(format!("cache mount {} not acquired", m.dest))
                    })?;
                    seed_cache(store, &parts.inputs, m, &lease)?;
                    extra.push(ExtraMount::Bind {
                        dest,
                        source: lease.dir().to_path_buf(),
                        readonly: m.readonly,
                    });
                    self._leases.push(lease);
                }
                MountType::Secret => {
                    let opt = m.secret_opt.clone().unwrap_or_default();
                    let Some(Some(data)) = parts.secrets.files.get(&index) else {
                        continue; // optional and missing
                    };
                    let file = self.bundle.path().join(format!("secret-{index}"));
                    write_secret(&file, data, &opt).map_err(|source| Error::SecretWrite {
                        id: opt.id.clone(),
                        source,
                    })?;
                    extra.push(ExtraMount::Bind {
                        dest,
                        source: file,
                        readonly: true,
                    });
                }
                MountType::Ssh => {
                    let Some(sock) = parts.ssh_sockets.get(&index) else {
                        continue; // optional and absent
                    };
                    extra.push(ExtraMount::Bind {
                        dest,
                        source: sock.clone(),
                        readonly: false,
                    });
                }
            }
        }
        Ok(extra)
    }

    /// A bind mount of an input: writable (over a new upper) when it has an output
    /// or is not read-only. The root becomes the rootfs; any other is returned.
    fn bind(
        &mut self,
        store: &Store,
        inputs: &[Option<String>],
        index: usize,
        m: &pb::Mount,
    ) -> Result<Option<ExtraMount>> {
        let is_root = m.dest == "/";
        let parent = input_ref(inputs, m.input)?;
        let path = if m.output >= 0 || !m.readonly {
            let staging = store.prepare(parent.as_deref())?;
            let mounted = store.mount_rw_for_step(&staging)?;
            let path = mounted.path().to_path_buf();
            if is_root {
                self.root_writable = Some(self.writable.len());
            }
            self.writable.push(Writable {
                output: m.output,
                staging,
                mounted,
            });
            path
        } else {
            let mounted = store.mount_ro_for_step(parent.as_deref())?;
            let path = mounted.path().to_path_buf();
            self._readonly.push(mounted);
            path
        };
        if is_root {
            self.mount_paths.insert(index, path.clone());
            self.rootfs = path;
            return Ok(None);
        }
        let source = rootpath::resolve(&path, &m.selector, true)
            .map_err(Error::io("resolve", &m.selector))?;
        self.mount_paths.insert(index, source.clone());
        Ok(Some(ExtraMount::Bind {
            dest: m.dest.clone(),
            source,
            readonly: m.readonly,
        }))
    }

    /// The step's resolv.conf and hosts files, written into the bundle.
    fn write_etc_files(&self, meta: &pb::Meta, net: &runc::Network) -> Result<(PathBuf, PathBuf)> {
        let resolv = self.bundle.path().join("resolv.conf");
        std::fs::write(&resolv, resolv_conf(*net != runc::Network::Host))
            .map_err(Error::io("write", &resolv))?;
        let hosts = self.bundle.path().join("hosts");
        // the step's own hostname, when it has one, is localhost's too
        let mut hosts_data = if meta.hostname.is_empty() {
            runc::HOSTS.to_string()
        } else {
            runc::HOSTS.replacen(runc::DEFAULT_HOSTNAME, &meta.hostname, 1)
        };
        for h in &meta.extra_hosts {
            hosts_data.push_str(&format!("{}\t{}\n", h.ip, h.host));
        }
        std::fs::write(&hosts, hosts_data).map_err(Error::io("write", &hosts))?;
        Ok((resolv, hosts))
    }
}

/// Seeds a new cache mount from the mount's input (`from=`, or the frontend's
/// mkdir carrying uid/gid/mode).
fn seed_cache(
    store: &Store,
    inputs: &[Option<String>],
    m: &pb::Mount,
    lease: &Lease,
) -> Result<()> {
    if !lease.fresh() || m.input < 0 {
        return Ok(());
    }
    let base = input_ref(inputs, m.input)?;
    let src = store.mount_ro(base.as_deref())?;
    let from = rootpath::resolve(src.path(), &m.selector, true)
        .map_err(Error::io("resolve", &m.selector))?;
    if std::fs::symlink_metadata(&from).is_ok_and(|md| md.is_dir()) {
        fscopy::copy_entry(&from, lease.dir(), &fscopy::CopyOpts::default())
            .map_err(Error::io("seed cache mount", lease.dir()))?;
    }
    src.unmount()
}

/// Writes the runtime spec of `process` as the bundle's config.json.
fn write_spec(bundle: &Path, process: &ProcessSpec) -> Result<oci_spec::runtime::Spec> {
    let spec = runc::spec(process)?;
    let config = bundle.join("config.json");
    spec.save(&config).map_err(|source| Error::SpecSave {
        path: config.clone(),
        source,
    })?;
    Ok(spec)
}

/// Writes a secret file with the mount's owner and mode (on the bundle's tmpfs).
fn write_secret(path: &Path, data: &[u8], opt: &pb::SecretOpt) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    drop(f);
    kiln_oci::idmap::lchown(path, opt.uid, opt.gid)?;
    let mode = if opt.mode == 0 {
        0o400
    } else {
        opt.mode & 0o7777
    };
    std::fs::set_permissions(
        path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
    )
}

fn finish(store: &Store, p: Prepared) -> Result<Vec<Option<String>>> {
    let n = p
        .writable
        .iter()
        .map(|w| w.output + 1)
        .max()
        .unwrap_or(0)
        .max(0) as usize;
    let mut outputs = vec![None; n];
    let t0 = std::time::Instant::now();
    let (mut t_unmount, mut t_commit) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for (i, w) in p.writable.into_iter().enumerate() {
        let t = std::time::Instant::now();
        w.mounted.unmount()?;
        t_unmount += t.elapsed();
        if Some(i) == p.root_writable {
            remove_stubs(&w.staging.diff(), &p.stubs);
        }
        if w.output >= 0 {
            let t = std::time::Instant::now();
            let id = store.commit(w.staging, Kind::Built, None)?;
            t_commit += t.elapsed();
            outputs[w.output as usize] = Some(id);
        }
    }
    tracing::debug!(
        target: "kiln_timing",
        "exec finish: unmount {} ms, sync+commit {} ms, total {} ms",
        t_unmount.as_millis(),
        t_commit.as_millis(),
        t0.elapsed().as_millis()
    );
    Ok(outputs)
}

/// What an exec needs from its request: the refs its mounts name, the build's
/// session and the entitlements it was granted.
pub struct ExecContext<'a> {
    pub inputs: &'a [Option<String>],
    pub session_id: &'a str,
    pub entitlements: &'a [String],
}

/// Checks entitlements, fetches secrets and agents, acquires cache mounts and
/// prepares the bundle (mounts, spec) of an exec.
async fn prepare_exec(
    w: &Worker,
    e: &pb::ExecOp,
    cx: &ExecContext<'_>,
) -> Result<(Prepared, SshAgents)> {
    let inputs = cx.inputs;
    if e.network == NetMode::Host as i32 {
        check_entitlement(w, cx.entitlements, ENTITLEMENT_NETWORK_HOST)?;
    }
    if e.security == SecurityMode::Insecure as i32 {
        check_entitlement(w, cx.entitlements, ENTITLEMENT_SECURITY_INSECURE)?;
    }
    let secrets = fetch_secrets(w, e, cx.session_id).await?;
    let agents = ssh_agents(w, e, cx.session_id).await?;
    let ssh_sockets = agents.sockets.clone();
    let mut leases = HashMap::new();
    for (i, m) in e.mounts.iter().enumerate() {
        if m.mount_type != MountType::Cache as i32 {
            continue;
        }
        let opt = m.cache_opt.clone().unwrap_or_default();
        let id = if opt.id.is_empty() {
            m.dest.clone()
        } else {
            opt.id
        };
        let sharing = match pb::CacheSharingOpt::try_from(opt.sharing) {
            Ok(pb::CacheSharingOpt::Private) => Sharing::Private,
            Ok(pb::CacheSharingOpt::Locked) => Sharing::Locked,
            _ => Sharing::Shared,
        };
        let base = input_ref(inputs, m.input)?;
        let base = base.map(|b| format!("{b}:{}", m.selector));
        leases.insert(
            i,
            w.cache_mounts
                .acquire(&id, base.as_deref(), sharing)
                .await?,
        );
    }
    let host = StepHost {
        store: w.store().clone(),
        runtime: w.runtime().clone(),
        networking: w.networking().clone(),
        rootless: w.config().rootless,
    };
    let parts = StepParts {
        exec: e.clone(),
        inputs: inputs.to_vec(),
        leases,
        secrets,
        ssh_sockets,
    };
    let prepared = tokio::task::spawn_blocking(move || prepare(&host, parts)).await??;
    Ok((prepared, agents))
}

/// An LLBBridge container: mounts prepared once, in which processes run one
/// after another or side by side (each a runc container over the same rootfs,
/// so they see each other's writes). Dropping it unmounts and discards.
pub struct Container {
    prepared: Prepared,
    /// the exec op it was made from (its network and security mode)
    op: pb::ExecOp,
    _agents: SshAgents,
}

impl Container {
    /// The host path of mount `index` (0 is usually the root).
    pub fn mount_path(&self, index: usize) -> Option<&Path> {
        self.prepared.mount_paths.get(&index).map(PathBuf::as_path)
    }
}

/// Prepares a container's mounts (`e`'s meta is not run).
pub async fn new_container(w: &Worker, e: &pb::ExecOp, cx: &ExecContext<'_>) -> Result<Container> {
    let (prepared, agents) = prepare_exec(w, e, cx).await?;
    Ok(Container {
        prepared,
        op: e.clone(),
        _agents: agents,
    })
}

/// Runs a process with `meta` in a container, stdio streamed. Returns its
/// exit code; dropping the future kills it.
/// A process to run in a container.
pub struct ContainerProcess<'a> {
    pub meta: &'a pb::Meta,
    pub secretenv: &'a [pb::SecretEnv],
    /// the session secrets come from
    pub session_id: &'a str,
    pub security: i32,
    /// on a pseudo-terminal
    pub tty: bool,
}

pub async fn run_in_container(
    w: &Worker,
    c: &Container,
    p: &ContainerProcess<'_>,
    stdio: crate::runc::Stdio,
    started: tokio::sync::oneshot::Sender<()>,
) -> Result<i32> {
    let ContainerProcess {
        meta,
        secretenv,
        session_id,
        security,
        tty,
    } = *p;
    if security == SecurityMode::Insecure as i32 && c.op.security != security {
        return Err(Error::Entitlement {
            entitlement: ENTITLEMENT_SECURITY_INSECURE.into(),
            reason: "a process cannot be more privileged than its container".into(),
        });
    }
    let base = &c.prepared.process;
    let identity = users::resolve_user(&base.rootfs, &meta.user)?;
    let secrets = fetch_secrets(
        w,
        &pb::ExecOp {
            secretenv: secretenv.to_vec(),
            ..Default::default()
        },
        session_id,
    )
    .await?;
    let mut env = meta.env.clone();
    env.extend(secrets.env.iter().cloned());
    let process = ProcessSpec {
        args: meta.args.clone(),
        env,
        cwd: if meta.cwd.is_empty() {
            "/".into()
        } else {
            meta.cwd.clone()
        },
        identity,
        terminal: tty,
        ..base.clone()
    };
    let bundle = tempfile::Builder::new()
        .prefix("exec-")
        .tempdir_in(w.runtime().path())
        .map_err(Error::io("create bundle", w.runtime().path()))?;
    write_spec(bundle.path(), &process)?;
    let id = format!("kiln-{}", uuid::Uuid::new_v4().simple());
    let _ = started.send(());
    w.interactive.run_stdio(&id, bundle.path(), stdio).await
}

/// Runs an interactive process (a frontend image, an LLBBridge container) with
/// its stdio streamed; what it writes to its mounts is dropped. Returns the exit
/// code. Dropping the future kills and removes the container.
pub async fn run_interactive(
    w: &Worker,
    e: &pb::ExecOp,
    cx: &ExecContext<'_>,
    stdio: crate::runc::Stdio,
    started: tokio::sync::oneshot::Sender<()>,
) -> Result<i32> {
    let (prepared, agents) = prepare_exec(w, e, cx).await?;
    let id = format!("kiln-{}", uuid::Uuid::new_v4().simple());
    let _ = started.send(());
    let code = w
        .interactive
        .run_stdio(&id, prepared.bundle.path(), stdio)
        .await?;
    drop(agents);
    // nothing an interactive process writes is kept
    tokio::task::spawn_blocking(move || drop(prepared)).await?;
    Ok(code)
}

pub async fn run(
    w: &Worker,
    e: &pb::ExecOp,
    req: &RunRequest,
    events: &mpsc::Sender<Event>,
) -> Result<Vec<Option<String>>> {
    let meta = e
        .meta
        .clone()
        .ok_or_else(|| Error::InvalidOp("exec without meta".into()))?;
    let t0 = std::time::Instant::now();
    // from here until the container has run, runc's cgroup attach finds the fast path
    let warm = (!matches!(w.executor, Executor::Native(..))).then(crate::cgwarm::hold);
    let (prepared, agents) = prepare_exec(
        w,
        e,
        &ExecContext {
            inputs: &req.inputs,
            session_id: &req.session_id,
            entitlements: &req.entitlements,
        },
    )
    .await?;
    let t_prepared = t0.elapsed();
    let id = format!("kiln-{}", uuid::Uuid::new_v4().simple());
    // containerd keeps every container's spec in its database: a step with secrets in
    // its environment runs with runc directly, its spec only in the runtime dir
    let code = if !e.secretenv.is_empty() && matches!(w.executor, Executor::Containerd(_)) {
        w.interactive
            .run(&id, prepared.bundle.path(), events)
            .await?
    } else {
        w.executor
            .run(&id, prepared.bundle.path(), &prepared.spec, events)
            .await?
    };
    drop(warm);
    let mut prepared = prepared;
    prepared.ran();
    let t_ran = t0.elapsed();
    drop(agents);
    let valid = if meta.valid_exit_codes.is_empty() {
        vec![0]
    } else {
        meta.valid_exit_codes.clone()
    };
    if !valid.contains(&code) {
        return Err(Error::ExitCode {
            args: meta.args.join(" "),
            code,
        });
    }
    let store = w.store().clone();
    let out = tokio::task::spawn_blocking(move || finish(&store, prepared)).await??;
    tracing::debug!(
        target: "kiln_timing",
        "exec {id}: prepare {} ms, run {} ms, finish {} ms",
        t_prepared.as_millis(),
        (t_ran - t_prepared).as_millis(),
        (t0.elapsed() - t_ran).as_millis()
    );
    Ok(out)
}

/// The build's client session, reached through the solver's broker; `None`
/// when the op runs without a session.
async fn session_client(
    w: &Worker,
    session_id: &str,
) -> std::result::Result<Option<kiln_session::SessionClient>, kiln_session::Error> {
    if session_id.is_empty() {
        return Ok(None);
    }
    let ch = kiln_session::dial::connect(&w.config().broker).await?;
    Ok(Some(kiln_session::SessionClient::new(
        ch,
        session_id.to_string(),
    )))
}

/// `Meta.proxy_env` as process env: each set proxy in upper and lower case
/// (build-arg proxies reach the step without being part of the image).
fn proxy_env_list(p: &pb::ProxyEnv) -> Vec<String> {
    [
        ("HTTP_PROXY", &p.http_proxy),
        ("HTTPS_PROXY", &p.https_proxy),
        ("FTP_PROXY", &p.ftp_proxy),
        ("NO_PROXY", &p.no_proxy),
        ("ALL_PROXY", &p.all_proxy),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .flat_map(|(k, v)| {
        [
            format!("{k}={v}"),
            format!("{}={v}", k.to_ascii_lowercase()),
        ]
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use crate::pb::{self, op::Op};
    use crate::testutil;
    use crate::{Event, RunRequest, Worker};
    use tokio::sync::mpsc;

    async fn run(
        w: &Worker,
        root: &str,
        op: pb::Op,
    ) -> (crate::Result<Vec<Option<String>>>, Vec<Event>) {
        let (tx, mut rx) = mpsc::channel(16);
        let collect = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(e) = rx.recv().await {
                v.push(e);
            }
            v
        });
        let req = RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "test".into(),
            op,
            inputs: vec![Some(root.to_string())],
            entitlements: Vec::new(),
        };
        let res = w.run(req, tx).await;
        (res, collect.await.expect("collect"))
    }

    #[tokio::test]
    async fn run_writes_diff_without_mount_stubs_and_streams_output() {
        let (_tmp, w) = testutil::worker();
        let root = testutil::busybox(&w);
        let (res, events) = run(
            &w,
            &root,
            testutil::exec_op(
                "echo hi > /out.txt; echo out; echo err >&2; cat /etc/hosts",
                "",
                vec![],
            ),
        )
        .await;
        let outs = res.expect("run");
        let out = outs[0].clone().expect("output ref");
        let diff = w.store().diff_dir(&out);
        assert_eq!(
            std::fs::read_to_string(diff.join("out.txt")).expect("out.txt"),
            "hi\n"
        );
        for stub in ["etc/hosts", "etc/resolv.conf", "proc", "dev", "sys", "etc"] {
            assert!(
                std::fs::symlink_metadata(diff.join(stub)).is_err(),
                "stub {stub} left in the diff"
            );
        }
        assert_eq!(
            w.store().meta(&out).expect("meta").parent.as_deref(),
            Some(root.as_str())
        );
        let logs = |s: i64| -> String {
            events
                .iter()
                .filter_map(|e| match e {
                    Event::Log { stream, data } if *stream == s => {
                        Some(String::from_utf8_lossy(data).into_owned())
                    }
                    _ => None,
                })
                .collect()
        };
        assert!(logs(1).starts_with("out\n"), "stdout: {:?}", logs(1));
        assert!(
            logs(1).contains("127.0.0.1\tlocalhost buildkitsandbox"),
            "stdout: {:?}",
            logs(1)
        );
        assert_eq!(logs(2), "err\n");
    }

    #[tokio::test]
    async fn failing_process_reports_buildkit_error_and_valid_exit_codes_pass() {
        let (_tmp, w) = testutil::worker();
        let root = testutil::busybox(&w);
        let (res, _) = run(&w, &root, testutil::exec_op("exit 3", "", vec![])).await;
        let err = res.expect_err("exit 3 must fail");
        assert_eq!(
            err.to_string(),
            r#"process "/bin/sh -c exit 3" did not complete successfully: exit code: 3"#
        );
        let (res, _) = run(&w, &root, testutil::exec_op("exit 3", "", vec![0, 3])).await;
        assert!(res.expect("valid exit code")[0].is_some());
    }

    #[tokio::test]
    async fn user_by_name_comes_from_rootfs_passwd() {
        let (_tmp, w) = testutil::worker();
        let root = testutil::busybox(&w);
        let (res, events) = run(
            &w,
            &root,
            testutil::exec_op("echo $(id -u):$(id -g)", "alice", vec![]),
        )
        .await;
        res.expect("run as alice");
        let out: Vec<u8> = events
            .into_iter()
            .filter_map(|e| match e {
                Event::Log { stream: 1, data } => Some(data),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(String::from_utf8_lossy(&out), "1000:1001\n");
        let (res, _) = run(&w, &root, testutil::exec_op("true", "nobody", vec![])).await;
        assert!(
            res.expect_err("unknown user")
                .to_string()
                .contains("nobody")
        );
    }

    #[tokio::test]
    async fn insecure_exec_is_privileged_only_when_entitled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cfg = crate::Config::new(tmp.path().join("root"));
        cfg.insecure_entitlements = vec!["security.insecure".into()];
        let w = Worker::new(cfg).expect("worker");
        let root = testutil::busybox(&w);
        let mut op = testutil::exec_op(
            "mkdir -p /m && mount -t tmpfs none /m && umount /m",
            "",
            vec![],
        );
        if let Some(Op::Exec(e)) = op.op.as_mut() {
            e.security = pb::SecurityMode::Insecure as i32;
        }
        let (res, _) = run(&w, &root, op.clone()).await;
        assert!(
            res.expect_err("request did not allow it")
                .to_string()
                .contains("security.insecure")
        );
        let (tx, mut rx) = mpsc::channel(64);
        let req = RunRequest {
            build_id: "b".into(),
            session_id: String::new(),
            session_shared_key: String::new(),
            name: "test".into(),
            op,
            inputs: vec![Some(root.clone())],
            entitlements: vec!["security.insecure".into()],
        };
        let res = w.run(req, tx).await;
        let mut logs = Vec::new();
        while let Ok(Event::Log { data, .. }) = rx.try_recv() {
            logs.extend(data);
        }
        res.unwrap_or_else(|e| panic!("privileged run: {e}: {}", String::from_utf8_lossy(&logs)));
        let (res, _) = run(
            &w,
            &root,
            testutil::exec_op("mkdir -p /m && mount -t tmpfs none /m", "", vec![]),
        )
        .await;
        assert!(res.is_err(), "a sandboxed step cannot mount");
    }
}
