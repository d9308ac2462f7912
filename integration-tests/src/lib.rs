//! Test harness for end-to-end tests: a real registry seeded with busybox,
//! real `kilnd` daemons (all-in-one or one process per service) and the real
//! `kiln` client, run as separate processes in a temp dir.
//!
//! `make test` starts one registry for the whole run and passes it in
//! `KILN_TEST_REGISTRY`; run alone, a test starts its own.

pub mod container_farm;
pub mod farm;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Directory holding the `kilnd` and `kiln` binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("KILN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

struct OwnRegistry {
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(repo_root().join("scripts/registry.sh"))
            .arg("stop")
            .arg(self._dir.path())
            .status();
    }
}

static OWN_REGISTRY: OnceLock<Option<OwnRegistry>> = OnceLock::new();

/// `HOST:PORT` of a registry holding `library/busybox:latest`.
pub fn registry() -> String {
    if let Ok(r) = std::env::var("KILN_TEST_REGISTRY") {
        return r;
    }
    let own = OWN_REGISTRY.get_or_init(|| {
        let dir = tempfile::tempdir().ok()?;
        let out = Command::new("sh")
            .arg(repo_root().join("scripts/registry.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .ok()?;
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ok = Command::new("sh")
            .arg(repo_root().join("scripts/seed-busybox.sh"))
            .arg(&addr)
            .status()
            .ok()?
            .success();
        ok.then_some(OwnRegistry { addr, _dir: dir })
    });
    own.as_ref()
        .map(|r| r.addr.clone())
        .expect("could not start a test registry (scripts/registry.sh)")
}

/// How the daemon is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// one `kilnd` hosting all four services
    AllInOne,
    /// one `kilnd --role X` per service, talking gRPC over unix sockets; the
    /// solver-scheduler serves clients on its `--addr` and the other services on
    /// `--internal-addr`
    Split,
    /// one all-in-one `kilnd --rootless` run by an unprivileged user
    /// ([`rootless_user`]) under `rootlesskit --net=host --copy-up=/etc`
    Rootless,
}

/// The unprivileged user rootless daemons run as (`scripts/rootless-user.sh` makes it,
/// with subordinate ids, the first time).
pub struct RootlessUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

static ROOTLESS_USER: OnceLock<std::result::Result<RootlessUser, String>> = OnceLock::new();

/// The test user of [`Topology::Rootless`].
pub fn rootless_user() -> Result<&'static RootlessUser> {
    let u = ROOTLESS_USER.get_or_init(|| {
        let out = Command::new("sh")
            .arg(repo_root().join("scripts/rootless-user.sh"))
            .output()
            .map_err(|e| format!("scripts/rootless-user.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/rootless-user.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let id = |flag: &str| -> std::result::Result<u32, String> {
            let o = Command::new("id")
                .args([flag, &name])
                .output()
                .map_err(|e| e.to_string())?;
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("id {flag} {name}: {e}"))
        };
        Ok(RootlessUser {
            uid: id("-u")?,
            gid: id("-g")?,
            home: PathBuf::from("/home").join(&name),
            name,
        })
    });
    u.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// `kilnd ARGS` as `user` under rootlesskit, as a rootless daemon is started: the
/// binary copied into `dir` (which becomes the user's), a clean environment (`HOME`,
/// `USER`, `PATH`, `XDG_RUNTIME_DIR` = `dir`/run, and `env`).
pub fn rootless_kilnd(
    user: &RootlessUser,
    dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Command> {
    rootless_kilnd_on("host", user, dir, args, env)
}

/// [`rootless_kilnd`] with rootlesskit's `--net=NET` (`host`, `slirp4netns`).
pub fn rootless_kilnd_on(
    net: &str,
    user: &RootlessUser,
    dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Command> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(bin_dir().join("kilnd"), bin.join("kilnd")).context("copy kilnd")?;
    let run = dir.join("run");
    std::fs::create_dir_all(&run)?;
    let st = Command::new("chown")
        .args(["-R", &format!("{}:{}", user.uid, user.gid)])
        .arg(dir)
        .status()?;
    if !st.success() {
        bail!("chown {} to {}", dir.display(), user.name);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.name))
        .arg(format!("--regid={}", user.name))
        .arg("--init-groups")
        .arg("env")
        .arg("-i")
        .arg(format!("HOME={}", user.home.display()))
        .arg(format!("USER={}", user.name))
        .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .arg(format!("XDG_RUNTIME_DIR={}", run.display()));
    if let Ok(l) = std::env::var("KILN_LOG") {
        c.arg(format!("KILN_LOG={l}"));
    }
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    c.arg("rootlesskit")
        .arg("--state-dir")
        .arg(dir.join("rootlesskit"))
        .arg(format!("--net={net}"))
        .arg("--copy-up=/etc")
        .arg(bin.join("kilnd"))
        .arg("--rootless")
        .args(args);
    Ok(c)
}

/// Where the worker runs exec steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// runc run directly (the default)
    Runc,
    /// containerd tasks through the containerd at `address` (`[worker.containerd]`)
    Containerd { address: String },
}

