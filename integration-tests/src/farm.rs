//! A farm of real processes on one host: a solver-scheduler (with its
//! internal listener on loopback TCP), a frontend-gateway, a
//! registry-exporter and N worker-executors that join the scheduler, each
//! worker with its own root, TCP address and labels. Faults are signals:
//! SIGKILL is a crashed host, SIGSTOP a partition (nothing sent or answered
//! until SIGCONT), SIGTERM the drain a preStop hook starts.

use crate::{bin_dir, registry_mirror_toml, run, unmount_under, wait_for_socket};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `n` independent stages, each `sleep SECS` and writing `/outN`, and a final
/// stage copying every `/outN` into `/out/`: a build a farm spreads.
pub fn stages_dockerfile(n: usize, secs: u32) -> String {
    let mut d = String::new();
    for i in 0..n {
        d.push_str(&format!(
            "FROM busybox AS s{i}\nRUN sleep {secs} && echo stage{i} > /out{i}\n"
        ));
    }
    d.push_str("FROM busybox\n");
    for i in 0..n {
        d.push_str(&format!("COPY --from=s{i} /out{i} /out/\n"));
    }
    d
}

/// A free TCP port on loopback (bound, then released for the daemon to take).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A farm a test drives, whatever it runs on (processes on one host, or
/// containers on a private network): its client address, its workers, and
/// the faults a test does to them.
pub trait Farm {
    /// The scheduler's client address (`kiln --addr`).
    fn addr(&self) -> &str;
    fn worker_count(&self) -> usize;
    /// Worker `i`'s id, as the farm lists it.
    fn worker_id(&self, i: usize) -> String;
    /// Every service's and worker's log (the end of it).
    fn logs(&self) -> String;
    /// A crashed host.
    fn kill_worker(&mut self, i: usize);
    /// Starts worker `i` again on its root, after it was killed or left.
    fn start_worker(&mut self, i: usize) -> Result<()>;
    /// A partition: the worker neither sends nor answers until [`Farm::heal_worker`].
    fn cut_worker(&mut self, i: usize);
    fn heal_worker(&mut self, i: usize);
    /// The preStop path: SIGTERM, the worker drains and exits.
    fn drain_worker(&mut self, i: usize);
    /// Waits for worker `i` to end; whether it exited successfully.
    fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> Result<bool>;

