//! The default seccomp profile of steps that are not `security.insecure`: everything is
//! refused with EPERM but an allow list of ordinary syscalls, the same set container
//! engines allow by default. Syscalls that need a capability a step does not have
//! (`mount`, `unshare`, `setns`, `bpf`, `ptrace` of other processes' memory, module
//! loading, clock setting, reboot, …) are allowed only when the capability is in the
//! step's bounding set; `clone` may not create namespaces without CAP_SYS_ADMIN, and
//! `clone3` (whose flags seccomp cannot read) fails with ENOSYS so that libcs fall back
//! to `clone`. `personality` takes the harmless personas only, and `socket` every address
//! family but AF_VSOCK.

use crate::error::{Error, Result};
use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// Allowed for every step.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed on this architecture only.
#[cfg(target_arch = "x86_64")]
const ARCH_ALLOWED: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "aarch64")]
const ARCH_ALLOWED: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH_ALLOWED: &[&str] = &[];

/// The architectures the filter covers: the native one and its 32-bit compat mode.
/// Not x32: no image ships x32 binaries, its syscalls then meet the filter's bad-arch
/// action, and its rules made runc's filter build the slowest part of starting a step
/// (runc 1.1 with libseccomp 2.5: 14 ms of a 50 ms `runc run` on the test VM, against
/// 4 ms for x86_64 and x86 together).
fn arches() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchArm, Arch::ScmpArchAarch64]
    } else {
        vec![]
    }
}

/// Allowed when the capability is in the bounding set.
const BY_CAPABILITY: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// The namespace flags `clone` may not carry without CAP_SYS_ADMIN.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// `personality` values a step may set: PER_LINUX, PER_LINUX32, UNAME26 with either,
/// and the query 0xffffffff.
const PERSONAS: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// `socket`'s domain a step may not use.
const AF_VSOCK: u64 = 40;

fn rule(
    names: &[&str],
    action: LinuxSeccompAction,
    args: Vec<(usize, u64, u64, LinuxSeccompOperator)>,
    errno: Option<u32>,
) -> Result<LinuxSyscall> {
    let se = |source: oci_spec::OciSpecError| Error::Spec { source };
    let mut b = LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(action);
    if let Some(e) = errno {
        b = b.errno_ret(e);
    }
    if !args.is_empty() {
        b = b.args(
            args.into_iter()
                .map(|(index, value, two, op)| {
                    let a = LinuxSeccompArgBuilder::default()
                        .index(index)
                        .value(value)
                        .op(op);
                    if two != 0 { a.value_two(two) } else { a }
                        .build()
                        .map_err(se)
                })
                .collect::<Result<Vec<_>>>()?,
        );
    }
    b.build().map_err(se)
}

/// The default profile for a step whose bounding set is `caps`.
pub fn default_profile(caps: &[Capability]) -> Result<LinuxSeccomp> {
    use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
    use LinuxSeccompOperator::{ScmpCmpEq as Eq, ScmpCmpMaskedEq as MaskedEq, ScmpCmpNe as Ne};
    let mut syscalls = vec![
        rule(ALLOWED, Allow, vec![], None)?,
        rule(ARCH_ALLOWED, Allow, vec![], None)?,
        rule(&["socket"], Allow, vec![(0, AF_VSOCK, 0, Ne)], None)?,
    ];
    for p in PERSONAS {
        syscalls.push(rule(&["personality"], Allow, vec![(0, *p, 0, Eq)], None)?);
    }
    for (cap, names) in BY_CAPABILITY {
        if caps.contains(cap) {
            syscalls.push(rule(names, Allow, vec![], None)?);
        }
    }
    if !caps.contains(&Capability::SysAdmin) {
        // clone without namespace flags (its flags are argument 0 but on s390)
        syscalls.push(rule(
            &["clone"],
            Allow,
            vec![(0, CLONE_NAMESPACES, 0, MaskedEq)],
            None,
        )?);
        // seccomp cannot see clone3's flags: ENOSYS sends libcs back to clone
        syscalls.push(rule(&["clone3"], Errno, vec![], Some(libc::ENOSYS as u32))?);
    }
    syscalls.retain(|s| !s.names().is_empty());
    LinuxSeccompBuilder::default()
        .default_action(Errno)
        .default_errno_ret(libc::EPERM as u32)
        .architectures(arches())
        .syscalls(syscalls)
        .build()
        .map_err(|source| Error::Spec { source })
}

