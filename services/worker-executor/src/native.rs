//! kiln's own container starter: runs an exec step's runtime spec (the `config.json`
//! kiln writes for runc) without runc.
//!
//! runc starts a Go runtime twice and compiles the seccomp profile for every container,
//! about 26 ms of CPU per step on a 2-CPU host; eight parallel stages spend most of their
//! overhead there. This executor does the same work from one `clone3` of kilnd:
//! - namespaces: mount, pid, ipc and uts, and the network one the spec names (a new one
//!   with loopback up, a step's on kiln's bridge, or the host's);
//! - the root: mount propagation made one-way (rslave), every bind source opened as a
//!   detached tree, the rootfs bound on itself and made the root by `pivot_root`, the old
//!   root detached;
//! - the spec's mounts in order, their targets made and resolved inside the new root
//!   (no magic links); `/dev` gets null, zero, full, random, urandom and tty bound from
//!   the host, and the usual symlinks;
//! - masked and read-only paths, hostname, rlimits, umask 022;
//! - the user (groups, gid, uid), capabilities (bounding set cut to the spec's,
//!   effective, permitted, inheritable and ambient sets as the spec gives them), no_new_privs, the
//!   seccomp filter (compiled once per profile by [`crate::seccomp::compile`]), and
//!   `execve` along the process's `PATH`, as runc does.
//!
//! No device cgroup says which device nodes a step may open, so every mount but the
//! device binds and devpts is `nodev`: a node a step makes with CAP_MKNOD can be made and
//! kept in its layer, but not opened. A `security.insecure` step (CAP_SYS_ADMIN, which
//! could remount anyway) gets no `nodev`, as BuildKit's insecure mode allows every device. Steps get no cgroup of their own. Killing the
//! container's pid 1 (by pidfd) ends every process in it; so does kilnd's exit
//! (`PR_SET_PDEATHSIG` of the one thread that clones).
//!
//! Between the clone and the exec the child only makes system calls on data prepared
//! before the clone (kilnd is multi-threaded: no allocation, no locks, no libc call that
//! signals other threads); a failure is written to a pipe as (stage, errno, index) and the
//! child exits 1, as runc does when a container cannot start.

use crate::Event;
use crate::error::{Error, Result};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_long, c_uint, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// What starts exec steps' containers (kilnd.toml `[worker.oci] runtime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Runtime {
    /// kiln's own starter where the host has what it needs and the worker is not
    /// rootless; runc otherwise.
    #[default]
    Auto,
    /// kiln's own starter ([`Native`]).
    Native,
    /// The runc binary.
    Runc,
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Runtime, String> {
        match s {
            "auto" | "" => Ok(Runtime::Auto),
            "native" => Ok(Runtime::Native),
            "runc" => Ok(Runtime::Runc),
            other => Err(format!("unknown runtime {other:?} (auto, native or runc)")),
        }
    }
}

const OPEN_TREE_CLONE: c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: c_uint = 0x40;
const FSOPEN_CLOEXEC: c_uint = 1;
const FSMOUNT_CLOEXEC: c_uint = 1;
const FSCONFIG_SET_FLAG: c_uint = 0;
const FSCONFIG_SET_STRING: c_uint = 1;
const FSCONFIG_CMD_CREATE: c_uint = 6;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
const RESOLVE_NO_MAGICLINKS: u64 = 0x2;
const CLOSE_RANGE_CLOEXEC: c_uint = 1 << 2;
const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The devices every container's `/dev` gets, bound from the host's.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// `/dev`'s symlinks: (link, target).
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
];

/// Declares [`Stage`] and the list of its values.
macro_rules! stages {
    ($($name:ident),* $(,)?) => {
        /// Where the child was when it failed (reported with errno and an index).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        enum Stage {
            $($name),*
        }

        impl Stage {
            fn from_u32(v: u32) -> Option<Stage> {
                [$(Stage::$name),*].into_iter().find(|s| *s as u32 == v)
            }
        }
    };
}

stages!(
    Stdio,
    Session,
    JoinNetwork,
    Propagation,
    OpenSource,
    PivotRoot,
    Loopback,
    Hostname,
    MountPoint,
    MountTarget,
    MountFs,
    MountBind,
    Devices,
    Mask,
    Readonly,
    RootAttrs,
    Rlimit,
    Capabilities,
    User,
    Cwd,
    NoNewPrivs,
    Seccomp,
    Exec,
    NotFound,
);

enum MountKind {
    /// A new filesystem: its type, `source`, fsconfig options and mount attributes.
    Fs {
        fstype: CString,
        source: CString,
        /// (key, value); no value: a flag
        options: Vec<(CString, Option<CString>)>,
        attrs: u64,
    },
    /// A bind of `sources[source]` with these attributes set (recursively).
    Bind { source: usize, attrs: u64 },
}

struct MountPlan {
    /// Every prefix of the destination ("/a", "/a/b", …), made when missing.
    prefixes: Vec<CString>,
    /// Every prefix of the destination resolved inside the rootfs (symlinks followed as
    /// the container will follow them), made first: `/cm/x` with `/cm -> /tmp/c` needs
    /// `/tmp/c` to exist before `/cm/x` can be made. Empty when no symlink is on the way.
    resolved: Vec<CString>,
    /// The last prefix is a file to make (a bind of a file or socket), not a dir.
    file: bool,
    kind: MountKind,
}

/// Everything the child needs, made before the clone.
struct Plan {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    err_w: OwnedFd,
    netns: Option<OwnedFd>,
    new_net: bool,
    rootfs: CString,
    hostname: CString,
    /// Bind sources (host paths), opened as trees before the pivot: (path, recursive).
    sources: Vec<(CString, bool)>,
    /// Their tree fds in the child.
    trees: Vec<c_int>,
    mounts: Vec<MountPlan>,
    /// `/dev` is a tmpfs of the spec's: it gets [`DEVICES`] and [`DEV_LINKS`].
    dev_tmpfs: bool,
    /// `sources` index of the first of [`DEVICES`].
    devices_at: usize,
    dev_paths: Vec<CString>,
    dev_links: Vec<(CString, CString)>,
    masked: Vec<CString>,
    readonly: Vec<CString>,
    readonly_root: bool,
    /// No mount is made nodev (a step with CAP_SYS_ADMIN).
    all_devices: bool,
    rlimits: Vec<(c_int, u64, u64)>,
    bounding: u64,
    last_cap: u32,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    no_new_privs: bool,
    seccomp: Option<Arc<crate::seccomp::Bpf>>,
    /// Paths to try `execve` on, in `PATH` order.
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    _env: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    env_ptrs: Vec<*const c_char>,
    /// The exec's name as the spec gives it, for messages.
    arg0: String,
    /// Mount destinations, for messages.
    dests: Vec<String>,
}