impl Backend {
    /// The containerd backend on `KILN_TEST_CONTAINERD` (scripts/test.sh starts one).
    /// `None` (skip) only when run by hand without `KILN_TEST_REGISTRY` either; under
    /// `make test` a missing containerd is a failure, never a skip.
    pub fn containerd() -> Option<Backend> {
        match std::env::var("KILN_TEST_CONTAINERD") {
            Ok(address) if !address.is_empty() => Some(Backend::Containerd { address }),
            _ if std::env::var_os("KILN_TEST_REGISTRY").is_some() => {
                panic!("KILN_TEST_CONTAINERD is not set (scripts/test.sh starts containerd)")
            }
            _ => {
                eprintln!(
                    "skipped: KILN_TEST_CONTAINERD not set (sh scripts/containerd.sh start DIR)"
                );
                None
            }
        }
    }

    /// The kilnd.toml section selecting this backend, with its own containerd namespace.
    fn config(&self, namespace: &str) -> String {
        match self {
            Backend::Runc => String::new(),
            Backend::Containerd { address } => format!(
                "[worker.containerd]\nenabled = true\naddress = \"{address}\"\nnamespace = \"{namespace}\"\n"
            ),
        }
    }
}

/// Running daemon process(es) with their own state dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub addr: String,
    /// The containerd namespace of this daemon's containers (containerd backend only).
    pub containerd_namespace: Option<String>,
    children: Vec<Child>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // unmount anything a killed worker left mounted under the state dir
        unmount_under(self.dir.path());
    }
}

fn wait_for_socket(path: &Path, child: &mut Child, log: &Path) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if path.exists() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "kilnd exited with {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "kilnd did not listen on {} in time: {}",
        path.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// kilnd.toml lines that make the test registry docker.io's mirror, over plain HTTP.
pub fn registry_mirror_toml() -> String {
    let reg = registry();
    format!("[registry.\"docker.io\"]\nmirrors = [\"{reg}\"]\n[registry.\"{reg}\"]\nhttp = true\n")
}

