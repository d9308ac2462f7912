//! kiln's own kilnd image run the ways people run it, with the `kiln` on this
//! host building through a port published on loopback:
//! - the all-in-one daemon as one container, its root on a Docker volume, a
//!   registry container beside it on a network of the test's own as its
//!   docker.io mirror;
//! - the Compose farm of `deploy/compose/compose.yaml` (scheduler, frontend,
//!   exporter, two replicas of the worker service), brought up under a project
//!   name of its own and taken down with its volumes whatever happens.
//!
//! The images are the container farm's (`container_farm::farm_images`: built
//! by kiln, `docker load`ed, tagged by content). Skipped without
//! `KILN_TEST_DOCKER=1`.

use anyhow::{Context, Result, bail};
use kiln_integration_tests::container_farm::{
    REGISTRY_PORT, docker, docker_available, farm_images, missing_caps, seed_busybox,
    worker_security_flags,
};
use kiln_integration_tests::farm::{Farm, bytes_moved, placements, stages_dockerfile, tail};
use kiln_integration_tests::{BuildContext, bin_dir, dockerfile_args, is_cached, oci_image};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The port kilnd listens on inside its container.
const CLIENT_PORT: u16 = 1234;
/// Its `--debugaddr` port (metrics, health).
const DEBUG_PORT: u16 = 6060;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A name no other test run uses: `WHAT-PID-N`.
fn unique(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Runs `cmd` to its end or until `timeout` (then kills it and fails); its output.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            bail!(
                "{cmd:?} still ran after {timeout:?}: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The body of `GET url` (curl, bounded), which must answer 2xx.
fn http_get(url: &str) -> Result<String> {
    let out = run_bounded(
        Command::new("curl").args(["-sSf", "-m", "20", url]),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// `kiln --addr ADDR build --progress plain` of the Dockerfile in `ctx` with
/// `outputs`, bounded; its progress, or an error with it and `logs()`.
fn kiln_build(
    addr: &str,
    ctx: &Path,
    outputs: &[&str],
    logs: impl Fn() -> String,
) -> Result<String> {
    let mut cmd = Command::new(bin_dir().join("kiln"));
    cmd.args(["--addr", addr, "build", "--progress", "plain"])
        .args(dockerfile_args())
        .current_dir(ctx);
    for o in outputs {
        cmd.args(["--output", o]);
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(150))?;
    let progress = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "kiln build failed:\n{progress}\n--- daemon logs ---\n{}",
            logs()
        );
    }
    Ok(progress)
}

/// `kiln --addr ADDR debug workers` until it lists `n` workers (bounded); their ids.
fn wait_workers(
    addr: &str,
    n: usize,
    timeout: Duration,
    logs: impl Fn() -> String,
) -> Result<Vec<String>> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        let out = run_bounded(
            Command::new(bin_dir().join("kiln")).args(["--addr", addr, "debug", "workers"]),
            Duration::from_secs(20),
        )?;
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect();
            if ids.len() == n {
                return Ok(ids);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "{addr} did not list {n} workers within {timeout:?}:\n{last}\n--- logs ---\n{}",
        logs()
    )
}

/// The files of a layer blob of an OCI tarball (an uncompressed layer), by path.
fn layer_files(image_tar: &Path, digest: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    let hex = digest.strip_prefix("sha256:").context("a sha256 digest")?;
    let blob = kiln_integration_tests::tar_entry(image_tar, &format!("blobs/sha256/{hex}"))?;
    let mut files = BTreeMap::new();
    for e in tar::Archive::new(&blob[..]).entries()? {
        let mut e = e?;
        if e.header().entry_type().is_file() {
            let path = e
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            files.insert(path, data);
        }
    }
    Ok(files)
}

/// `docker logs --tail 60` of each container, for a failure's message.
fn container_logs(containers: &[String]) -> String {
    let mut text = String::new();
    for c in containers {
        let log = Command::new("docker")
            .args(["logs", "--tail", "60", c])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default();
        text.push_str(&format!("== {c}\n{}\n", tail(&log, 60)));
    }
    text
}

/// Containers, volumes and networks a test made, removed on drop (pass or fail).
#[derive(Default)]
struct DockerThings {
    containers: Vec<String>,
    volumes: Vec<String>,
    networks: Vec<String>,
}

impl Drop for DockerThings {
    fn drop(&mut self) {
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        for n in &self.networks {
            let _ = docker(&["network", "rm", n]);
        }
    }
}

/// The container's address on `network`.
fn container_ip(container: &str, network: &str) -> Result<String> {
    let f = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = docker(&["inspect", "-f", &f, container])?
        .trim()
        .to_string();
    if ip.is_empty() {
        bail!("{container} has no address on {network}");
    }
    Ok(ip)
}

/// The host port Docker published `port` of `container` on (`docker port`).
fn published_port(container: &str, port: u16) -> Result<u16> {
    let out = docker(&["port", container, &format!("{port}/tcp")])?;
    let first = out.lines().next().context("no published port")?;
    first
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("published port of {container}: {out:?}"))
}

