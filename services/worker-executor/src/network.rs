//! Step networking. The worker's network mode (kilnd.toml `[worker] networkMode`) decides
//! what an exec step whose LLB network mode is unset gets:
//!
//! - `host`: the host's network namespace;
//! - `none`: a namespace of its own with only loopback;
//! - `bridge`: a namespace of its own with a veth pair on kiln's bridge (default `kiln0`,
//!   `10.213.0.0/16`), NAT to the outside, and nothing of the host reachable: iptables drops
//!   what steps send to any host address (INPUT from the bridge) except replies, and what a
//!   DNAT rule would send to a host service; bridge ports are isolated from each other;
//! - `auto` (the default): `bridge` when it can be set up, else `host` with a warning.
//!
//! `RUN --network=host` (entitlement `network.host`) and `--network=none` keep their meaning
//! in every mode.
//!
//! Bridge mode shares the bridge, the iptables rules and the address pool with every kilnd
//! on the host: an address is leased by holding a `flock` on `/run/kiln-net/<bridge>/<ip>`,
//! the step's namespace is bind-mounted at `<ip>.ns` and its host-side veth is `kv<ip in
//! hex>`, so leftovers of a killed kilnd are found by name and removed by whoever takes the
//! lock next (a worker sweeps every unlocked lease when it starts).

use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The worker setting: what steps without an LLB network mode get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// `bridge` when it can be set up, else `host`.
    #[default]
    Auto,
    Host,
    Bridge,
    None,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "" => Ok(NetworkMode::Auto),
            "host" => Ok(NetworkMode::Host),
            "bridge" => Ok(NetworkMode::Bridge),
            "none" => Ok(NetworkMode::None),
            _ => Err(format!(
                "unknown network mode {s:?} (auto, host, bridge, none)"
            )),
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::Auto => "auto",
            NetworkMode::Host => "host",
            NetworkMode::Bridge => "bridge",
            NetworkMode::None => "none",
        })
    }
}

/// An IPv4 subnet, `10.213.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The gateway (the bridge's address): the subnet's first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// How many step addresses there are (all hosts but the gateway).
    fn steps(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 3
    }

    /// The `i`th step address (`i < steps()`).
    fn step(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 2 + i)
    }

    fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }
}

impl Default for Subnet {
    fn default() -> Self {
        Subnet {
            network: Ipv4Addr::new(10, 213, 0, 0),
            prefix: 16,
        }
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = |why: &str| format!("bridge subnet {s:?}: {why} (e.g. 10.213.0.0/16)");
        let (a, p) = s.split_once('/').ok_or_else(|| bad("no /prefix"))?;
        let network: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("bad prefix length"))?;
        if !(8..=28).contains(&prefix) {
            return Err(bad("the prefix length must be 8 to 28"));
        }
        if u32::from(network) & !(u32::MAX << (32 - prefix)) != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(Subnet { network, prefix })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The worker's network settings.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    /// the bridge's name (default `kiln0`)
    pub bridge: String,
    pub subnet: Subnet,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Auto,
            bridge: "kiln0".into(),
            subnet: Subnet::default(),
        }
    }
}

/// What the worker's steps get, decided once at start.
#[derive(Debug, Clone)]
pub enum Networking {
    Host,
    None,
    Bridge(Arc<Bridge>),
}