/// Starts an all-in-one kilnd with `config` and its state under `root`, listening on the
/// unix socket `sock` (a stale one is removed first), its stderr in `log`; returns once it
/// listens.
pub fn spawn_kilnd(config: &Path, root: &Path, sock: &Path, log: &Path) -> Result<Child> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(bin_dir().join("kilnd"))
        .arg("--config")
        .arg(config)
        .arg("--root")
        .arg(root)
        .arg("--addr")
        .arg(format!("unix://{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("start kilnd")?;
    if let Err(e) = wait_for_socket(sock, &mut child, log) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// One all-in-one kilnd on a state dir that outlives it, so a test can stop it (SIGTERM
/// or SIGKILL) and start another on the same root, which [`Daemon`] cannot. Killed, and
/// whatever it left mounted detached, on drop.
pub struct Restartable {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Daemons started so far; the n-th logs to `kilnd-n.log`.
    starts: usize,
}

impl Restartable {
    /// A kilnd with the test registry as docker.io's mirror.
    pub fn start() -> Restartable {
        let dir = tempfile::Builder::new()
            .prefix("kiln-restart-it-")
            .tempdir()
            .expect("tmp");
        std::fs::write(dir.path().join("kilnd.toml"), registry_mirror_toml()).expect("config");
        let mut k = Restartable {
            dir,
            child: None,
            starts: 0,
        };
        k.spawn();
        k
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("kilnd.sock")
    }

    pub fn addr(&self) -> String {
        format!("unix://{}", self.sock().display())
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Starts a daemon on the state dir (after [`Restartable::stop`]).
    pub fn spawn(&mut self) {
        self.starts += 1;
        let log = self.dir.path().join(format!("kilnd-{}.log", self.starts));
        let config = self.dir.path().join("kilnd.toml");
        let child = spawn_kilnd(&config, &self.root(), &self.sock(), &log).expect("start kilnd");
        self.child = Some(child);
    }

    /// Stops the daemon: SIGTERM (up to 10 s) when `graceful`, then SIGKILL.
    pub fn stop(&mut self, graceful: bool) {
        if let Some(mut c) = self.child.take() {
            if graceful {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .status();
                let start = Instant::now();
                while c.try_wait().ok().flatten().is_none()
                    && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends the daemon `signal` ("TERM", "INT", …).
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Whether the daemon has exited, waiting up to `within` for it.
    pub fn exited(&mut self, within: Duration) -> bool {
        let Some(c) = &mut self.child else {
            return true;
        };
        let start = Instant::now();
        loop {
            if c.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            if start.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon (see [`Restartable::stop`]) and starts another on the same root.
    pub fn restart(&mut self, graceful: bool) {
        self.stop(graceful);
        self.spawn();
    }

    /// `kiln ARGS` against this daemon, in `cwd`.
    pub fn kiln(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("kiln"));
        c.arg("--addr").arg(self.addr()).args(args).current_dir(cwd);
        c
    }

    /// `kiln build --progress plain` of the Dockerfile in `ctx`; returns stderr.
    pub fn build(&self, ctx: &Path, extra: &[&str]) -> String {
        let mut args = vec!["build", "--progress", "plain"];
        args.extend(dockerfile_args());
        args.extend_from_slice(extra);
        let out = self.kiln(ctx, &args).output().expect("run kiln");
        self.check(out, "kiln build")
    }

    /// Stderr of `out`, which must have succeeded (else the daemons' logs are shown).
    pub fn check(&self, out: Output, what: &str) -> String {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "{what} failed:\n{err}\n{}\n--- daemon logs ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            self.logs()
        );
        err
    }

    /// The logs of every daemon started so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("kilnd-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n== restart ==\n")
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.stop(false);
        unmount_under(self.dir.path());
    }
}

impl Daemon {
    pub fn start(topology: Topology) -> Result<Daemon> {
        Daemon::start_with_config(topology, "")
    }

    /// Like `start`, with `extra` TOML keys placed at the top of kilnd.toml
    /// (e.g. `insecure-entitlements = ["network.host"]`).
    pub fn start_with_config(topology: Topology, extra: &str) -> Result<Daemon> {
        Daemon::start_on(topology, &Backend::Runc, extra)
    }

    /// Like `start_with_config`, with exec steps running on `backend`.
    pub fn start_on(topology: Topology, backend: &Backend, extra: &str) -> Result<Daemon> {
        Daemon::start_with_env(topology, backend, extra, &[])
    }

    /// Like `start_on`, every process given the environment variables `env`.
    pub fn start_with_env(
        topology: Topology,
        backend: &Backend,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("kiln-it-").tempdir()?;
        let config = dir.path().join("kilnd.toml");
        let namespace = dir
            .path()
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            })
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "{extra}\n{}{}",
                registry_mirror_toml(),
                backend.config(&namespace)
            ),
        )?;
        let kilnd = bin_dir().join("kilnd");
        let sock = |n: &str| dir.path().join(format!("{n}.sock"));
        let mut children = Vec::new();
        let spawn = |args: &[String], log_name: &str| -> Result<(Child, PathBuf)> {
            let log = dir.path().join(log_name);
            let child = Command::new(&kilnd)
                .args(args)
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("start {}", kilnd.display()))?;
            Ok((child, log))
        };
        let root = dir.path().join("root");
        let common = |addr: &Path, role: Option<&str>, extra: &[String]| -> Vec<String> {
            let mut v = vec![
                "--config".to_string(),
                config.display().to_string(),
                "--root".into(),
                root.join(role.unwrap_or("all")).display().to_string(),
                "--addr".into(),
                format!("unix://{}", addr.display()),
            ];
            if let Some(r) = role {
                v.push("--role".into());
                v.push(r.into());
            }
            v.extend_from_slice(extra);
            v
        };
        match topology {
            Topology::AllInOne => {
                let s = sock("kilnd");
                let (mut c, log) = spawn(&common(&s, None, &[]), "kilnd.log")?;
                wait_for_socket(&s, &mut c, &log)?;
                children.push(c);
            }
            Topology::Rootless => {
                if !matches!(backend, Backend::Runc) {
                    bail!("a rootless daemon runs steps with runc");
                }
                let user = rootless_user()?;
                let s = sock("kilnd");
                let log = dir.path().join("kilnd.log");
                let mut c = rootless_kilnd(user, dir.path(), &common(&s, None, &[]), env)?
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("start rootlesskit kilnd")?;
                wait_for_socket(&s, &mut c, &log)?;
                children.push(c);
            }
            Topology::Split => {
                // the other roles reach the solver on its internal listener
                let solver = format!("unix://{}", sock("solver-internal").display());
                let peer = |flag: &str, name: &str| {
                    [
                        format!("--{flag}"),
                        format!("unix://{}", sock(name).display()),
                    ]
                };
                for role in ["worker-executor", "frontend-gateway", "registry-exporter"] {
                    let s = sock(role);
                    let (mut c, log) = spawn(
                        &common(&s, Some(role), &["--solver-addr".into(), solver.clone()]),
                        &format!("{role}.log"),
                    )?;
                    wait_for_socket(&s, &mut c, &log)?;
                    children.push(c);
                }
                let mut extra = Vec::new();
                extra.extend(peer("worker-addr", "worker-executor"));
                extra.extend(peer("frontend-addr", "frontend-gateway"));
                extra.extend(peer("exporter-addr", "registry-exporter"));
                extra.extend(peer("internal-addr", "solver-internal"));
                let s = sock("solver");
                let (mut c, log) = spawn(
                    &common(&s, Some("solver-scheduler"), &extra),
                    "solver-scheduler.log",
                )?;
                wait_for_socket(&s, &mut c, &log)?;
                children.push(c);
            }
        }
        let addr = match topology {
            Topology::AllInOne | Topology::Rootless => {
                format!("unix://{}", sock("kilnd").display())
            }
            Topology::Split => format!("unix://{}", sock("solver").display()),
        };
        Ok(Daemon {
            dir,
            addr,
            containerd_namespace: matches!(backend, Backend::Containerd { .. })
                .then_some(namespace),
            children,
        })
    }

    /// One all-in-one `kilnd` whose client listener is `addr` (e.g.
    /// `tcp://127.0.0.1:PORT`), started with the extra flags `args` (e.g.
    /// `--tlscert`); ready once it logs that it listens.
    pub fn start_listening(addr: &str, args: &[&str]) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("kiln-it-").tempdir()?;
        let config = dir.path().join("kilnd.toml");
        std::fs::write(&config, registry_mirror_toml())?;
        let log = dir.path().join("kilnd.log");
        let mut child = Command::new(bin_dir().join("kilnd"))
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--addr", addr])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start kilnd")?;
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!("kilnd exited with {st}: {text}");
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                bail!("kilnd did not listen on {addr} in time: {text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // the log line comes just before the listeners bind
        std::thread::sleep(Duration::from_millis(200));
        Ok(Daemon {
            dir,
            addr: addr.to_string(),
            containerd_namespace: None,
            children: vec![child],
        })
    }

    /// Runs `kiln ARGS` against this daemon in `cwd`.
    pub fn kiln(&self, cwd: &Path, args: &[&str]) -> Result<Output> {
        let out = Command::new(bin_dir().join("kiln"))
            .arg("--addr")
            .arg(&self.addr)
            .args(args)
            .current_dir(cwd)
            .output()
            .context("run kiln")?;
        Ok(out)
    }

    /// Packages the frontend binary `bin` (in [`bin_dir`]) as a frontend image
    /// with `scripts/frontend-image.sh`, built by this daemon and pushed to the
    /// test registry as `kiln/NAME:test`; returns its reference.
    pub fn frontend_image(&self, bin: &str, name: &str) -> Result<String> {
        let reference = format!("{}/kiln/{name}:test", registry());
        let bin = bin_dir().join(bin).display().to_string();
        self.script("frontend-image.sh", &[&bin, &reference])?;
        Ok(reference)
    }

    /// Runs `scripts/SCRIPT ARGS` with this daemon as its kilnd (`KILN`,
    /// `KILN_ARGS`, `KILN_BIN_DIR` set); an error with its stderr and the
    /// daemon's logs when it fails.
    pub fn script(&self, script: &str, args: &[&str]) -> Result<()> {
        let out = Command::new("sh")
            .arg(repo_root().join("scripts").join(script))
            .args(args)
            .env("KILN", bin_dir().join("kiln"))
            .env("KILN_BIN_DIR", bin_dir())
            .env("KILN_ARGS", format!("--addr {}", self.addr))
            .output()
            .with_context(|| format!("run scripts/{script}"))?;
        if !out.status.success() {
            bail!(
                "scripts/{script} {}: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        Ok(())
    }

    /// Runs `kiln build` and fails with its output unless it succeeded.
    pub fn build(&self, cwd: &Path, args: &[&str]) -> Result<Output> {
        let mut full = vec!["build", "--progress", "plain"];
        full.extend_from_slice(args);
        let out = self.kiln(cwd, &full)?;
        if !out.status.success() {
            bail!(
                "kiln build failed ({}):\n{}\n--- daemon logs ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        Ok(out)
    }

    /// The largest resident set size any of the daemon's processes has had, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .filter_map(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .max()
            .unwrap_or(0)
    }

    /// Everything the daemon processes logged.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    s.push_str(&format!(
                        "== {} ==\n{}\n",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    ));
                }
            }
        }
        s
    }
}

