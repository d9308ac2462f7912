//! Steps of other platforms through emulation: the platforms this worker can
//! run are the host's plus those the kernel hands to an emulator (QEMU
//! user-mode, e.g. Debian's `qemu-user-static`) through binfmt_misc.
//!
//! A handler counts when it is enabled, matches ELF binaries of one machine
//! (its magic: class, byte order and `e_machine` at offset 0) and has the `F`
//! flag: the kernel opened its interpreter when it was registered, so it runs
//! inside a step's root, where the interpreter's path does not exist. (BuildKit
//! checks the same by running a tiny binary of each architecture in a chroot.)
//! Nothing else is needed at run time: the kernel starts the emulator for
//! every foreign binary a step executes. An amd64 host also runs i386
//! binaries itself when its kernel has IA-32 emulation, which the worker checks
//! once by running a tiny i386 program, as BuildKit does.
//!
//! The worker lists (Info, a farm registration, `ListWorkers`) the host's
//! platform, then those of BuildKit's list ([`LISTED`]) it runs, in BuildKit's
//! order and normal form: `linux/arm64`, `linux/riscv64`, `linux/386`,
//! `linux/arm/v7`, `linux/arm/v6`, ...
//!
//! An exec step whose platform is neither the host's nor emulated fails
//! before its container starts, saying what is missing and how to fix it,
//! instead of with "exec format error".

use kiln_oci::Platform;
use std::path::{Path, PathBuf};

/// Where binfmt_misc is mounted.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// The architectures a worker lists when an emulator runs them, in the order
/// BuildKit's worker lists them.
pub const LISTED: &[&str] = &[
    "amd64", "arm64", "riscv64", "ppc64", "ppc64le", "s390x", "386", "mips64le", "mips64",
    "loong64", "arm",
];

/// One registered binfmt_misc handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// its file name under binfmt_misc (`qemu-aarch64`)
    pub name: String,
    pub enabled: bool,
    /// the `F` flag: the interpreter is opened at registration
    pub fix_binary: bool,
    pub interpreter: String,
    /// the GOARCH-style architecture of the ELF binaries it matches
    pub architecture: Option<String>,
}

/// What binfmt_misc holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binfmt {
    /// not mounted (or unreadable)
    NotMounted,
    /// mounted; `enabled` is its global status
    Mounted {
        enabled: bool,
        handlers: Vec<Handler>,
    },
}

