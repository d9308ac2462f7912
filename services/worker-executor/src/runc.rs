//! The executor: an OCI runtime bundle (config.json from `oci-spec`) run with the `runc`
//! binary, stdout/stderr streamed line by line. The containerd executor runs the same
//! spec. `run_stdio` runs an interactive process with its stdin, stdout and stderr
//! streamed and signals delivered: `Worker.Exec`, for frontend images and LLBBridge
//! containers, always with runc directly (on the containerd executor too); it prepares
//! mounts as an `ExecOp` does and keeps nothing it wrote. `Worker.NewContainer` keeps
//! such mounts for an LLBBridge container, whose processes are runc containers over the
//! same rootfs, until `ReleaseContainer`.

use crate::Event;
use crate::error::{Error, Result};
use crate::users::Identity;
use bytes::Bytes;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const DEFAULT_HOSTNAME: &str = "buildkitsandbox";
pub const HOSTS: &str =
    "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// An extra mount inside the container.
#[derive(Debug, Clone)]
pub enum ExtraMount {
    Bind {
        dest: String,
        source: PathBuf,
        readonly: bool,
    },
    Tmpfs {
        dest: String,
        size: Option<i64>,
    },
}

impl ExtraMount {
    pub fn dest(&self) -> &str {
        match self {
            ExtraMount::Bind { dest, .. } | ExtraMount::Tmpfs { dest, .. } => dest,
        }
    }
}

/// Which network namespace a container gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's (kilnd's) own.
    #[default]
    Host,
    /// A fresh one with only loopback.
    Loopback,
    /// The namespace bind-mounted at this path (a step's on kiln's bridge).
    Join(PathBuf),
}

/// What to run and how.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub identity: Identity,
    pub hostname: String,
    /// The network namespace the process runs in.
    pub network: Network,
    /// `security.insecure`: every capability, no masked or read-only paths, writable /sys.
    pub privileged: bool,
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    pub mounts: Vec<ExtraMount>,
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
    /// A terminal: runc, run in the foreground, puts the process on a pty and
    /// copies between it and runc's own stdio (stderr then comes with stdout).
    pub terminal: bool,
    /// The worker is rootless ([`crate::rootless`]): no `/sys`, and bind mounts keep
    /// the flags the kernel locks on their sources.
    pub rootless: bool,
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|source| Error::Spec { source })
}

/// Every Linux capability with its number, for privileged (`security.insecure`) runs.
pub(crate) const ALL_CAPS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

/// The capability bounding set of this process (what a privileged step may get).
fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// The mount destinations every container gets (they need stubs in a bare rootfs).
pub const SYSTEM_MOUNTS: &[&str] = &["/proc", "/dev", "/sys", "/etc/resolv.conf", "/etc/hosts"];

/// Builds the OCI runtime config for `p`.
pub fn spec(p: &ProcessSpec) -> Result<Spec> {
    let caps = capabilities(p.privileged);
    let mut spec = Spec::default();
    spec.set_process(Some(process(p, caps.clone())?));
    spec.set_root(Some(
        RootBuilder::default()
            .path(&p.rootfs)
            .readonly(p.readonly_rootfs)
            .build()
            .map_err(spec_err)?,
    ));
    spec.set_hostname(Some(if p.hostname.is_empty() {
        DEFAULT_HOSTNAME.to_string()
    } else {
        p.hostname.clone()
    }));
    spec.set_mounts(Some(mounts(p)?));
    spec.set_linux(Some(linux(p, &caps)?));
    Ok(spec)
}

fn spec_err(source: oci_spec::OciSpecError) -> Error {
    Error::Spec { source }
}

/// Docker's default capabilities; with `privileged`, all the process may hold.
fn capabilities(privileged: bool) -> oci_spec::runtime::Capabilities {
    use Capability::*;
    let default_caps = [
        Chown,
        DacOverride,
        Fsetid,
        Fowner,
        Mknod,
        NetRaw,
        Setgid,
        Setuid,
        Setfcap,
        Setpcap,
        NetBindService,
        SysChroot,
        Kill,
        AuditWrite,
    ];
    if privileged {
        let bounding = bounding_set();
        ALL_CAPS
            .iter()
            .filter(|(_, bit)| bounding & (1u64 << bit) != 0)
            .filter_map(|(c, _)| c.trim_start_matches("CAP_").parse::<Capability>().ok())
            .collect()
    } else {
        default_caps.into_iter().collect()
    }
}