// The profile as a classic-BPF program, built by the system's libseccomp the way runc
// (libseccomp-golang) builds it, so that a step started without runc gets the filter
// runc would have loaded. libseccomp is opened at run time: the worker does not link it,
// and a host without it fails here with a clear message rather than at start.

/// libseccomp's soname; its 2.5 API is what runc uses.
const LIBSECCOMP: &str = "libseccomp.so.2";

/// `__NR_SCMP_ERROR`: a name libseccomp does not know on any of its arches.
const NR_SCMP_ERROR: libc::c_int = -1;
/// `SCMP_FLTATR_CTL_NNP`: whether `seccomp_load` sets no_new_privs.
const SCMP_FLTATR_CTL_NNP: libc::c_int = 3;
/// `SCMP_FLTATR_CTL_OPTIMIZE`: 2 lays the syscalls out as a binary tree.
const SCMP_FLTATR_CTL_OPTIMIZE: libc::c_int = 8;
/// A rule's conditions are on one of the syscall's 6 arguments.
const SYSCALL_MAX_ARGUMENTS: usize = 6;
/// The kernel's limit on a classic-BPF program (`BPF_MAXINSNS`).
const BPF_MAXINSNS: usize = 4096;

/// `scmp_filter_ctx`.
type ScmpCtx = *mut libc::c_void;

/// `struct scmp_arg_cmp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScmpArgCmp {
    arg: libc::c_uint,
    /// `enum scmp_compare`: [`LinuxSeccompOperator`]'s values.
    op: libc::c_uint,
    datum_a: u64,
    datum_b: u64,
}

type InitFn = unsafe extern "C" fn(u32) -> ScmpCtx;
type ReleaseFn = unsafe extern "C" fn(ScmpCtx);
type AttrSetFn = unsafe extern "C" fn(ScmpCtx, libc::c_int, u32) -> libc::c_int;
type ArchResolveNameFn = unsafe extern "C" fn(*const libc::c_char) -> u32;
type ArchNativeFn = unsafe extern "C" fn() -> u32;
type ArchAddFn = unsafe extern "C" fn(ScmpCtx, u32) -> libc::c_int;
type SyscallResolveNameFn = unsafe extern "C" fn(*const libc::c_char) -> libc::c_int;
type RuleAddArrayFn =
    unsafe extern "C" fn(ScmpCtx, u32, libc::c_int, libc::c_uint, *const ScmpArgCmp) -> libc::c_int;
type ExportBpfFn = unsafe extern "C" fn(ScmpCtx, libc::c_int) -> libc::c_int;

/// The libseccomp functions [`compile`] calls. The library is never closed, so they
/// stay valid for the life of the process.
struct Lib {
    init: InitFn,
    release: ReleaseFn,
    attr_set: AttrSetFn,
    arch_resolve_name: ArchResolveNameFn,
    arch_native: ArchNativeFn,
    arch_add: ArchAddFn,
    syscall_resolve_name: SyscallResolveNameFn,
    rule_add_array: RuleAddArrayFn,
    export_bpf: ExportBpfFn,
}

/// libseccomp, opened once; or why it could not be.
static LIB: std::sync::OnceLock<std::result::Result<Lib, String>> = std::sync::OnceLock::new();

/// A seccomp error (see the report: a dedicated `Error` variant would replace this).
fn seccomp_err(msg: impl std::fmt::Display) -> Error {
    Error::Seccomp(msg.to_string())
}