/// What `docker run` gives the all-in-one kilnd: `--privileged` when this
/// engine allows it, else what the container farm's workers get.
fn kilnd_security_flags(image: &str) -> Vec<String> {
    let privileged = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--privileged",
            "--entrypoint",
            "/bin/busybox",
            image,
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if privileged {
        vec!["--privileged".to_string()]
    } else {
        worker_security_flags()
    }
}

/// A file of the all-in-one test's context, which its COPY step copies in
/// and its RUN step reads.
const GREETING: &str = "hello from the host\n";

/// The all-in-one image as a container: root on a volume, client port
/// published on loopback, docker.io mirrored to a registry container; kiln
/// on the host builds through that port, and the image and files it gets
/// back hold what the COPY and RUN steps made; the published debug port
/// says it is ready and counts the step.
#[test]
fn all_in_one_image_in_docker_builds_from_the_host_through_a_published_port() -> Result<()> {
    if !docker_available() {
        return Ok(());
    }
    let (image, registry_image) = farm_images()?;
    all_in_one_in_docker(&image, &registry_image, "kilnd", "oci")
}

/// The kilnd-rootless image in a container that is not privileged and adds no
/// capability (seccomp and AppArmor unconfined, /proc unmasked, as deploy/README.md
/// says): its kilnd is the user kiln under rootlesskit, and it builds the same way.
#[test]
fn rootless_image_in_docker_builds_without_a_privileged_container() -> Result<()> {
    if !docker_available() {
        return Ok(());
    }
    let (image, registry_image) = farm_images()?;
    let image = image.replacen("kiln/kilnd:", "kiln/kilnd-rootless:", 1);
    all_in_one_in_docker(&image, &registry_image, "kilnd-rootless", "oci")
}

/// What `docker run` gives the kilnd-rootless image instead of `--privileged`.
const ROOTLESS_SECURITY_FLAGS: &[&str] = &[
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
];

/// The same with the kilnd-containerd image: its entrypoint starts a
/// containerd of its own beside kilnd, and the steps run as that
/// containerd's tasks on its snapshotter.
#[test]
fn containerd_image_in_docker_runs_steps_through_its_own_containerd() -> Result<()> {
    if !docker_available() {
        return Ok(());
    }
    let (image, registry_image) = farm_images()?;
    let image = image.replacen("kiln/kilnd:", "kiln/kilnd-containerd:", 1);
    all_in_one_in_docker(&image, &registry_image, "kilnd-containerd", "containerd")
}