/// The spec's process: `p`'s args, environment (PATH by default), cwd and user.
fn process(
    p: &ProcessSpec,
    caps: oci_spec::runtime::Capabilities,
) -> Result<oci_spec::runtime::Process> {
    let se = spec_err;
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let cwd = if p.cwd.is_empty() {
        "/".to_string()
    } else {
        p.cwd.clone()
    };
    let mut user = UserBuilder::default()
        .uid(p.identity.uid)
        .gid(p.identity.gid);
    // the primary gid is one of the additional gids too (BuildKit's
    // ensureAdditionalGids)
    let mut gids = p.identity.additional_gids.clone();
    if !gids.contains(&p.identity.gid) {
        gids.insert(0, p.identity.gid);
    }
    user = user.additional_gids(gids);
    ProcessBuilder::default()
        .terminal(p.terminal)
        .args(p.args.clone())
        .env(env)
        .cwd(cwd)
        .user(user.build().map_err(se)?)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()
                .map_err(se)?,
        )
        .no_new_privileges(!p.privileged)
        .build()
        .map_err(se)
}

/// The system mounts every container gets, then `p`'s own.
fn mounts(p: &ProcessSpec) -> Result<Vec<oci_spec::runtime::Mount>> {
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            if p.privileged {
                &["nosuid", "noexec", "nodev", "rw"]
            } else {
                &["nosuid", "noexec", "nodev", "ro"]
            },
        )?,
        mount(
            "/etc/resolv.conf",
            "bind",
            &p.resolv_conf.to_string_lossy(),
            &["rbind", "rw"],
        )?,
        mount(
            "/etc/hosts",
            "bind",
            &p.hosts.to_string_lossy(),
            &["rbind", "rw"],
        )?,
    ];
    for m in &p.mounts {
        mounts.push(match m {
            ExtraMount::Bind {
                dest,
                source,
                readonly,
            } => mount(
                dest,
                "bind",
                &source.to_string_lossy(),
                &["rbind", if *readonly { "ro" } else { "rw" }],
            )?,
            ExtraMount::Tmpfs { dest, size } => {
                let size = size.filter(|s| *s > 0).map(|s| format!("size={s}"));
                let mut opts = vec!["nosuid", "nodev", "mode=1777"];
                if let Some(s) = &size {
                    opts.push(s);
                }
                mount(dest, "tmpfs", "tmpfs", &opts)?
            }
        });
    }
    if p.rootless {
        rootless_mounts(&mut mounts);
    }
    Ok(mounts)
}

/// What a rootless worker's container gets instead: no `/sys` (sysfs cannot be mounted
/// while the daemon shares a network namespace it does not own), and each bind mount
/// with the flags the kernel locks on its source's mount.
fn rootless_mounts(mounts: &mut Vec<Mount>) {
    mounts.retain(|m| {
        !(m.destination() == Path::new("/sys") || m.destination().starts_with("/sys/"))
    });
    for m in mounts.iter_mut() {
        let Some(opts) = m.options().clone() else {
            continue;
        };
        if !opts.iter().any(|o| o == "bind" || o == "rbind") {
            continue;
        }
        let Some(source) = m.source().clone() else {
            continue;
        };
        let mut opts = opts;
        for f in crate::rootless::locked_mount_flags(&source) {
            if !opts.iter().any(|o| o == f) {
                opts.push(f.to_string());
            }
        }
        m.set_options(Some(opts));
    }
}