impl Networking {
    /// Resolves `config` (setting up the bridge in `bridge` and `auto` mode). `auto`
    /// falls back to `host` with a warning saying why; `bridge` fails instead. A
    /// rootless worker cannot make the bridge (it needs root on the host): `auto` is
    /// the daemon's own network namespace there, as rootlesskit gave it.
    pub fn start(config: &NetworkConfig, rootless: bool) -> Result<Networking> {
        let n = match config.mode {
            NetworkMode::Bridge if rootless => {
                return Err(Error::Rootless(
                    "bridge network mode needs root on the host; a rootless worker's steps \
                     use kilnd's own network namespace (mode host: what rootlesskit --net \
                     gave it) or none"
                        .into(),
                ));
            }
            NetworkMode::Auto if rootless => Networking::Host,
            NetworkMode::Host => Networking::Host,
            NetworkMode::None => Networking::None,
            NetworkMode::Bridge => {
                Networking::Bridge(Arc::new(Bridge::setup(config).map_err(|e| {
                    Error::BridgeMode {
                        source: Box::new(e),
                    }
                })?))
            }
            NetworkMode::Auto => match Bridge::setup(config) {
                Ok(b) => Networking::Bridge(Arc::new(b)),
                Err(e) => {
                    tracing::warn!(
                        error = %kiln_proto::status::Chain(&e),
                        "network mode auto: bridge unavailable; steps use the host's network"
                    );
                    Networking::Host
                }
            },
        };
        match &n {
            Networking::Bridge(b) => tracing::info!(
                "network mode bridge: steps get their own network on {} ({}, gateway {})",
                b.name,
                b.subnet,
                b.subnet.gateway()
            ),
            Networking::Host if rootless => tracing::info!(
                "network mode host, rootless: steps share kilnd's network namespace (what rootlesskit --net gave it)"
            ),
            Networking::Host => tracing::info!("network mode host: steps share the host's network"),
            Networking::None => tracing::info!("network mode none: steps get loopback only"),
        }
        Ok(n)
    }
}

/// A bridge name kiln accepts: an interface name (at most 15 bytes) that also fits its
/// iptables chain names.
pub fn check_bridge_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::BridgeName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Where leases and namespace mounts live (host-wide: kilnds share the bridge).
const STATE_DIR: &str = "/run/kiln-net";

/// kiln's bridge, set up and ready to attach steps to.
#[derive(Debug)]
pub struct Bridge {
    pub name: String,
    pub subnet: Subnet,
    /// `/run/kiln-net/<bridge>`: leases and namespace mounts
    dir: PathBuf,
    /// where the next lease search starts
    cursor: AtomicU32,
    /// Step networks whose step ended, ready for the next (see [`StepNetwork::reuse`]).
    idle: std::sync::Mutex<Vec<Lease>>,
}

/// Step networks kept for reuse, at most.
const IDLE_MAX: usize = 32;

