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
//! once by running a tiny i386 program, as BuildKit does. Where binfmt_misc is
//! not mounted (a worker in a container, which still shares its host's
//! handlers), the worker checks each architecture the same way, running a
//! tiny `exit(0)` program of it ([`exit0_program`]).
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
        listed_platforms(host, usable)
    }

    /// Why `want` (not the host's platform) cannot run; `None` when an emulator runs it.
    pub fn missing(&self, want: &Platform, dir: &Path) -> Option<String> {
        let arch = &want.architecture;
        let handlers = match self {
            Binfmt::NotMounted => {
                return Some(format!(
                    "binfmt_misc is not mounted at {d} and {arch} binaries do not run; \
                     install QEMU user-mode emulation on the host (Debian: apt-get install \
                     qemu-user-static binfmt-support; a container shares its host's \
                     handlers), or mount binfmt_misc (mount -t binfmt_misc binfmt_misc {d}) \
                     and register an emulator with the F flag",
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

/// A static program of `arch` that exits 0 (`exit(0)` by system call), for
/// checking that this kernel runs `arch`'s binaries, as BuildKit's check binaries
/// do: an ELF header and one program header loading the whole file, then the
/// code. `None` for architectures without one.
pub fn exit0_program(arch: &str) -> Option<Vec<u8>> {
    // (64-bit, little-endian, e_machine, e_flags, load address, code)
    let (wide, little, machine, flags, base, code): (bool, bool, u16, u32, u64, Vec<u8>) =
        match arch {
            // mov eax, 1; xor ebx, ebx; int 0x80
            "386" => (
                false,
                true,
                3,
                0,
                0x0804_8000,
                vec![0xb8, 1, 0, 0, 0, 0x31, 0xdb, 0xcd, 0x80],
            ),
            // mov x0, #0; mov x8, #93; svc #0
            "arm64" => (
                true,
                true,
                183,
                0,
                0x40_0000,
                words_le(&[0xd280_0000, 0xd280_0ba8, 0xd400_0001]),
            ),
            // li a0, 0; li a7, 93; ecall
            "riscv64" => (
                true,
                true,
                243,
                0,
                0x40_0000,
                words_le(&[0x0000_0513, 0x05d0_0893, 0x0000_0073]),
            ),
            // li r3, 0; li r0, 1; sc (ELFv2)
            "ppc64le" => (
                true,
                true,
                21,
                2,
                0x1000_0000,
                words_le(&[0x3860_0000, 0x3800_0001, 0x4400_0002]),
            ),
            // lghi %r2, 0; svc 1
            "s390x" => (
                true,
                false,
                22,
                0,
                0x40_0000,
                vec![0xa7, 0x29, 0, 0, 0x0a, 0x01],
            ),
            // mov r0, #0; mov r7, #1; svc #0 (EABI 5)
            "arm" => (
                false,
                true,
                40,
                0x0500_0000,
                0x1_0000,
                words_le(&[0xe3a0_0000, 0xe3a0_7001, 0xef00_0000]),
            ),
            _ => return None,
        };
    let (ehsize, phsize) = if wide { (64u16, 56u16) } else { (52, 32) };
    let entry = base + u64::from(ehsize) + u64::from(phsize);
    let size = u64::from(ehsize) + u64::from(phsize) + code.len() as u64;
    let mut b: Vec<u8> = Vec::with_capacity(size as usize);
    let u16b = |v: u16| {
        if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        }
    };
    let u32b = |v: u32| {
        if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        }
    };
    let u64b = |v: u64| {
        if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        }
    };
    // a word of the file's class: 4 bytes or 8
    let word = |v: u64| -> Vec<u8> {
        if wide {
            u64b(v).to_vec()
        } else {
            u32b(v as u32).to_vec()
        }
    };
    b.extend_from_slice(b"\x7fELF");
    b.extend_from_slice(&[if wide { 2 } else { 1 }, if little { 1 } else { 2 }, 1]);
    b.extend_from_slice(&[0; 9]);
    b.extend_from_slice(&u16b(2)); // e_type: executable
    b.extend_from_slice(&u16b(machine));
    b.extend_from_slice(&u32b(1)); // e_version
    b.extend(word(entry));
    b.extend(word(u64::from(ehsize))); // e_phoff
    b.extend(word(0)); // e_shoff
    b.extend_from_slice(&u32b(flags));
    b.extend_from_slice(&u16b(ehsize));
    b.extend_from_slice(&u16b(phsize));
    b.extend_from_slice(&u16b(1)); // e_phnum
    b.extend_from_slice(&[0; 6]); // no section headers
    // the program header: load the file at `base`, readable and executable
    b.extend_from_slice(&u32b(1));
    if wide {
        b.extend_from_slice(&u32b(5)); // p_flags
        b.extend(word(0)); // p_offset
        b.extend(word(base)); // p_vaddr
        b.extend(word(base)); // p_paddr
        b.extend(word(size)); // p_filesz
        b.extend(word(size)); // p_memsz
        b.extend(word(0x1_0000)); // p_align
    } else {
        b.extend(word(0));
        b.extend(word(base));
        b.extend(word(base));
        b.extend(word(size));
        b.extend(word(size));
        b.extend_from_slice(&u32b(5));
        b.extend(word(0x1000));
    }
    b.extend_from_slice(&code);
    Some(b)
}

fn words_le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Whether this kernel runs `arch`'s binaries (natively, or through a
/// registered emulator): runs [`exit0_program`] from `scratch`.
pub fn runs(arch: &str, scratch: &Path) -> bool {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(program) = exit0_program(arch) else {
        return false;
    };
    let path = scratch.join(format!("check-{arch}-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&path)
        .and_then(|mut f| f.write_all(&program));
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
    /// where check programs are written
    scratch: PathBuf,
    /// runs an architecture's check program ([`runs`]; tests replace it)
    prober: fn(&str, &Path) -> bool,
    /// check results by architecture (each checked once)
    probed: std::sync::Mutex<std::collections::HashMap<String, bool>>,
}

impl Emulation {
    /// Over binfmt_misc at `dir` (normally [`BINFMT_MISC`]); checks write to `scratch`.
    pub fn new(dir: impl Into<PathBuf>, scratch: impl Into<PathBuf>) -> Emulation {
        Emulation {
            dir: dir.into(),
            host: Platform::host(),
            scratch: scratch.into(),
            prober: runs,
            probed: Default::default(),
        }
    }

    /// Whether `arch`'s check program runs here (once per architecture).
    fn probe(&self, arch: &str) -> bool {
        if exit0_program(arch).is_none() {
            return false;
        }
        match self.probed.lock() {
            Ok(mut m) => *m
                .entry(arch.to_string())
                .or_insert_with(|| (self.prober)(arch, &self.scratch)),
            Err(_) => (self.prober)(arch, &self.scratch),
        }
    }

    /// Whether the host runs `want`'s binaries without an emulator of binfmt_misc.
    fn native(&self, want: &Platform) -> bool {
        want.architecture == self.host.architecture || self.runs_i386(want)
    }

    /// An amd64 kernel with IA-32 emulation runs i386 binaries itself.
    fn runs_i386(&self, want: &Platform) -> bool {
        self.host.architecture == "amd64" && want.architecture == "386" && self.probe("386")
    }

    /// The host's platform first, then those it runs natively (linux/386 on an
    /// amd64 host that runs it) or emulated, in BuildKit's order (read now:
    /// handlers registered after the worker started count). Where binfmt_misc
    /// is not mounted (a worker in a container: the host's handlers still
    /// apply), each architecture of [`LISTED`] with a check program is checked
    /// by running it.
    pub fn platforms(&self) -> Vec<Platform> {
        let mut out = vec![self.host.clone()];
        match Binfmt::read(&self.dir) {
            Binfmt::NotMounted => out.extend(listed_platforms(&self.host, |a| self.probe(a))),
            binfmt => out.extend(binfmt.platforms(&self.host)),
        }
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
        let binfmt = Binfmt::read(&self.dir);
        if binfmt == Binfmt::NotMounted && self.probe(&want.architecture) {
            return Ok(());
        }
        match binfmt.missing(&want, &self.dir) {
            None => Ok(()),
            Some(reason) => Err(crate::Error::NoEmulator {
                platform: want.to_string(),
                host: self.host.to_string(),
                reason,
            }),
        }
    }
}

/// The platforms of [`LISTED`] other than the host's whose architecture
/// `usable` accepts, in that order (arm as v7 and v6).
fn listed_platforms(host: &Platform, usable: impl Fn(&str) -> bool) -> Vec<Platform> {
    let mut out = Vec::new();
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
        e.prober = |_, _| false;
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
        e.prober = |a, _| a == "386";
        e.probed = Default::default();
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
    fn without_binfmt_misc_only_what_runs_counts() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut e = Emulation::new(d.path().join("none"), d.path());
        e.host = Platform::new("linux", "amd64", None);
        e.prober = |_, _| false;
        assert_eq!(plats(&e), vec!["linux/amd64"]);
        let p = Platform::parse("linux/arm64").expect("platform");
        let msg = e.check(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("not mounted"), "{msg}");
        assert!(msg.contains("mount -t binfmt_misc"), "{msg}");
        assert!(msg.contains("qemu-user-static"), "{msg}");

        // unmounted (a worker in a container): what the check programs run counts
        e.prober = |a, _| a == "arm64" || a == "arm";
        e.probed = Default::default();
        assert_eq!(
            plats(&e),
            vec!["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6"]
        );
        assert!(e.check(&p).is_ok());
        let s390x = Platform::parse("linux/s390x").expect("platform");
        let msg = e
            .check(&s390x)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("s390x binaries do not run"), "{msg}");

        let d = dir_with(&[("qemu-aarch64", AARCH64)]);
        std::fs::write(d.path().join("status"), "disabled\n").expect("status");
        let mut e = Emulation::new(d.path(), d.path());
        e.host = Platform::new("linux", "amd64", None);
        e.prober = |_, _| false;
        assert_eq!(plats(&e), vec!["linux/amd64"]);
        let msg = e.check(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("binfmt_misc is disabled"), "{msg}");
    }

    #[test]
    fn check_programs_are_executables_of_their_architecture_and_run() {
        let d = tempfile::tempdir().expect("tempdir");
        let live = Binfmt::read(Path::new(BINFMT_MISC));
        let host = Platform::host();
        for arch in ["386", "arm64", "riscv64", "ppc64le", "s390x", "arm"] {
            let bin = exit0_program(arch).expect("a program");
            assert_eq!(elf_architecture(&bin), Some(arch), "{arch}");
            // where this machine runs the architecture (natively, or through a
            // registered emulator as under `make test`), the program exits 0
            let emulated =
                live.missing(&Platform::new("linux", arch, None), Path::new(BINFMT_MISC));
            if arch == host.architecture || emulated.is_none() {
                assert!(runs(arch, d.path()), "{arch} did not run");
            }
        }
        assert_eq!(exit0_program("sparc64"), None);
        assert!(!runs("sparc64", d.path()));
        // nothing is left behind
        assert_eq!(std::fs::read_dir(d.path()).map(|r| r.count()).ok(), Some(0));
    }
}