/// A build context in a temp dir.
pub struct BuildContext {
    pub dir: tempfile::TempDir,
}

impl BuildContext {
    pub fn new(dockerfile: &str) -> Result<BuildContext> {
        let dir = tempfile::Builder::new().prefix("kiln-ctx-").tempdir()?;
        std::fs::write(dir.path().join("Dockerfile"), dockerfile)?;
        Ok(BuildContext { dir })
    }

    pub fn file(&self, rel: &str, content: &str) -> Result<&Self> {
        let p = self.dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, content)?;
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The standard dockerfile.v0 flags for a context dir.
pub fn dockerfile_args() -> Vec<&'static str> {
    vec![
        "--frontend",
        "dockerfile.v0",
        "--local",
        "context=.",
        "--local",
        "dockerfile=.",
    ]
}

/// Reads one file out of a tar archive.
pub fn tar_entry(archive: &Path, name: &str) -> Result<Vec<u8>> {
    let mut found = None;
    read_tar(archive, |p, _| p == name, |_, data| found = Some(data))?;
    found.with_context(|| format!("{name} not in {}", archive.display()))
}

/// Reads the entries of a tar archive whose (`./`-less) path and size `want`
/// accepts, handing each to `got` with its contents.
fn read_tar(
    archive: &Path,
    want: impl Fn(&str, i64) -> bool,
    mut got: impl FnMut(String, Vec<u8>),
) -> Result<()> {
    use std::io::Read;
    let mut a = tar::Archive::new(std::fs::File::open(archive)?);
    for e in a.entries()? {
        let mut e = e?;
        let p = e
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if want(&p, e.size() as i64) {
            let mut v = Vec::new();
            e.read_to_end(&mut v)?;
            got(p, v);
        }
    }
    Ok(())
}