#[allow(unsafe_code, reason = "raw pointers are not Send")]
// SAFETY: `argv_ptrs` and `env_ptrs` point into the heap buffers of `_argv` and `_env`,
// which the plan owns and which do not move when the plan does
unsafe impl Send for Plan {}

fn cstr(s: impl AsRef<[u8]>, what: &str) -> Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidOp(format!("{what} has a NUL byte")))
}

fn cpath(p: &Path, what: &str) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    cstr(p.as_os_str().as_bytes(), what)
}

/// Every prefix of an absolute path: "/a/b" → ["/a", "/a/b"].
fn prefixes_of(dest: &str) -> Result<Vec<CString>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in dest.split('/').filter(|c| !c.is_empty() && *c != ".") {
        cur.push('/');
        cur.push_str(c);
        out.push(cstr(&cur, "mount destination")?);
    }
    Ok(out)
}

fn cap_number(c: &oci_spec::runtime::Capability) -> Option<u32> {
    let name = format!("CAP_{c}");
    crate::runc::ALL_CAPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

fn cap_mask(caps: Option<&oci_spec::runtime::Capabilities>) -> u64 {
    caps.into_iter()
        .flatten()
        .filter_map(cap_number)
        .fold(0, |m, b| m | (1u64 << b))
}

fn rlimit_resource(t: oci_spec::runtime::PosixRlimitType) -> c_int {
    use oci_spec::runtime::PosixRlimitType::*;
    (match t {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    }) as c_int
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Io {
        op: "pipe",
        path: "".into(),
        source: e.into(),
    })
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The seccomp filters compiled so far, by profile.
type FilterCache = Mutex<HashMap<String, Arc<crate::seccomp::Bpf>>>;

/// Runs exec steps itself (see the module docs).
#[derive(Clone)]
pub struct Native {
    spawner: std::sync::mpsc::SyncSender<Job>,
    filters: Arc<FilterCache>,
}

impl std::fmt::Debug for Native {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Native")
    }
}

struct Job {
    plan: Plan,
    reply: tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>,
}

impl Native {
    /// The native executor, or why this host cannot have it (then runc runs steps).
    pub fn new() -> std::result::Result<Native, String> {
        if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            return Err("not on this architecture".into());
        }
        let filters: Arc<FilterCache> = Arc::default();
        let default =
            crate::runc::spec(&crate::runc::ProcessSpec::default()).map_err(|e| e.to_string())?;
        if let Some(p) = default.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            let key = serde_json::to_string(p).map_err(|e| e.to_string())?;
            let bpf = crate::seccomp::compile(p).map_err(|e| format!("seccomp: {e}"))?;
            if let Ok(mut f) = filters.lock() {
                f.insert(key, Arc::new(bpf));
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(64);
        std::thread::Builder::new()
            .name("kiln-clone".into())
            .spawn(move || {
                // the parent-death signal of every container is this thread's exit,
                // which is kilnd's
                for job in rx {
                    let r = clone_child(job.plan);
                    // a step cancelled while it was being cloned: nobody waits for
                    // its container, so it is killed here
                    if let Err(Ok(pidfd)) = job.reply.send(r) {
                        kill_and_reap(pidfd);
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let n = Native {
            spawner: tx,
            filters,
        };
        n.self_test()?;
        Ok(n)
    }

    /// Starts one container whose rootfs is empty, with a new network namespace: every
    /// stage of the set-up must pass and only its exec may fail (nothing to run). A
    /// host where some stage cannot work (a container without the privileges it needs,
    /// an LSM that refuses a mount) then uses runc, instead of failing its steps.
    fn self_test(&self) -> std::result::Result<(), String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-start-probe-")
            .tempdir()
            .map_err(|e| format!("probe dir: {e}"))?;
        let rootfs = dir.path().join("rootfs");
        let (resolv, hosts) = (dir.path().join("resolv.conf"), dir.path().join("hosts"));
        let made = std::fs::create_dir(&rootfs)
            .and_then(|()| std::fs::write(&resolv, ""))
            .and_then(|()| std::fs::write(&hosts, crate::runc::HOSTS));
        made.map_err(|e| format!("probe dir: {e}"))?;
        let p = crate::runc::ProcessSpec {
            args: vec!["kiln-start-probe".into()],
            env: vec!["PATH=/".into()],
            rootfs,
            resolv_conf: resolv,
            hosts,
            network: crate::runc::Network::Loopback,
            ..Default::default()
        };
        let spec = crate::runc::spec(&p).map_err(|e| e.to_string())?;
        let null = || {
            std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| format!("/dev/null: {e}"))
        };
        let (status_r, status_w) = pipe().map_err(|e| e.to_string())?;
        let plan = self
            .plan(&spec, null()?, null()?, null()?, status_w)
            .map_err(|e| e.to_string())?;
        let pidfd = clone_child(plan).map_err(|e| format!("clone3: {e}"))?;
        waitid(pidfd.as_raw_fd(), 0).map_err(|e| format!("waitid: {e}"))?;
        match read_status(&status_r) {
            Some((stage, _, _)) if stage == Stage::NotFound as u32 => Ok(()),
            Some(status) => {
                let dests: Vec<String> = (spec.mounts().iter().flatten())
                    .map(|m| m.destination().to_string_lossy().into_owned())
                    .collect();
                Err(describe(status, &dests, "kiln-start-probe"))
            }
            None => Err("the probe ran nothing and reported nothing".into()),
        }
    }

    fn filter(&self, p: &oci_spec::runtime::LinuxSeccomp) -> Result<Arc<crate::seccomp::Bpf>> {
        let key = serde_json::to_string(p).map_err(|e| Error::InvalidOp(e.to_string()))?;
        if let Some(b) = self.filters.lock().ok().and_then(|f| f.get(&key).cloned()) {
            return Ok(b);
        }
        let b = Arc::new(crate::seccomp::compile(p)?);
        if let Ok(mut f) = self.filters.lock() {
            f.insert(key, b.clone());
        }
        Ok(b)
    }

    /// Runs `spec` (its process, root, mounts and Linux settings) as container `id`,
    /// streaming output as `Event::Log`; returns the exit code (128+signal when killed,
    /// 1 with the reason on stderr when the process could not start). Dropping the
    /// future kills the container.
    pub async fn run(&self, id: &str, spec: &Spec, events: &mpsc::Sender<Event>) -> Result<i32> {
        let t0 = std::time::Instant::now();
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        nix::fcntl::fcntl(
            &status_r,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::Io {
            op: "fcntl",
            path: "".into(),
            source: e.into(),
        })?;
        let stdin = std::fs::File::open("/dev/null").map_err(Error::io("open", "/dev/null"))?;
        let plan = self.plan(spec, stdin.into(), out_w, err_w, status_w)?;
        let dests = plan.dests.clone();
        let arg0 = plan.arg0.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.spawner
            .send(Job { plan, reply: tx })
            .map_err(|_| Error::InvalidOp("the clone thread is gone".into()))?;
        let pidfd = match rx.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return Err(Error::Io {
                    op: "clone3",
                    path: id.into(),
                    source: e,
                });
            }
            Err(_) => return Err(Error::InvalidOp("the clone thread is gone".into())),
        };
        let mut guard = Reaper::new(pidfd)?;
        let out = tokio::spawn(crate::runc::pump(receiver(out_r)?, 1, events.clone()));
        let err = tokio::spawn(crate::runc::pump(receiver(err_r)?, 2, events.clone()));
        let t_spawned = t0.elapsed();
        let code = guard.wait().await?;
        let t_exited = t0.elapsed();
        for h in [out, err] {
            let _ = h.await;
        }
        tracing::debug!(
            target: "kiln_timing",
            "native {id}: spawned {} us, exited {} us, output drained {} us",
            t_spawned.as_micros(),
            t_exited.as_micros(),
            t0.elapsed().as_micros()
        );
        if let Some(status) = read_status(&status_r) {
            let msg = describe(status, &dests, &arg0);
            let _ = events
                .send(Event::Log {
                    stream: 2,
                    data: format!("{msg}\n").into_bytes(),
                })
                .await;
            return Ok(1);
        }
        Ok(code)
    }