impl Binfmt {
    /// Reads binfmt_misc at `dir` (normally [`BINFMT_MISC`]).
    pub fn read(dir: &Path) -> Binfmt {
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            return Binfmt::NotMounted;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Binfmt::NotMounted;
        };
        let mut handlers: Vec<Handler> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "status" || name == "register" {
                    return None;
                }
                let text = std::fs::read_to_string(e.path()).ok()?;
                Some(parse_handler(&name, &text))
            })
            .collect();
        handlers.sort_by(|a, b| a.name.cmp(&b.name));
        Binfmt::Mounted {
            enabled: status.trim() == "enabled",
            handlers,
        }
    }

    /// The emulated platforms: those of BuildKit's list ([`LISTED`]) a usable
    /// handler runs, other than the host's, in its order and normal form
    /// (`linux/arm64`; arm as `linux/arm/v7` and `linux/arm/v6`). Steps of the other
    /// architectures a handler runs (`mips`, `ppc`, ...) run too; they are not listed.
    pub fn platforms(&self, host: &Platform) -> Vec<Platform> {
        let Binfmt::Mounted {
            enabled: true,
            handlers,
        } = self
        else {
            return Vec::new();
        };
        let usable = |arch: &str| {
            handlers
                .iter()
                .any(|h| h.enabled && h.fix_binary && h.architecture.as_deref() == Some(arch))
        };
        let mut out: Vec<Platform> = Vec::new();
        for arch in LISTED {
            if *arch == host.architecture || !usable(arch) {
                continue;
            }
            if *arch == "arm" {
                out.push(Platform::new("linux", "arm", Some("v7")));
                out.push(Platform::new("linux", "arm", Some("v6")));
            } else {
                out.push(Platform::new("linux", arch, None));
            }
        }
        out
    }

    /// Why `want` (not the host's platform) cannot run; `None` when an emulator runs it.
    pub fn missing(&self, want: &Platform, dir: &Path) -> Option<String> {
        let arch = &want.architecture;
        let handlers = match self {
            Binfmt::NotMounted => {
                return Some(format!(
                    "binfmt_misc is not mounted at {d} (mount -t binfmt_misc binfmt_misc {d})",
                    d = dir.display()
                ));
            }
            Binfmt::Mounted { enabled: false, .. } => {
                return Some(format!(
                    "binfmt_misc is disabled (echo 1 > {})",
                    dir.join("status").display()
                ));
            }
            Binfmt::Mounted { handlers, .. } => handlers,
        };
        let mine: Vec<&Handler> = handlers
            .iter()
            .filter(|h| h.architecture.as_deref() == Some(arch.as_str()))
            .collect();
        if mine.iter().any(|h| h.enabled && h.fix_binary) {
            return None;
        }
        if let Some(h) = mine.iter().find(|h| !h.enabled) {
            return Some(format!(
                "its binfmt_misc handler {n} is disabled (update-binfmts --enable {n}, or echo 1 > {})",
                dir.join(&h.name).display(),
                n = h.name
            ));
        }
        if let Some(h) = mine.first() {
            return Some(format!(
                "its binfmt_misc handler {} is registered without the F flag, so its \
                 interpreter {} is not found inside a step's root; register it with flags F \
                 (as Debian's qemu-user-static does)",
                h.name, h.interpreter
            ));
        }
        Some(format!(
            "no binfmt_misc handler runs {arch} binaries; install QEMU user-mode emulation \
             (Debian: apt-get install qemu-user-static binfmt-support) or register an \
             emulator for {arch} with the F flag in {}",
            dir.join("register").display()
        ))
    }
}

