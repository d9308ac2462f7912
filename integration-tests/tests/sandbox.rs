//! The step sandbox: in bridge network mode a step has its own network, reaches the
//! outside through NAT and no listener of the host, and hands it to the next step when
//! it has ended (unless it was cancelled or `security.insecure`); steps run under the
//! default seccomp profile unless `security.insecure`; a killed kilnd's step networks
//! are swept. Real
//! kilnd, runc (and containerd), iptables and network namespaces.

use kiln_integration_tests::{Backend, BuildContext, Daemon, Topology, dockerfile_args};
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BRIDGE: &str = "[worker]\nnetworkMode = \"bridge\"\n";
const LEASES: &str = "/run/kiln-net/kiln0";

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = dockerfile_args();
    v.extend_from_slice(extra);
    v
}

fn read(out: &Path, p: &str) -> String {
    std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host listener that counts the connections it accepts.
struct Listener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Listener {
    fn on(addr: &str) -> Listener {
        let l = TcpListener::bind(addr).expect("bind");
        let port = l.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                n.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
        Listener { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A network namespace standing for the world outside the host: reached from the host
/// through a veth pair on a /30 of 198.18.0.0/15, with no route back to kiln's subnet,
/// so only NATed traffic gets an answer. A busybox `nc` listens there once.
struct Outside {
    name: String,
    addr: Ipv4Addr,
    listener: std::process::Child,
}

impl Outside {
    fn start(port: u16) -> Outside {
        let id = std::process::id();
        let name = format!("kiln-outside-{id}");
        let (a, b) = (((id / 64) % 256) as u8, ((id % 64) * 4) as u8);
        let host = Ipv4Addr::new(198, 18, a, b + 1);
        let addr = Ipv4Addr::new(198, 18, a, b + 2);
        let veth = format!("kso{:x}", id);
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&format!(
            "ip netns add {name} && ip link add {veth} type veth peer name eth0 netns {name} && \
             ip addr add {host}/30 dev {veth} && ip link set {veth} up && \
             ip -n {name} addr add {addr}/30 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up"
        ));
        let listener = Command::new("ip")
            .args(["netns", "exec", &name, "/bin/busybox", "nc", "-l", "-p"])
            .arg(port.to_string())
            // a stdin that stays open: at its end nc would stop reading the connection
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("nc -l in the outside namespace");
        let t = Instant::now();
        while !sh(&format!("ip netns exec {name} /bin/busybox netstat -ltn"))
            .contains(&format!(":{port} "))
        {
            assert!(t.elapsed() < Duration::from_secs(5), "outside listener");
            std::thread::sleep(Duration::from_millis(20));
        }
        Outside {
            name,
            addr,
            listener,
        }
    }

    /// What the listener received (it is stopped if still waiting).
    fn received(&mut self) -> String {
        let t = Instant::now();
        while self.listener.try_wait().ok().flatten().is_none()
            && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        let mut s = String::new();
        if let Some(mut o) = self.listener.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        // the namespace's veth end goes with it, and the host's with that
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An IPv4 address of the host on an interface other than loopback and kiln's bridge.
fn host_address() -> Option<String> {
    sh("ip -4 -o addr show scope global")
        .lines()
        .filter(|l| !l.contains(" kiln0 "))
        .find_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "inet")
                .and_then(|_| w.next())
                .and_then(|a| a.split('/').next())
                .map(str::to_string)
        })
}

/// The step network of `ip` is gone: no lease, no namespace mount, no veth.
fn wait_until_removed(ip: &str) {
    let veth = format!(
        "kv{:08x}",
        u32::from(ip.parse::<Ipv4Addr>().expect("step address"))
    );
    let t = Instant::now();
    loop {
        let left: Vec<String> = [
            PathBuf::from(LEASES).join(ip),
            PathBuf::from(LEASES).join(format!("{ip}.ns")),
            Path::new("/sys/class/net").join(&veth),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "left after the step: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn still_serves(d: &Daemon) {
    let c = BuildContext::new("FROM busybox\nRUN echo again > /again\n").expect("context");
    d.build(
        c.path(),
        &args(&["--no-cache", "--output", "type=local,dest=out"]),
    )
    .expect("kilnd still builds");
    assert_eq!(read(&c.path().join("out"), "again"), "again\n");
}

#[test]
fn bridge_steps_reach_out_through_nat_and_no_host_listener() {
    let loopback = Listener::on("127.0.0.1:0");
    let any = Listener::on("0.0.0.0:0");
    let host_ip = host_address().expect("a host address");
    let mut outside = Outside::start(18080);
    let d = Daemon::start_with_config(Topology::AllInOne, BRIDGE).expect("daemon");
    assert!(
        d.logs().contains("network mode bridge"),
        "kilnd says which mode: {}",
        d.logs()
    );
    let probe = |addr: &str, port: u16| {
        format!(
            "if echo x | nc -w 2 {addr} {port}; then echo {addr}:{port} reached; else echo {addr}:{port} blocked; fi"
        )
    };
    let c = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN ip -4 -o addr show dev eth0 > /addr; ip route > /route; cat /etc/resolv.conf > /resolv; \
         ({}; {}; {}; {}) > /host; \
         if echo from-step | nc -w 3 {} 18080; then echo sent > /outside; else echo failed > /outside; fi\n",
        probe("127.0.0.1", loopback.port),
        probe("10.213.0.1", any.port),
        probe(&host_ip, any.port),
        probe("10.213.0.1", loopback.port),
        outside.addr,
    ))
    .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");

    let host = read(&out, "host");
    assert!(
        !host.contains("reached"),
        "a host listener answered: {host}"
    );
    assert_eq!(host.matches("blocked").count(), 4, "{host}");
    assert_eq!(
        (loopback.accepted(), any.accepted()),
        (0, 0),
        "host listeners saw connections"
    );

    let addr = read(&out, "addr");
    let ip = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address on eth0: {addr}"))
        .to_string();
    assert!(ip.starts_with("10.213."), "{addr}");
    assert!(
        read(&out, "route").contains("default via 10.213.0.1"),
        "{}",
        read(&out, "route")
    );
    let resolv = read(&out, "resolv");
    assert!(
        resolv.contains("nameserver") && !resolv.contains("nameserver 127."),
        "{resolv}"
    );

    assert_eq!(read(&out, "outside"), "sent\n", "outbound through NAT");
    assert_eq!(outside.received(), "from-step\n");
    still_serves(&d);
}

/// The address on eth0 that `RUN` of a build of `d` saw (the build's `RUN` writes
/// `ip -4 -o addr show dev eth0` to `/addr`).
fn step_address(d: &Daemon, dockerfile: &str, extra: &[&str]) -> String {
    let c = BuildContext::new(dockerfile).expect("context");
    let mut a = vec!["--no-cache", "--output", "type=local,dest=out"];
    a.extend_from_slice(extra);
    d.build(c.path(), &args(&a)).expect("build");
    let addr = read(&c.path().join("out"), "addr");
    addr.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address on eth0: {addr}"))
        .to_string()
}

#[test]
fn a_finished_steps_network_goes_to_the_next_step_and_an_insecure_steps_is_removed() {
    let d = Daemon::start_with_config(
        Topology::AllInOne,
        &format!("insecure-entitlements = [\"security.insecure\"]\n{BRIDGE}"),
    )
    .expect("daemon");
    let pid = kilnd_pid(&d);
    let first = step_address(
        &d,
        "FROM busybox\nRUN ip -4 -o addr show dev eth0 > /addr\n",
        &[],
    );
    // kept: kilnd still holds its lease, the namespace and the veth are there
    let veth = Path::new("/sys/class/net").join(format!(
        "kv{:08x}",
        u32::from(first.parse::<Ipv4Addr>().expect("ip"))
    ));
    assert_eq!(lease_held_by(pid).as_deref(), Some(first.as_str()));
    assert!(veth.exists() && PathBuf::from(LEASES).join(format!("{first}.ns")).exists());
    // the next step (of another build) gets it, and it works as a new one does: its
    // address, route and outbound NAT
    let mut outside = Outside::start(18081);
    let again = step_address(
        &d,
        &format!(
            "FROM busybox\nRUN ip -4 -o addr show dev eth0 > /addr; ip route > /route; \
             echo reused | nc -w 3 {} 18081\n",
            outside.addr
        ),
        &[],
    );
    assert_eq!(
        again, first,
        "the finished step's network is the next one's"
    );
    assert_eq!(outside.received(), "reused\n");
    // a step that could change its network (CAP_NET_ADMIN) leaves it to nobody
    let insecure = step_address(
        &d,
        "FROM busybox\nRUN --security=insecure ip -4 -o addr show dev eth0 > /addr\n",
        &["--allow", "security.insecure"],
    );
    assert_eq!(insecure, first);
    wait_until_removed(&insecure);
    still_serves(&d);
}

#[test]
fn network_host_and_none_keep_their_meaning_in_bridge_mode() {
    let loopback = Listener::on("127.0.0.1:0");
    let d = Daemon::start_with_config(
        Topology::AllInOne,
        &format!("insecure-entitlements = [\"network.host\"]\n{BRIDGE}"),
    )
    .expect("daemon");
    let c = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN --network=host sh -c 'echo from-host-step | nc -w 2 127.0.0.1 {}; echo $? > /host-rc'\n\
         RUN --network=none sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \" > /none'\n",
        loopback.port
    ))
    .expect("context");
    d.build(
        c.path(),
        &args(&["--allow", "network.host", "--output", "type=local,dest=out"]),
    )
    .expect("build");
    let out = c.path().join("out");
    assert_eq!(read(&out, "host-rc"), "0\n");
    assert_eq!(loopback.accepted(), 1, "--network=host reaches the host");
    assert_eq!(read(&out, "none"), "lo\n");
}