/// Namespaces (a network one unless the host's), masked and read-only paths and the
/// seccomp profile, all lifted for a privileged process but its namespaces.
fn linux(
    p: &ProcessSpec,
    caps: &oci_spec::runtime::Capabilities,
) -> Result<oci_spec::runtime::Linux> {
    let se = spec_err;
    let bounding_caps: Vec<Capability> = caps.iter().copied().collect();
    let ns_types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    let mut namespaces = ns_types
        .into_iter()
        .map(|t| LinuxNamespaceBuilder::default().typ(t).build().map_err(se))
        .collect::<Result<Vec<_>>>()?;
    match &p.network {
        Network::Host => {}
        Network::Loopback => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .build()
                .map_err(se)?,
        ),
        Network::Join(path) => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(path)
                .build()
                .map_err(se)?,
        ),
    }
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default().namespaces(namespaces);
    if p.privileged {
        // the builder starts from the default masked/readonly lists
        linux = linux.masked_paths(Vec::new()).readonly_paths(Vec::new());
    } else {
        if let Some(m) = defaults.masked_paths() {
            linux = linux.masked_paths(m.clone());
        }
        if let Some(r) = defaults.readonly_paths() {
            linux = linux.readonly_paths(r.clone());
        }
        // security.insecure lifts the syscall filter with the rest
        linux = linux.seccomp(crate::seccomp::default_profile(&bounding_caps)?);
    }
    linux.build().map_err(se)
}

/// Runs bundles with the runc binary.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    /// runc's `--root` state directory (private to this worker).
    pub state: PathBuf,
    /// A sealed in-memory copy of `binary` that containers are started from, shared by
    /// every container of this daemon (see [`sealed_copy`]); `None` runs `binary`.
    sealed: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// The seals runc looks for on its own executable (write, grow, shrink and the seals
/// themselves): with all four it knows it runs from an unchangeable copy.
const RUNC_SEALS: i32 =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// A sealed memfd holding the file at `path` (found on `PATH` when it has no `/`).
///
/// Before a container's first process runs, runc copies its own 9 MB executable into a
/// sealed memfd and re-executes that, so a process in the container cannot overwrite
/// the runc on the host through `/proc/PID/exe` (CVE-2019-5736). It skips the copy when
/// it already runs from a memfd sealed against writes. kilnd makes that copy once and
/// starts every container's runc from it: the protection is the same, and each step
/// saves the copy (its CPU, and 9 MB of memory charged while the step starts). A runc
/// replaced on disk is used from kilnd's next start.
pub fn sealed_copy(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let path = resolve_on_path(path)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"))?;
    let mut src = std::fs::File::open(&path)?;
    let fd = memfd_create(c"runc", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut dst = std::fs::File::from(fd);
    std::io::copy(&mut src, &mut dst)?;
    use std::os::unix::fs::PermissionsExt;
    dst.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    fcntl(
        &dst,
        FcntlArg::F_ADD_SEALS(SealFlag::from_bits_truncate(RUNC_SEALS)),
    )?;
    Ok(dst.into())
}

/// `path` itself when it has a directory part, else the first file of that name on
/// `PATH`.
fn resolve_on_path(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 {
        return Some(path.to_path_buf());
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|d| d.join(path))
        .find(|p| p.is_file())
}

/// Kills and deletes a container that is still around when its run is abandoned.
struct ContainerGuard<'a> {
    runc: &'a Runc,
    id: String,
    armed: bool,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for args in [
            vec!["kill", self.id.as_str(), "KILL"],
            vec!["delete", "-f", self.id.as_str()],
        ] {
            let _ = std::process::Command::new(&self.runc.binary)
                .arg("--root")
                .arg(&self.runc.state)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// The longest piece of a line a step's log carries at once: output without
/// newlines is sent in pieces, never gathered whole.
const LOG_LINE_MAX: usize = 64 * 1024;
/// Log bytes of one output stream of a step sent on; the rest is read and dropped
/// (the solver keeps 2 MiB of a step's log, so more would only cross the network).
const STREAM_LOG_FORWARD: usize = 2 << 20;

/// A step's output stream cut into log lines of at most [`LOG_LINE_MAX`] bytes, of
/// which the first [`STREAM_LOG_FORWARD`] bytes are handed out.
#[derive(Default)]
pub(crate) struct LogLines {
    line: Vec<u8>,
    sent: usize,
}

impl LogLines {
    /// Takes what it can of `buf`: how much it took, and a line to send, if one ended.
    pub(crate) fn take(&mut self, buf: &[u8]) -> (usize, Option<Vec<u8>>) {
        let (n, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let n = n.min(LOG_LINE_MAX - self.line.len());
        self.line.extend_from_slice(&buf[..n]);
        if complete || self.line.len() >= LOG_LINE_MAX {
            (n, self.emit())
        } else {
            (n, None)
        }
    }

    /// What is left once the stream has ended.
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        if self.line.is_empty() {
            return None;
        }
        self.emit()
    }

    fn emit(&mut self) -> Option<Vec<u8>> {
        let line = std::mem::take(&mut self.line);
        if self.sent >= STREAM_LOG_FORWARD {
            return None;
        }
        self.sent += line.len();
        Some(line)
    }
}

pub(crate) async fn pump(r: impl AsyncRead + Unpin, stream: i64, events: mpsc::Sender<Event>) {
    let mut r = BufReader::new(r);
    let mut lines = LogLines::default();
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        let (took, line) = lines.take(buf);
        r.consume(took);
        if let Some(data) = line {
            // Keep reading even when nobody listens, so the process never blocks on a pipe.
            let _ = events.send(Event::Log { stream, data }).await;
        }
    }
    if let Some(data) = lines.finish() {
        let _ = events.send(Event::Log { stream, data }).await;
    }
}

/// Sends what `r` yields as it comes, as output of `fd`.
async fn pump_chunks(mut r: impl AsyncRead + Unpin, fd: u32, output: mpsc::Sender<(u32, Bytes)>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // keep reading when nobody listens: the process never blocks on a pipe
                let _ = output.send((fd, Bytes::copy_from_slice(&buf[..n]))).await;
            }
        }
    }
}

