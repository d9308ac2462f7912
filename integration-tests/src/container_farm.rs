//! The farm as a real multi-host system: the scheduler, frontend, exporter and
//! N workers each run as a container of kiln's own image on a private Docker
//! network (`--internal`: nothing leaves it), with its own address, and each
//! worker with a volume for its root. A registry container on the same
//! network, seeded with busybox, is the farm's `docker.io` mirror.
//!
//! The images are built by kiln itself, on an all-in-one kilnd on this host:
//! kiln's own kilnd image as `make images` makes it (`scripts/images.sh` from
//! `deploy/images/Dockerfile`, with the binaries under test: kilnd, runc,
//! the C library, CA roots and busybox, which the tests use to read a
//! worker's id), and a registry image (`scripts/binaries-image.sh`); each is
//! written by `kiln build --output type=docker` and `docker load`ed. They are
//! tagged by what they hold, so a second farm with the same binaries reuses
//! them.
//!
//! Faults are what a host and its network do: `docker kill` (a crash),
//! `docker network disconnect`/`connect` (a partition and its end, the
//! process running on), `docker stop` (SIGTERM: the drain a preStop hook
//! starts).
//!
//! Workers do not run `--privileged`: an engine whose own capability
//! bounding set is short (as in nested sandboxes) refuses it. They get every
//! capability the engine has, no seccomp or AppArmor profile, and their
//! cgroup hierarchies remounted writable, which is what runc inside needs.

use crate::farm::{Farm, tail};
use crate::{Daemon, Topology, bin_dir, repo_root, run};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Ports inside the containers (each has its own address).
const CLIENT_PORT: u16 = 7000;
const INTERNAL_PORT: u16 = 7100;
const SERVICE_PORT: u16 = 7200;
/// The registry image's port (`farm_images`).
pub const REGISTRY_PORT: u16 = 5000;

/// Whether the container farm tests can run: `KILN_TEST_DOCKER=1` (scripts/test.sh
/// sets it when a Docker engine answers). Without it they are skipped, saying so.
pub fn docker_available() -> bool {
    if std::env::var("KILN_TEST_DOCKER").is_ok_and(|v| v == "1") {
        return true;
    }
    eprintln!("skipped: KILN_TEST_DOCKER is not 1 (no Docker engine for the container farm)");
    false
}

/// `docker ARGS`, its stdout; an error with its stderr when it failed.
pub fn docker(args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(args)).with_context(|| format!("docker {}", args.join(" ")))
}

/// The capability names by number, as the kernel and Docker know them.
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities a `CapBnd:` mask (hex, from /proc/PID/status) lacks.
pub fn missing_caps(cap_bnd_hex: &str) -> Vec<&'static str> {
    let mask = u64::from_str_radix(cap_bnd_hex.trim(), 16).unwrap_or(u64::MAX);
    CAPS.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1u64 << i) == 0)
        .map(|(_, n)| *n)
        .collect()
}

/// `docker run` flags giving a worker what runc inside it needs: every
/// capability this host's bounding set has (the engine can give no more),
/// no seccomp/AppArmor profile, /proc and /sys unmasked.
pub fn worker_security_flags() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap_or("ffffffffffffffff");
    let mut flags: Vec<String> = [
        "--cap-add=ALL",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--security-opt=systempaths=unconfined",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(missing_caps(bnd).iter().map(|c| format!("--cap-drop={c}")));
    flags
}

/// A tag naming what the images hold: the programs' sizes and times.
fn content_tag(files: &[PathBuf]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        if let Ok(m) = std::fs::metadata(f) {
            m.len().hash(&mut h);
            if let Ok(t) = m.modified() {
                t.hash(&mut h);
            }
        }
    }
    format!("{:016x}", h.finish())
}