#[test]
fn none_mode_gives_every_step_loopback_only() {
    let d = Daemon::start_with_config(Topology::AllInOne, "[worker]\nnetworkMode = \"none\"\n")
        .expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\nRUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /ifaces\n",
    )
    .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    assert_eq!(read(&c.path().join("out"), "ifaces"), "lo\n");
    still_serves(&d);
}

#[test]
fn bad_network_settings_are_refused_at_start() {
    let e = match Daemon::start_with_config(Topology::AllInOne, "[worker]\nnetworkMode = \"cni\"\n")
    {
        Ok(_) => panic!("networkMode cni must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("networkMode") && e.contains("cni"), "{e}");
    let e = match Daemon::start_with_config(
        Topology::AllInOne,
        "[worker]\nbridgeSubnet = \"10.213.0.1/16\"\n",
    ) {
        Ok(_) => panic!("a subnet with host bits must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bridgeSubnet") && e.contains("host bits"), "{e}");
}

#[test]
fn seccomp_denies_user_namespaces_unless_insecure() {
    let d = Daemon::start_with_config(
        Topology::AllInOne,
        "insecure-entitlements = [\"security.insecure\"]",
    )
    .expect("daemon");
    let c = BuildContext::new(
        "FROM busybox\n\
         RUN grep Seccomp: /proc/self/status > /mode; unshare -U true 2> /err; echo $? > /rc\n\
         RUN --security=insecure sh -c 'grep Seccomp: /proc/self/status > /insecure-mode; unshare -U true; echo $? > /insecure-rc'\n",
    )
    .expect("context");
    d.build(
        c.path(),
        &args(&[
            "--allow",
            "security.insecure",
            "--output",
            "type=local,dest=out",
        ]),
    )
    .expect("build");
    let out = c.path().join("out");
    assert_eq!(read(&out, "mode"), "Seccomp:\t2\n", "a filter is on");
    assert_eq!(read(&out, "rc"), "1\n");
    assert!(
        read(&out, "err").contains("Operation not permitted"),
        "{}",
        read(&out, "err")
    );
    assert_eq!(read(&out, "insecure-mode"), "Seccomp:\t0\n");
    assert_eq!(
        read(&out, "insecure-rc"),
        "0\n",
        "insecure lifts the filter"
    );
    still_serves(&d);
}

/// The pid of the kilnd serving `d` (its state dir is in the command line).
fn kilnd_pid(d: &Daemon) -> u32 {
    let dir = d.dir.path().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("kilnd") && c.contains(&dir)
                })
                .unwrap_or(false)
        })
        .expect("kilnd pid")
}