/// The (first) image of an OCI layout tarball: its manifest and config.
pub struct OciImage {
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
}

/// Reads the image of an OCI layout tarball: index.json, nested indexes
/// followed through their first entry, down to a manifest and its config.
pub fn oci_image(tar_path: &Path) -> Result<OciImage> {
    let mut files = std::collections::BTreeMap::new();
    // layers are not read: only the JSON documents are wanted
    read_tar(
        tar_path,
        |p, size| p == "index.json" || size < 1 << 20,
        |p, data| {
            files.insert(p, data);
        },
    )?;
    let json = |p: &str| -> Result<serde_json::Value> {
        let data = files
            .get(p)
            .with_context(|| format!("{p} not in the oci tarball"))?;
        serde_json::from_slice(data).with_context(|| format!("{p} is not JSON"))
    };
    let blob = |d: &serde_json::Value| -> Result<serde_json::Value> {
        let digest = d["digest"].as_str().context("descriptor without digest")?;
        json(&format!("blobs/{}", digest.replacen(':', "/", 1)))
    };
    let mut doc = json("index.json")?;
    while let Some(first) = doc.pointer("/manifests/0").cloned() {
        doc = blob(&first)?;
    }
    let config = blob(&doc["config"])?;
    Ok(OciImage {
        manifest: doc,
        config,
    })
}

