//! The stable-toolchain fuzz runner: no libFuzzer, no coverage feedback, a
//! seeded mutation loop over each target's corpus (`corpus/<target>/` plus
//! the seeds the target makes in code).
//!
//! ```text
//! stable_fuzz --target NAME|all [--seconds N] [--seed S] [--timeout SECS]
//!             [--max-mem MIB] [--corpus DIR] [--crashes DIR]
//! stable_fuzz --target NAME --reproduce FILE
//! stable_fuzz --list
//! stable_fuzz --dump-seeds DIR       (the seeds made in code, as files)
//! stable_fuzz SECONDS [SEED]          (the dockerfile target, as before)
//! ```
//!
//! Every corpus entry runs first as is, then mutated inputs until the time
//! budget (per target) is spent. A failure stops the run with a non-zero
//! exit and saves the input under `crashes/<target>/`:
//! - a panic, on any thread (`crash-*`, exit 1);
//! - an input still running after `--timeout` seconds (`hang-*`, exit 2);
//! - more than `--max-mem` MiB allocated at once (`oom-*`, exit 3).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_fuzz::{Rng, Target};

// ---- allocation cap -------------------------------------------------------

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The cap (0: none).
static CAP: AtomicUsize = AtomicUsize::new(0);
/// The input being run (its buffer never moves while it runs) and where an
/// over-the-cap input is saved: read by the allocator, which cannot allocate.
static CUR_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CUR_LEN: AtomicUsize = AtomicUsize::new(0);
static OOM_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

struct Counting;

fn raw_write(fd: i32, b: &[u8]) {
    // SAFETY: writing a valid buffer to a file descriptor
    unsafe {
        libc::write(fd, b.as_ptr().cast(), b.len());
    }
}

#[cold]
fn over_cap() -> ! {
    raw_write(2, b"\nFAIL: the input allocated more than --max-mem; ");
    let path = OOM_PATH.load(Ordering::SeqCst);
    let ptr = CUR_PTR.load(Ordering::SeqCst);
    let len = CUR_LEN.load(Ordering::SeqCst);
    if !path.is_null() && !ptr.is_null() {
        // SAFETY: path is a leaked NUL-terminated CString; ptr/len the current input
        unsafe {
            let fd = libc::open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644);
            if fd >= 0 {
                libc::write(fd, ptr.cast(), len);
                libc::close(fd);
                raw_write(2, b"input saved to ");
                raw_write(2, std::ffi::CStr::from_ptr(path).to_bytes());
                raw_write(2, b"\n");
            }
        }
    }
    // SAFETY: exiting without unwinding or allocating
    unsafe { libc::_exit(3) }
}

fn track(add: usize) {
    let now = LIVE.fetch_add(add, Ordering::Relaxed) + add;
    let cap = CAP.load(Ordering::Relaxed);
    if cap != 0 && now > cap {
        over_cap();
    }
}

// SAFETY: forwards to the system allocator, only counting
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        track(l.size());
        // SAFETY: same layout contract as ours
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        track(l.size());
        // SAFETY: same layout contract as ours
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: p was allocated by System with l
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            track(new - l.size());
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        // SAFETY: p was allocated by System with l
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- panics ---------------------------------------------------------------

/// Set by the panic hook, on whatever thread panicked.
static PANICKED: AtomicBool = AtomicBool::new(false);
static PANIC_MESSAGE: Mutex<String> = Mutex::new(String::new());

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let msg = format!(
            "thread '{}' panicked at {}:\n{}\n{}",
            thread.name().unwrap_or("<unnamed>"),
            info.location()
                .map(|l| l.to_string())
                .unwrap_or_else(|| "?".into()),
            info.payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default(),
            std::backtrace::Backtrace::force_capture()
        );
        if let Ok(mut m) = PANIC_MESSAGE.lock()
            && m.is_empty()
        {
            *m = msg;
        }
        PANICKED.store(true, Ordering::SeqCst);
    }));
}

/// Runs one input; `Err(message)` when something panicked.
fn run_one(t: &Target, input: &[u8]) -> Result<(), String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(input)));
    if r.is_err() || PANICKED.load(Ordering::SeqCst) {
        let msg = PANIC_MESSAGE.lock().map(|m| m.clone()).unwrap_or_default();
        return Err(if msg.is_empty() {
            "panic (no message)".into()
        } else {
            msg
        });
    }
    Ok(())
}

// ---- options --------------------------------------------------------------

struct Opts {
    target: String,
    seconds: u64,
    seed: u64,
    timeout: u64,
    max_mem_mib: usize,
    corpus: PathBuf,
    crashes: PathBuf,
    reproduce: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: stable_fuzz --target NAME|all [--seconds N] [--seed S] [--timeout SECS] [--max-mem MIB] [--corpus DIR] [--crashes DIR]\n       stable_fuzz --target NAME --reproduce FILE\n       stable_fuzz --list"
    );
    std::process::exit(64)
}