impl Runc {
    /// The runc at `binary` with its state in `state`, started from a sealed copy of
    /// `binary` when one can be made ([`sealed_copy`]).
    pub fn new(binary: PathBuf, state: PathBuf) -> Runc {
        let sealed = match sealed_copy(&binary) {
            Ok(fd) => Some(std::sync::Arc::new(fd)),
            Err(e) => {
                tracing::debug!(runc = %binary.display(), error = %e, "runc runs from its file (no sealed copy)");
                None
            }
        };
        Runc {
            binary,
            state,
            sealed,
        }
    }

    /// What `runc run` executes: the sealed copy, by its descriptor (open in this
    /// process, and in the child until its exec), else the binary.
    fn program(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        match &self.sealed {
            Some(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            None => self.binary.clone(),
        }
    }

    /// Kills and deletes containers a previous run of this worker left in its private
    /// state dir (a crashed or killed kilnd never ran their guards).
    pub fn reap(&self) {
        if !self.state.exists() {
            return;
        }
        let Ok(out) = std::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.state)
            .args(["list", "-q"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
        else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
            if id.is_empty() {
                continue;
            }
            tracing::info!(id, "removing a container left by an earlier run");
            drop(ContainerGuard {
                runc: self,
                id: id.to_string(),
                armed: true,
            });
        }
    }

    /// `runc run --bundle B ID` with piped stdio, under a guard that kills and
    /// deletes the container unless disarmed.
    fn spawn(
        &self,
        id: &str,
        bundle: &Path,
        stdin: bool,
        terminal: Option<std::os::fd::OwnedFd>,
    ) -> Result<(tokio::process::Child, ContainerGuard<'_>)> {
        std::fs::create_dir_all(&self.state).map_err(Error::io("create", &self.state))?;
        let mut cmd = tokio::process::Command::new(self.program());
        cmd.arg0("runc")
            .arg("--root")
            .arg(&self.state)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .kill_on_drop(true);
        match terminal {
            // runc in the foreground with a terminal spec wants its own stdio to be
            // its controlling terminal: the slave end of our pty, in a new session
            Some(slave) => {
                let dup = |fd: &std::os::fd::OwnedFd| {
                    fd.try_clone()
                        .map(std::process::Stdio::from)
                        .map_err(Error::io("dup", "pty"))
                };
                cmd.stdin(dup(&slave)?).stdout(dup(&slave)?).stderr(slave);
                #[allow(
                    unsafe_code,
                    reason = "pre_exec is unsafe; TIOCSCTTY has no safe wrapper in nix"
                )]
                // SAFETY: only async-signal-safe calls between fork and exec
                unsafe {
                    cmd.pre_exec(|| {
                        nix::unistd::setsid()?;
                        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            None => {
                cmd.stdin(if stdin {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            }
        }
        let child = cmd.spawn().map_err(|source| Error::RuncStart {
            runc: self.binary.clone(),
            source,
        })?;
        Ok((
            child,
            ContainerGuard {
                runc: self,
                id: id.to_string(),
                armed: true,
            },
        ))
    }

    /// Waits for runc and returns the process's exit code (128+signal like a
    /// shell when it was killed).
    async fn wait(&self, child: &mut tokio::process::Child) -> Result<i32> {
        let status = child.wait().await.map_err(|source| Error::RuncStart {
            runc: self.binary.clone(),
            source,
        })?;
        Ok(status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }))
    }

    /// `runc run --bundle B ID`, streaming output as `Event::Log`; returns the exit code.
    pub async fn run(&self, id: &str, bundle: &Path, events: &mpsc::Sender<Event>) -> Result<i32> {
        let t0 = std::time::Instant::now();
        let (mut child, mut guard) = self.spawn(id, bundle, false, None)?;
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, 1, events.clone())));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, 2, events.clone())));
        let t_spawned = t0.elapsed();
        let code = self.wait(&mut child).await?;
        let t_exited = t0.elapsed();
        for h in [out, err].into_iter().flatten() {
            let _ = h.await;
        }
        tracing::debug!(
            target: "kiln_timing",
            "runc {id}: spawned {} us, exited {} us, output drained {} us",
            t_spawned.as_micros(),
            t_exited.as_micros(),
            t0.elapsed().as_micros()
        );
        guard.armed = false;
        drop(guard);
        Ok(code)
    }

    /// `runc run --bundle B ID` of an interactive process: its stdin fed from
    /// `stdio.stdin`, its output sent as it comes, signals delivered with
    /// `runc kill`. Returns the exit code.
    pub async fn run_stdio(&self, id: &str, bundle: &Path, stdio: Stdio) -> Result<i32> {
        let Stdio {
            stdin,
            output,
            mut signals,
            tty,
            mut resize,
        } = stdio;
        // on a terminal, runc's stdio is a pty of ours: the process's output is
        // read from its master end, its input written there
        let pty = if tty {
            Some(nix::pty::openpty(None, None).map_err(|source| Error::Pty { source })?)
        } else {
            None
        };
        let (master, slave) = match pty {
            Some(p) => (Some(p.master), Some(p.slave)),
            None => (None, None),
        };
        let (mut child, mut guard) = self.spawn(id, bundle, stdin.is_some(), slave)?;
        let mut feed = None;
        let out;
        let mut sizer = None;
        match master {
            Some(master) => {
                let master = std::fs::File::from(master);
                let writer = master.try_clone().map_err(Error::io("dup", "pty master"))?;
                sizer = Some(master.try_clone().map_err(Error::io("dup", "pty master"))?);
                out = Some(tokio::spawn(pump_chunks(
                    tokio::fs::File::from_std(master),
                    1,
                    output.clone(),
                )));
                if let Some(rx) = stdin {
                    feed = Some(tokio::spawn(feed_stdin(
                        tokio::fs::File::from_std(writer),
                        rx,
                    )));
                }
            }
            None => {
                if let (Some(pipe), Some(rx)) = (child.stdin.take(), stdin) {
                    feed = Some(tokio::spawn(feed_stdin(pipe, rx)));
                }
                out = child
                    .stdout
                    .take()
                    .map(|r| tokio::spawn(pump_chunks(r, 1, output.clone())));
            }
        }
        // runc's own messages, and the process's stderr without a terminal
        let err = child
            .stderr
            .take()
            .map(|r| tokio::spawn(pump_chunks(r, 2, output.clone())));
        let code = loop {
            tokio::select! {
                code = self.wait(&mut child) => break code?,
                Some(sig) = signals.recv() => {
                    let _ = tokio::process::Command::new(&self.binary)
                        .arg("--root")
                        .arg(&self.state)
                        .args(["kill", id, sig.trim_start_matches("SIG")])
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                        .await;
                }
                Some((rows, cols)) = resize.recv() => {
                    if let Some(m) = &sizer {
                        set_window_size(m, rows, cols);
                    }
                }
            }
        };
        for h in [out, err].into_iter().flatten() {
            let _ = h.await;
        }
        if let Some(f) = feed {
            f.abort();
        }
        guard.armed = false;
        drop(guard);
        Ok(code)
    }
}