    fn plan(
        &self,
        spec: &Spec,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
        err_w: OwnedFd,
    ) -> Result<Plan> {
        let bad = |s: &str| Error::InvalidOp(format!("runtime spec: {s}"));
        let process = spec.process().as_ref().ok_or_else(|| bad("no process"))?;
        if process.terminal().unwrap_or(false) {
            return Err(bad("a terminal is for runc"));
        }
        let root = spec.root().as_ref().ok_or_else(|| bad("no root"))?;
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| bad("no linux section"))?;
        let mut new_net = false;
        let mut netns = None;
        for ns in linux.namespaces().iter().flatten() {
            match ns.typ() {
                LinuxNamespaceType::Network => match ns.path() {
                    Some(p) => {
                        let f = std::fs::File::open(p).map_err(Error::io("open netns", p))?;
                        netns = Some(OwnedFd::from(f));
                    }
                    None => new_net = true,
                },
                LinuxNamespaceType::Pid
                | LinuxNamespaceType::Ipc
                | LinuxNamespaceType::Uts
                | LinuxNamespaceType::Mount => {
                    if ns.path().is_some() {
                        return Err(bad("joining namespaces other than the network's"));
                    }
                }
                other => return Err(bad(&format!("namespace {other:?}"))),
            }
        }
        // a step that may remount (CAP_SYS_ADMIN: `security.insecure`) gets every
        // device, as BuildKit's insecure mode allows them all: no nodev for it
        let bounding =
            cap_mask((process.capabilities().as_ref()).and_then(|c| c.bounding().as_ref()));
        let all_devices = bounding & (1u64 << CAP_SYS_ADMIN) != 0;
        let mut sources = Vec::new();
        let mut mounts = Vec::new();
        let mut dests = Vec::new();
        let mut dev_tmpfs = false;
        for m in spec.mounts().iter().flatten() {
            let dest = m.destination().to_string_lossy().to_string();
            let opts: Vec<String> = m.options().clone().unwrap_or_default();
            let typ = m.typ().clone().unwrap_or_default();
            let is_bind = typ == "bind" || opts.iter().any(|o| o == "bind" || o == "rbind");
            let mut attrs = 0u64;
            let mut fs_options = Vec::new();
            for o in &opts {
                match o.as_str() {
                    "ro" => attrs |= MOUNT_ATTR_RDONLY,
                    "nosuid" => attrs |= MOUNT_ATTR_NOSUID,
                    "nodev" => attrs |= MOUNT_ATTR_NODEV,
                    "noexec" => attrs |= MOUNT_ATTR_NOEXEC,
                    "noatime" => attrs |= MOUNT_ATTR_NOATIME,
                    "strictatime" => attrs |= MOUNT_ATTR_STRICTATIME,
                    "nodiratime" => attrs |= MOUNT_ATTR_NODIRATIME,
                    "rw" | "bind" | "rbind" | "relatime" | "newinstance" | "private"
                    | "rprivate" | "slave" | "rslave" | "suid" | "dev" | "exec" => {}
                    kv => {
                        let (k, v) = match kv.split_once('=') {
                            Some((k, v)) => (k, Some(cstr(v, "mount option")?)),
                            None => (kv, None),
                        };
                        fs_options.push((cstr(k, "mount option")?, v));
                    }
                }
            }
            // devpts holds the ptys; every other mount is nodev (see the module docs)
            if typ != "devpts" && !all_devices {
                attrs |= MOUNT_ATTR_NODEV;
            }
            let mut file = false;
            let kind = if is_bind {
                let src = m
                    .source()
                    .as_ref()
                    .ok_or_else(|| bad("bind without source"))?;
                let meta = std::fs::metadata(src).map_err(Error::io("mount source", src))?;
                file = !meta.is_dir();
                sources.push((
                    cpath(src, "mount source")?,
                    opts.iter().any(|o| o == "rbind"),
                ));
                MountKind::Bind {
                    source: sources.len() - 1,
                    attrs,
                }
            } else {
                if dest == "/dev" && typ == "tmpfs" {
                    dev_tmpfs = true;
                }
                let source = m
                    .source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_else(|| typ.clone());
                MountKind::Fs {
                    fstype: cstr(&typ, "mount type")?,
                    source: cstr(source, "mount source")?,
                    options: fs_options,
                    attrs,
                }
            };
            let prefixes = prefixes_of(&dest)?;
            if prefixes.is_empty() {
                return Err(bad("a mount over /"));
            }
            let resolved = crate::rootpath::resolve(root.path(), &dest, true)
                .ok()
                .and_then(|r| {
                    let rel = r.strip_prefix(root.path()).ok()?;
                    Some(format!("/{}", rel.to_string_lossy()))
                })
                .filter(|r| r.trim_end_matches('/') != dest.trim_end_matches('/'))
                .map(|r| prefixes_of(&r))
                .transpose()?
                .unwrap_or_default();
            mounts.push(MountPlan {
                prefixes,
                resolved,
                file,
                kind,
            });
            dests.push(dest);
        }
        let devices_at = sources.len();
        let mut dev_paths = Vec::new();
        if dev_tmpfs {
            for d in DEVICES {
                sources.push((cstr(format!("/dev/{d}"), "device")?, false));
                dev_paths.push(cstr(format!("/dev/{d}"), "device")?);
            }
        }
        let dev_links = DEV_LINKS
            .iter()
            .map(|(l, t)| Ok((cstr(l, "link")?, cstr(t, "link")?)))
            .collect::<Result<Vec<_>>>()?;
        let to_c = |v: &Option<Vec<String>>| -> Result<Vec<CString>> {
            v.iter().flatten().map(|s| cstr(s, "masked path")).collect()
        };
        let caps = process.capabilities().as_ref();
        let user = process.user();
        let mut groups: Vec<libc::gid_t> = user.additional_gids().clone().unwrap_or_default();
        groups.dedup();
        let mut env: Vec<String> = process.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            let home = crate::users::home_of(root.path(), user.uid());
            env.push(format!("HOME={home}"));
        }
        let args: Vec<String> = process.args().clone().unwrap_or_default();
        let arg0 = args.first().cloned().ok_or_else(|| bad("no args"))?;
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("");
        let candidates = if arg0.contains('/') {
            vec![cstr(&arg0, "args")?]
        } else {
            path.split(':')
                .map(|d| {
                    let d = if d.is_empty() { "." } else { d };
                    cstr(format!("{d}/{arg0}"), "PATH")
                })
                .collect::<Result<Vec<_>>>()?
        };
        let argv = args
            .iter()
            .map(|a| cstr(a, "args"))
            .collect::<Result<Vec<_>>>()?;
        let envc = env
            .iter()
            .map(|a| cstr(a, "env"))
            .collect::<Result<Vec<_>>>()?;
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|c| c.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const c_char> = envc.iter().map(|c| c.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        let seccomp = match linux.seccomp() {
            Some(p) => Some(self.filter(p)?),
            None => None,
        };
        let trees = vec![-1; sources.len()];
        Ok(Plan {
            stdin,
            stdout,
            stderr,
            err_w,
            netns,
            new_net,
            rootfs: cpath(root.path(), "rootfs")?,
            hostname: cstr(
                spec.hostname()
                    .clone()
                    .unwrap_or_else(|| crate::runc::DEFAULT_HOSTNAME.into()),
                "hostname",
            )?,
            sources,
            trees,
            mounts,
            dev_tmpfs,
            devices_at,
            dev_paths,
            dev_links,
            masked: to_c(linux.masked_paths())?,
            readonly: to_c(linux.readonly_paths())?,
            readonly_root: root.readonly().unwrap_or(false),
            all_devices,
            rlimits: process
                .rlimits()
                .iter()
                .flatten()
                .map(|r| (rlimit_resource(r.typ()), r.soft(), r.hard()))
                .collect(),
            bounding,
            last_cap: last_cap(),
            effective: cap_mask(caps.and_then(|c| c.effective().as_ref())),
            permitted: cap_mask(caps.and_then(|c| c.permitted().as_ref())),
            inheritable: cap_mask(caps.and_then(|c| c.inheritable().as_ref())),
            ambient: cap_mask(caps.and_then(|c| c.ambient().as_ref())),
            uid: user.uid(),
            gid: user.gid(),
            groups,
            cwd: cstr(process.cwd().to_string_lossy().as_bytes(), "cwd")?,
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            seccomp,
            candidates,
            _argv: argv,
            _env: envc,
            argv_ptrs,
            env_ptrs,
            arg0,
            dests,
        })
    }
}