fn parse_args() -> Opts {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut o = Opts {
        target: String::new(),
        seconds: 60,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
        timeout: 10,
        max_mem_mib: 2048,
        corpus: here.join("corpus"),
        crashes: here.join("crashes"),
        reproduce: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let mut positional = Vec::new();
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = || {
            i += 1;
            args.get(i).cloned().unwrap_or_else(|| usage())
        };
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match a {
            "--target" => o.target = value(),
            "--seconds" => o.seconds = num(value()),
            "--seed" => o.seed = num(value()),
            "--timeout" => o.timeout = num(value()),
            "--max-mem" => o.max_mem_mib = num(value()) as usize,
            "--corpus" => o.corpus = value().into(),
            "--crashes" => o.crashes = value().into(),
            "--reproduce" => o.reproduce = Some(value().into()),
            "--dump-seeds" => {
                // the seeds a target makes in code, as files (to look at, or to reproduce one)
                let dir = PathBuf::from(value());
                for t in kiln_fuzz::all_targets() {
                    let d = dir.join(t.name);
                    std::fs::create_dir_all(&d).expect("mkdir");
                    for (n, s) in (t.seeds)().iter().enumerate() {
                        std::fs::write(d.join(format!("seed-{n}")), s).expect("write");
                    }
                }
                std::process::exit(0);
            }
            "--list" => {
                for t in kiln_fuzz::all_targets() {
                    println!("{:<15} {}", t.name, t.about);
                }
                std::process::exit(0);
            }
            "-h" | "--help" => usage(),
            s if !s.starts_with('-') => positional.push(s.to_string()),
            _ => usage(),
        }
        i += 1;
    }
    // the old interface: `stable_fuzz SECONDS [SEED]` fuzzes the Dockerfile parser
    if o.target.is_empty() {
        o.target = "dockerfile".into();
        if let Some(s) = positional.first() {
            o.seconds = s.parse().unwrap_or_else(|_| usage());
        }
        if let Some(s) = positional.get(1) {
            o.seed = s.parse().unwrap_or_else(|_| usage());
        }
    }
    o
}

// ---- the loop -------------------------------------------------------------

/// Inputs started (the watchdog sees one that does not end).
static STARTED: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since `EPOCH` when the current input started (0: none running).
static STARTED_AT: AtomicU64 = AtomicU64::new(0);

fn since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64 + 1
}

fn corpus_of(t: &Target, dir: &Path) -> Vec<Vec<u8>> {
    let mut out = (t.seeds)();
    let d = dir.join(t.name);
    if let Ok(rd) = std::fs::read_dir(&d) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if let Ok(b) = std::fs::read(&f) {
                out.push(b);
            }
        }
    }
    out
}

fn save(crashes: &Path, t: &Target, kind: &str, input: &[u8]) -> PathBuf {
    use sha2::Digest;
    let dir = crashes.join(t.name);
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("{kind}-{}", &hex::encode(sha2::Sha256::digest(input))[..16]);
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("cannot save the input to {}: {e}", path.display());
    }
    path
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

enum Outcome {
    Done { execs: u64 },
    Failed { input: Vec<u8>, message: String },
}