/// Runs `ip`, `iptables` or another tool; an error names the command and what it said.
fn tool(program: &'static str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Error::NetworkToolStart { program, source })?;
    if !out.status.success() {
        return Err(Error::NetworkTool {
            command: format!("{program} {}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables [-t table] -C rule` or else `-A`/`-I` it.
fn ensure_rule(table: &str, chain: &str, rule: &[&str], insert: bool) -> Result<()> {
    let with = |op: &str| {
        let mut v = vec!["-w", "-t", table, op, chain];
        if op == "-I" {
            v.push("1");
        }
        v.extend_from_slice(rule);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let check = with("-C");
    let check: Vec<&str> = check.iter().map(String::as_str).collect();
    if tool("iptables", &check).is_ok() {
        return Ok(());
    }
    let add = with(if insert { "-I" } else { "-A" });
    let add: Vec<&str> = add.iter().map(String::as_str).collect();
    tool("iptables", &add).map(|_| ())
}

/// Makes `chain` hold exactly `rules` (flushed and refilled only when it differs).
fn ensure_chain(table: &str, chain: &str, rules: &[Vec<String>]) -> Result<()> {
    let _ = tool("iptables", &["-w", "-t", table, "-N", chain]);
    let listed = tool("iptables", &["-w", "-t", table, "-S", chain])?;
    let want: Vec<String> = rules
        .iter()
        .map(|r| format!("-A {chain} {}", r.join(" ")))
        .collect();
    let have: Vec<&str> = listed.lines().filter(|l| l.starts_with("-A ")).collect();
    if have.len() == want.len() && have.iter().zip(&want).all(|(h, w)| *h == w.as_str()) {
        return Ok(());
    }
    tool("iptables", &["-w", "-t", table, "-F", chain])?;
    for r in rules {
        let mut args = vec!["-w", "-t", table, "-A", chain];
        args.extend(r.iter().map(String::as_str));
        tool("iptables", &args)?;
    }
    Ok(())
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// A whole-file exclusive lock (released when dropped); `None` when another
/// holds it and `wait` is false.
fn lock(path: &Path, wait: bool) -> std::io::Result<Option<Flock<std::fs::File>>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(f, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

impl Bridge {
    /// Creates (or finds) the bridge with the subnet's gateway address, enables
    /// forwarding and puts kiln's iptables rules in place; then sweeps leases a killed
    /// kilnd left. The error says what is missing.
    pub fn setup(config: &NetworkConfig) -> Result<Bridge> {
        let name = &config.bridge;
        check_bridge_name(name)?;
        let subnet = config.subnet;
        for t in ["ip", "iptables"] {
            if Command::new(t)
                .arg("-V")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_err()
            {
                return Err(Error::NetworkToolMissing {
                    tool: t,
                    package: if t == "ip" { "iproute2" } else { "iptables" },
                });
            }
        }
        let dir = Path::new(STATE_DIR).join(name);
        std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        // one kilnd at a time sets up the shared bridge and rules
        let lock_path = Path::new(STATE_DIR).join(format!("{name}.lock"));
        let _setup = lock(&lock_path, true).map_err(Error::io("lock", &lock_path))?;

        let gw = format!("{}/{}", subnet.gateway(), subnet.prefix);
        if !Path::new("/sys/class/net").join(name).exists() {
            tool("ip", &["link", "add", name, "type", "bridge"])?;
        }
        let addrs = tool("ip", &["-4", "-o", "addr", "show", "dev", name])?;
        let have: Vec<&str> = addrs
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.position(|x| x == "inet").and_then(|_| w.next())
            })
            .collect();
        if !have.contains(&gw.as_str()) {
            if let Some(other) = have.first() {
                return Err(Error::BridgeAddress {
                    bridge: name.clone(),
                    have: other.to_string(),
                    gateway: gw,
                    subnet: subnet.to_string(),
                });
            }
            tool("ip", &["addr", "add", &gw, "dev", name])?;
        }
        // no IPv6 on the bridge: steps get IPv4 only, and no link-local way to the host
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // a fixed MAC: a bridge that has none takes its ports' lowest, so it would change
        // as steps come and go, under the ARP caches of running steps
        let mac = bridge_mac(name);
        let have_mac =
            std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
        if have_mac.trim() != mac {
            tool("ip", &["link", "set", name, "address", &mac])?;
        }
        tool("ip", &["link", "set", name, "up"])?;
        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd)
            .map(|s| s.trim() != "1")
            .unwrap_or(true)
        {
            std::fs::write(fwd, "1").map_err(Error::io("enable IPv4 forwarding in", fwd))?;
            tracing::info!("enabled IPv4 forwarding for bridge {name}");
        }

        let sub = subnet.to_string();
        let input = format!("KILN-IN-{name}");
        let forward = format!("KILN-FWD-{name}");
        // INPUT from the bridge: only replies to what the host started
        ensure_chain(
            "filter",
            &input,
            &[
                words(&format!(
                    "-i {name} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                )),
                words(&format!("-i {name} -j DROP")),
            ],
        )?;
        // FORWARD: out of the bridge (never to a host service a DNAT rule publishes, never
        // to another step), and the replies back
        ensure_chain(
            "filter",
            &forward,
            &[
                words(&format!("-i {name} -m conntrack --ctstate DNAT -j DROP")),
                words(&format!("-i {name} -o {name} -j DROP")),
                words(&format!("-i {name} -j ACCEPT")),
                words(&format!(
                    "-o {name} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                )),
                words(&format!("-o {name} -j DROP")),
            ],
        )?;
        ensure_rule("filter", "INPUT", &["-j", &input], true)?;
        ensure_rule("filter", "FORWARD", &["-j", &forward], true)?;
        ensure_rule(
            "nat",
            "POSTROUTING",
            &["-s", &sub, "!", "-o", name, "-j", "MASQUERADE"],
            false,
        )?;
        let b = Bridge {
            name: name.clone(),
            subnet,
            dir,
            cursor: AtomicU32::new(std::process::id().wrapping_mul(2_654_435_761)),
            idle: Default::default(),
        };
        b.sweep();
        Ok(b)
    }

    /// Removes what killed workers left: each lease nobody holds.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            if let Ok(Some(lease)) = self.try_lease(ip) {
                drop(lease);
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(bridge = %self.name, "removed {n} step networks left by an earlier run");
        }
    }

    fn veth(ip: Ipv4Addr) -> String {
        format!("kv{:08x}", u32::from(ip))
    }

    /// Takes the lease of `ip` when nobody holds it, removing what an earlier holder left.
    fn try_lease(&self, ip: Ipv4Addr) -> std::io::Result<Option<Lease>> {
        let path = self.dir.join(ip.to_string());
        loop {
            let Some(held) = lock(&path, false)? else {
                return Ok(None);
            };
            // the holder before us may have removed the file while we waited for it
            use std::os::unix::fs::MetadataExt;
            let same = match (held.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let lease = Lease {
                _lock: held,
                path: path.clone(),
                ns: self.dir.join(format!("{ip}.ns")),
                veth: Self::veth(ip),
                ip,
            };
            lease.clean();
            return Ok(Some(lease));
        }
    }

    /// A network namespace on the bridge for one step: one an ended step left (see
    /// [`StepNetwork::reuse`]), else a fresh address, a veth pair, loopback and the
    /// default route. Blocking (a few ms); dropping it tears it down.
    pub fn attach(self: &Arc<Self>) -> Result<StepNetwork> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(lease) = idle else { break };
            // still whole: its namespace mounted and its veth on the bridge
            if lease.ns.exists() && Path::new("/sys/class/net").join(&lease.veth).exists() {
                return Ok(self.step_network(lease));
            }
        }
        let n = self.subnet.steps();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut lease = None;
        for k in 0..n {
            let ip = self.subnet.step((start.wrapping_add(k)) % n);
            match self.try_lease(ip) {
                Ok(Some(l)) => {
                    self.cursor
                        .store(start.wrapping_add(k + 1), Ordering::Relaxed);
                    lease = Some(l);
                    break;
                }
                Ok(None) => continue,
                Err(e) => return Err(Error::io("lease an address in", &self.dir)(e)),
            }
        }
        let lease = lease.ok_or_else(|| Error::NoStepAddress {
            subnet: self.subnet.to_string(),
            bridge: self.name.clone(),
        })?;
        // on failure the lease's drop removes what was made
        self.configure(&lease).map_err(|e| Error::StepNetwork {
            ip: lease.ip,
            source: Box::new(e),
        })?;
        Ok(self.step_network(lease))
    }

    fn step_network(self: &Arc<Self>, lease: Lease) -> StepNetwork {
        StepNetwork {
            lease: Some(lease),
            reuse: Some((self.clone(), false)),
        }
    }

    fn configure(&self, lease: &Lease) -> Result<()> {
        let ns = &lease.ns;
        let t0 = std::time::Instant::now();
        std::fs::File::create(ns).map_err(Error::io("create", ns))?;
        // a new namespace, pinned by a bind mount; its loopback up
        in_thread(|| {
            // this thread's network namespace only
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| Error::NetworkSys {
                op: "unshare".into(),
                source,
            })?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                ns,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|source| Error::Mount {
                target: ns.clone(),
                source,
            })?;
            ifconfig::up("lo")
        })?;
        // the veth pair: `eth0` inside, `kv…` on the bridge, isolated from other steps
        let v = &lease.veth;
        let batch = format!(
            "link add {v} type veth peer name eth0 netns {}\nlink set {v} master {}\nlink set {v} type bridge_slave isolated on\nlink set {v} up\n",
            ns.display(),
            self.name
        );
        let t_ns = t0.elapsed();
        ip_batch(&batch)?;
        let t_veth = t0.elapsed();
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{v}/disable_ipv6"), "1");
        let (ip, mask, gw) = (lease.ip, self.subnet.netmask(), self.subnet.gateway());
        in_thread(|| {
            let f = std::fs::File::open(ns).map_err(Error::io("open", ns))?;
            // this thread's network namespace only
            nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).map_err(|source| {
                Error::NetworkSys {
                    op: format!("enter {}", ns.display()),
                    source,
                }
            })?;
            // IPv4 only (and no link-local way to the host)
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1");
            ifconfig::address("eth0", ip, mask)?;
            ifconfig::up("eth0")?;
            ifconfig::default_route(gw)
        })?;
        tracing::debug!(
            target: "kiln_timing",
            "step network {ip}: namespace {} us, veth {} us, addresses {} us",
            t_ns.as_micros(),
            (t_veth - t_ns).as_micros(),
            (t0.elapsed() - t_veth).as_micros()
        );
        Ok(())
    }
}

/// The bridge's MAC: locally administered, from its name.
fn bridge_mac(name: &str) -> String {
    // FNV-1a: the same on every build of kiln
    let h = name.bytes().fold(0x811c_9dc5u32, |h, c| {
        (h ^ u32::from(c)).wrapping_mul(0x0100_0193)
    });
    let b = h.to_be_bytes();
    format!("02:6b:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// Runs `f` on a thread of its own (namespace changes stay there) and waits for it.
fn in_thread<F>(f: F) -> Result<()>
where
    F: FnOnce() -> Result<()> + Send,
{
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or(Err(Error::NetworkThreadPanicked))
    })
}

fn ip_batch(batch: &str) -> Result<()> {
    let start = |source| Error::NetworkToolStart {
        program: "ip",
        source,
    };
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(start)?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(batch.as_bytes()).map_err(start)?;
    }
    let out = child.wait_with_output().map_err(start)?;
    if !out.status.success() {
        return Err(Error::NetworkTool {
            command: format!("ip -batch ({})", batch.trim().replace('\n', "; ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// An address leased to one step (held while the lock is).
#[derive(Debug)]
struct Lease {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
    ns: PathBuf,
    veth: String,
    ip: Ipv4Addr,
}

impl Lease {
    /// Removes the namespace mount and veth of this address, when there are any.
    fn clean(&self) {
        if Path::new("/sys/class/net").join(&self.veth).exists()
            && let Err(e) = tool("ip", &["link", "del", &self.veth])
        {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "remove step network {}", self.ip);
        }
        if self.ns.exists() {
            let _ = nix::mount::umount2(&self.ns, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&self.ns);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.clean();
        // removed while still locked: the next taker checks it locked the file it opened
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One step's network namespace on the bridge. Dropping it removes the namespace and the
/// veth pair and frees the address, unless [`StepNetwork::reuse`] was called: then the
/// next step gets it as it is (as BuildKit's pool of CNI namespaces does), which saves
/// making a namespace and a veth pair and removing them (removals wait for the kernel and
/// for each other, which slows concurrent builds most).
/// On a tokio runtime the teardown (removing a veth waits for the kernel, ~10 ms) runs on
/// a blocking thread, off the step's path.
#[derive(Debug)]
pub struct StepNetwork {
    lease: Option<Lease>,
    /// The bridge it goes back to, and whether it may ([`StepNetwork::reuse`]).
    reuse: Option<(Arc<Bridge>, bool)>,
}

impl StepNetwork {
    /// The namespace's path, for the runtime spec.
    pub fn path(&self) -> &Path {
        self.lease
            .as_ref()
            .map(|l| l.ns.as_path())
            .unwrap_or(Path::new(""))
    }

    /// Lets the next step have this namespace once this is dropped. Only for a step
    /// whose container has exited and been removed (nothing of it is left in the
    /// namespace) and that could not change the namespace: one without
    /// `CAP_NET_ADMIN`, i.e. not `security.insecure`.
    pub fn reuse(&mut self) {
        if let Some((_, reuse)) = &mut self.reuse {
            *reuse = true;
        }
    }
}

impl Drop for StepNetwork {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let lease = match self.reuse.take() {
            Some((bridge, true)) => {
                let mut idle = bridge.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < IDLE_MAX {
                    idle.push(lease);
                    return;
                }
                lease
            }
            _ => lease,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(move || drop(lease));
            }
            Err(_) => drop(lease),
        }
    }
}

/// `/etc/resolv.conf` for a step in its own network: the host's, without loopback
/// nameservers (a resolver on the host's 127.0.0.53 is not reachable from there); public
/// DNS (8.8.8.8, 8.8.4.4) when none is left.
pub fn bridge_resolv_conf(host: &str) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.lines() {
        let mut w = line.split_whitespace();
        if w.next() == Some("nameserver") {
            let addr = w.next().unwrap_or("");
            let ip = addr.split('%').next().unwrap_or("");
            if ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

/// The few interface settings a step's namespace needs, with the classic ioctls (no netlink).
mod ifconfig {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, OwnedFd};

    use crate::error::{Error, Result};

    fn socket() -> Result<OwnedFd> {
        nix::sys::socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|source| Error::NetworkSys {
            op: "open an interface socket".into(),
            source,
        })
    }

    fn ifreq(name: &str) -> libc::ifreq {
        #[allow(
            unsafe_code,
            reason = "std::mem::zeroed of a C struct; nix has no ifreq"
        )]
        // SAFETY: ifreq is plain old data; all zeroes is valid
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        r
    }

    fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        #[allow(
            unsafe_code,
            reason = "a sockaddr_in read as the sockaddr the SIOCSIF* ioctls take"
        )]
        // SAFETY: sockaddr_in and sockaddr have the same size; a sockaddr is its bytes
        unsafe {
            std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
        }
    }

    fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
        #[allow(
            unsafe_code,
            reason = "the SIOC* interface ioctls have no safe wrapper in nix"
        )]
        // SAFETY: `arg` is the struct `req` reads or writes, valid for the call
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(Error::NetworkSys {
                op: what.to_string(),
                source: nix::Error::last(),
            });
        }
        Ok(())
    }

    pub fn up(name: &str) -> Result<()> {
        let s = socket()?;
        let mut r = ifreq(name);
        ioctl(
            &s,
            libc::SIOCGIFFLAGS,
            &mut r,
            &format!("get flags of {name}"),
        )?;
        #[allow(unsafe_code, reason = "reads a union member of libc's ifreq")]
        // SAFETY: SIOCGIFFLAGS filled the flags member
        unsafe {
            r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        }
        ioctl(&s, libc::SIOCSIFFLAGS, &mut r, &format!("set {name} up"))
    }

    pub fn address(name: &str, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<()> {
        let s = socket()?;
        let mut r = ifreq(name);
        r.ifr_ifru.ifru_addr = sockaddr(ip);
        ioctl(
            &s,
            libc::SIOCSIFADDR,
            &mut r,
            &format!("set address {ip} on {name}"),
        )?;
        let mut r = ifreq(name);
        r.ifr_ifru.ifru_netmask = sockaddr(mask);
        ioctl(
            &s,
            libc::SIOCSIFNETMASK,
            &mut r,
            &format!("set netmask {mask} on {name}"),
        )
    }

    /// The kernel's `struct rtentry` (linux/route.h).
    #[repr(C)]
    struct RtEntry {
        rt_pad1: libc::c_ulong,
        rt_dst: libc::sockaddr,
        rt_gateway: libc::sockaddr,
        rt_genmask: libc::sockaddr,
        rt_flags: libc::c_ushort,
        rt_pad2: libc::c_short,
        rt_pad3: libc::c_ulong,
        rt_pad4: *mut libc::c_void,
        rt_metric: libc::c_short,
        rt_dev: *mut libc::c_char,
        rt_mtu: libc::c_ulong,
        rt_window: libc::c_ulong,
        rt_irtt: libc::c_ushort,
    }

    pub fn default_route(gw: Ipv4Addr) -> Result<()> {
        let s = socket()?;
        let any = Ipv4Addr::UNSPECIFIED;
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(any),
            rt_gateway: sockaddr(gw),
            rt_genmask: sockaddr(any),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        ioctl(
            &s,
            libc::SIOCADDRT,
            &mut rt,
            &format!("add the default route via {gw}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_name_their_addresses() {
        let s: Subnet = "10.213.0.0/16".parse().expect("subnet");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.step(0), Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(s.step(s.steps() - 1), Ipv4Addr::new(10, 213, 255, 254));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        for bad in [
            "10.213.0.0",
            "10.213.0.1/16",
            "10.213.0.0/30",
            "x/16",
            "10.0.0.0/4",
        ] {
            let e = bad.parse::<Subnet>().expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!("none".parse::<NetworkMode>(), Ok(NetworkMode::None));
        assert!(
            "cni"
                .parse::<NetworkMode>()
                .expect_err("cni")
                .contains("auto, host, bridge, none")
        );
    }

    #[test]
    fn bridge_resolv_conf_drops_loopback_nameservers() {
        let r = bridge_resolv_conf("nameserver 127.0.0.53\noptions edns0\nsearch example.com\n");
        assert_eq!(
            r,
            "options edns0\nsearch example.com\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        let r = bridge_resolv_conf("nameserver ::1\nnameserver 10.1.2.3\n");
        assert_eq!(r, "nameserver 10.1.2.3\n");
    }
}