fn receiver(fd: OwnedFd) -> Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(Error::io("pipe", "stdout"))
}

/// Kills the container unless it was waited for.
struct Reaper {
    pidfd: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
    exited: bool,
}

impl Reaper {
    fn new(fd: OwnedFd) -> Result<Reaper> {
        #[allow(unsafe_code, reason = "registering a descriptor with tokio is unsafe")]
        // SAFETY: the AsyncFd owns the pidfd, which stays open and unreplaced while it does
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::io("watch", "pidfd")(e.into_parts().1))?;
        Ok(Reaper {
            pidfd: Some(afd),
            exited: false,
        })
    }

    /// Waits for the container's pid 1; its exit code, 128+signal when killed.
    async fn wait(&mut self) -> Result<i32> {
        let Some(afd) = &self.pidfd else {
            return Err(Error::InvalidOp("waited twice".into()));
        };
        loop {
            let mut ready = afd.readable().await.map_err(Error::io("wait", "pidfd"))?;
            match waitid(afd.get_ref().as_raw_fd(), libc::WNOHANG) {
                Ok(Some(code)) => {
                    self.exited = true;
                    return Ok(code);
                }
                Ok(None) => ready.clear_ready(),
                Err(e) => return Err(Error::io("waitid", "pidfd")(e)),
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let Some(afd) = self.pidfd.take() else { return };
        let fd = afd.into_inner();
        if self.exited {
            return;
        }
        tracing::debug!("killing a cancelled step's container");
        kill_and_reap(fd);
    }
}

/// Kills the container whose pid 1 is `pidfd` and reaps it, off the runtime. With its
/// pid 1 gone, the kernel kills the rest of its pid namespace.
fn kill_and_reap(pidfd: OwnedFd) {
    #[allow(unsafe_code, reason = "pidfd_send_signal has no wrapper")]
    // SAFETY: a pidfd we own; no siginfo
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<c_void>(),
            0,
        );
    }
    std::thread::spawn(move || {
        let _ = waitid(pidfd.as_raw_fd(), 0);
    });
}