/// What libseccomp's negative-errno return `rc` means.
fn rc_err(rc: libc::c_int) -> std::io::Error {
    std::io::Error::from_raw_os_error(rc.saturating_neg())
}

/// The last `dlopen`/`dlsym` error.
fn dl_error() -> String {
    #[allow(unsafe_code, reason = "dlerror has no safe wrapper")]
    // SAFETY: dlerror takes no argument; it returns NULL or a NUL-terminated string
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".to_string();
    }
    #[allow(unsafe_code, reason = "reading dlerror's C string")]
    // SAFETY: e is non-NULL and NUL-terminated, valid until the next dl* call on this thread
    let msg = unsafe { std::ffi::CStr::from_ptr(e) };
    msg.to_string_lossy().into_owned()
}

fn load() -> std::result::Result<Lib, String> {
    #[allow(unsafe_code, reason = "dlopen has no safe wrapper")]
    // SAFETY: the name is NUL-terminated; libseccomp's initialisers have no preconditions
    let handle = unsafe { libc::dlopen(c"libseccomp.so.2".as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        return Err(format!(
            "load {LIBSECCOMP} (install libseccomp2): {}",
            dl_error()
        ));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            #[allow(unsafe_code, reason = "dlsym has no safe wrapper")]
            // SAFETY: handle is an open library; the name is NUL-terminated
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("{LIBSECCOMP}: no {}: {}", $name, dl_error()));
            }
            #[allow(unsafe_code, reason = "a dlsym address as the function it is")]
            // SAFETY: $ty is the C prototype of $name in libseccomp 2.x's seccomp.h, and
            // the library is never closed
            let f = unsafe { std::mem::transmute::<*mut libc::c_void, $ty>(p) };
            f
        }};
    }
    Ok(Lib {
        init: sym!("seccomp_init", InitFn),
        release: sym!("seccomp_release", ReleaseFn),
        attr_set: sym!("seccomp_attr_set", AttrSetFn),
        arch_resolve_name: sym!("seccomp_arch_resolve_name", ArchResolveNameFn),
        arch_native: sym!("seccomp_arch_native", ArchNativeFn),
        arch_add: sym!("seccomp_arch_add", ArchAddFn),
        syscall_resolve_name: sym!("seccomp_syscall_resolve_name", SyscallResolveNameFn),
        rule_add_array: sym!("seccomp_rule_add_array", RuleAddArrayFn),
        export_bpf: sym!("seccomp_export_bpf", ExportBpfFn),
    })
}

fn lib() -> Result<&'static Lib> {
    LIB.get_or_init(load).as_ref().map_err(seccomp_err)
}

/// A filter context, released when dropped.
struct Filter {
    lib: &'static Lib,
    ctx: ScmpCtx,
}

impl Drop for Filter {
    fn drop(&mut self) {
        #[allow(unsafe_code, reason = "libseccomp call")]
        // SAFETY: ctx came from seccomp_init and is released once, here
        unsafe {
            (self.lib.release)(self.ctx)
        };
    }
}

/// A classic-BPF seccomp program, as `prctl(PR_SET_SECCOMP)` or `seccomp(2)` load it.
#[derive(Clone)]
pub struct Bpf(pub Vec<libc::sock_filter>);

impl std::fmt::Debug for Bpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpf")
            .field("instructions", &self.0.len())
            .finish()
    }
}

impl Bpf {
    /// The `sock_fprog` to load the program with; it points into `self`, which must
    /// outlive its use. [`compile`] never makes a program longer than the kernel takes.
    pub fn fprog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            len: u16::try_from(self.0.len()).unwrap_or(u16::MAX),
            filter: self.0.as_ptr().cast_mut(),
        }
    }
}