/// `image` run as the all-in-one daemon through `entrypoint` (kilnd's flags
/// after it), built through from this host; its worker says `executor`.
fn all_in_one_in_docker(
    image: &str,
    registry_image: &str,
    entrypoint: &str,
    executor: &str,
) -> Result<()> {
    let prefix = unique("kiln-aio");
    let mut things = DockerThings::default();
    let network = format!("{prefix}-net");
    docker(&["network", "create", &network])?;
    things.networks.push(network.clone());
    let registry = format!("{prefix}-registry");
    things.containers.push(registry.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &registry,
        "--network",
        &network,
        registry_image,
        "serve",
        "/etc/docker/registry/config.yml",
    ])?;
    seed_busybox(&format!(
        "{}:{REGISTRY_PORT}",
        container_ip(&registry, &network)?
    ))?;

    let dir = tempfile::Builder::new().prefix("kiln-aio-").tempdir()?;
    let config = dir.path().join("kilnd.toml");
    let mirror = format!("{registry}:{REGISTRY_PORT}");
    std::fs::write(
        &config,
        format!(
            "[registry.\"docker.io\"]\nmirrors = [\"{mirror}\"]\n[registry.\"{mirror}\"]\nhttp = true\n"
        ),
    )?;
    let kilnd = format!("{prefix}-kilnd");
    let volume = format!("{kilnd}-root");
    things.containers.push(kilnd.clone());
    things.volumes.push(volume.clone());
    let rootless = entrypoint == "kilnd-rootless";
    let state = if rootless {
        "/home/kiln/.local/share/kiln"
    } else {
        "/var/lib/kiln"
    };
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &kilnd,
        "--network",
        &network,
        "--publish",
        &format!("127.0.0.1::{CLIENT_PORT}"),
        "--publish",
        &format!("127.0.0.1::{DEBUG_PORT}"),
        "--volume",
        &format!("{volume}:{state}"),
        "--volume",
        &format!("{}:/etc/kiln/kilnd.toml:ro", config.display()),
        "--entrypoint",
        "/bin/busybox",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if rootless {
        args.extend(ROOTLESS_SECURITY_FLAGS.iter().map(|s| s.to_string()));
    } else {
        args.extend(kilnd_security_flags(image));
    }
    // the cgroups writable for runc (a no-op when privileged or rootless), then kilnd
    let script = format!(
        "for m in /sys/fs/cgroup/*/; do mount -o remount,bind,rw \"$m\" 2>/dev/null; done; exec {entrypoint} \"$@\""
    );
    args.extend(
        [
            image,
            "sh",
            "-c",
            &script,
            entrypoint,
            "--config",
            "/etc/kiln/kilnd.toml",
            "--addr",
            &format!("tcp://0.0.0.0:{CLIENT_PORT}"),
            "--debugaddr",
            &format!("0.0.0.0:{DEBUG_PORT}"),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let addr = format!("tcp://127.0.0.1:{}", published_port(&kilnd, CLIENT_PORT)?);
    let logs = || container_logs(&[kilnd.clone(), registry.clone()]);
    wait_workers(&addr, 1, Duration::from_secs(60), logs)?;
    let workers = run_bounded(
        Command::new(bin_dir().join("kiln")).args(["--addr", &addr, "debug", "workers", "-v"]),
        Duration::from_secs(20),
    )?;
    let workers = String::from_utf8_lossy(&workers.stdout).to_string();
    assert!(
        workers.contains(&format!(
            "org.mobyproject.buildkit.worker.executor:\t{executor}\n"
        )),
        "{workers}"
    );

    let ctx = BuildContext::new(
        "FROM busybox\nCOPY greeting.txt /srv/greeting.txt\nRUN wc -c < /srv/greeting.txt > /srv/size && id -u > /srv/uid\n",
    )?;
    ctx.file("greeting.txt", GREETING)?;
    let progress = kiln_build(
        &addr,
        ctx.path(),
        &[
            "type=oci,dest=image.tar,compression=uncompressed",
            "type=local,dest=out",
        ],
        logs,
    )?;
    assert!(!is_cached(&progress, "RUN wc"), "{progress}");
    // the files, back on this host through the session
    let read = |p: &str| std::fs::read_to_string(ctx.path().join("out").join(p));
    assert_eq!(read("srv/greeting.txt")?, GREETING);
    assert_eq!(read("srv/size")?.trim(), GREETING.len().to_string());
    assert_eq!(read("srv/uid")?.trim(), "0");
    if rootless {
        // kilnd is the user kiln, not the container's root
        let status = docker(&[
            "exec",
            &kilnd,
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = kilnd ] && cat $p/status; done; true",
        ])?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_string);
        assert_eq!(uid.as_deref(), Some("1000"), "{status}");
        let privileged = docker(&["inspect", "-f", "{{.HostConfig.Privileged}}", &kilnd])?;
        assert_eq!(privileged.trim(), "false");
    }
    // the image: busybox's layer, then the COPY's, then the RUN's
    let tar = ctx.path().join("image.tar");
    let img = oci_image(&tar)?;
    let layers: Vec<String> = img.manifest["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect();
    assert!(layers.len() >= 3, "{}", img.manifest);
    let copied = layer_files(&tar, &layers[layers.len() - 2])?;
    assert_eq!(
        copied.get("srv/greeting.txt").map(Vec::as_slice),
        Some(GREETING.as_bytes()),
        "{:?}",
        copied.keys()
    );
    let ran = layer_files(&tar, &layers[layers.len() - 1])?;
    assert_eq!(
        ran.get("srv/size")
            .map(|v| String::from_utf8_lossy(v).trim().to_string()),
        Some(GREETING.len().to_string()),
        "{:?}",
        ran.keys()
    );
    assert!(ran.contains_key("srv/uid"), "{:?}", ran.keys());
    let history = img.config["history"].to_string();
    assert!(history.contains("RUN"), "{history}");
    // its debug port, published too: ready, and counting the step it ran
    let debug = format!("http://127.0.0.1:{}", published_port(&kilnd, DEBUG_PORT)?);
    assert_eq!(http_get(&format!("{debug}/healthz"))?, "ok\n");
    let metrics = http_get(&format!("{debug}/metrics"))?;
    assert!(
        metrics.contains("kiln_steps_total{kind=\"exec\",cache=\"miss\"} 1\n"),
        "{metrics}"
    );
    if executor == "containerd" {
        // the results are snapshots of the containerd inside
        let snapshots = docker(&[
            "exec",
            &kilnd,
            "ctr",
            "--address",
            "/run/kiln-containerd/containerd.sock",
            "--namespace",
            "kiln",
            "snapshots",
            "ls",
        ])?;
        assert!(snapshots.lines().count() >= 3, "{snapshots}");
    }
    Ok(())
}