/// `waitid(P_PIDFD)`: Some(exit code or 128+signal) once exited, None if not yet.
fn waitid(pidfd: RawFd, flags: c_int) -> std::io::Result<Option<i32>> {
    #[allow(unsafe_code, reason = "waitid has no safe wrapper for pidfds")]
    // SAFETY: a zeroed siginfo filled by the kernel
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        loop {
            let r = libc::waitid(
                libc::P_PIDFD,
                pidfd as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            );
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            break;
        }
        if info.si_pid() == 0 {
            return Ok(None);
        }
        let status = info.si_status();
        Ok(Some(if info.si_code == libc::CLD_EXITED {
            status
        } else {
            128 + status
        }))
    }
}

/// The child's report, if it failed before its exec: (stage, errno, index).
fn read_status(fd: &OwnedFd) -> Option<(u32, i32, usize)> {
    let mut buf = [0u8; 12];
    #[allow(unsafe_code, reason = "a plain read of a pipe")]
    // SAFETY: reads at most 12 bytes into a 12-byte buffer
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n != 12 {
        return None;
    }
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[i..i + 4]);
        u32::from_ne_bytes(b)
    };
    Some((word(0), word(4) as i32, word(8) as usize))
}

/// What a child's report means, as runc would word it.
fn describe(status: (u32, i32, usize), dests: &[String], arg0: &str) -> String {
    let (stage, errno, index) = status;
    let err = std::io::Error::from_raw_os_error(errno);
    let dest = dests.get(index).map(String::as_str).unwrap_or("?");
    let what = match Stage::from_u32(stage) {
        Some(Stage::NotFound) => {
            format!("exec: {arg0:?}: executable file not found in $PATH")
        }
        Some(Stage::Exec) => format!("exec: {arg0:?}: {err}"),
        Some(Stage::Cwd) => format!("chdir to cwd: {err}"),
        Some(s @ (Stage::MountPoint | Stage::MountTarget | Stage::MountFs | Stage::MountBind)) => {
            format!("mount {dest} ({s:?}): {err}")
        }
        Some(s) => format!("{s:?} (#{index}): {err}"),
        None => format!("stage {stage}: {err}"),
    };
    format!("unable to start container process: {what}")
}