/// The libseccomp action for `action` (`errno` defaulting to EPERM, as runc does).
fn scmp_action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<u32> {
    use LinuxSeccompAction::*;
    // runc passes the errno as an int16: its low 16 bits
    let errno = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match action {
        ScmpActKill | ScmpActKillThread => 0,
        ScmpActKillProcess => 0x8000_0000,
        ScmpActTrap => 0x0003_0000,
        ScmpActErrno => 0x0005_0000 | errno,
        ScmpActTrace => 0x7ff0_0000 | errno,
        ScmpActLog => 0x7ffc_0000,
        ScmpActAllow => 0x7fff_0000,
        ScmpActNotify => {
            return Err(seccomp_err(
                "SCMP_ACT_NOTIFY needs a seccomp agent, which steps do not have",
            ));
        }
    })
}

/// libseccomp's name of `arch`; `None` for the native one.
fn arch_name(arch: Arch) -> Option<&'static str> {
    Some(match arch {
        Arch::ScmpArchNative => return None,
        Arch::ScmpArchX86 => "x86",
        Arch::ScmpArchX86_64 => "x86_64",
        Arch::ScmpArchX32 => "x32",
        Arch::ScmpArchArm => "arm",
        Arch::ScmpArchAarch64 => "aarch64",
        Arch::ScmpArchMips => "mips",
        Arch::ScmpArchMips64 => "mips64",
        Arch::ScmpArchMips64n32 => "mips64n32",
        Arch::ScmpArchMipsel => "mipsel",
        Arch::ScmpArchMipsel64 => "mipsel64",
        Arch::ScmpArchMipsel64n32 => "mipsel64n32",
        Arch::ScmpArchPpc => "ppc",
        Arch::ScmpArchPpc64 => "ppc64",
        Arch::ScmpArchPpc64le => "ppc64le",
        Arch::ScmpArchS390 => "s390",
        Arch::ScmpArchS390x => "s390x",
        Arch::ScmpArchParisc => "parisc",
        Arch::ScmpArchParisc64 => "parisc64",
        Arch::ScmpArchRiscv64 => "riscv64",
        Arch::ScmpArchLoongarch64 => "loongarch64",
        Arch::ScmpArchM68k => "m68k",
        Arch::ScmpArchSh => "sh",
        Arch::ScmpArchSheb => "sheb",
    })
}

fn c_string(what: &str, s: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| seccomp_err(format!("{what} {s:?} holds a NUL")))
}

/// The conditions of `args`, as runc makes them: the OCI `value` is `datum_a` (the mask
/// of SCMP_CMP_MASKED_EQ) and `valueTwo` is `datum_b`.
fn conditions(name: &str, args: &[oci_spec::runtime::LinuxSeccompArg]) -> Result<Vec<ScmpArgCmp>> {
    args.iter()
        .map(|a| {
            if a.index() >= SYSCALL_MAX_ARGUMENTS {
                return Err(seccomp_err(format!(
                    "{name}: syscalls only have up to {SYSCALL_MAX_ARGUMENTS} arguments ({} given)",
                    a.index()
                )));
            }
            Ok(ScmpArgCmp {
                arg: a.index() as libc::c_uint,
                op: a.op() as libc::c_uint,
                datum_a: a.value(),
                datum_b: a.value_two().unwrap_or(0),
            })
        })
        .collect()
}

/// The rules runc adds for one syscall's `conds`: all of them in one rule (AND), but
/// when two are on the same argument, one rule for each (OR), runc's older behaviour.
fn rule_conditions(conds: Vec<ScmpArgCmp>) -> Vec<Vec<ScmpArgCmp>> {
    let mut counts = [0usize; SYSCALL_MAX_ARGUMENTS];
    for c in &conds {
        if let Some(n) = counts.get_mut(c.arg as usize) {
            *n += 1;
        }
    }
    if counts.iter().any(|n| *n > 1) {
        conds.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conds]
    }
}