/// `docker compose` (the v2 plugin) or else `docker-compose`; `None` when
/// neither answers.
fn compose_program() -> Option<Vec<String>> {
    let answers = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if answers(&["docker", "compose", "version"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if answers(&["docker-compose", "version"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

/// `deploy/compose/compose.yaml` up under a project of its own, with an
/// override file the test adds (a registry service as docker.io's mirror,
/// the capabilities this engine lacks dropped); `down -v` on drop.
struct ComposeFarm {
    program: Vec<String>,
    project: String,
    /// the override file's dir
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    addr: String,
    /// the scheduler's published debug address, `http://127.0.0.1:PORT`
    debug: String,
    /// worker containers' ids, and each one's kiln worker id
    workers: Vec<(String, String)>,
}

impl ComposeFarm {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .arg("-f")
            .arg(repo_root().join("deploy/compose/compose.yaml"))
            .arg("-f")
            .arg(self.dir.path().join("test.yaml"))
            .args(["-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `docker compose ... ARGS` (bounded); its stdout.
    fn compose(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let out = run_bounded(&mut self.command(args), timeout)?;
        if !out.status.success() {
            bail!(
                "compose {}: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The ids of `service`'s containers.
    fn containers(&self, service: &str) -> Result<Vec<String>> {
        Ok(self
            .compose(&["ps", "-q", service], Duration::from_secs(60))?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    /// The host port `service`'s `port` is published on.
    fn port(&self, service: &str, port: u16) -> Result<u16> {
        let out = self.compose(
            &["port", service, &port.to_string()],
            Duration::from_secs(60),
        )?;
        out.trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("{service}'s port {port}: {out:?}"))
    }

    /// Waits until each container of `services` is healthy (its
    /// healthcheck: the debug port's /healthz).
    fn wait_healthy(&self, services: &[&str], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut states = String::new();
        while start.elapsed() < timeout {
            states.clear();
            let mut all = true;
            for service in services {
                for id in self.containers(service)? {
                    let state = docker(&[
                        "inspect",
                        "-f",
                        "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                        &id,
                    ])?;
                    all &= state.trim() == "healthy";
                    states.push_str(&format!("{service} {id}: {}\n", state.trim()));
                }
            }
            if all {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        bail!(
            "not all healthy within {timeout:?}:\n{states}\n{}",
            self.logs()
        )
    }

    /// The farm with `workers` replicas of the worker service; returns once
    /// each has joined.
    fn start(workers: usize) -> Result<Option<ComposeFarm>> {
        let Some(program) = compose_program() else {
            eprintln!("skipped: neither `docker compose` nor `docker-compose` answers");
            return Ok(None);
        };
        let (image, registry_image) = farm_images()?;
        let dir = tempfile::Builder::new().prefix("kiln-compose-").tempdir()?;
        // the registry beside the farm, and what this engine cannot give
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let bnd = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .unwrap_or("ffffffffffffffff");
        let drop: Vec<String> = missing_caps(bnd)
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        let mut test_yaml = format!(
            "services:\n  registry:\n    image: \"{registry_image}\"\n    command: [\"serve\", \"/etc/docker/registry/config.yml\"]\n"
        );
        if !drop.is_empty() {
            test_yaml.push_str(&format!("  worker:\n    cap_drop: [{}]\n", drop.join(", ")));
        }
        std::fs::write(dir.path().join("test.yaml"), test_yaml)?;
        // compose's project names are lower-case letters, digits, - and _
        let project = unique("kilntest").replace('-', "_");
        let mut farm = ComposeFarm {
            program,
            project,
            dir,
            env: vec![
                ("KILN_IMAGE".into(), image),
                // free ports on loopback
                ("KILN_PORT".into(), String::new()),
                ("KILN_DEBUG_PORT".into(), String::new()),
                ("KILN_BIND".into(), "127.0.0.1".into()),
                (
                    "KILN_REGISTRY_MIRROR".into(),
                    format!("http://registry:{REGISTRY_PORT}"),
                ),
                ("KILN_WORKERS".into(), workers.to_string()),
            ],
            addr: String::new(),
            debug: String::new(),
            workers: vec![],
        };
        // `down` (the drop) from here on, whatever `up` managed
        farm.compose(
            &["up", "-d", "--scale", &format!("worker={workers}")],
            Duration::from_secs(180),
        )?;
        let registry = farm.containers("registry")?;
        let registry = registry.first().context("no registry container")?;
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            registry,
        ])?;
        let ip = ip.split_whitespace().next().context("registry address")?;
        seed_busybox(&format!("{ip}:{REGISTRY_PORT}"))?;
        farm.addr = format!("tcp://127.0.0.1:{}", farm.port("scheduler", CLIENT_PORT)?);
        farm.debug = format!("http://127.0.0.1:{}", farm.port("scheduler", DEBUG_PORT)?);
        farm.wait_workers(workers, Duration::from_secs(90))?;
        for id in farm.containers("worker")? {
            let worker_id = docker(&[
                "exec",
                &id,
                "/bin/busybox",
                "cat",
                "/var/lib/kiln/worker/worker-id",
            ])?;
            farm.workers.push((id, worker_id.trim().to_string()));
        }
        Ok(Some(farm))
    }
}

impl Farm for ComposeFarm {
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
        run_bounded(
            &mut self.command(&["logs", "--no-color", "--tail", "40"]),
            Duration::from_secs(60),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
    }

    fn kill_worker(&mut self, i: usize) {
        let _ = docker(&["kill", &self.workers[i].0]);
    }

    fn start_worker(&mut self, i: usize) -> Result<()> {
        docker(&["start", &self.workers[i].0]).map(|_| ())
    }

    fn cut_worker(&mut self, i: usize) {
        let network = format!("{}_default", self.project);
        let _ = docker(&["network", "disconnect", &network, &self.workers[i].0]);
    }

    fn heal_worker(&mut self, i: usize) {
        let network = format!("{}_default", self.project);
        let _ = docker(&["network", "connect", &network, &self.workers[i].0]);
    }

    fn drain_worker(&mut self, i: usize) {
        let _ = Command::new("docker")
            .args(["stop", "--time", "120", &self.workers[i].0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let state = docker(&[
                "inspect",
                "-f",
                "{{.State.Running}} {{.State.ExitCode}}",
                &self.workers[i].0,
            ])?;
            if let Some(code) = state.trim().strip_prefix("false ") {
                return Ok(code == "0");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "worker {} did not exit within {timeout:?}",
            self.workers[i].0
        )
    }
}

impl Drop for ComposeFarm {
    fn drop(&mut self) {
        let down = run_bounded(
            &mut self.command(&["down", "-v", "--remove-orphans", "-t", "30"]),
            Duration::from_secs(180),
        );
        if let Err(e) = down.as_ref().map_err(|e| e.to_string()).and_then(|o| {
            o.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&o.stderr).to_string())
        }) {
            eprintln!("docker compose down -p {}: {e}", self.project);
        }
    }
}

/// The Compose farm with two workers: both join (`kiln debug workers`), and
/// a build from this host through the scheduler's published port spreads
/// its RUN steps over both and returns every stage's file; every service
/// turns healthy and the scheduler's metrics count the workers and steps.
#[test]
fn compose_farm_with_two_workers_builds_from_the_host_on_both() -> Result<()> {
    if !docker_available() {
        return Ok(());
    }
    let Some(farm) = ComposeFarm::start(2)? else {
        return Ok(());
    };
    let listed = farm.listed_workers()?;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (_, id) in &farm.workers {
        assert!(listed.contains(id), "{id} not listed: {listed:?}");
    }
    let n = 6;
    let ctx = BuildContext::new(&stages_dockerfile(n, 1))?;
    let progress = kiln_build(&farm.addr, ctx.path(), &["type=local,dest=out"], || {
        farm.logs()
    })?;
    for i in 0..n {
        let got = std::fs::read_to_string(ctx.path().join(format!("out/out/out{i}")))?;
        assert_eq!(got, format!("stage{i}\n"));
    }
    let used: Vec<String> = placements(&progress)
        .into_iter()
        .filter(|(name, _)| name.contains(" RUN "))
        .map(|(_, w)| w)
        .collect();
    assert_eq!(used.len(), n, "one placement per RUN:\n{progress}");
    for (_, id) in &farm.workers {
        assert!(
            used.contains(id),
            "no step ran on worker {id}: {used:?}\n{progress}"
        );
    }
    // the last stage's worker fetched the others' results from the worker
    // that made them, at the address it advertised (its hostname)
    assert!(bytes_moved(&progress) > 0, "{progress}");
    // every service's healthcheck passes; the scheduler's metrics, on its
    // published debug port, count both workers and the build's RUN steps
    farm.wait_healthy(
        &["scheduler", "frontend", "exporter", "worker"],
        Duration::from_secs(60),
    )?;
    assert_eq!(http_get(&format!("{}/healthz", farm.debug))?, "ok\n");
    let metrics = http_get(&format!("{}/metrics", farm.debug))?;
    for line in [
        "kiln_workers{state=\"ready\"} 2\n".to_string(),
        format!("kiln_steps_total{{kind=\"exec\",cache=\"miss\"}} {n}\n"),
    ] {
        assert!(metrics.contains(&line), "{line:?} not in:\n{metrics}");
    }
    Ok(())
}