/// The fuzz loop for one target, on the calling thread.
fn fuzz(t: &Target, o: &Opts, epoch: Instant) -> Outcome {
    let corpus0 = corpus_of(t, &o.corpus);
    let mut corpus = corpus0.clone();
    let mut rng = Rng::new(o.seed);
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    // room for any input, so its buffer never moves while it runs
    let cap = corpus0
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(t.max_len)
        * 2
        + 4096;
    let mut current: Vec<u8> = Vec::with_capacity(cap);
    let mut execs: u64 = 0;
    let mut next_report = Instant::now() + Duration::from_secs(60);
    let run = |input: &mut Vec<u8>, execs: &mut u64| -> Result<(), String> {
        input.truncate(cap);
        CUR_PTR.store(input.as_mut_ptr(), Ordering::SeqCst);
        CUR_LEN.store(input.len(), Ordering::SeqCst);
        STARTED.fetch_add(1, Ordering::SeqCst);
        STARTED_AT.store(since(epoch), Ordering::SeqCst);
        let r = run_one(t, input);
        STARTED_AT.store(0, Ordering::SeqCst);
        *execs += 1;
        r
    };
    // every corpus entry as is
    for entry in &corpus0 {
        current.clear();
        current.extend_from_slice(entry);
        if let Err(message) = run(&mut current, &mut execs) {
            return Outcome::Failed {
                input: current,
                message,
            };
        }
    }
    while Instant::now() < deadline {
        for _ in 0..64 {
            current.clear();
            current.extend_from_slice(&corpus[rng.below(corpus.len())]);
            if let Some(m) = t.mutate
                && rng.one_in(2)
            {
                m(&mut rng, &mut current, t.tokens);
                current.truncate(t.max_len);
            }
            if current.is_empty() || !rng.one_in(4) {
                kiln_fuzz::mutate::mutate_bytes(
                    &mut rng,
                    &mut current,
                    t.tokens,
                    &corpus0,
                    t.max_len,
                );
            }
            if let Err(message) = run(&mut current, &mut execs) {
                return Outcome::Failed {
                    input: current,
                    message,
                };
            }
            // keep some mutated inputs so mutations compound
            if rng.one_in(32) {
                if corpus.len() < corpus0.len() + 512 {
                    corpus.push(current.clone());
                } else {
                    let i = corpus0.len() + rng.below(corpus.len() - corpus0.len());
                    corpus[i] = current.clone();
                }
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            eprintln!(
                "[{}] {} execs, {:.0}/s, cpu {:.0}s, {} bytes live",
                t.name,
                execs,
                execs as f64
                    / (o.seconds as f64
                        - deadline
                            .saturating_duration_since(Instant::now())
                            .as_secs_f64())
                    .max(1.0),
                cpu_seconds(),
                LIVE.load(Ordering::Relaxed)
            );
        }
    }
    Outcome::Done { execs }
}

fn reproduce_hint(t: &Target, path: &Path) -> String {
    format!(
        "reproduce: fuzz/run-stable.sh --target {} --reproduce {}",
        t.name,
        path.display()
    )
}

fn main() {
    let o = parse_args();
    install_panic_hook();
    let targets: Vec<Target> = if o.target == "all" {
        kiln_fuzz::all_targets()
    } else {
        match kiln_fuzz::target(&o.target) {
            Some(t) => vec![t],
            None => {
                eprintln!("no target {:?}; --list names them", o.target);
                std::process::exit(64);
            }
        }
    };
    CAP.store(o.max_mem_mib << 20, Ordering::SeqCst);

    if let Some(file) = &o.reproduce {
        let t = &targets[0];
        let input = std::fs::read(file).unwrap_or_else(|e| {
            eprintln!("{}: {e}", file.display());
            std::process::exit(64)
        });
        let start = Instant::now();
        match run_one(t, &input) {
            Ok(()) => {
                println!(
                    "{}: no failure with {} ({} bytes, {:.3}s)",
                    t.name,
                    file.display(),
                    input.len(),
                    start.elapsed().as_secs_f64()
                );
            }
            Err(message) => {
                eprintln!("{}: FAIL with {}:\n{message}", t.name, file.display());
                std::process::exit(1);
            }
        }
        return;
    }

    let epoch = Instant::now();
    let mut total = 0;
    for t in targets {
        let oom = o
            .crashes
            .join(t.name)
            .join(format!("oom-{}", std::process::id()));
        let _ = std::fs::create_dir_all(oom.parent().expect("parent"));
        let c = std::ffi::CString::new(oom.as_os_str().as_encoded_bytes()).expect("path");
        OOM_PATH.store(c.into_raw(), Ordering::SeqCst);
        let started = Instant::now();
        let cpu0 = cpu_seconds();
        let outcome = std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("fuzz-{}", t.name))
                .spawn_scoped(s, || fuzz(&t, &o, epoch))
                .expect("spawn");
            // the watchdog: an input that runs past --timeout is a hang
            loop {
                if h.is_finished() {
                    return h.join().unwrap_or_else(|_| Outcome::Failed {
                        input: Vec::new(),
                        message: "the fuzz loop itself panicked".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
                let at = STARTED_AT.load(Ordering::SeqCst);
                if at != 0 && since(epoch).saturating_sub(at) > o.timeout * 1000 {
                    let ptr = CUR_PTR.load(Ordering::SeqCst);
                    let len = CUR_LEN.load(Ordering::SeqCst);
                    // SAFETY: the fuzz thread is stuck inside this input, whose
                    // buffer does not move or change while it runs
                    let input = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
                    let path = save(&o.crashes, &t, "hang", &input);
                    eprintln!(
                        "FAIL [{}]: an input ran for more than {}s (input #{}); saved to {}\n{}",
                        t.name,
                        o.timeout,
                        STARTED.load(Ordering::SeqCst),
                        path.display(),
                        reproduce_hint(&t, &path)
                    );
                    std::process::exit(2);
                }
            }
        });
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        match outcome {
            Outcome::Done { execs } => {
                total += execs;
                println!(
                    "ok {:<15} {execs} execs in {secs:.1}s wall, {cpu:.1}s cpu, seed {}, no failure",
                    t.name, o.seed
                );
            }
            Outcome::Failed { input, message } => {
                let path = save(&o.crashes, &t, "crash", &input);
                eprintln!(
                    "FAIL [{}] after {secs:.1}s (seed {}): {message}\ninput saved to {}\n{}",
                    t.name,
                    o.seed,
                    path.display(),
                    reproduce_hint(&t, &path)
                );
                std::process::exit(1);
            }
        }
        // SAFETY: the pointer came from CString::into_raw above
        drop(unsafe {
            std::ffi::CString::from_raw(OOM_PATH.swap(std::ptr::null_mut(), Ordering::SeqCst))
        });
    }
    if o.target == "all" {
        println!("all targets: {total} execs, no failure");
    }
}