/// The step address whose lease `pid` holds (its flock in /proc/locks).
fn lease_held_by(pid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let inodes: Vec<u64> = locks
        .lines()
        .filter(|l| l.contains("FLOCK"))
        .filter(|l| l.split_whitespace().nth(4) == Some(&pid.to_string()))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(5)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    std::fs::read_dir(LEASES)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
        .find(|e| e.metadata().is_ok_and(|m| inodes.contains(&m.ino())))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

#[test]
fn a_killed_kilnds_step_networks_are_swept_at_the_next_start() {
    let d = Daemon::start_with_config(Topology::AllInOne, BRIDGE).expect("daemon");
    let pid = kilnd_pid(&d);
    let c = BuildContext::new("FROM busybox\nRUN sleep 3\n").expect("context");
    let mut build = spawn_build(&d, &c);
    let ip = running_step_ip(pid, &mut build);
    let veth = Path::new("/sys/class/net").join(format!(
        "kv{:08x}",
        u32::from(ip.parse::<Ipv4Addr>().expect("ip"))
    ));
    // the lease is taken first, the veth made next
    let t = Instant::now();
    while !veth.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the running step has its veth"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // kill -9: nothing of kilnd's runs any more
    sh(&format!("kill -9 {pid}"));
    let _ = build.wait();
    // the next kilnd to start removes what nobody holds any more
    let d2 = Daemon::start_with_config(Topology::AllInOne, BRIDGE).expect("daemon");
    wait_until_removed(&ip);
    drop(d);
    still_serves(&d2);
}

#[test]
fn bridge_mode_on_containerd_joins_the_step_network() {
    let Some(b) = Backend::containerd() else {
        return;
    };
    let loopback = Listener::on("0.0.0.0:0");
    let d = Daemon::start_on(Topology::AllInOne, &b, BRIDGE).expect("daemon");
    let c = BuildContext::new(&format!(
        "FROM busybox\n\
         RUN ip -4 -o addr show dev eth0 > /addr; \
         if echo x | nc -w 2 10.213.0.1 {}; then echo reached > /host; else echo blocked > /host; fi; \
         grep Seccomp: /proc/self/status > /mode\n",
        loopback.port
    ))
    .expect("context");
    d.build(c.path(), &args(&["--output", "type=local,dest=out"]))
        .expect("build");
    let out = c.path().join("out");
    assert!(
        read(&out, "addr").contains("inet 10.213."),
        "{}",
        read(&out, "addr")
    );
    assert_eq!(read(&out, "host"), "blocked\n");
    assert_eq!(loopback.accepted(), 0);
    assert_eq!(read(&out, "mode"), "Seccomp:\t2\n");
    still_serves(&d);
}

/// `kiln build --no-cache` of `c` on `d`, in the background.
fn spawn_build(d: &Daemon, c: &BuildContext) -> std::process::Child {
    Command::new(kiln_integration_tests::bin_dir().join("kiln"))
        .args(["--addr", &d.addr, "build", "--no-cache"])
        .args(dockerfile_args())
        .current_dir(c.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln build")
}

/// The address of the step network kilnd `pid` holds, once `build` has a step running.
fn running_step_ip(pid: u32, build: &mut std::process::Child) -> String {
    let t = Instant::now();
    loop {
        if let Some(ip) = lease_held_by(pid) {
            return ip;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = build.kill();
            let _ = build.wait();
            panic!("no step network");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cancelled_steps_network_is_removed_and_a_failed_steps_kept() {
    let d = Daemon::start_with_config(Topology::AllInOne, BRIDGE).expect("daemon");
    let pid = kilnd_pid(&d);
    // a step that fails: its container exited, its network goes to the next step
    let c = BuildContext::new("FROM busybox\nRUN sleep 1; exit 3\n").expect("context");
    let mut build = spawn_build(&d, &c);
    let ip = running_step_ip(pid, &mut build);
    assert!(!build.wait().expect("wait").success(), "the step fails");
    assert_eq!(lease_held_by(pid).as_deref(), Some(ip.as_str()));
    // a build whose client goes away mid-step: its container may still be going
    // away, so its network is removed (the next step takes the kept one)
    let c = BuildContext::new("FROM busybox\nRUN sleep 61\n").expect("context");
    let mut build = spawn_build(&d, &c);
    // the step runs once its process is in a network namespace of the bridge
    let t = Instant::now();
    let step_ip = loop {
        let running = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .find(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x0061\x00")
            });
        if let Some(p) = running {
            let out = sh(&format!(
                "nsenter -t {} -n ip -4 -o addr show dev eth0",
                p.file_name().to_string_lossy()
            ));
            if let Some(a) = out
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.split('/').next())
            {
                break a.to_string();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the step runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(step_ip, ip, "the kept network went to the next step");
    build.kill().expect("cancel the build");
    let _ = build.wait();
    wait_until_removed(&step_ip);
    still_serves(&d);
}