/// Parses one handler file (`enabled`, `interpreter P`, `flags: F`, `offset N`,
/// `magic HEX`, `mask HEX`).
pub fn parse_handler(name: &str, text: &str) -> Handler {
    let mut h = Handler {
        name: name.to_string(),
        enabled: false,
        fix_binary: false,
        interpreter: String::new(),
        architecture: None,
    };
    let (mut offset, mut magic, mut mask) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line == "enabled" {
            h.enabled = true;
        } else if let Some(i) = line.strip_prefix("interpreter ") {
            h.interpreter = i.to_string();
        } else if let Some(f) = line.strip_prefix("flags:") {
            h.fix_binary = f.trim().contains('F');
        } else if let Some(o) = line.strip_prefix("offset ") {
            offset = o.trim().parse::<u64>().ok();
        } else if let Some(m) = line.strip_prefix("magic ") {
            magic = hex(m.trim());
        } else if let Some(m) = line.strip_prefix("mask ") {
            mask = hex(m.trim());
        }
    }
    if offset == Some(0)
        && let Some(magic) = magic
    {
        let masked: Vec<u8> = match mask {
            Some(mask) => magic
                .iter()
                .zip(mask.iter().chain(std::iter::repeat(&0xff)))
                .map(|(a, m)| a & m)
                .collect(),
            None => magic,
        };
        h.architecture = elf_architecture(&masked).map(str::to_string);
    }
    h
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// The GOARCH-style architecture of ELF binaries whose first bytes are `magic`
/// (masked): class, byte order and `e_machine`.
pub fn elf_architecture(magic: &[u8]) -> Option<&'static str> {
    if magic.len() < 20 || magic.get(..4)? != b"\x7fELF" {
        return None;
    }
    let class64 = match magic[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match magic[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let machine = if little {
        u16::from_le_bytes([magic[18], magic[19]])
    } else {
        u16::from_be_bytes([magic[18], magic[19]])
    };
    Some(match (machine, class64, little) {
        (3, false, true) => "386",
        (62, true, true) => "amd64",
        (40, false, true) => "arm",
        (40, false, false) => "armbe",
        (183, true, true) => "arm64",
        (183, true, false) => "arm64be",
        (243, true, true) => "riscv64",
        (21, true, true) => "ppc64le",
        (21, true, false) => "ppc64",
        (20, false, false) => "ppc",
        (22, true, false) => "s390x",
        (8, true, true) => "mips64le",
        (8, true, false) => "mips64",
        (8, false, _) => {
            // MIPS n32 (EF_MIPS_ABI2 in e_flags) is not GOARCH mips/mipsle
            if magic.get(36..40).is_some_and(|f| f.iter().any(|b| *b != 0)) {
                return None;
            }
            if little { "mipsle" } else { "mips" }
        }
        (258, true, true) => "loong64",
        (43, true, false) => "sparc64",
        _ => return None,
    })
}

/// An i386 program that exits 0: an ELF header, one program header loading the
/// file at 0x08048000, and `mov eax, 1; xor ebx, ebx; int 0x80`.
fn i386_exit0() -> Vec<u8> {
    const BASE: u32 = 0x0804_8000;
    const CODE: [u8; 9] = [0xb8, 0x01, 0x00, 0x00, 0x00, 0x31, 0xdb, 0xcd, 0x80];
    let size = (52 + 32 + CODE.len()) as u32;
    let mut b = Vec::with_capacity(size as usize);
    b.extend_from_slice(b"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00");
    b.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    b.extend_from_slice(&3u16.to_le_bytes()); // e_machine: i386
    b.extend_from_slice(&1u32.to_le_bytes()); // e_version
    b.extend_from_slice(&(BASE + 52 + 32).to_le_bytes()); // e_entry
    b.extend_from_slice(&52u32.to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&52u16.to_le_bytes()); // e_ehsize
    b.extend_from_slice(&32u16.to_le_bytes()); // e_phentsize
    b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&[0; 6]); // no section headers
    b.extend_from_slice(&1u32.to_le_bytes()); // p_type: load
    b.extend_from_slice(&0u32.to_le_bytes()); // p_offset
    b.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    b.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    b.extend_from_slice(&size.to_le_bytes()); // p_filesz
    b.extend_from_slice(&size.to_le_bytes()); // p_memsz
    b.extend_from_slice(&5u32.to_le_bytes()); // p_flags: read, execute
    b.extend_from_slice(&0x1000u32.to_le_bytes()); // p_align
    b.extend_from_slice(&CODE);
    b
}