/// Clones the child (on the clone thread); returns its pidfd. The plan, with the
/// child's ends of its pipes, is dropped here.
fn clone_child(mut plan: Plan) -> std::io::Result<OwnedFd> {
    let mut pidfd: c_int = -1;
    let mut flags = (libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_PIDFD) as u64;
    if plan.new_net {
        flags |= libc::CLONE_NEWNET as u64;
    }
    let args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    #[allow(unsafe_code, reason = "clone3 has no wrapper")]
    // SAFETY: fork semantics (no CLONE_VM, no stack): the child continues on its own copy
    // of this thread's stack and never returns from `child`
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        child(&mut plan);
    }
    #[allow(unsafe_code, reason = "the kernel wrote a new fd")]
    // SAFETY: clone3 with CLONE_PIDFD stored a pidfd that we now own
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Reports (stage, errno, index) on the status pipe and exits 1.
fn fail(fd: RawFd, stage: Stage, errno: i32, index: usize) -> ! {
    let mut buf = [0u8; 12];
    let words = [stage as u32, errno as u32, index as u32];
    for (i, w) in words.iter().enumerate() {
        let b = w.to_ne_bytes();
        let mut j = 0;
        while j < 4 {
            buf[i * 4 + j] = b[j];
            j += 1;
        }
    }
    #[allow(unsafe_code, reason = "the child's last system calls")]
    // SAFETY: a write of a stack buffer, then _exit
    unsafe {
        libc::write(fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(1)
    }
}

/// The child: namespaces are made; set up the container and exec. Never returns.
#[allow(unsafe_code, reason = "the container's set-up is system calls")]
fn child(p: &mut Plan) -> ! {
    let st = p.err_w.as_raw_fd();
    macro_rules! check {
        ($e:expr, $stage:expr, $i:expr) => {
            if ($e as c_long) < 0 {
                fail(st, $stage, errno(), $i)
            }
        };
    }
    // SAFETY: every call below is a system call on the plan's C strings, fds and
    // structs, all made before the clone; nothing allocates.
    unsafe {
        // signals: nothing blocked, nothing ignored (kilnd ignores SIGPIPE)
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        check!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            Stage::Session,
            0
        );
        check!(libc::dup2(p.stdin.as_raw_fd(), 0), Stage::Stdio, 0);
        check!(libc::dup2(p.stdout.as_raw_fd(), 1), Stage::Stdio, 1);
        check!(libc::dup2(p.stderr.as_raw_fd(), 2), Stage::Stdio, 2);
        check!(libc::setsid(), Stage::Session, 0);
        if let Some(ns) = &p.netns {
            check!(
                libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
                Stage::JoinNetwork,
                0
            );
        }
        check!(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null()
            ),
            Stage::Propagation,
            0
        );
        for (i, (src, recursive)) in p.sources.iter().enumerate() {
            let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as c_uint;
            if *recursive {
                flags |= libc::AT_RECURSIVE as c_uint;
            }
            let fd = libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, src.as_ptr(), flags);
            check!(fd, Stage::OpenSource, i);
            if let Some(t) = p.trees.get_mut(i) {
                *t = fd as c_int;
            }
        }
        // the rootfs becomes the root
        check!(
            libc::mount(
                p.rootfs.as_ptr(),
                p.rootfs.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null()
            ),
            Stage::PivotRoot,
            0
        );
        check!(libc::chdir(p.rootfs.as_ptr()), Stage::PivotRoot, 1);
        check!(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            Stage::PivotRoot,
            2
        );
        check!(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            Stage::PivotRoot,
            3
        );
        check!(libc::chdir(c"/".as_ptr()), Stage::PivotRoot, 4);
        if p.new_net {
            loopback_up(st);
        }
        check!(
            libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()),
            Stage::Hostname,
            0
        );
        for (i, m) in p.mounts.iter().enumerate() {
            // the path the destination resolves to first (failures show below)
            let n = m.resolved.len();
            for (j, pre) in m.resolved.iter().enumerate() {
                if j + 1 == n && m.file {
                    libc::mknod(pre.as_ptr(), libc::S_IFREG | 0o644, 0);
                } else {
                    libc::mkdir(pre.as_ptr(), 0o755);
                }
            }
            let n = m.prefixes.len();
            for (j, pre) in m.prefixes.iter().enumerate() {
                let r = if j + 1 == n && m.file {
                    libc::mknod(pre.as_ptr(), libc::S_IFREG | 0o644, 0)
                } else {
                    libc::mkdir(pre.as_ptr(), 0o755)
                };
                if r < 0 && errno() != libc::EEXIST {
                    fail(st, Stage::MountPoint, errno(), i);
                }
            }
            let Some(dest) = m.prefixes.last() else {
                fail(st, Stage::MountPoint, libc::EINVAL, i)
            };
            let target = open_in_root(dest);
            check!(target, Stage::MountTarget, i);
            let src = match &m.kind {
                MountKind::Fs {
                    fstype,
                    source,
                    options,
                    attrs,
                } => {
                    let fs = libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC);
                    check!(fs, Stage::MountFs, i);
                    libc::syscall(
                        libc::SYS_fsconfig,
                        fs,
                        FSCONFIG_SET_STRING,
                        c"source".as_ptr(),
                        source.as_ptr(),
                        0,
                    );
                    for (k, v) in options {
                        let r = match v {
                            Some(v) => libc::syscall(
                                libc::SYS_fsconfig,
                                fs,
                                FSCONFIG_SET_STRING,
                                k.as_ptr(),
                                v.as_ptr(),
                                0,
                            ),
                            None => libc::syscall(
                                libc::SYS_fsconfig,
                                fs,
                                FSCONFIG_SET_FLAG,
                                k.as_ptr(),
                                std::ptr::null::<c_char>(),
                                0,
                            ),
                        };
                        check!(r, Stage::MountFs, i);
                    }
                    check!(
                        libc::syscall(
                            libc::SYS_fsconfig,
                            fs,
                            FSCONFIG_CMD_CREATE,
                            std::ptr::null::<c_char>(),
                            std::ptr::null::<c_char>(),
                            0
                        ),
                        Stage::MountFs,
                        i
                    );
                    let mfd = libc::syscall(libc::SYS_fsmount, fs, FSMOUNT_CLOEXEC, *attrs);
                    check!(mfd, Stage::MountFs, i);
                    libc::close(fs as c_int);
                    mfd as c_int
                }
                MountKind::Bind { source, attrs } => {
                    let tree = p.trees.get(*source).copied().unwrap_or(-1);
                    check!(
                        set_attrs(tree, c"", libc::AT_EMPTY_PATH | libc::AT_RECURSIVE, *attrs),
                        Stage::MountBind,
                        i
                    );
                    tree
                }
            };
            check!(
                libc::syscall(
                    libc::SYS_move_mount,
                    src,
                    c"".as_ptr(),
                    target as c_int,
                    c"".as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
                ),
                Stage::MountBind,
                i
            );
            libc::close(src);
            libc::close(target as c_int);
        }
        if p.dev_tmpfs {
            for (i, path) in p.dev_paths.iter().enumerate() {
                let r = libc::mknod(path.as_ptr(), libc::S_IFREG | 0o666, 0);
                if r < 0 && errno() != libc::EEXIST {
                    fail(st, Stage::Devices, errno(), i);
                }
                let tree = p.trees.get(p.devices_at + i).copied().unwrap_or(-1);
                check!(
                    libc::syscall(
                        libc::SYS_move_mount,
                        tree,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH
                    ),
                    Stage::Devices,
                    i
                );
                libc::close(tree);
            }
            for (link, target) in &p.dev_links {
                libc::symlink(target.as_ptr(), link.as_ptr());
            }
        }
        for (i, path) in p.masked.iter().enumerate() {
            let r = libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            );
            if r < 0 {
                match errno() {
                    libc::ENOENT => {}
                    libc::ENOTDIR => check!(
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            path.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_RDONLY,
                            std::ptr::null()
                        ),
                        Stage::Mask,
                        i
                    ),
                    e => fail(st, Stage::Mask, e, i),
                }
            }
        }
        for (i, path) in p.readonly.iter().enumerate() {
            let r = libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            );
            if r < 0 {
                if errno() == libc::ENOENT {
                    continue;
                }
                fail(st, Stage::Readonly, errno(), i);
            }
            check!(
                set_attrs(libc::AT_FDCWD, path, libc::AT_RECURSIVE, MOUNT_ATTR_RDONLY),
                Stage::Readonly,
                i
            );
        }
        let root = (if p.all_devices { 0 } else { MOUNT_ATTR_NODEV })
            | if p.readonly_root {
                MOUNT_ATTR_RDONLY
            } else {
                0
            };
        check!(
            set_attrs(libc::AT_FDCWD, c"/", 0, root),
            Stage::RootAttrs,
            0
        );
        for (i, (res, soft, hard)) in p.rlimits.iter().enumerate() {
            let l = libc::rlimit {
                rlim_cur: *soft,
                rlim_max: *hard,
            };
            check!(libc::setrlimit(*res as _, &l), Stage::Rlimit, i);
        }
        libc::umask(0o022);
        // capabilities: the bounding set first (needs CAP_SETPCAP), then the user
        for cap in 0..=p.last_cap.min(63) {
            if p.bounding & (1u64 << cap) == 0 {
                let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                if r < 0 && errno() != libc::EINVAL {
                    fail(st, Stage::Capabilities, errno(), cap as usize);
                }
            }
        }
        check!(
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
            Stage::Capabilities,
            100
        );
        // raw system calls: libc's set*id wrappers signal every thread libc knows of,
        // and this child has only the one
        check!(
            libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()),
            Stage::User,
            0
        );
        check!(
            libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid),
            Stage::User,
            1
        );
        check!(
            libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid),
            Stage::User,
            2
        );
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [
            CapData {
                effective: p.effective as u32,
                permitted: p.permitted as u32,
                inheritable: p.inheritable as u32,
            },
            CapData {
                effective: (p.effective >> 32) as u32,
                permitted: (p.permitted >> 32) as u32,
                inheritable: (p.inheritable >> 32) as u32,
            },
        ];
        check!(
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
            Stage::Capabilities,
            101
        );
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        // as runc: an ambient capability that cannot be raised is left out
        for cap in 0..=p.last_cap.min(63) {
            if p.ambient & (1u64 << cap) != 0 {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    cap as libc::c_ulong,
                    0,
                    0,
                );
            }
        }
        check!(libc::chdir(p.cwd.as_ptr()), Stage::Cwd, 0);
        libc::syscall(libc::SYS_close_range, 3, c_uint::MAX, CLOSE_RANGE_CLOEXEC);
        if p.no_new_privs {
            check!(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                Stage::NoNewPrivs,
                0
            );
        }
        if let Some(bpf) = &p.seccomp {
            let prog = bpf.fprog();
            check!(
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog
                ),
                Stage::Seccomp,
                0
            );
        }
        let mut denied = false;
        for c in &p.candidates {
            libc::execve(c.as_ptr(), p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                e => fail(st, Stage::Exec, e, 0),
            }
        }
        if denied {
            fail(st, Stage::Exec, libc::EACCES, 0)
        }
        fail(st, Stage::NotFound, libc::ENOENT, 0)
    }
}