/// Compiles `profile` into the classic-BPF program runc would load for it: libseccomp
/// builds it with runc's settings (no_new_privs left to the caller, the default bad-arch
/// action, binary-tree layout past 32 syscall names), skipping the rules whose action is
/// the default one and the syscalls libseccomp does not know. What this does not do:
/// runc's patch that makes syscalls newer than libseccomp knows fail with ENOSYS, and
/// the profile's `flags` (they are flags of the load, not of the program).
pub fn compile(profile: &LinuxSeccomp) -> Result<Bpf> {
    let lib = lib()?;
    let default = scmp_action(profile.default_action(), profile.default_errno_ret())?;
    #[allow(unsafe_code, reason = "libseccomp call")]
    // SAFETY: seccomp_init takes an action by value; it returns a new context or NULL
    let ctx = unsafe { (lib.init)(default) };
    if ctx.is_null() {
        return Err(seccomp_err(format!(
            "seccomp_init({default:#x}) failed: invalid default action"
        )));
    }
    let filter = Filter { lib, ctx };
    let attr = |attr: libc::c_int, value: u32| {
        #[allow(unsafe_code, reason = "libseccomp call")]
        // SAFETY: ctx is a live filter context
        let rc = unsafe { (lib.attr_set)(filter.ctx, attr, value) };
        rc
    };
    let rc = attr(SCMP_FLTATR_CTL_NNP, 0);
    if rc != 0 {
        return Err(seccomp_err(format!("unset no_new_privs: {}", rc_err(rc))));
    }

    #[allow(unsafe_code, reason = "libseccomp call")]
    // SAFETY: seccomp_arch_native takes no argument
    let native = unsafe { (lib.arch_native)() };
    for arch in profile.architectures().iter().flatten() {
        let token = match arch_name(*arch) {
            None => native,
            Some(name) => {
                let c = c_string("architecture", name)?;
                #[allow(unsafe_code, reason = "libseccomp call")]
                // SAFETY: c is NUL-terminated and outlives the call
                let token = unsafe { (lib.arch_resolve_name)(c.as_ptr()) };
                if token == 0 {
                    return Err(seccomp_err(format!(
                        "architecture {name} unknown to this {LIBSECCOMP}"
                    )));
                }
                token
            }
        };
        #[allow(unsafe_code, reason = "libseccomp call")]
        // SAFETY: ctx is a live filter context
        let rc = unsafe { (lib.arch_add)(filter.ctx, token) };
        // EEXIST: already there (the native arch, or listed twice), as runc ignores it
        if rc != 0 && rc != -libc::EEXIST {
            return Err(seccomp_err(format!(
                "add architecture {arch}: {}",
                rc_err(rc)
            )));
        }
    }

    let syscalls = profile.syscalls().as_deref().unwrap_or_default();
    // runc's rule count is one per name
    if syscalls.iter().map(|s| s.names().len()).sum::<usize>() > 32 {
        // not fatal to runc either: libseccomp before 2.5 has no such attribute
        let rc = attr(SCMP_FLTATR_CTL_OPTIMIZE, 2);
        if rc != 0 {
            tracing::debug!("seccomp binary tree optimization: {}", rc_err(rc));
        }
    }

    for call in syscalls {
        let action = scmp_action(call.action(), call.errno_ret())?;
        for name in call.names() {
            if name.is_empty() {
                return Err(seccomp_err("empty string is not a valid syscall"));
            }
            if action == default {
                // libseccomp refuses a rule with the default action; runc skips it
                continue;
            }
            let c = c_string("syscall", name)?;
            #[allow(unsafe_code, reason = "libseccomp call")]
            // SAFETY: c is NUL-terminated and outlives the call
            let nr = unsafe { (lib.syscall_resolve_name)(c.as_ptr()) };
            if nr == NR_SCMP_ERROR {
                // not a syscall of these arches (or newer than libseccomp): runc skips it
                continue;
            }
            let conds = conditions(name, call.args().as_deref().unwrap_or_default())?;
            for conds in rule_conditions(conds) {
                let len = conds.len() as libc::c_uint;
                let ptr = if conds.is_empty() {
                    std::ptr::null()
                } else {
                    conds.as_ptr()
                };
                #[allow(unsafe_code, reason = "libseccomp call")]
                // SAFETY: ctx is a live filter context; ptr is NULL or points to `len`
                // scmp_arg_cmp that outlive the call
                let rc = unsafe { (lib.rule_add_array)(filter.ctx, action, nr, len, ptr) };
                if rc != 0 {
                    return Err(seccomp_err(format!(
                        "add the rule for syscall {name}: {}",
                        rc_err(rc)
                    )));
                }
            }
        }
    }

    let program = export(&filter)?;
    drop(filter);
    if program.len() > BPF_MAXINSNS {
        return Err(seccomp_err(format!(
            "the program has {} instructions, more than the kernel's {BPF_MAXINSNS}",
            program.len()
        )));
    }
    Ok(Bpf(program))
}