/// Whether this kernel runs i386 binaries (an amd64 kernel with IA-32
/// emulation, or a registered emulator): runs [`i386_exit0`] from `scratch`,
/// as BuildKit runs its check binaries.
fn runs_i386(scratch: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = scratch.join(format!("check-386-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)
        .and_then(|mut f| f.write_all(&i386_exit0()));
    let mut ok = false;
    if written.is_ok() {
        // a process forked elsewhere may hold the file open for writing a moment
        for _ in 0..20 {
            match std::process::Command::new(&path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
            {
                Ok(st) => {
                    ok = st.success();
                    break;
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    ok
}

/// Platforms a worker runs and the check of an exec step's platform, over
/// binfmt_misc at one place.
#[derive(Debug)]
pub struct Emulation {
    dir: PathBuf,
    host: Platform,
    /// where the i386 check program is written
    scratch: PathBuf,
    /// whether an amd64 host runs i386 binaries (checked once)
    i386: std::sync::OnceLock<bool>,
}

impl Emulation {
    /// Over binfmt_misc at `dir` (normally [`BINFMT_MISC`]); checks write to `scratch`.
    pub fn new(dir: impl Into<PathBuf>, scratch: impl Into<PathBuf>) -> Emulation {
        Emulation {
            dir: dir.into(),
            host: Platform::host(),
            scratch: scratch.into(),
            i386: std::sync::OnceLock::new(),
        }
    }

    /// Whether the host runs `want`'s binaries without an emulator of binfmt_misc.
    fn native(&self, want: &Platform) -> bool {
        want.architecture == self.host.architecture || self.runs_i386(want)
    }

    fn runs_i386(&self, want: &Platform) -> bool {
        self.host.architecture == "amd64"
            && want.architecture == "386"
            && *self.i386.get_or_init(|| runs_i386(&self.scratch))
    }

    /// The host's platform first, then those it runs natively (linux/386 on an
    /// amd64 host that runs it) or emulated, in BuildKit's order (read now:
    /// handlers registered after the worker started count).
    pub fn platforms(&self) -> Vec<Platform> {
        let mut out = vec![self.host.clone()];
        out.extend(Binfmt::read(&self.dir).platforms(&self.host));
        let i386 = Platform::new("linux", "386", None);
        if !out.contains(&i386) && self.runs_i386(&i386) {
            out.push(i386);
        }
        let rank = |p: &Platform| LISTED.iter().position(|a| *a == p.architecture);
        if let Some(rest) = out.get_mut(1..) {
            rest.sort_by_key(rank);
        }
        out
    }

    /// Whether a step of `want` can run here; the error says why not and how to fix it.
    pub fn check(&self, want: &Platform) -> Result<(), crate::Error> {
        let want = want.normalized();
        if want.os.is_empty() || want.architecture.is_empty() {
            return Ok(());
        }
        if want.os != "linux" {
            return Err(crate::Error::NoEmulator {
                platform: want.to_string(),
                host: self.host.to_string(),
                reason: "this worker runs linux steps only".into(),
            });
        }
        if self.native(&want) {
            return Ok(());
        }
        match Binfmt::read(&self.dir).missing(&want, &self.dir) {
            None => Ok(()),
            Some(reason) => Err(crate::Error::NoEmulator {
                platform: want.to_string(),
                host: self.host.to_string(),
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
    const ARM: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/arm-binfmt-P\nflags: PF\noffset 0\nmagic 7f454c4601010100000000000000000002002800\nmask ffffffffffffff00fffffffffffffffffeffffff\n";
    const S390X: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/s390x-binfmt-P\nflags: PF\noffset 0\nmagic 7f454c4602020100000000000000000000020016\nmask fffffffffffffffcfffffffffffffffffffeffff\n";
    const PPC64LE: &str = "enabled\ninterpreter /x\nflags: PF\noffset 0\nmagic 7f454c4602010100000000000000000002001500\nmask fffffffffffffffcfffffffffffffffffeffff00\n";
    const MIPSN32: &str = "enabled\ninterpreter /x\nflags: PF\noffset 0\nmagic 7f454c46010201000000000000000000000200080000000000000000000000000000000000000020\nmask ffffffffffffff00fefffffffffffffffffeffff0000000000000000000000000000000000000020\n";
    const MIPS: &str = "enabled\ninterpreter /x\nflags: PF\noffset 0\nmagic 7f454c46010201000000000000000000000200080000000000000000000000000000000000000000\nmask ffffffffffffff00fefffffffffffffffffeffff0000000000000000000000000000000000000020\n";
    const LOONG: &str = "enabled\ninterpreter /x\nflags: PF\noffset 0\nmagic 7f454c4602010100000000000000000002000201\nmask fffffffffffffffc00fffffffffffffffeffffff\n";
    const PYTHON: &str =
        "enabled\ninterpreter /usr/bin/python3.11\nflags: \noffset 0\nmagic a70d0d0a\n";

    fn arch(text: &str) -> Option<String> {
        parse_handler("h", text).architecture
    }

    #[test]
    fn handlers_name_the_architecture_of_their_elf_magic() {
        assert_eq!(arch(AARCH64).as_deref(), Some("arm64"));
        assert_eq!(arch(ARM).as_deref(), Some("arm"));
        assert_eq!(arch(S390X).as_deref(), Some("s390x"));
        assert_eq!(arch(PPC64LE).as_deref(), Some("ppc64le"));
        assert_eq!(arch(LOONG).as_deref(), Some("loong64"));
        assert_eq!(arch(MIPSN32), None);
        assert_eq!(arch(MIPS).as_deref(), Some("mips"));
        assert_eq!(arch(PYTHON), None);
        let h = parse_handler("qemu-aarch64", AARCH64);
        assert!(h.enabled && h.fix_binary);
        assert_eq!(h.interpreter, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P");
        assert!(!parse_handler("p", PYTHON).fix_binary);
    }

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("status"), "enabled\n").expect("status");
        std::fs::write(d.path().join("register"), "").expect("register");
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).expect("handler");
        }
        d
    }

    fn plats(e: &Emulation) -> Vec<String> {
        e.platforms().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn platforms_are_the_host_and_usable_handlers() {
        let d = dir_with(&[
            ("qemu-aarch64", AARCH64),
            ("qemu-arm", ARM),
            ("qemu-mips", MIPS),
            ("qemu-s390x", &S390X.replace("enabled", "disabled")),
            ("qemu-ppc64le", &PPC64LE.replace("flags: PF", "flags: P")),
            ("python3.11", PYTHON),
        ]);
        let mut e = Emulation::new(d.path(), d.path());
        e.host = Platform::new("linux", "amd64", None);
        e.i386 = std::sync::OnceLock::from(false);
        assert_eq!(
            plats(&e),
            vec!["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6"]
        );
        for ok in ["linux/arm64", "linux/arm/v7", "linux/arm", "linux/amd64"] {
            let p = Platform::parse(ok).expect("platform");
            assert!(e.check(&p).is_ok(), "{ok}");
        }
        let err = |s: &str| {
            let p = Platform::parse(s).expect("platform");
            match e.check(&p) {
                Err(e) => e.to_string(),
                Ok(()) => String::new(),
            }
        };
        let s390x = err("linux/s390x");
        assert!(s390x.contains("linux/s390x"), "{s390x}");
        assert!(s390x.contains("qemu-s390x is disabled"), "{s390x}");
        let ppc = err("linux/ppc64le");
        assert!(ppc.contains("without the F flag"), "{ppc}");
        let riscv = err("linux/riscv64");
        assert!(
            riscv.contains("no binfmt_misc handler runs riscv64"),
            "{riscv}"
        );
        assert!(riscv.contains("qemu-user-static"), "{riscv}");
        assert!(err("windows/amd64").contains("linux steps only"));
        // an amd64 kernel without IA-32 emulation and no i386 handler
        assert!(err("linux/386").contains("no binfmt_misc handler runs 386"));
        e.i386 = std::sync::OnceLock::from(true);
        assert!(e.check(&Platform::new("linux", "386", None)).is_ok());
        assert_eq!(
            plats(&e),
            [
                "linux/amd64",
                "linux/arm64",
                "linux/386",
                "linux/arm/v7",
                "linux/arm/v6"
            ]
        );
    }

    #[test]
    fn nothing_is_emulated_when_binfmt_misc_is_not_mounted_or_disabled() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut e = Emulation::new(d.path().join("none"), d.path());
        e.host = Platform::new("linux", "amd64", None);
        e.i386 = std::sync::OnceLock::from(false);
        assert_eq!(plats(&e), vec!["linux/amd64"]);
        let p = Platform::parse("linux/arm64").expect("platform");
        let msg = e.check(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("not mounted"), "{msg}");
        assert!(msg.contains("mount -t binfmt_misc"), "{msg}");

        let d = dir_with(&[("qemu-aarch64", AARCH64)]);
        std::fs::write(d.path().join("status"), "disabled\n").expect("status");
        let mut e = Emulation::new(d.path(), d.path());
        e.host = Platform::new("linux", "amd64", None);
        e.i386 = std::sync::OnceLock::from(false);
        assert_eq!(plats(&e), vec!["linux/amd64"]);
        let msg = e.check(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("binfmt_misc is disabled"), "{msg}");
    }

    #[test]
    fn the_i386_check_program_is_an_i386_executable() {
        let bin = i386_exit0();
        assert_eq!(bin.len(), 52 + 32 + 9);
        assert_eq!(elf_architecture(&bin), Some("386"));
        // on an amd64 host it runs when the kernel has IA-32 emulation (most do);
        // either way the check answers and leaves nothing behind
        let d = tempfile::tempdir().expect("tempdir");
        let _ = runs_i386(d.path());
        assert_eq!(std::fs::read_dir(d.path()).map(|r| r.count()).ok(), Some(0));
    }
}