/// `mount_setattr(dirfd, path, flags)` setting the mount attributes `set`.
fn set_attrs(dirfd: c_int, path: &std::ffi::CStr, flags: c_int, set: u64) -> c_long {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    #[allow(unsafe_code, reason = "mount_setattr has no wrapper")]
    // SAFETY: a valid C string and struct of the size given
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags as c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    }
}

/// `openat2(path, O_PATH)` refusing magic links (`/proc/self/fd/N` and the like).
fn open_in_root(path: &CString) -> c_long {
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_MAGICLINKS,
    };
    #[allow(unsafe_code, reason = "openat2 has no wrapper")]
    // SAFETY: a valid C string and struct
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    }
}

/// Sets `lo` up in the child's new network namespace (as runc's loopback strategy does).
fn loopback_up(st: RawFd) {
    #[allow(unsafe_code, reason = "SIOCSIFFLAGS has no wrapper")]
    // SAFETY: an ifreq on the stack for an ioctl on a socket we made
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            fail(st, Stage::Loopback, errno(), 0)
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as c_char;
        req.ifr_name[1] = b'o' as c_char;
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) < 0 {
            fail(st, Stage::Loopback, errno(), 1)
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) < 0 {
            fail(st, Stage::Loopback, errno(), 2)
        }
        libc::close(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runc::{ExtraMount, ProcessSpec};
    use crate::users::Identity;
    use std::path::PathBuf;

    /// A busybox rootfs in a temp dir, with the bundle files a step gets.
    fn rootfs() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("rootfs");
        crate::testutil::busybox_into(&root);
        std::fs::write(tmp.path().join("resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv");
        std::fs::write(tmp.path().join("hosts"), crate::runc::HOSTS).expect("hosts");
        (tmp, root)
    }

    fn process(tmp: &Path, root: &Path, script: &str) -> ProcessSpec {
        ProcessSpec {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            rootfs: root.to_path_buf(),
            resolv_conf: tmp.join("resolv.conf"),
            hosts: tmp.join("hosts"),
            network: crate::runc::Network::Loopback,
            ..Default::default()
        }
    }

    /// Runs `p` natively: (exit code, stdout, stderr).
    async fn run(n: &Native, p: &ProcessSpec) -> (i32, String, String) {
        let spec = crate::runc::spec(p).expect("spec");
        let (tx, mut rx) = mpsc::channel(64);
        let collect = tokio::spawn(async move {
            let (mut out, mut err) = (String::new(), String::new());
            while let Some(e) = rx.recv().await {
                if let Event::Log { stream, data } = e {
                    let s = String::from_utf8_lossy(&data).into_owned();
                    if stream == 1 { out += &s } else { err += &s }
                }
            }
            (out, err)
        });
        let code = n.run("test", &spec, &tx).await.expect("run");
        drop(tx);
        let (out, err) = collect.await.expect("collect");
        (code, out, err)
    }

    fn bind(dest: &str, source: &Path, readonly: bool) -> ExtraMount {
        ExtraMount::Bind {
            dest: dest.into(),
            source: source.to_path_buf(),
            readonly,
        }
    }

    fn native() -> Native {
        Native::new().expect("kiln's container starter runs on this host")
    }

    #[tokio::test]
    async fn a_step_runs_as_its_user_with_the_specs_capabilities_filter_and_home() {
        let n = native();
        let (tmp, root) = rootfs();
        let script = "echo uid=$(id -u) gid=$(id -g) home=$HOME host=$(hostname); \
                      grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
                      unshare -m true 2>/dev/null && echo UNSHARED; echo pid=$$";
        let (code, out, err) = run(&n, &process(tmp.path(), &root, script)).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("uid=0 gid=0 home=/root host=buildkitsandbox"),
            "{out}"
        );
        // Docker's default capabilities, effective and bounding
        assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
        assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
        assert!(
            out.contains("NoNewPrivs:\t1") && out.contains("Seccomp:\t2"),
            "{out}"
        );
        assert!(
            !out.contains("UNSHARED"),
            "the filter let unshare through: {out}"
        );
        assert!(
            out.contains("pid=1\n"),
            "not pid 1 of its own namespace: {out}"
        );

        let mut alice = process(
            tmp.path(),
            &root,
            "echo $(id -u):$(id -g):$(id -G):$HOME; grep CapEff /proc/self/status",
        );
        alice.identity = Identity {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![1001, 4],
        };
        let (code, out, err) = run(&n, &alice).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("1000:1001:1001 4:/home/alice\n"), "{out}");
        // a user other than root keeps only the spec's ambient set (as with runc)
        assert!(out.contains("CapEff:\t0000000020000420"), "{out}");
    }

    #[tokio::test]
    async fn a_device_node_a_step_makes_cannot_be_opened_but_the_standard_devices_work() {
        let n = native();
        let (tmp, root) = rootfs();
        let script = "mknod /blk b 8 0 && mknod /dev/mynull c 1 3 && echo MADE; \
                      head -c 1 /blk >/dev/null 2>&1 && echo BLK-OPENED; \
                      echo x > /dev/mynull 2>/dev/null && echo NULL-OPENED; \
                      echo x > /dev/null && head -c 4 /dev/zero | wc -c; \
                      head -c 4 /dev/urandom | wc -c; ls /dev/pts/ptmx >/dev/null && echo PTS";
        let (code, out, err) = run(&n, &process(tmp.path(), &root, script)).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("MADE"),
            "CAP_MKNOD should make nodes: {out} {err}"
        );
        assert!(
            !out.contains("BLK-OPENED") && !out.contains("NULL-OPENED"),
            "{out}"
        );
        assert_eq!(out.matches("4\n").count(), 2, "{out}");
        assert!(out.contains("PTS"), "{out}");
        // the node is in the step's filesystem, as with runc
        assert!(std::fs::symlink_metadata(root.join("blk")).is_ok());

        // a security.insecure step may use the nodes it makes
        let mut p = process(
            tmp.path(),
            &root,
            "mknod /mynull2 c 1 3 && echo x > /mynull2 && echo NULL-OPENED",
        );
        p.privileged = true;
        let (code, out, err) = run(&n, &p).await;
        assert_eq!((code, out.as_str()), (0, "NULL-OPENED\n"), "{err}");
    }

    #[tokio::test]
    async fn a_mount_target_symlinked_out_of_the_root_stays_inside_it() {
        let n = native();
        let (tmp, root) = rootfs();
        let host = tempfile::tempdir().expect("tempdir");
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::write(src.path().join("marker"), "inside\n").expect("marker");
        // /escape → the host dir, spelled to climb out of the root
        let up = "../".repeat(20);
        // (its target does not exist in the root: it is made there, as runc makes it)
        std::os::unix::fs::symlink(
            format!("/{up}{}", host.path().display()),
            root.join("escape"),
        )
        .expect("symlink");
        let mut p = process(
            tmp.path(),
            &root,
            &format!("cat {}/x/marker", host.path().display()),
        );
        p.mounts.push(bind("/escape/x", src.path(), true));
        let (code, out, err) = run(&n, &p).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "inside\n");
        // the mount point was made in the root's copy of the path, not on the host
        assert!(
            std::fs::read_dir(host.path())
                .expect("host dir")
                .next()
                .is_none()
        );
        let inside = root.join(host.path().strip_prefix("/").expect("absolute"));
        assert!(inside.join("x").is_dir());

        // a target through a magic link is refused, naming the mount
        let mut p = process(tmp.path(), &root, "true");
        p.mounts.push(bind("/proc/self/cwd/y", src.path(), true));
        let (code, _, err) = run(&n, &p).await;
        assert_eq!(code, 1);
        assert!(
            err.contains("unable to start container process: mount /proc/self/cwd/y"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_executable_fails_as_with_runc_and_a_readonly_bind_is_readonly() {
        let n = native();
        let (tmp, root) = rootfs();
        let mut p = process(tmp.path(), &root, "");
        p.args = vec!["nonexistent-cmd".into()];
        let (code, _, err) = run(&n, &p).await;
        assert_eq!(code, 1);
        assert_eq!(
            err,
            "unable to start container process: exec: \"nonexistent-cmd\": executable file not found in $PATH\n"
        );
        let src = tempfile::tempdir().expect("tempdir");
        let mut p = process(
            tmp.path(),
            &root,
            "touch /ro/f 2>/dev/null && echo WROTE; touch /rw/f && echo RW",
        );
        p.mounts.push(bind("/ro", src.path(), true));
        p.mounts.push(bind("/rw", src.path(), false));
        let (code, out, err) = run(&n, &p).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "RW\n");
    }

    /// Pids of processes whose command line holds `needle`.
    fn running(needle: &str) -> bool {
        std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(needle))
    }

    #[tokio::test]
    async fn a_step_cancelled_while_it_is_cloned_is_killed_by_the_clone_thread() {
        let n = native();
        let (tmp, root) = rootfs();
        let marker = format!("{}", std::process::id() % 1000 + 5000);
        let p = process(tmp.path(), &root, &format!("sleep {marker}2"));
        let spec = crate::runc::spec(&p).expect("spec");
        let null = || OwnedFd::from(std::fs::File::open("/dev/null").expect("null"));
        let (_status_r, status_w) = pipe().expect("pipe");
        let plan = n
            .plan(&spec, null(), null(), null(), status_w)
            .expect("plan");
        // the run that asked for it is gone before the clone answers
        let (reply, rx) = tokio::sync::oneshot::channel();
        drop(rx);
        n.spawner.send(Job { plan, reply }).expect("send");
        // (left alone, its sleep would be running by now)
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(
            !running(&format!("sleep\0{marker}2")),
            "the container of a cancelled clone is left running"
        );
    }

    #[tokio::test]
    async fn dropping_the_run_kills_every_process_of_the_container() {
        let n = native();
        let (tmp, root) = rootfs();
        let marker = format!("{}", std::process::id() % 1000 + 4000);
        let p = process(
            tmp.path(),
            &root,
            &format!("sleep {marker} & sleep {marker}1 & echo started; wait"),
        );
        let spec = crate::runc::spec(&p).expect("spec");
        let (tx, mut rx) = mpsc::channel(64);
        let mut run = Box::pin(n.run("test", &spec, &tx));
        tokio::select! {
            r = &mut run => panic!("the step ended: {r:?}"),
            e = rx.recv() => assert!(matches!(e, Some(Event::Log { .. }))),
        }
        let alive = || running(&format!("sleep\0{marker}"));
        // the echo can come before the background sleeps have started
        for _ in 0..100 {
            if alive() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(alive(), "the step's processes never started");
        drop(run);
        let mut gone = false;
        for _ in 0..100 {
            if !alive() {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(gone, "processes of a dropped step are still running");
    }
}