/// The filter's program, through a memfd (libseccomp writes it to a file descriptor).
fn export(filter: &Filter) -> Result<Vec<libc::sock_filter>> {
    use std::io::{Read, Seek};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    #[allow(
        unsafe_code,
        reason = "memfd_create has no safe wrapper in the enabled nix features"
    )]
    // SAFETY: the name is NUL-terminated
    let fd = unsafe { libc::memfd_create(c"kiln-seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(seccomp_err(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    #[allow(unsafe_code, reason = "taking ownership of a new descriptor")]
    // SAFETY: fd was just opened and nothing else owns it
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    #[allow(unsafe_code, reason = "libseccomp call")]
    // SAFETY: ctx is a live filter context; the descriptor is open for writing
    let rc = unsafe { (filter.lib.export_bpf)(filter.ctx, file.as_raw_fd()) };
    if rc != 0 {
        return Err(seccomp_err(format!("seccomp_export_bpf: {}", rc_err(rc))));
    }
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut bytes))
        .map_err(|e| seccomp_err(format!("read the exported program back: {e}")))?;
    let size = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 {
        return Err(seccomp_err(format!(
            "seccomp_export_bpf wrote {} bytes, not whole {size}-byte instructions",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|i| libc::sock_filter {
            code: u16::from_ne_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp, name: &str) -> Vec<LinuxSyscall> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|s| s.names().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    #[test]
    fn default_profile_allows_by_capability() {
        let p = default_profile(&[Capability::Chown, Capability::SysChroot]).expect("profile");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        let arches = p.architectures().as_ref().expect("arches");
        assert!(!arches.is_empty());
        assert!(!arches.contains(&Arch::ScmpArchX32));
        assert_eq!(allowed(&p, "read").len(), 1);
        assert_eq!(allowed(&p, "chroot").len(), 1);
        for denied in [
            "mount",
            "unshare",
            "setns",
            "bpf",
            "reboot",
            "init_module",
            "keyctl",
        ] {
            assert!(allowed(&p, denied).is_empty(), "{denied}");
        }
        let clone = allowed(&p, "clone");
        assert_eq!(clone.len(), 1);
        let arg = clone[0].args().as_ref().expect("args")[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(arg.value(), CLONE_NAMESPACES);
        let clone3 = allowed(&p, "clone3");
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(libc::ENOSYS as u32));
        let socket = allowed(&p, "socket");
        assert_eq!(
            socket[0].args().as_ref().expect("args")[0].value(),
            AF_VSOCK
        );
        assert_eq!(allowed(&p, "personality").len(), PERSONAS.len());

        let admin = default_profile(&[Capability::SysAdmin]).expect("profile");
        assert_eq!(allowed(&admin, "mount").len(), 1);
        let clone = allowed(&admin, "clone");
        assert!(clone.len() == 1 && clone[0].args().is_none());
        assert!(allowed(&admin, "chroot").is_empty());
    }

    /// runc.rs's `capabilities(false)`: Docker's defaults.
    const DOCKER_CAPS: &[Capability] = &[
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ];

    const BPF_RET: u16 = 0x06;

    fn insns(b: &Bpf) -> Vec<(u16, u8, u8, u32)> {
        b.0.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
    }

    fn with_rules(p: &LinuxSeccomp, more: Vec<LinuxSyscall>) -> LinuxSeccomp {
        let mut p = p.clone();
        let mut syscalls = p.syscalls().clone().unwrap_or_default();
        syscalls.extend(more);
        p.set_syscalls(Some(syscalls));
        p
    }

    #[test]
    fn compiles_the_default_profile() {
        let p = default_profile(DOCKER_CAPS).expect("profile");
        let bpf = compile(&p).expect("compile");
        assert!(!bpf.0.is_empty());
        assert!(bpf.0.len() <= BPF_MAXINSNS);
        let last = bpf.0.last().expect("an instruction");
        assert_eq!(last.code & 0x07, BPF_RET, "ends with a return");
        assert_eq!(
            format!("{bpf:?}"),
            format!("Bpf {{ instructions: {} }}", bpf.0.len())
        );
        // the filter checks the arches it was given: AUDIT_ARCH_X86_64 and AUDIT_ARCH_I386
        #[cfg(target_arch = "x86_64")]
        for arch in [0xc000_003e_u32, 0x4000_0003] {
            assert!(bpf.0.iter().any(|i| i.k == arch), "{arch:#x}");
        }
        // the same profile, the same program
        assert_eq!(insns(&compile(&p).expect("compile")), insns(&bpf));
    }

    #[test]
    fn skips_what_runc_skips() {
        use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
        use LinuxSeccompOperator::ScmpCmpEq as Eq;
        let p = default_profile(DOCKER_CAPS).expect("profile");
        let base = insns(&compile(&p).expect("compile"));
        // a rule with the default action (ERRNO with the default EPERM, explicit or
        // not), and names no arch has
        let redundant = with_rules(
            &p,
            vec![
                rule(&["keyctl"], Errno, vec![], Some(libc::EPERM as u32)).expect("rule"),
                rule(&["add_key"], Errno, vec![], None).expect("rule"),
                rule(&["no_such_syscall"], Allow, vec![], None).expect("rule"),
            ],
        );
        assert_eq!(insns(&compile(&redundant).expect("compile")), base);
        // two conditions on one argument: one rule each (OR), as separate rules give
        let or = with_rules(
            &p,
            vec![rule(&["keyctl"], Allow, vec![(0, 1, 0, Eq), (0, 2, 0, Eq)], None).expect("rule")],
        );
        let separate = with_rules(
            &p,
            vec![
                rule(&["keyctl"], Allow, vec![(0, 1, 0, Eq)], None).expect("rule"),
                rule(&["keyctl"], Allow, vec![(0, 2, 0, Eq)], None).expect("rule"),
            ],
        );
        let or = insns(&compile(&or).expect("compile"));
        assert_ne!(or, base);
        assert_eq!(or, insns(&compile(&separate).expect("compile")));
        // a notify rule needs an agent
        let notify = with_rules(
            &p,
            vec![rule(&["keyctl"], LinuxSeccompAction::ScmpActNotify, vec![], None).expect("rule")],
        );
        assert!(compile(&notify).is_err());
    }

    #[test]
    fn runc_conditions() {
        let c = |arg, a| ScmpArgCmp {
            arg,
            op: 4,
            datum_a: a,
            datum_b: 0,
        };
        assert_eq!(
            rule_conditions(vec![c(0, 1), c(1, 2)]),
            vec![vec![c(0, 1), c(1, 2)]]
        );
        assert_eq!(
            rule_conditions(vec![c(0, 1), c(1, 2), c(0, 3)]),
            vec![vec![c(0, 1)], vec![c(1, 2)], vec![c(0, 3)]]
        );
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(7u64)
            .value_two(1u64)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .expect("arg");
        assert_eq!(
            conditions("x", &[arg]).expect("conditions"),
            vec![ScmpArgCmp {
                arg: 0,
                op: 7,
                datum_a: 7,
                datum_b: 1
            }]
        );
        let bad = LinuxSeccompArgBuilder::default()
            .index(6usize)
            .build()
            .expect("arg");
        assert!(conditions("x", &[bad]).is_err());
    }

    /// The checks [`filtered_child`] makes under the filter, in order.
    const CHECKS: &[&str] = &[
        "load the filter",
        "getpid works",
        "keyctl fails with EPERM",
        "unshare(CLONE_NEWNS) fails with EPERM",
        "clone3 fails with ENOSYS",
        "socket(AF_VSOCK) fails with EPERM",
        "socket(AF_UNIX) works",
        "personality(0xffffffff) works",
        "clone without namespace flags works",
        "clone(CLONE_NEWUSER) fails with EPERM",
    ];

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// In the forked child: loads `prog` and makes the checks; the number of the first
    /// that fails (1-based), or 0. Raw syscalls only: no allocation, no lock.
    fn filtered_child(prog: &libc::sock_fprog) -> i32 {
        #[allow(unsafe_code, reason = "raw syscalls under test")]
        // SAFETY: prctl and syscall with plain integer arguments and a pointer to a
        // sock_fprog whose program outlives the call; the forked clone _exits at once
        let failed = unsafe {
            let sys = |nr: libc::c_long, a: libc::c_long, b: libc::c_long, c: libc::c_long| {
                libc::syscall(nr, a, b, c, 0 as libc::c_long, 0 as libc::c_long)
            };
            let fails_with = |r: libc::c_long, e: i32| r == -1 && errno() == e;
            let clone = |flags: libc::c_long| {
                let pid = sys(libc::SYS_clone, flags, 0, 0);
                if pid == 0 {
                    libc::_exit(0);
                }
                if pid > 0 {
                    let mut status = 0;
                    libc::waitpid(pid as libc::pid_t, &mut status, 0);
                }
                pid
            };
            let loaded = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    prog as *const libc::sock_fprog,
                ) == 0;
            if !loaded {
                return 1;
            }
            let unix = sys(
                libc::SYS_socket,
                libc::AF_UNIX.into(),
                libc::SOCK_STREAM.into(),
                0,
            );
            if unix >= 0 {
                libc::close(unix as libc::c_int);
            }
            let sigchld = libc::c_long::from(libc::SIGCHLD);
            let results = [
                sys(libc::SYS_getpid, 0, 0, 0) > 0,
                // KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING
                fails_with(sys(libc::SYS_keyctl, 0, -3, 0), libc::EPERM),
                fails_with(
                    sys(libc::SYS_unshare, libc::CLONE_NEWNS.into(), 0, 0),
                    libc::EPERM,
                ),
                fails_with(sys(libc::SYS_clone3, 0, 0, 0), libc::ENOSYS),
                fails_with(
                    sys(libc::SYS_socket, 40, libc::SOCK_STREAM.into(), 0),
                    libc::EPERM,
                ),
                unix >= 0,
                sys(libc::SYS_personality, 0xffff_ffff, 0, 0) >= 0,
                clone(sigchld) > 0,
                fails_with(
                    clone(libc::c_long::from(libc::CLONE_NEWUSER) | sigchld),
                    libc::EPERM,
                ),
            ];
            results.iter().position(|ok| !ok)
        };
        failed.map_or(0, |i| i as i32 + 2)
    }

    #[test]
    fn the_default_filter_refuses_and_allows() {
        let bpf = compile(&default_profile(DOCKER_CAPS).expect("profile")).expect("compile");
        let prog = bpf.fprog();
        #[allow(unsafe_code, reason = "fork and _exit have no safe wrapper")]
        // SAFETY: the child makes raw syscalls only, then _exits
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = filtered_child(&prog);
            #[allow(unsafe_code, reason = "fork and _exit have no safe wrapper")]
            // SAFETY: _exit ends the child without running the parent's destructors
            unsafe {
                libc::_exit(code)
            };
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
            .expect("wait for the child");
        let nix::sys::wait::WaitStatus::Exited(_, code) = status else {
            panic!("the child did not exit: {status:?}");
        };
        let failed = usize::try_from(code)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| CHECKS.get(i));
        assert_eq!(code, 0, "under the filter, this failed: {failed:?}");
        drop(bpf);
    }
}