    /// `kiln debug workers`, one line per worker: (id, rest of the line).
    fn listed_workers(&self) -> Result<Vec<String>> {
        let out = run(Command::new(bin_dir().join("kiln")).args([
            "--addr",
            self.addr(),
            "debug",
            "workers",
        ]))?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// Steps the farm has placed on worker `i` now (its `kiln.worker.running`
    /// label in `kiln debug workers -v`).
    fn running_on(&self, i: usize) -> u32 {
        let id = self.worker_id(i);
        let out = run(Command::new(bin_dir().join("kiln")).args([
            "--addr",
            self.addr(),
            "debug",
            "workers",
            "-v",
            "--filter",
            &format!("id=={id}"),
        ]))
        .unwrap_or_default();
        out.lines()
            .find_map(|l| l.trim().strip_prefix("kiln.worker.running:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    }

    /// Waits until every worker has a step placed on it at once: a build's
    /// wide part runs (its first steps, loading the Dockerfile and pulling
    /// the base, run on one worker).
    fn wait_all_running(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if (0..self.worker_count()).all(|i| self.running_on(i) > 0) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the workers never all ran steps at once within {timeout:?}\n{}",
            self.logs()
        )
    }

    /// Waits until `n` workers are listed.
    fn wait_workers(&self, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let listed = self.listed_workers().unwrap_or_default();
            if listed.len() == n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} workers listed after {timeout:?}, not {n}: {listed:?}\n{}",
                    listed.len(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kiln --addr <scheduler> ARGS` in `cwd`.
    fn kiln(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("kiln"));
        c.args(["--addr", self.addr()]).args(args).current_dir(cwd);
        c
    }

    /// `kiln build --progress plain ARGS .` in `cwd`, started (not waited for).
    fn spawn_build(&self, cwd: &Path, args: &[&str]) -> Result<Child> {
        let mut c = self.kiln(cwd, &["build", "--progress", "plain"]);
        c.args(args)
            .arg(".")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(c.spawn()?)
    }

    /// `kiln build --progress plain` of a marshaled LLB definition on stdin
    /// (as buildctl takes one) in `cwd`; its progress once it succeeded.
    fn build_definition(&self, cwd: &Path, definition: &[u8]) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .kiln(cwd, &["build", "--progress", "plain"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(definition)?;
        finished(child, self)
    }
}

pub struct FarmWorker {
    child: Option<Child>,
    pub addr: String,
    pub root: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// run by the rootless test user under rootlesskit (`--rootless` among its flags)
    rootless: bool,
}

impl FarmWorker {
    /// The worker's id (kept in its root once it started).
    pub fn id(&self) -> String {
        std::fs::read_to_string(self.root.join("worker/worker-id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

pub struct ProcessFarm {
    pub dir: tempfile::TempDir,
    /// the client listener of the scheduler
    pub addr: String,
    /// where workers join
    pub internal: String,
    /// the scheduler's debug listener (metrics, the farm dashboard), host:port
    pub debug: String,
    config: PathBuf,
    services: Vec<Child>,
    /// how the scheduler was started (the last of `services`)
    scheduler_args: Vec<String>,
    pub workers: Vec<FarmWorker>,
}

impl ProcessFarm {
    /// A scheduler, frontend and exporter, and one worker per entry of
    /// `workers` (its extra flags, e.g. `--oci-worker-labels zone=a`), each
    /// with 2 step slots; returns once every worker has joined.
    pub fn start(workers: &[&[&str]], extra_config: &str) -> Result<ProcessFarm> {
        let dir = tempfile::Builder::new().prefix("kiln-farm-").tempdir()?;
        let config = dir.path().join("kilnd.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n[farm]\nkeepalive-timeout = \"3s\"\n{extra_config}\n",
                registry_mirror_toml()
            ),
        )?;
        let internal = format!("tcp://127.0.0.1:{}", free_port()?);
        let debug = format!("127.0.0.1:{}", free_port()?);
        let mut farm = ProcessFarm {
            addr: format!("unix://{}", dir.path().join("scheduler.sock").display()),
            internal: internal.clone(),
            debug: debug.clone(),
            config,
            services: vec![],
            scheduler_args: vec![],
            workers: vec![],
            dir,
        };
        for role in ["frontend-gateway", "registry-exporter"] {
            let sock = farm.dir.path().join(format!("{role}.sock"));
            let args = farm.common(
                role,
                &format!("unix://{}", sock.display()),
                &["--solver-addr", &internal],
            );
            farm.spawn_service(role, &args, &sock)?;
        }
        let peer = |r: &str| {
            format!(
                "unix://{}",
                farm.dir.path().join(format!("{r}.sock")).display()
            )
        };
        let sock = farm.dir.path().join("scheduler.sock");
        let args = farm.common(
            "solver-scheduler",
            &format!("unix://{}", sock.display()),
            &[
                "--internal-addr",
                &internal,
                "--frontend-addr",
                &peer("frontend-gateway"),
                "--exporter-addr",
                &peer("registry-exporter"),
                "--debugaddr",
                &debug,
            ],
        );
        farm.spawn_service("solver-scheduler", &args, &sock)?;
        farm.scheduler_args = args;
        for (i, extra) in workers.iter().enumerate() {
            let addr = format!("tcp://127.0.0.1:{}", free_port()?);
            // `--rootless` in a worker's flags: kilnd --rootless as the rootless test
            // user under rootlesskit, in a dir of its own with its own copy of the config
            let rootless = extra.contains(&"--rootless");
            let (root, config) = if rootless {
                use std::os::unix::fs::PermissionsExt;
                let home = farm.dir.path().join(format!("w{i}-rootless"));
                std::fs::create_dir_all(&home)?;
                let config = home.join("kilnd.toml");
                std::fs::copy(&farm.config, &config)?;
                // the user passes through the farm's dir to its own
                std::fs::set_permissions(farm.dir.path(), std::fs::Permissions::from_mode(0o711))?;
                (home.join("root"), config)
            } else {
                (farm.dir.path().join(format!("w{i}")), farm.config.clone())
            };
            let mut args = vec![
                "--config".to_string(),
                config.display().to_string(),
                "--root".into(),
                root.display().to_string(),
                "--addr".into(),
                addr.clone(),
                "--role".into(),
                "worker-executor".into(),
                "--join".into(),
                internal.clone(),
                "--capacity".into(),
                "2".into(),
                // one host, many workers: steps share its network
                "--network-mode".into(),
                "host".into(),
            ];
            args.extend(
                extra
                    .iter()
                    .filter(|a| **a != "--rootless")
                    .map(|s| s.to_string()),
            );
            farm.workers.push(FarmWorker {
                child: None,
                addr,
                log: farm.dir.path().join(format!("w{i}.log")),
                root,
                args,
                rootless,
            });
            farm.start_worker(i)?;
        }
        farm.wait_workers(workers.len(), Duration::from_secs(30))?;
        Ok(farm)
    }

    fn common(&self, role: &str, addr: &str, extra: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--config".to_string(),
            self.config.display().to_string(),
            "--root".into(),
            self.dir.path().join(role).display().to_string(),
            "--addr".into(),
            addr.to_string(),
            "--role".into(),
            role.to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn spawn_service(&mut self, role: &str, args: &[String], sock: &Path) -> Result<()> {
        let log = self.dir.path().join(format!("{role}.log"));
        let mut child = Command::new(bin_dir().join("kilnd"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start kilnd")?;
        wait_for_socket(sock, &mut child, &log)?;
        self.services.push(child);
        Ok(())
    }

    /// Kills the scheduler (SIGKILL) and starts it again on the same root and
    /// addresses; returns once it listens (its workers join again by themselves).
    pub fn restart_scheduler(&mut self) -> Result<()> {
        if let Some(mut c) = self.services.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_scheduler()
    }

    /// Sends the scheduler SIGTERM and waits up to `timeout` for it to exit;
    /// whether it exited successfully (start it again with [`Self::start_scheduler`]).
    pub fn terminate_scheduler(&mut self, timeout: Duration) -> Result<bool> {
        let Some(mut c) = self.services.pop() else {
            bail!("no scheduler running");
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(st) = c.try_wait()? {
                return Ok(st.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!(
            "the scheduler did not exit within {timeout:?} of SIGTERM\n{}",
            self.logs()
        )
    }

    /// Starts the scheduler on its root and addresses; returns once it listens.
    pub fn start_scheduler(&mut self) -> Result<()> {
        let sock = self.dir.path().join("scheduler.sock");
        let _ = std::fs::remove_file(&sock);
        let args = self.scheduler_args.clone();
        self.spawn_service("solver-scheduler", &args, &sock)
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.workers[i].pid() {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), pid.to_string()])
                .status();
        }
    }
}

/// Faults are signals: SIGKILL a crash, SIGSTOP/SIGCONT a partition and its
/// end, SIGTERM a drain.
impl Farm for ProcessFarm {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn worker_count(&self) -> usize {
        self.workers.len()
    }

    fn worker_id(&self, i: usize) -> String {
        self.workers[i].id()
    }

    fn start_worker(&mut self, i: usize) -> Result<()> {
        let w = &mut self.workers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&w.log)?;
        let mut cmd = if w.rootless {
            let home = w.root.parent().context("rootless worker dir")?;
            crate::rootless_kilnd(crate::rootless_user()?, home, &w.args, &[])?
        } else {
            let mut c = Command::new(bin_dir().join("kilnd"));
            c.args(&w.args);
            c
        };
        w.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start worker")?,
        );
        Ok(())
    }

    fn kill_worker(&mut self, i: usize) {
        self.signal(i, "CONT");
        if let Some(mut c) = self.workers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cut_worker(&mut self, i: usize) {
        self.signal(i, "STOP");
    }

    fn heal_worker(&mut self, i: usize) {
        self.signal(i, "CONT");
    }

    fn drain_worker(&mut self, i: usize) {
        self.signal(i, "TERM");
    }

    fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        let Some(c) = self.workers[i].child.as_mut() else {
            bail!("worker {i} is not running");
        };
        while start.elapsed() < timeout {
            if let Some(st) = c.try_wait()? {
                self.workers[i].child = None;
                return Ok(st.success());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("worker {i} did not exit within {timeout:?}")
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut logs: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            logs.sort();
            for p in logs {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                out.push_str(&format!("== {}\n{}", p.display(), tail(&text, 40)));
            }
        }
        out
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    let mut out = String::new();
    for l in lines.into_iter().rev() {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Adds busybox (`docker-image://`) to an LLB definition being built.
pub fn busybox(b: &mut kiln_llb::DefinitionBuilder) -> kiln_proto::pb::Input {
    use kiln_proto::pb;
    b.add(
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "docker-image://docker.io/library/busybox:latest".into(),
                attrs: Default::default(),
            })),
            ..Default::default()
        },
        pb::OpMetadata::default(),
    )
}

/// Adds `sh -c CMD` over `root`, for workers labelled `zone=ZONE` only (LLB
/// worker constraints), with `mounts` of further `inputs` (input 1 on).
pub fn constrained_exec(
    b: &mut kiln_llb::DefinitionBuilder,
    root: kiln_proto::pb::Input,
    zone: &str,
    cmd: &str,
    mounts: Vec<kiln_proto::pb::Mount>,
    inputs: Vec<kiln_proto::pb::Input>,
) -> kiln_proto::pb::Input {
    use kiln_proto::pb;
    let mut run = kiln_llb::exec_op(
        root,
        pb::Meta {
            args: vec!["sh".into(), "-c".into(), cmd.into()],
            cwd: "/".into(),
            env: vec!["PATH=/bin:/usr/bin".into()],
            ..Default::default()
        },
    );
    run.inputs.extend(inputs);
    if let Some(pb::op::Op::Exec(e)) = &mut run.op {
        e.mounts.extend(mounts);
    }
    run.constraints = Some(pb::WorkerConstraints {
        filter: vec![format!("labels.zone=={zone}")],
    });
    b.add(run, pb::OpMetadata::default())
}

/// The worker ids a build's plain progress says its steps were placed on,
/// by vertex name: (step name, worker id).
pub fn placements(progress: &str) -> Vec<(String, String)> {
    let mut names = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in progress.lines() {
        let Some((num, rest)) = line.split_once(' ') else {
            continue;
        };
        if let Some(w) = rest.strip_prefix("placed on worker ") {
            let w = w.split_whitespace().next().unwrap_or_default().to_string();
            let name = names.get(num).cloned().unwrap_or_default();
            out.push((name, w));
        } else if num.starts_with('#') && !names.contains_key(num) {
            // a vertex's first line is its name
            names.insert(num.to_string(), rest.to_string());
        }
    }
    out
}

/// The sum of the bytes a build's progress says were moved between workers.
pub fn bytes_moved(progress: &str) -> u64 {
    progress
        .lines()
        .filter_map(|l| {
            let i = l.find(" bytes moved")?;
            l[..i].rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

impl Drop for ProcessFarm {
    fn drop(&mut self) {
        for i in 0..self.workers.len() {
            self.kill_worker(i);
        }
        for c in &mut self.services {
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount_under(self.dir.path());
    }
}

/// Output of a finished build child, checked for success.
pub fn finished(child: Child, farm: &(impl Farm + ?Sized)) -> Result<String> {
    let out: Output = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("build failed:\n{text}\n{}", farm.logs());
    }
    Ok(text)
}