/// The stdio of an interactive process.
pub struct Stdio {
    /// bytes for its stdin (`None`: it reads /dev/null); the end of the
    /// channel closes its stdin
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// what it writes: (1 stdout | 2 stderr, bytes)
    pub output: mpsc::Sender<(u32, Bytes)>,
    /// signals to deliver ("SIGTERM", "KILL")
    pub signals: mpsc::Receiver<String>,
    /// on a pseudo-terminal (the spec says `terminal`): stdout and stderr
    /// come as one stream, fd 1
    pub tty: bool,
    /// new sizes of the terminal (rows, columns); ignored without one
    pub resize: mpsc::Receiver<(u32, u32)>,
}

/// Sets the size of the pty whose master is `master`. runc, whose terminal is
/// the slave, gets SIGWINCH and passes the size on to the process's terminal.
fn set_window_size(master: &std::fs::File, rows: u32, cols: u32) {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: rows.min(u16::MAX as u32) as u16,
        ws_col: cols.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    #[allow(unsafe_code, reason = "TIOCSWINSZ has no safe wrapper in nix")]
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on an open fd
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        tracing::debug!("resize the terminal: {}", std::io::Error::last_os_error());
    }
}

/// Writes what arrives to `w` (a stdin pipe or a pty), closing it when the
/// sender is gone so the process reads end of file.
async fn feed_stdin(mut w: impl tokio::io::AsyncWrite + Unpin, mut rx: mpsc::Receiver<Bytes>) {
    use tokio::io::AsyncWriteExt;
    while let Some(b) = rx.recv().await {
        if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_copy_is_the_file_found_on_path_sealed_against_change_and_runs() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let fd = sealed_copy(Path::new("sh")).expect("sealed copy of sh");
        let seals = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GET_SEALS).expect("seals");
        assert_eq!(
            seals, RUNC_SEALS,
            "runc skips its own copy only with all four seals"
        );
        let on_path = resolve_on_path(Path::new("sh")).expect("sh on PATH");
        let at = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        assert_eq!(
            std::fs::read(&at).expect("read copy"),
            std::fs::read(&on_path).expect("read sh")
        );
        let mut f = std::fs::File::from(fd.try_clone().expect("dup"));
        assert!(
            f.write_all(b"x").is_err(),
            "a sealed copy cannot be written"
        );
        // started by its descriptor, as runc is
        let out = std::process::Command::new(&at)
            .args(["-c", "echo started"])
            .output()
            .expect("run the copy");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
        assert!(sealed_copy(Path::new("no-such-runtime-kiln")).is_err());
    }

    #[test]
    fn privileged_spec_has_every_capability_and_no_masked_paths() {
        let mut p = ProcessSpec {
            args: vec!["true".into()],
            env: vec![],
            cwd: String::new(),
            identity: Identity::default(),
            hostname: String::new(),
            network: Network::Loopback,
            privileged: false,
            rootfs: PathBuf::from("/r"),
            readonly_rootfs: false,
            mounts: vec![],
            resolv_conf: PathBuf::from("/b/resolv.conf"),
            hosts: PathBuf::from("/b/hosts"),
            terminal: false,
            rootless: false,
        };
        let s = spec(&p).expect("spec");
        let linux = s.linux().as_ref().expect("linux");
        assert!(linux.masked_paths().as_ref().is_some_and(|m| !m.is_empty()));
        let ns = linux.namespaces().as_ref().expect("namespaces");
        assert!(
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
        );
        let caps = |s: &Spec| {
            s.process()
                .as_ref()
                .and_then(|p| p.capabilities().as_ref())
                .and_then(|c| c.effective().clone())
                .map(|c| c.len())
                .unwrap_or(0)
        };
        assert_eq!(caps(&s), 14);
        p.privileged = true;
        p.network = Network::Host;
        let s = spec(&p).expect("spec");
        assert_eq!(
            caps(&s) as u32,
            bounding_set().count_ones().min(ALL_CAPS.len() as u32)
        );
        let linux = s.linux().as_ref().expect("linux");
        assert!(linux.masked_paths().as_ref().is_none_or(|m| m.is_empty()));
        let ns = linux.namespaces().as_ref().expect("namespaces");
        assert!(!ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        assert!(linux.seccomp().is_none(), "security.insecure lifts seccomp");
    }

    #[test]
    fn rootless_spec_has_no_sys_and_binds_keep_locked_flags() {
        // sources on a nosuid,nodev,noexec mount: a bind of them made in a user
        // namespace must say so
        let locked = crate::rootless::tests::LockedMount::new();
        let file = locked.0.path().join("f");
        std::fs::write(&file, "x").expect("write");
        let p = ProcessSpec {
            args: vec!["true".into()],
            rootfs: PathBuf::from("/r"),
            mounts: vec![ExtraMount::Bind {
                dest: "/m".into(),
                source: locked.0.path().to_path_buf(),
                readonly: false,
            }],
            resolv_conf: file.clone(),
            hosts: file.clone(),
            rootless: true,
            ..Default::default()
        };
        let s = spec(&p).expect("spec");
        let mounts = s.mounts().as_ref().expect("mounts");
        assert!(!mounts.iter().any(|m| m.destination().starts_with("/sys")));
        for dest in ["/m", "/etc/hosts", "/etc/resolv.conf"] {
            let m = mounts
                .iter()
                .find(|m| m.destination() == Path::new(dest))
                .expect("bind");
            let o = m.options().clone().unwrap_or_default();
            for f in ["nosuid", "nodev", "noexec"] {
                assert!(o.iter().any(|x| x == f), "{dest}: {o:?}");
            }
        }
        let root = spec(&ProcessSpec {
            rootless: false,
            ..p
        })
        .expect("spec");
        let mounts = root.mounts().as_ref().expect("mounts");
        assert!(mounts.iter().any(|m| m.destination() == Path::new("/sys")));
    }

    #[test]
    fn step_spec_joins_its_network_and_filters_syscalls() {
        let p = ProcessSpec {
            args: vec!["true".into()],
            network: Network::Join(PathBuf::from("/run/kiln-net/kiln0/10.213.0.2.ns")),
            rootfs: PathBuf::from("/r"),
            ..Default::default()
        };
        let s = spec(&p).expect("spec");
        let linux = s.linux().as_ref().expect("linux");
        let net: Vec<_> = linux
            .namespaces()
            .iter()
            .flatten()
            .filter(|n| n.typ() == LinuxNamespaceType::Network)
            .collect();
        assert_eq!(net.len(), 1);
        assert_eq!(
            net[0].path().as_deref(),
            Some(Path::new("/run/kiln-net/kiln0/10.213.0.2.ns"))
        );
        let seccomp = linux.seccomp().as_ref().expect("a seccomp profile");
        assert_eq!(
            seccomp.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        // the profile follows the step's capabilities: no CAP_SYS_ADMIN, no mount
        let names: Vec<&String> = seccomp
            .syscalls()
            .iter()
            .flatten()
            .flat_map(|r| r.names())
            .collect();
        assert!(names.iter().any(|n| *n == "chroot"));
        assert!(!names.iter().any(|n| *n == "mount"));
        // the spec as runc reads it
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(
            json["linux"]["seccomp"]["defaultAction"],
            serde_json::json!("SCMP_ACT_ERRNO")
        );
        assert!(
            json["linux"]["namespaces"]
                .as_array()
                .expect("namespaces")
                .iter()
                .any(|n| n["type"] == "network" && n["path"] == "/run/kiln-net/kiln0/10.213.0.2.ns")
        );
    }

    #[test]
    fn log_lines_are_cut_at_newlines_and_the_line_max_and_stop_past_the_stream_budget() {
        let mut lines = LogLines::default();
        let mut sent = Vec::new();
        let mut feed = |lines: &mut LogLines, mut buf: &[u8]| {
            while !buf.is_empty() {
                let (n, line) = lines.take(buf);
                buf = &buf[n..];
                sent.extend(line);
            }
        };
        feed(&mut lines, b"one\ntw");
        feed(&mut lines, b"o\n");
        // no newline: pieces of LOG_LINE_MAX, the first STREAM_LOG_FORWARD bytes only
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            feed(&mut lines, &chunk);
        }
        sent.extend(lines.finish());
        assert_eq!(sent[0], b"one\n");
        assert_eq!(sent[1], b"two\n");
        assert!(sent[2..].iter().all(|l| l.len() == LOG_LINE_MAX));
        let total: usize = sent.iter().map(Vec::len).sum();
        assert!(total >= STREAM_LOG_FORWARD, "{total}");
        assert!(total <= STREAM_LOG_FORWARD + LOG_LINE_MAX, "{total}");
    }
}