/// kiln's own kilnd image (`scripts/images.sh`, from the binaries under
/// test) and the registry image, built by kiln and loaded into the engine
/// unless it has them already: (kilnd image, registry image). Their tags
/// start with `test-`; older `test-` tags are removed, nothing else is.
pub fn farm_images() -> Result<(String, String)> {
    let programs = [
        bin_dir().join("kilnd"),
        bin_dir().join("kiln"),
        repo_root().join("deploy/images/Dockerfile"),
        repo_root().join("scripts/images.sh"),
        repo_root().join("deploy/images/kilnd-containerd"),
        repo_root().join("deploy/images/kilnd-rootless"),
        PathBuf::from("/usr/bin/containerd"),
        PathBuf::from("/usr/bin/rootlesskit"),
        PathBuf::from("/usr/bin/newuidmap"),
        PathBuf::from("/usr/sbin/runc"),
        PathBuf::from("/bin/busybox"),
        PathBuf::from("/usr/bin/docker-registry"),
        PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
    ];
    let tag = format!("test-{}", content_tag(&programs));
    let kilnd_image = format!("kiln/kilnd:{tag}");
    let registry_image = format!("kiln-test/registry:{tag}");
    if docker(&["image", "inspect", &kilnd_image]).is_ok()
        && docker(&["image", "inspect", &registry_image]).is_ok()
    {
        return Ok((kilnd_image, registry_image));
    }
    let daemon = Daemon::start(Topology::AllInOne)?;
    // kiln's own images, as `make images` makes them
    daemon.script("images.sh", &[&crate::registry(), &tag])?;
    // the registry the farm pulls from, as a container beside it
    let dir = tempfile::tempdir()?;
    let registry_config = dir.path().join("config.yml");
    std::fs::write(
        &registry_config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: /var/lib/registry\nhttp:\n  addr: 0.0.0.0:{REGISTRY_PORT}\n"
        ),
    )?;
    let tar = dir.path().join("image.tar");
    daemon.script(
        "binaries-image.sh",
        &[
            &format!("type=docker,name={registry_image},dest={}", tar.display()),
            "/usr/bin/docker-registry",
            "/usr/bin/docker-registry",
            &format!(
                "{}:/etc/docker/registry/config.yml",
                registry_config.display()
            ),
        ],
    )?;
    docker(&["load", "-i", &tar.display().to_string()])?;
    // images of older binaries go (one still used by a container stays)
    for repo in [
        "kiln/kilnd",
        "kiln/kilnd-containerd",
        "kiln/kilnd-rootless",
        "kiln/kiln",
        "kiln-test/registry",
    ] {
        for old in docker(&["images", repo, "--format", "{{.Repository}}:{{.Tag}}"])?.lines() {
            let old_tag = old.rsplit(':').next().unwrap_or_default();
            if old_tag.starts_with("test-") && old_tag != tag {
                let _ = docker(&["rmi", old]);
            }
        }
    }
    Ok((kilnd_image, registry_image))
}

pub struct ContainerFarm {
    /// every container's, volume's and the network's name starts with it
    prefix: String,
    network: String,
    /// `tcp://SCHEDULER_IP:PORT`
    addr: String,
    /// the worker containers' names and ids
    workers: Vec<(String, String)>,
    /// the kilnd.toml every service reads (bind-mounted)
    dir: tempfile::TempDir,
    /// kiln's client image (`kiln/kiln`, made beside kilnd's)
    kiln_image: String,
}

