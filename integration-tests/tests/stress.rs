//! Stress: 20 concurrent builds with exec steps on one kilnd, a quarter of them
//! cancelled mid-step by killing the client. Afterwards the worker must hold no mounts,
//! no containers (runc or containerd), no step processes, no staging snapshots (in kiln's
//! store or active in containerd's snapshotter), no containerd snapshots kiln does not
//! know, and no bundles.

use kiln_integration_tests::{
    Backend, BuildContext, Daemon, Topology, bin_dir, dockerfile_args, mounts_under, run,
    spawn_kilnd,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILDS: usize = 20;

/// Pids of processes running `sleep <marker>`.
fn sleepers(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.len() >= 2 && args[0].ends_with(b"sleep") && args[1] == marker.as_bytes() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn lines_of(cmd: &mut Command) -> Vec<String> {
    run(cmd)
        .expect("listing command")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Everything the worker could have leaked, by kind; empty when clean. `dir` is the
/// daemon's dir (its root is `dir/root/all`), `namespace` its containerd namespace.
fn leaks(
    dir: &Path,
    backend: &Backend,
    namespace: Option<&str>,
    marker: &str,
) -> Vec<(&'static str, Vec<String>)> {
    let worker: PathBuf = dir.join("root/all/worker");
    let mut v = vec![
        ("mounts", mounts_under(dir)),
        ("processes", sleepers(marker)),
        ("staging snapshots", entries(&worker.join("staging"))),
        ("mountpoints", entries(&worker.join("mnt"))),
        (
            "bundles",
            entries(&worker.join("tmp"))
                .into_iter()
                .chain(entries(&worker.join("runtime")))
                .filter(|n| n.starts_with("exec-"))
                .collect(),
        ),
    ];
    match backend {
        Backend::Runc => {
            let state = worker.join("runtime/runc");
            let listed = if state.exists() {
                lines_of(
                    Command::new("runc")
                        .arg("--root")
                        .arg(&state)
                        .args(["list", "-q"]),
                )
            } else {
                Vec::new()
            };
            v.push(("runc containers", listed));
        }
        Backend::Containerd { address } => {
            let ns = namespace.expect("namespace");
            let ctr = |what: &str| {
                lines_of(Command::new("ctr").args(["-a", address, "-n", ns, what, "ls", "-q"]))
            };
            v.push(("containerd tasks", ctr("tasks")));
            v.push(("containerd containers", ctr("containers")));
            // snapshots: none still being written, and every committed one is kiln's
            let (mut active, mut unknown) = (Vec::new(), Vec::new());
            for (name, snap) in kiln_integration_tests::containerd_snapshots(address, ns) {
                let row = format!("{name} {snap:?}");
                if snap.kind != "Committed" {
                    active.push(row);
                } else if !name
                    .strip_prefix("kiln/")
                    .is_some_and(|id| worker.join("snapshots").join(id).join("meta.json").exists())
                {
                    unknown.push(row);
                }
            }
            v.push(("containerd active snapshots", active));
            v.push(("containerd snapshots kiln does not know", unknown));
        }
    }
    v.retain(|(_, l)| !l.is_empty());
    v
}

fn stress(backend: &Backend, marker: &'static str) {
    let d = Daemon::start_on(Topology::AllInOne, backend, "").expect("daemon");
    let addr = d.addr.clone();
    let threads: Vec<_> = (0..BUILDS)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let cancel = i % 4 == 3;
                let df = if cancel {
                    format!("FROM busybox\nRUN echo start-{i} && sleep {marker}\n")
                } else {
                    format!("FROM busybox\nRUN echo {i} > /a && sleep 0.2\nRUN cat /a > /b\n")
                };
                let c = BuildContext::new(&df).expect("context");
                let log = c.path().join("kiln.log");
                let mut args = vec!["--addr", addr.as_str(), "build", "--progress", "plain"];
                args.extend(dockerfile_args());
                args.extend(["--output", "type=local,dest=out"]);
                let mut child = Command::new(bin_dir().join("kiln"))
                    .args(&args)
                    .current_dir(c.path())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("log"))
                    .spawn()
                    .expect("kiln");
                if cancel {
                    // kill the client once the step's process has printed
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_secs(60) {
                        let l = std::fs::read_to_string(&log).unwrap_or_default();
                        if l.contains(&format!("start-{i}\n")) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    child.kill().expect("kill kiln");
                    let _ = child.wait();
                    return;
                }
                let st = child.wait().expect("wait kiln");
                let l = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(st.success(), "build {i} failed: {l}");
                let b = std::fs::read_to_string(c.path().join("out/b")).expect("out/b");
                assert_eq!(b, format!("{i}\n"));
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in threads {
        if let Err(e) = t.join() {
            failed.push(e);
        }
    }
    assert!(failed.is_empty(), "builds failed: {failed:?}\n{}", d.logs());
    // cancellation is asynchronous: give the worker a moment to clean up
    let start = Instant::now();
    let ns = d.containerd_namespace.as_deref();
    let mut left = leaks(d.dir.path(), backend, ns, marker);
    while !left.is_empty() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        left = leaks(d.dir.path(), backend, ns, marker);
    }
    assert!(
        left.is_empty(),
        "leaked after the builds: {left:?}\n{}",
        d.logs()
    );
}

#[test]
fn concurrent_and_cancelled_builds_leak_nothing_on_runc() {
    stress(&Backend::Runc, "77.71");
}

#[test]
fn concurrent_and_cancelled_builds_leak_nothing_on_containerd() {
    if let Some(b) = Backend::containerd() {
        stress(&b, "77.72");
    }
}

/// A kilnd started by hand (the harness's `Daemon` cannot be killed and restarted on
/// the same root). Killed, and whatever it left mounted detached, on drop.
struct Kilnd {
    child: std::process::Child,
}

impl Kilnd {
    fn start(dir: &Path, config: &Path, n: usize) -> Kilnd {
        let log = dir.join(format!("kilnd-{n}.log"));
        let child = spawn_kilnd(config, &dir.join("root/all"), &dir.join("kilnd.sock"), &log)
            .expect("kilnd");
        Kilnd { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn build(dir: &Path, dockerfile: &str, log: &Path) -> std::process::Child {
    let c = dir.join(format!("ctx-{}", uuid_like()));
    std::fs::create_dir_all(&c).expect("ctx");
    std::fs::write(c.join("Dockerfile"), dockerfile).expect("Dockerfile");
    let addr = format!("unix://{}", dir.join("kilnd.sock").display());
    let mut args = vec!["--addr", addr.as_str(), "build", "--progress", "plain"];
    args.extend(dockerfile_args());
    Command::new(bin_dir().join("kiln"))
        .args(&args)
        .current_dir(&c)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("kiln")
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// kill -9 of kilnd in the middle of a step leaves a running container (runc's or
/// containerd's), its mounts and its bundle; the next kilnd on the same root removes all
/// of it. With kiln's own container starter (`runtime = "native"`) the step's processes
/// die with kilnd, and the rest is removed the same way.
fn restart_after_crash(backend: &Backend, marker: &str, runtime: &str) {
    let dir = tempfile::Builder::new()
        .prefix("kiln-crash-")
        .tempdir()
        .expect("tempdir");
    let reg = kiln_integration_tests::registry();
    let namespace = dir
        .path()
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        })
        .expect("name");
    let mut config = format!(
        "[registry.\"docker.io\"]\nmirrors = [\"{reg}\"]\n[registry.\"{reg}\"]\nhttp = true\n"
    );
    let ns = match backend {
        Backend::Runc => {
            config.push_str(&format!("[worker.oci]\nruntime = \"{runtime}\"\n"));
            None
        }
        Backend::Containerd { address } => {
            config.push_str(&format!(
                "[worker.containerd]\nenabled = true\naddress = \"{address}\"\nnamespace = \"{namespace}\"\n"
            ));
            Some(namespace.as_str())
        }
    };
    let config_path = dir.path().join("kilnd.toml");
    std::fs::write(&config_path, config).expect("config");
    let mut k = Kilnd::start(dir.path(), &config_path, 1);
    let log = dir.path().join("kiln-1.log");
    let mut client = build(
        dir.path(),
        &format!("FROM busybox\nRUN echo start-crash && sleep {marker}\n"),
        &log,
    );
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("start-crash\n")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the step did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the echo comes before the shell starts `sleep`: wait for the process itself
    let sleeping = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    String::from_utf8_lossy(&c).contains(&format!("sleep\0{marker}"))
                })
            })
    };
    while !sleeping() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the step's sleep did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    k.kill();
    let _ = client.kill();
    let _ = client.wait();
    let mut left = leaks(dir.path(), backend, ns, marker);
    if runtime == "native" {
        // the step's pid 1 gets SIGKILL when kilnd's cloning thread dies
        let start = Instant::now();
        while left.iter().any(|(kind, _)| *kind == "processes")
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
            left = leaks(dir.path(), backend, ns, marker);
        }
        assert!(
            !left.iter().any(|(kind, _)| *kind == "processes"),
            "a killed kilnd leaves the step it started running: {left:?}"
        );
        assert!(
            left.iter().any(|(kind, _)| *kind == "mounts"),
            "(the step's mounts stay until the next kilnd): {left:?}"
        );
    } else {
        assert!(
            left.iter().any(|(kind, _)| *kind == "processes"),
            "a killed kilnd leaves its step running: {left:?}"
        );
    }
    if runtime == "native" {
        // no container state: the starter keeps none
    } else if ns.is_some() {
        assert!(
            left.iter()
                .any(|(kind, _)| *kind == "containerd active snapshots"),
            "and its step's snapshot active in containerd: {left:?}"
        );
    } else {
        assert!(
            left.iter().any(|(kind, _)| *kind == "runc containers"),
            "and its container in runc's state (the worker's runtime dir): {left:?}"
        );
    }
    let k2 = Kilnd::start(dir.path(), &config_path, 2);
    // a restarted worker has removed the leftovers (containerd's when it connected, at
    // start) and still builds
    let log = dir.path().join("kiln-2.log");
    let st = build(dir.path(), "FROM busybox\nRUN true\n", &log)
        .wait()
        .expect("kiln");
    assert!(
        st.success(),
        "build after restart: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let start = Instant::now();
    let mut left = leaks(dir.path(), backend, ns, marker);
    while !left.is_empty() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        left = leaks(dir.path(), backend, ns, marker);
    }
    assert!(left.is_empty(), "left after a restart: {left:?}");
    drop(k2);
    for m in mounts_under(dir.path()).iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
}

#[test]
fn a_restarted_kilnd_removes_what_a_killed_one_left_on_runc() {
    restart_after_crash(&Backend::Runc, "77.73", "runc");
}

#[test]
fn a_killed_kilnd_takes_its_native_steps_down_and_the_next_one_cleans_up() {
    restart_after_crash(&Backend::Runc, "77.75", "native");
}

#[test]
fn a_restarted_kilnd_removes_what_a_killed_one_left_on_containerd() {
    if let Some(b) = Backend::containerd() {
        restart_after_crash(&b, "77.74", "runc");
    }
}