/// Names of all entries in a tar archive.
pub fn tar_names(archive: &Path) -> Result<Vec<String>> {
    let mut a = tar::Archive::new(std::fs::File::open(archive)?);
    let mut v = Vec::new();
    for e in a.entries()? {
        let e = e?;
        v.push(
            e.path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string(),
        );
    }
    Ok(v)
}

/// Mount points under `dir` in this mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Runs a command and returns stdout, failing with stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Detaches whatever is mounted under `dir`, deepest first: what a killed
/// kilnd left behind.
pub fn unmount_under(dir: &Path) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
            dir.display()
        ))
        .status();
}

/// `kiln --addr ADDR build --progress plain EXTRA` in `cwd` with a marshaled LLB
/// definition on stdin (as `buildctl build` reads one); its output.
pub fn kiln_build_llb(addr: &str, cwd: &Path, definition: Vec<u8>, extra: &[&str]) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("kiln"))
        .args(["--addr", addr, "build", "--progress", "plain"])
        .args(extra)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&definition));
    let out = child.wait_with_output().expect("kiln");
    writer.join().expect("writer").expect("write definition");
    out
}

/// [`kiln_build_llb`] of `definition` exported to the local directory `dest`.
pub fn kiln_build_llb_to(addr: &str, definition: Vec<u8>, dest: &Path) -> Output {
    let output = format!("type=local,dest={}", dest.display());
    kiln_build_llb(
        addr,
        &std::env::temp_dir(),
        definition,
        &["--output", &output],
    )
}

/// The `#N` number, in plain progress, of the step whose name contains `needle`.
pub fn step_number(progress: &str, needle: &str) -> Option<String> {
    progress.lines().find_map(|l| {
        let rest = l.strip_prefix('#')?;
        let (n, text) = rest.split_once(' ')?;
        (text.starts_with('[') && text.contains(needle)).then(|| n.to_string())
    })
}

/// Whether the step whose name contains `needle` was CACHED in plain progress.
pub fn is_cached(progress: &str, needle: &str) -> bool {
    step_number(progress, needle)
        .is_some_and(|n| progress.lines().any(|l| l == format!("#{n} CACHED")))
}

/// `12.3MB` → bytes (decimal units, as `kiln du` and the progress output print them).
pub fn parse_size(s: &str) -> f64 {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let mult = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other:?} in {s:?}"),
    };
    n.parse::<f64>().expect("number") * mult
}

/// One snapshot as `ctr snapshots ls` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrSnapshot {
    /// the parent's name, empty for none
    pub parent: String,
    /// `Committed` or `Active`
    pub kind: String,
}

/// The snapshots in containerd namespace `namespace`, by name (`ctr snapshots ls`).
pub fn containerd_snapshots(
    address: &str,
    namespace: &str,
) -> std::collections::BTreeMap<String, CtrSnapshot> {
    run(Command::new("ctr").args(["-a", address, "-n", namespace, "snapshots", "ls"]))
        .expect("ctr")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (name, kind) = (f.first()?, f.last()?);
            let parent = if f.len() == 3 { f[1] } else { "" };
            Some((
                name.to_string(),
                CtrSnapshot {
                    parent: parent.to_string(),
                    kind: kind.to_string(),
                },
            ))
        })
        .collect()
}

/// Pushes an image to the test registry as `REGISTRY/NAME:1`, through an OCI layout
/// and skopeo: `layers` are (media type, blob), `diff_ids` what its config claims
/// (crafted images: they need not match the layers). Returns the reference.
pub fn push_oci_image(name: &str, layers: &[(&str, Vec<u8>)], diff_ids: &[String]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let blob = |data: &[u8]| -> (String, usize) {
        let digest = kiln_llb::digest(data);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(layout.join("blobs/sha256").join(hex), data).expect("blob");
        (digest, data.len())
    };
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|(media_type, data)| {
            let (digest, size) = blob(data);
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
        })
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = blob(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": md, "size": ms,
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
    let reference = format!("{}/{name}:1", registry());
    let out = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "push the crafted image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

/// A test's own `ssh-agent` (no keys yet) listening at `sock`; killed on drop.
pub struct SshAgent {
    child: Child,
    pub sock: PathBuf,
}

impl SshAgent {
    /// Starts one with its socket in `dir`; returns once the socket is there.
    pub fn start(dir: &Path) -> Result<SshAgent> {
        let sock = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start ssh-agent")?;
        let agent = SshAgent { child, sock };
        let start = Instant::now();
        while !agent.sock.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("ssh-agent did not make {}", agent.sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