impl ContainerFarm {
    /// The registry, scheduler, frontend and exporter, and one worker per
    /// entry of `workers` (its extra kilnd flags), each with 2 step slots;
    /// returns once every worker has joined.
    pub fn start(workers: &[&[&str]]) -> Result<ContainerFarm> {
        let (image, registry_image) = farm_images()?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let prefix = format!(
            "kiln-farm-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new().prefix("kiln-cfarm-").tempdir()?;
        let mut farm = ContainerFarm {
            network: format!("{prefix}-net"),
            addr: String::new(),
            workers: vec![],
            prefix: prefix.clone(),
            dir,
            kiln_image: image.replacen("kiln/kilnd:", "kiln/kiln:", 1),
        };
        docker(&["network", "create", "--internal", &farm.network])?;
        let registry = farm.name("registry");
        farm.run(
            &registry,
            &[],
            &registry_image,
            &["serve", "/etc/docker/registry/config.yml"],
        )?;
        let registry_addr = format!("{}:{REGISTRY_PORT}", farm.ip(&registry)?);
        seed_busybox(&registry_addr)?;
        // every service reaches the registry by its name on the network
        let reg = format!("{registry}:{REGISTRY_PORT}");
        std::fs::write(
            farm.dir.path().join("kilnd.toml"),
            format!(
                "[registry.\"docker.io\"]\nmirrors = [\"{reg}\"]\n[registry.\"{reg}\"]\nhttp = true\n[farm]\nkeepalive-timeout = \"3s\"\n"
            ),
        )?;
        let internal = format!("tcp://{}:{INTERNAL_PORT}", farm.name("scheduler"));
        for role in ["frontend-gateway", "registry-exporter"] {
            let name = farm.name(role);
            farm.kilnd(&name, role, &[], &image, &["--solver-addr", &internal])?;
        }
        let scheduler = farm.name("scheduler");
        let (frontend, exporter) = (
            format!("tcp://{}:{SERVICE_PORT}", farm.name("frontend-gateway")),
            format!("tcp://{}:{SERVICE_PORT}", farm.name("registry-exporter")),
        );
        farm.kilnd(
            &scheduler,
            "solver-scheduler",
            &[],
            &image,
            &[
                "--addr",
                &format!("tcp://0.0.0.0:{CLIENT_PORT}"),
                "--internal-addr",
                &format!("tcp://0.0.0.0:{INTERNAL_PORT}"),
                "--frontend-addr",
                &frontend,
                "--exporter-addr",
                &exporter,
            ],
        )?;
        farm.addr = format!("tcp://{}:{CLIENT_PORT}", farm.ip(&scheduler)?);
        let security = worker_security_flags();
        for (i, extra) in workers.iter().enumerate() {
            let name = farm.name(&format!("w{i}"));
            let volume = format!("{name}-root");
            let mut flags = security.clone();
            flags.push(format!("--volume={volume}:/var/lib/kiln"));
            let mut args = vec![
                "--join".to_string(),
                internal.clone(),
                "--advertise-addr".into(),
                format!("tcp://{name}:{SERVICE_PORT}"),
                "--capacity".into(),
                "2".into(),
                // the step shares the worker container's network
                "--network-mode".into(),
                "host".into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            farm.kilnd(&name, "worker-executor", &flags, &image, &args)?;
            farm.workers.push((name, String::new()));
        }
        farm.wait_workers(workers.len(), Duration::from_secs(60))?;
        for i in 0..farm.workers.len() {
            let id = docker(&[
                "exec",
                &farm.workers[i].0,
                "/bin/busybox",
                "cat",
                "/var/lib/kiln/worker/worker-id",
            ])?;
            farm.workers[i].1 = id.trim().to_string();
        }
        Ok(farm)
    }

    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// The container's address on the farm's network.
    pub fn ip(&self, name: &str) -> Result<String> {
        let f = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip = docker(&["inspect", "-f", &f, name])?.trim().to_string();
        if ip.is_empty() {
            bail!("{name} has no address on {}", self.network);
        }
        Ok(ip)
    }

    /// `docker run -d` of `image` as `name` on the farm's network.
    fn run(&self, name: &str, flags: &[&str], image: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["run", "-d", "--name", name, "--network", &self.network];
        all.extend_from_slice(flags);
        all.push(image);
        all.extend_from_slice(args);
        docker(&all)?;
        Ok(())
    }

    /// A kilnd container in `role` with the farm's kilnd.toml; its root is
    /// /var/lib/kiln, its listener on [`SERVICE_PORT`] unless `args` say otherwise.
    fn kilnd(
        &self,
        name: &str,
        role: &str,
        flags: &[&str],
        image: &str,
        args: &[&str],
    ) -> Result<()> {
        let config = format!(
            "--volume={}:/etc/kiln/kilnd.toml:ro",
            self.dir.path().join("kilnd.toml").display()
        );
        let mut all_flags = vec![config.as_str()];
        all_flags.extend_from_slice(flags);
        let entry = "--entrypoint=/bin/busybox";
        all_flags.push(entry);
        // the cgroup hierarchies writable (runc makes each step's cgroups), then kilnd
        let script = "for m in /sys/fs/cgroup/*/; do /bin/busybox mount -o remount,bind,rw \"$m\" 2>/dev/null; done; exec /usr/bin/kilnd \"$@\"";
        let listen = format!("tcp://0.0.0.0:{SERVICE_PORT}");
        let mut all_args = vec![
            "sh",
            "-c",
            script,
            "kilnd",
            "--config",
            "/etc/kiln/kilnd.toml",
            "--root",
            "/var/lib/kiln",
            "--role",
            role,
        ];
        if !args.contains(&"--addr") {
            all_args.extend_from_slice(&["--addr", &listen]);
        }
        all_args.extend_from_slice(args);
        self.run(name, &all_flags, image, &all_args)
    }

    /// Worker `i`'s container name.
    pub fn worker_name(&self, i: usize) -> &str {
        &self.workers[i].0
    }

    /// `kiln ARGS` run from kiln's client image in a container on the farm's
    /// network, reaching the scheduler by its name (as a CI job in a pod
    /// would); its stdout.
    pub fn kiln_in_container(&self, args: &[&str]) -> Result<String> {
        let addr = format!("tcp://{}:{CLIENT_PORT}", self.name("scheduler"));
        let mut all = vec![
            "run",
            "--rm",
            "--network",
            &self.network,
            &self.kiln_image,
            "--addr",
            &addr,
        ];
        all.extend_from_slice(args);
        docker(&all)
    }
}

/// Seeds busybox into the registry at `addr` (scripts/seed-busybox.sh).
pub fn seed_busybox(addr: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = Command::new("sh")
            .arg(repo_root().join("scripts/seed-busybox.sh"))
            .arg(addr)
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "seeding busybox into {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Farm for ContainerFarm {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn worker_count(&self) -> usize {
        self.workers.len()
    }

    fn worker_id(&self, i: usize) -> String {
        self.workers[i].1.clone()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        let names = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("name={}-", self.prefix),
            "--format",
            "{{.Names}}",
        ])
        .unwrap_or_default();
        for name in names.lines() {
            let log = Command::new("docker")
                .args(["logs", "--tail", "40", name])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                .unwrap_or_default();
            out.push_str(&format!("== {name}\n{}", tail(&log, 40)));
        }
        out
    }

    fn kill_worker(&mut self, i: usize) {
        let _ = docker(&["kill", &self.workers[i].0]);
    }

    fn start_worker(&mut self, i: usize) -> Result<()> {
        docker(&["start", &self.workers[i].0]).map(|_| ())
    }

    fn cut_worker(&mut self, i: usize) {
        let _ = docker(&["network", "disconnect", &self.network, &self.workers[i].0]);
    }

    fn heal_worker(&mut self, i: usize) {
        let _ = docker(&["network", "connect", &self.network, &self.workers[i].0]);
    }

    fn drain_worker(&mut self, i: usize) {
        // `docker stop` sends SIGTERM and waits; the test waits for the exit
        let _ = Command::new("docker")
            .args(["stop", "--time", "120", &self.workers[i].0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        let name = &self.workers[i].0;
        while start.elapsed() < timeout {
            let state = docker(&[
                "inspect",
                "-f",
                "{{.State.Running}} {{.State.ExitCode}}",
                name,
            ])?;
            if let Some(code) = state.trim().strip_prefix("false ") {
                return Ok(code == "0");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("worker {name} did not exit within {timeout:?}")
    }
}

impl Drop for ContainerFarm {
    fn drop(&mut self) {
        let names = docker(&["ps", "-aq", "--filter", &format!("name={}-", self.prefix)])
            .unwrap_or_default();
        let ids: Vec<&str> = names.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = docker(&args);
        }
        for (name, _) in &self.workers {
            let _ = docker(&["volume", "rm", "-f", &format!("{name}-root")]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

#[cfg(test)]
mod tests {
    use super::missing_caps;

    #[test]
    fn missing_caps_reads_a_bounding_set() {
        assert!(missing_caps("000001ffffffffff").is_empty());
        assert_eq!(missing_caps("000001fffeffffff"), vec!["SYS_RESOURCE"]);
        assert_eq!(missing_caps("000000ffffffffff"), vec!["CHECKPOINT_RESTORE"]);
    }
}
