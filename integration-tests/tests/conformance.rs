//! Dockerfile conformance: every case under `integration-tests/conformance/<group>/<case>/`
//! is built by one real all-in-one `kilnd` per group and checked on the
//! exported filesystem (`type=local`), the image config (`type=oci`, read
//! back from the tarball: index → manifest → config) or the error message.
//!
//! A case dir is the build context (copied to a temp dir without `expect.txt`)
//! plus `expect.txt`, one directive per line (`#` comments):
//!
//! ```text
//! arg --opt build-arg:A=1        extra `kiln build` argument(s), whitespace-separated
//! file /app/a.txt = hello\n      exact contents (\n \t \\ escapes)
//! file /app/a.txt ~ hel          contents contain
//! exists /p   absent /p          presence (symlinks not followed)
//! mode /p 0755                   permission bits
//! owner /p 1000:1000             uid:gid
//! link /p -> target              symlink target
//! ls /dir = a b c                exact directory entries (sorted)
//! config /config/Env has "A=1"   JSON pointer into the image config; `-1` = last item
//! config /config/Cmd = ["sh"]    ... equals this JSON
//! config /config/User absent     ... missing or null
//! error ~ unknown instruction    the build must fail and stderr contain this
//! log ~ built-in                 the build's stderr (progress) contains this
//! ```
//!
//! Each group test collects every failing case and reports them all at the end.
//!
//! Every group also runs with kiln's Dockerfile frontend as a frontend image
//! (`kiln-frontend`, packaged by `scripts/frontend-image.sh` and pushed once per
//! daemon), in one of three [`Mode`]s: `conformance_<group>` uses the built-in
//! `dockerfile.v0`, `conformance_<group>_via_gateway_image` builds with
//! `--frontend gateway.v0 --opt source=IMAGE`, and
//! `conformance_<group>_via_syntax_image` (`parser`, `stages`, `errors`, `run`) puts
//! `# syntax=IMAGE` on top of each Dockerfile. `conformance_<group>_split_topology`
//! runs every group with the built-in frontend on one `kilnd --role` per service,
//! so each case also crosses the services' gRPC APIs, and `conformance_<group>_rootless`
//! on a rootless kilnd (an unprivileged user under rootlesskit), whose outputs, owners
//! and modes included, must be the same. In the image modes every build must show
//! that the image ran; [`skip_reason`] says which cases do not apply.
//!
//! The `remote` group runs next to a loopback `git daemon`, a git smart-HTTP
//! server, a plain HTTP server, a dumb-HTTP git server (static files, some behind
//! a token) and an `sshd` that serves the repository to a key in a test
//! `ssh-agent`; `{{NAME}}` in a case's `Dockerfile` and `expect.txt` is replaced
//! by [`Remotes::vars`] (`{{GIT}}`, `{{GIT_HTTP}}`, `{{HTTP}}`, `{{GIT_DUMB}}`,
//! `{{DUMB_HOST}}`, `{{TOKEN_FILE}}`, `{{HEADER_FILE}}`, `{{GIT_SSH}}`,
//! `{{SSH_AGENT}}`, `{{COMMIT1}}`, `{{COMMIT2}}`, `{{DATA_SHA256}}`).

use kiln_integration_tests::{Daemon, Topology, dockerfile_args};
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

#[derive(Debug)]
enum Check {
    FileEq(String, String),
    FileHas(String, String),
    Exists(String),
    Absent(String),
    Mode(String, u32),
    Owner(String, u32, u32),
    Link(String, String),
    Ls(String, Vec<String>),
    ConfigEq(String, Value),
    ConfigHas(String, Value),
    ConfigAbsent(String),
    Error(String),
    Log(String),
}

#[derive(Debug, Default)]
struct Case {
    dir: PathBuf,
    args: Vec<String>,
    checks: Vec<Check>,
}

impl Case {
    fn needs_fs(&self) -> bool {
        self.checks.iter().any(|c| {
            !matches!(
                c,
                Check::ConfigEq(..)
                    | Check::ConfigHas(..)
                    | Check::ConfigAbsent(..)
                    | Check::Error(..)
                    | Check::Log(..)
            )
        })
    }
    fn needs_config(&self) -> bool {
        self.checks.iter().any(|c| {
            matches!(
                c,
                Check::ConfigEq(..) | Check::ConfigHas(..) | Check::ConfigAbsent(..)
            )
        })
    }
    /// The Dockerfile's name in the context (`--opt filename=`, else `Dockerfile`).
    fn dockerfile_name(&self) -> String {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix("filename="))
            .unwrap_or("Dockerfile")
            .to_string()
    }
    /// Every `error ~` text; the build must fail when there is one.
    fn expected_errors(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter_map(|c| match c {
                Check::Error(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some(o) => {
                    out.push('\\');
                    out.push(o);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `{{NAME}}` → value for each var.
fn substitute(text: &str, vars: &[(String, String)]) -> String {
    vars.iter().fold(text.to_string(), |t, (k, v)| {
        t.replace(&format!("{{{{{k}}}}}"), v)
    })
}

fn parse_expect(dir: &Path, vars: &[(String, String)]) -> Result<Case, String> {
    let text = std::fs::read_to_string(dir.join("expect.txt"))
        .map_err(|e| format!("read expect.txt: {e}"))?;
    let text = substitute(&text, vars);
    let mut case = Case {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("expect.txt:{}: cannot parse {line:?}", n + 1);
        let (verb, rest) = line.split_once(' ').ok_or_else(bad)?;
        let rest = rest.trim();
        let path_and = |sep: &str| -> Result<(String, String), String> {
            let (p, v) = rest.split_once(sep).ok_or_else(bad)?;
            Ok((p.trim().to_string(), v.trim_start().to_string()))
        };
        let json =
            |v: &str| serde_json::from_str::<Value>(v).map_err(|e| format!("{}: {e}", bad()));
        let check = match verb {
            "arg" => {
                case.args
                    .extend(rest.split_whitespace().map(str::to_string));
                continue;
            }
            "file" if rest.contains(" = ") => {
                let (p, v) = path_and(" = ")?;
                Check::FileEq(p, unescape(&v))
            }
            "file" => {
                let (p, v) = path_and(" ~ ")?;
                Check::FileHas(p, unescape(&v))
            }
            "exists" => Check::Exists(rest.to_string()),
            "absent" => Check::Absent(rest.to_string()),
            "mode" => {
                let (p, m) = path_and(" ")?;
                Check::Mode(p, u32::from_str_radix(&m, 8).map_err(|_| bad())?)
            }
            "owner" => {
                let (p, o) = path_and(" ")?;
                let (u, g) = o.split_once(':').ok_or_else(bad)?;
                Check::Owner(
                    p,
                    u.parse().map_err(|_| bad())?,
                    g.parse().map_err(|_| bad())?,
                )
            }
            "link" => {
                let (p, t) = path_and(" -> ")?;
                Check::Link(p, t)
            }
            "ls" => {
                let (p, v) = path_and(" =")?;
                let mut names: Vec<String> = v.split_whitespace().map(str::to_string).collect();
                names.sort();
                Check::Ls(p, names)
            }
            "config" if rest.ends_with(" absent") => {
                Check::ConfigAbsent(rest.trim_end_matches(" absent").to_string())
            }
            "config" if rest.contains(" has ") => {
                let (p, v) = path_and(" has ")?;
                Check::ConfigHas(p, json(&v)?)
            }
            "config" => {
                let (p, v) = path_and(" = ")?;
                Check::ConfigEq(p, json(&v)?)
            }
            "error" => Check::Error(unescape(rest.strip_prefix("~").ok_or_else(bad)?.trim())),
            "log" => Check::Log(unescape(rest.strip_prefix("~").ok_or_else(bad)?.trim())),
            _ => return Err(bad()),
        };
        case.checks.push(check);
    }
    if case.checks.is_empty() {
        return Err("expect.txt has no checks".into());
    }
    Ok(case)
}

/// JSON pointer where a negative array index counts from the end (`-1` = last).
fn pointer<'a>(v: &'a Value, ptr: &str) -> Option<&'a Value> {
    let mut cur = v;
    for seg in ptr.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            Value::Object(m) => m.get(&seg)?,
            Value::Array(a) => match seg.strip_prefix('-') {
                Some(back) => a.get(a.len().checked_sub(back.parse::<usize>().ok()?)?)?,
                None => a.get(seg.parse::<usize>().ok()?)?,
            },
            _ => return None,
        };
    }
    Some(cur)
}

fn copy_context(src: &Path, dst: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let name = e.file_name();
        if name == "expect.txt" {
            continue;
        }
        let to = dst.join(&name);
        let ft = e.file_type()?;
        if ft.is_dir() {
            std::fs::create_dir_all(&to)?;
            copy_context(&e.path(), &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &to)?;
        } else {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// The image config inside an OCI layout tarball.
fn oci_config(tar_path: &Path) -> Result<Value, String> {
    kiln_integration_tests::oci_image(tar_path)
        .map(|i| i.config)
        .map_err(|e| format!("{e:#}"))
}

/// How the Dockerfile frontend runs a group's cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--frontend dockerfile.v0`: kilnd's built-in Dockerfile frontend
    BuiltIn,
    /// `--frontend gateway.v0 --opt source=IMAGE`: `kiln-frontend` as a frontend image
    Gateway,
    /// `--frontend dockerfile.v0` with `# syntax=IMAGE` prepended to the
    /// Dockerfile: the built-in frontend hands the build to that image
    Syntax,
    /// the built-in frontend, with each service its own `kilnd --role`
    /// talking gRPC to the others ([`Topology::Split`])
    Split,
    /// the built-in frontend on a rootless kilnd run by an unprivileged user
    /// ([`Topology::Rootless`]): the same outputs, owners included
    Rootless,
    /// the same, its snapshots mounted by fuse-overlayfs instead of the kernel
    RootlessFuse,
    /// the same, its snapshots copied instead of mounted (`snapshotter = "native"`)
    RootlessNative,
}

impl Mode {
    fn topology(self) -> Topology {
        match self {
            Mode::Split => Topology::Split,
            Mode::Rootless | Mode::RootlessFuse | Mode::RootlessNative => Topology::Rootless,
            Mode::BuiltIn | Mode::Gateway | Mode::Syntax => Topology::AllInOne,
        }
    }

    /// Whether a `kiln-frontend` image runs the Dockerfile frontend.
    fn image(self) -> bool {
        matches!(self, Mode::Gateway | Mode::Syntax)
    }
}

/// The frontend of a group run: the mode and, for the image modes, the
/// `kiln-frontend` image reference.
struct Frontend {
    mode: Mode,
    image: String,
}

/// Cases that differ by design when the Dockerfile frontend runs as a
/// frontend image or on a rootless daemon: (mode, `group/case`, reason).
const SKIPS: &[(Mode, &str, &str)] = &[
    (
        Mode::Syntax,
        "errors/empty-dockerfile",
        "the case is an empty Dockerfile: with `# syntax=` on top it is no longer empty",
    ),
    (
        Mode::Rootless,
        "run/security-insecure-with-entitlement",
        "a rootless worker refuses security.insecure (tests/rootless.rs checks its message)",
    ),
];

/// Why `case` does not apply in `mode`, if it does not.
///
/// Besides [`SKIPS`], the `# syntax=IMAGE` mode skips, by rule, cases
/// that name a frontend themselves: a Dockerfile with its own `# syntax=`
/// directive (a second one would be a duplicate directive, and the case is
/// about that directive) and a `BUILDKIT_SYNTAX` build arg (it overrides the
/// directive, so the image would not run).
fn skip_reason(mode: Mode, group: &str, name: &str, case: &Case) -> Option<String> {
    let id = format!("{group}/{name}");
    // what does not apply rootless does not apply on fuse-overlayfs either
    let same = |m: Mode| {
        m == mode
            || (m == Mode::Rootless && matches!(mode, Mode::RootlessFuse | Mode::RootlessNative))
    };
    if let Some((_, _, why)) = SKIPS.iter().find(|(m, c, _)| same(*m) && *c == id) {
        return Some(why.to_string());
    }
    if mode != Mode::Syntax {
        return None;
    }
    if case
        .args
        .iter()
        .any(|a| a.starts_with("build-arg:BUILDKIT_SYNTAX="))
    {
        return Some("sets BUILDKIT_SYNTAX, which overrides # syntax=".into());
    }
    let dockerfile = std::fs::read_to_string(case.dir.join(case.dockerfile_name())).ok()?;
    dockerfile
        .lines()
        .take_while(|l| l.trim_start().starts_with('#'))
        .any(|l| {
            let d = l.trim_start().trim_start_matches('#').trim_start();
            d.to_ascii_lowercase().starts_with("syntax")
                && d["syntax".len()..].trim_start().starts_with('=')
        })
        .then(|| "has its own # syntax= directive".into())
}

/// `Dockerfile:N` → `Dockerfile:N+1` in an expected text: in the `# syntax=`
/// mode the prepended directive moves every line down by one.
fn shift_lines(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("Dockerfile:") {
        let (head, tail) = rest.split_at(i + "Dockerfile:".len());
        out.push_str(head);
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + 1).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

fn run_case(
    d: &Daemon,
    case: &Case,
    vars: &[(String, String)],
    frontend: &Frontend,
) -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix("kiln-conf-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
    copy_context(&case.dir, &ctx).map_err(|e| format!("copy context: {e}"))?;
    if !vars.is_empty() {
        let df = ctx.join("Dockerfile");
        let text = std::fs::read_to_string(&df).map_err(|e| format!("read Dockerfile: {e}"))?;
        std::fs::write(&df, substitute(&text, vars))
            .map_err(|e| format!("write Dockerfile: {e}"))?;
    }
    if frontend.mode == Mode::Syntax {
        let df = ctx.join(case.dockerfile_name());
        let text = std::fs::read_to_string(&df).map_err(|e| format!("read Dockerfile: {e}"))?;
        std::fs::write(&df, format!("# syntax={}\n{text}", frontend.image))
            .map_err(|e| format!("write Dockerfile: {e}"))?;
    }
    let out_dir = work.path().join("out");
    let out_tar = work.path().join("out.tar");
    let mut args: Vec<String> = vec!["build".into(), "--progress".into(), "plain".into()];
    match frontend.mode {
        Mode::BuiltIn
        | Mode::Syntax
        | Mode::Split
        | Mode::Rootless
        | Mode::RootlessFuse
        | Mode::RootlessNative => args.extend(dockerfile_args().iter().map(|s| s.to_string())),
        Mode::Gateway => args.extend([
            "--frontend".to_string(),
            "gateway.v0".into(),
            "--opt".into(),
            format!("source={}", frontend.image),
            "--local".into(),
            "context=.".into(),
            "--local".into(),
            "dockerfile=.".into(),
        ]),
    }
    args.extend(case.args.iter().cloned());
    if case.needs_fs() {
        args.push("--output".into());
        args.push(format!("type=local,dest={}", out_dir.display()));
    }
    if case.needs_config() {
        args.push("--output".into());
        args.push(format!("type=oci,dest={}", out_tar.display()));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.kiln(&ctx, &argv).map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let tail = |s: &str| -> String {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n    ")
    };
    // the image built the case (not the built-in frontend)
    let ran = format!("[internal] frontend {}", frontend.image);
    if frontend.mode.image() && !stderr.contains(&ran) {
        return Err(format!(
            "the frontend image did not run (no {ran:?}):\n    {}",
            tail(&stderr)
        ));
    }
    let errors = case.expected_errors();
    if !errors.is_empty() {
        if out.status.success() {
            return Err(format!(
                "build succeeded, expected an error containing {errors:?}"
            ));
        }
        let missing: Vec<&&str> = errors.iter().filter(|w| !stderr.contains(**w)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "error does not contain {missing:?}:\n    {}",
                tail(&stderr)
            ));
        }
        return Ok(());
    }
    if !out.status.success() {
        return Err(format!("build failed:\n    {}", tail(&stderr)));
    }
    let config = if case.needs_config() {
        Some(oci_config(&out_tar)?)
    } else {
        None
    };
    let mut problems = Vec::new();
    let fs = |p: &str| out_dir.join(p.trim_start_matches('/'));
    for check in &case.checks {
        let problem = match check {
            Check::FileEq(p, want) => match std::fs::read_to_string(fs(p)) {
                Ok(got) if &got == want => None,
                Ok(got) => Some(format!("{p}: got {got:?}, want {want:?}")),
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::FileHas(p, want) => match std::fs::read_to_string(fs(p)) {
                Ok(got) if got.contains(want.as_str()) => None,
                Ok(got) => Some(format!("{p}: {got:?} does not contain {want:?}")),
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::Exists(p) => fs(p)
                .symlink_metadata()
                .is_err()
                .then(|| format!("{p} does not exist")),
            Check::Absent(p) => fs(p)
                .symlink_metadata()
                .is_ok()
                .then(|| format!("{p} exists")),
            Check::Mode(p, want) => match fs(p).symlink_metadata() {
                Ok(m) if m.permissions().mode() & 0o7777 == *want => None,
                Ok(m) => Some(format!(
                    "{p}: mode {:o}, want {want:o}",
                    m.permissions().mode() & 0o7777
                )),
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::Owner(p, u, g) => match fs(p).symlink_metadata() {
                Ok(m) if m.uid() == *u && m.gid() == *g => None,
                Ok(m) => Some(format!("{p}: owner {}:{}, want {u}:{g}", m.uid(), m.gid())),
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::Link(p, want) => match std::fs::read_link(fs(p)) {
                Ok(t) if t == Path::new(want) => None,
                Ok(t) => Some(format!("{p}: links to {}, want {want}", t.display())),
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::Ls(p, want) => match std::fs::read_dir(fs(p)) {
                Ok(rd) => {
                    let mut got: Vec<String> = rd
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect();
                    got.sort();
                    (&got != want).then(|| format!("ls {p}: got {got:?}, want {want:?}"))
                }
                Err(e) => Some(format!("{p}: {e}")),
            },
            Check::ConfigEq(ptr, want) => {
                let got = config.as_ref().and_then(|c| pointer(c, ptr));
                (got != Some(want)).then(|| format!("config {ptr}: got {got:?}, want {want}"))
            }
            Check::ConfigHas(ptr, want) => {
                let got = config.as_ref().and_then(|c| pointer(c, ptr));
                let ok = match (got, want) {
                    (Some(Value::Array(a)), w) => a.contains(w),
                    (Some(Value::Object(m)), Value::String(k)) => m.contains_key(k),
                    _ => false,
                };
                (!ok).then(|| format!("config {ptr}: {got:?} does not have {want}"))
            }
            Check::ConfigAbsent(ptr) => {
                let got = config.as_ref().and_then(|c| pointer(c, ptr));
                got.filter(|v| !v.is_null())
                    .map(|v| format!("config {ptr}: expected absent, got {v}"))
            }
            Check::Error(_) => None,
            Check::Log(want) => (!stderr.contains(want.as_str()))
                .then(|| format!("output does not contain {want:?}:\n    {}", tail(&stderr))),
        };
        problems.extend(problem);
    }
    if problems.is_empty() {
        return Ok(());
    }
    if let Some(c) = config
        .as_ref()
        .filter(|_| problems.iter().any(|p| p.starts_with("config ")))
    {
        problems.push(format!("image config: {c}"));
    }
    Err(problems.join("\n    "))
}

fn run_group(group: &str, mode: Mode) {
    run_group_with(group, &[], mode);
}

fn run_group_with(group: &str, vars: &[(String, String)], mode: Mode) {
    run_group_on(group, vars, "", mode);
}

/// Runs a group on a daemon whose kilnd.toml starts with `daemon_config`,
/// with the Dockerfile frontend run as `mode` says.
fn run_group_on(group: &str, vars: &[(String, String)], daemon_config: &str, mode: Mode) {
    let dir = conformance_dir().join(group);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no cases in {}", dir.display());
    // KILN_CONFORMANCE_CASE=substring[,substring...] runs only the matching
    // cases (debugging).
    if let Ok(only) = std::env::var("KILN_CONFORMANCE_CASE") {
        names.retain(|n| only.split(',').any(|s| n.contains(s)));
    }
    let daemon_config = match mode {
        Mode::RootlessFuse => {
            format!("{daemon_config}\n[worker.oci]\nsnapshotter = \"fuse-overlayfs\"\n")
        }
        Mode::RootlessNative => {
            format!("{daemon_config}\n[worker.oci]\nsnapshotter = \"native\"\n")
        }
        _ => daemon_config.to_string(),
    };
    let d = Daemon::start_with_config(mode.topology(), &daemon_config).expect("daemon");
    let image = match mode.image() {
        false => String::new(),
        true => d
            .frontend_image("kiln-frontend", "dockerfile-frontend")
            .expect("frontend image"),
    };
    let frontend = Frontend { mode, image };
    let mut failures = Vec::new();
    let (mut passed, mut skipped) = (0, 0);
    for name in &names {
        let case = parse_expect(&dir.join(name), vars).map(|mut case| {
            if mode == Mode::Syntax {
                for c in &mut case.checks {
                    if let Check::Error(s) | Check::Log(s) = c {
                        *s = shift_lines(s);
                    }
                }
            }
            case
        });
        if let Some(why) = case
            .as_ref()
            .ok()
            .and_then(|c| skip_reason(mode, group, name, c))
        {
            eprintln!("skip  {group}/{name}: {why}");
            skipped += 1;
            continue;
        }
        match case.and_then(|case| run_case(&d, &case, vars, &frontend)) {
            Ok(()) => {
                eprintln!("ok    {group}/{name}");
                passed += 1;
            }
            Err(e) => {
                eprintln!("FAIL  {group}/{name}");
                failures.push(format!("{group}/{name}:\n    {e}"));
            }
        }
    }
    eprintln!(
        "{group} ({mode:?}): {passed} passed, {} failed, {skipped} skipped",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} {group} cases failed ({mode:?}):\n\n{}\n",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
}

/// One test per group and mode: `conformance_<group>` (built-in, all-in-one),
/// `conformance_<group>_split_topology` (built-in, one kilnd per service),
/// `conformance_<group>_rootless` (built-in, a rootless kilnd),
/// `conformance_<group>_via_gateway_image`, and for the groups listed with
/// `syntax`, `conformance_<group>_via_syntax_image`.
macro_rules! group_tests {
    ($($group:ident($run:expr) $split:ident $rootless:ident $gateway:ident $(syntax $syntax:ident)?;)*) => {$(
        #[test]
        fn $group() {
            $run(Mode::BuiltIn);
        }
        #[test]
        fn $split() {
            $run(Mode::Split);
        }
        #[test]
        fn $rootless() {
            $run(Mode::Rootless);
        }
        #[test]
        fn $gateway() {
            $run(Mode::Gateway);
        }
        $(
            #[test]
            fn $syntax() {
                $run(Mode::Syntax);
            }
        )?
    )*};
}

group_tests! {
    conformance_parser(|m| run_group("parser", m)) conformance_parser_split_topology conformance_parser_rootless
        conformance_parser_via_gateway_image
        syntax conformance_parser_via_syntax_image;
    conformance_expansion(|m| run_group("expansion", m)) conformance_expansion_split_topology conformance_expansion_rootless
        conformance_expansion_via_gateway_image;
    conformance_args(|m| run_group("args", m)) conformance_args_split_topology conformance_args_rootless
        conformance_args_via_gateway_image;
    conformance_stages(|m| run_group("stages", m)) conformance_stages_split_topology conformance_stages_rootless
        conformance_stages_via_gateway_image
        syntax conformance_stages_via_syntax_image;
    conformance_metadata(|m| run_group("metadata", m)) conformance_metadata_split_topology conformance_metadata_rootless
        conformance_metadata_via_gateway_image;
    conformance_copy(|m| run_group("copy", m)) conformance_copy_split_topology conformance_copy_rootless
        conformance_copy_via_gateway_image;
    conformance_dockerignore(|m| run_group("dockerignore", m)) conformance_dockerignore_split_topology conformance_dockerignore_rootless
        conformance_dockerignore_via_gateway_image;
    conformance_contexts(|m| run_group("contexts", m)) conformance_contexts_split_topology conformance_contexts_rootless
        conformance_contexts_via_gateway_image;
    conformance_errors(|m| run_group("errors", m)) conformance_errors_split_topology conformance_errors_rootless
        conformance_errors_via_gateway_image
        syntax conformance_errors_via_syntax_image;
    conformance_run(run_group_run) conformance_run_split_topology conformance_run_rootless
        conformance_run_via_gateway_image
        syntax conformance_run_via_syntax_image;
    conformance_remote(run_group_remote) conformance_remote_split_topology conformance_remote_rootless
        conformance_remote_via_gateway_image;
}

// The groups that write the most through overlays, also on a rootless daemon whose
// snapshots fuse-overlayfs mounts (the kernel's overlayfs is what the other modes use).
#[test]
fn conformance_copy_rootless_fuse_overlayfs() {
    run_group("copy", Mode::RootlessFuse);
}

#[test]
fn conformance_stages_rootless_fuse_overlayfs() {
    run_group("stages", Mode::RootlessFuse);
}

#[test]
fn conformance_run_rootless_fuse_overlayfs() {
    run_group_run(Mode::RootlessFuse);
}

// ... and on one whose snapshots are copies (where nothing mounts)
#[test]
fn conformance_copy_rootless_native() {
    run_group("copy", Mode::RootlessNative);
}

#[test]
fn conformance_stages_rootless_native() {
    run_group("stages", Mode::RootlessNative);
}

#[test]
fn conformance_run_rootless_native() {
    run_group_run(Mode::RootlessNative);
}

/// The `run` group: its daemon allows `network.host` and `security.insecure`,
/// and an `ssh-agent` serves `--mount=type=ssh` cases (`{{SSH_SOCK}}`).
fn run_group_run(mode: Mode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = kiln_integration_tests::SshAgent::start(dir.path()).expect("ssh-agent");
    let sock = agent.sock.clone();
    let vars = [("SSH_SOCK".to_string(), sock.display().to_string())];
    run_group_on(
        "run",
        &vars,
        "insecure-entitlements = [\"network.host\", \"security.insecure\"]",
        mode,
    );
}

/// The `remote` group, next to loopback git and HTTP servers.
fn run_group_remote(mode: Mode) {
    let remotes = Remotes::start();
    run_group_with("remote", &remotes.vars, mode);
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed().as_secs() < 10, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn run_tool(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Loopback servers for the `remote` group: `git daemon` and git smart HTTP
/// (`git http-backend` as CGI) serving `repo.git`, and a plain HTTP server.
///
/// `repo.git` (branch `main`, HEAD): commit 1 has `README` = `one\n`,
/// `sub/a.txt` = `first\n` and tag `v1`; commit 2 changes `sub/a.txt` to
/// `second\n` and adds `sub/link -> a.txt`. The HTTP root has `data.txt`
/// (`payload\n`) and `files.tar` (holding `inner.txt`).
///
/// `{{GIT_DUMB}}` is a static HTTP server (no git on the server: it cannot do
/// shallow fetches) with `repo.git` after `git update-server-info`, and the same
/// under `private/`, which answers 401 unless the request carries
/// `Authorization: basic base64(x-access-token:TOKEN)`; `{{TOKEN_FILE}}` holds
/// TOKEN, `{{HEADER_FILE}}` that whole header value, `{{DUMB_HOST}}` is the
/// server's `host:port`. `{{GIT_SSH}}/repo.git` is the repository over ssh: an
/// `sshd` whose only command is `git-upload-pack` of that repository, for the
/// key held by the `ssh-agent` at `{{SSH_AGENT}}` (`kiln build --ssh
/// default={{SSH_AGENT}}`).
struct Remotes {
    _dir: tempfile::TempDir,
    _servers: Vec<Child>,
    _agent: kiln_integration_tests::SshAgent,
    vars: Vec<(String, String)>,
}

impl Remotes {
    fn start() -> Remotes {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        let base = dir.path().join("git");
        let www = dir.path().join("www");
        for d in [&work, &base, &www.join("cgi-bin")] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let git = |args: &[&str]| run_tool(&work, "git", args);
        git(&["init", "-q", "-b", "main"]);
        std::fs::create_dir_all(work.join("sub")).expect("mkdir");
        std::fs::write(work.join("README"), "one\n").expect("write");
        std::fs::write(work.join("sub/a.txt"), "first\n").expect("write");
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        git(&["tag", "v1"]);
        let commit1 = git(&["rev-parse", "HEAD"]);
        std::fs::write(work.join("sub/a.txt"), "second\n").expect("write");
        std::os::unix::fs::symlink("a.txt", work.join("sub/link")).expect("symlink");
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "two"]);
        let commit2 = git(&["rev-parse", "HEAD"]);
        let bare = base.join("repo.git");
        bare_clone(dir.path(), &work, &bare);
        run_tool(&bare, "git", &["config", "http.receivepack", "false"]);

        std::fs::write(www.join("data.txt"), "payload\n").expect("write");
        std::fs::write(dir.path().join("inner.txt"), "inside\n").expect("write");
        run_tool(
            dir.path(),
            "tar",
            &[
                "-cf",
                www.join("files.tar").to_str().expect("utf8"),
                "inner.txt",
            ],
        );
        let sha = run_tool(&www, "sha256sum", &["data.txt"]);
        let sha = sha.split_whitespace().next().expect("sha").to_string();
        let cgi = www.join("cgi-bin/git");
        // python's CGI runs the script as nobody: trust the root-owned repo, keep HOME out
        std::fs::write(
            &cgi,
            "#!/bin/sh\nexport HOME=/ XDG_CONFIG_HOME=/nonexistent GIT_CONFIG_COUNT=1 \
             GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'\nexec git http-backend\n",
        )
        .expect("write");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let git_port = free_port();
        let daemon = Child(
            std::process::Command::new("git")
                .args([
                    "daemon",
                    "--reuseaddr",
                    "--export-all",
                    "--listen=127.0.0.1",
                ])
                .arg(format!("--port={git_port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(&base)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("git daemon"),
        );
        let http_port = free_port();
        let http = Child(
            std::process::Command::new("python3")
                .args(["-m", "http.server", "--cgi", "--bind", "127.0.0.1"])
                .arg(http_port.to_string())
                .current_dir(&www)
                .env("GIT_PROJECT_ROOT", &base)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("python3 http.server"),
        );
        for port in [git_port, http_port] {
            wait_for(
                || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                "loopback server",
            );
        }
        let (dumb_server, dumb_vars) = dumb_http(dir.path(), &bare);
        let (sshd, agent, ssh_vars) = ssh_server(dir.path(), &base);
        let vars = [
            ("GIT", format!("git://127.0.0.1:{git_port}")),
            (
                "GIT_HTTP",
                format!("http://127.0.0.1:{http_port}/cgi-bin/git"),
            ),
            ("HTTP", format!("http://127.0.0.1:{http_port}")),
            ("COMMIT1", commit1),
            ("COMMIT2", commit2),
            ("DATA_SHA256", sha),
        ]
        .into_iter()
        .chain(dumb_vars)
        .chain(ssh_vars)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Remotes {
            _dir: dir,
            _servers: vec![daemon, http, dumb_server, sshd],
            _agent: agent,
            vars,
        }
    }
}

/// The token the dumb server's `private/` wants.
const GIT_TOKEN: &str = "kiln-test-token";

/// `git clone --bare FROM TO`, run in `cwd`.
fn bare_clone(cwd: &Path, from: &Path, to: &Path) {
    run_tool(
        cwd,
        "git",
        &[
            "clone",
            "-q",
            "--bare",
            from.to_str().expect("utf8"),
            to.to_str().expect("utf8"),
        ],
    );
}

/// A static HTTP server (python's, with a token check on `private/`) over a dir
/// with `repo.git` and `private/repo.git`, copies of `bare` after
/// `git update-server-info`.
fn dumb_http(tmp: &Path, bare: &Path) -> (Child, Vec<(&'static str, String)>) {
    let root = tmp.join("dumb");
    std::fs::create_dir_all(root.join("private")).expect("mkdir");
    for to in [root.join("repo.git"), root.join("private/repo.git")] {
        bare_clone(tmp, bare, &to);
        run_tool(&to, "git", &["update-server-info"]);
    }
    let script = tmp.join("dumb-http.py");
    std::fs::write(
        &script,
        r#"import base64, functools, http.server, sys
token = open(sys.argv[2]).read().strip()
want = base64.b64encode(("x-access-token:" + token).encode()).decode()
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/private/"):
            scheme, _, cred = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "basic" or cred != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="kiln"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        super().do_GET()
    def log_message(self, *args):
        pass
handler = functools.partial(Handler, directory=sys.argv[3])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"#,
    )
    .expect("write");
    let token_file = tmp.join("token");
    std::fs::write(&token_file, GIT_TOKEN).expect("write");
    let header_file = tmp.join("header");
    std::fs::write(
        &header_file,
        format!(
            "basic {}",
            run_tool(
                tmp,
                "sh",
                &[
                    "-c",
                    &format!("printf %s x-access-token:{GIT_TOKEN} | base64 -w0")
                ]
            )
        ),
    )
    .expect("write");
    let port = free_port();
    let server = Child(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&token_file)
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 dumb http server"),
    );
    wait_for(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "dumb http server",
    );
    let vars = vec![
        ("GIT_DUMB", format!("http://127.0.0.1:{port}")),
        ("DUMB_HOST", format!("127.0.0.1:{port}")),
        ("TOKEN_FILE", token_file.display().to_string()),
        ("HEADER_FILE", header_file.display().to_string()),
    ];
    (server, vars)
}

/// An `sshd` on loopback (its own host key and config) that lets one key in and
/// runs nothing but `git-upload-pack` of `base/repo.git`, and an `ssh-agent`
/// holding that key.
fn ssh_server(
    tmp: &Path,
    base: &Path,
) -> (
    Child,
    kiln_integration_tests::SshAgent,
    Vec<(&'static str, String)>,
) {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "{} missing: install openssh-server (scripts/install-deps.sh)",
        sshd.display()
    );
    let dir = tmp.join("ssh");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let keygen = |name: &str| {
        let key = dir.join(name);
        run_tool(
            &dir,
            "ssh-keygen",
            &[
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                key.to_str().expect("utf8"),
            ],
        );
        key
    };
    let host_key = keygen("host_key");
    let client_key = keygen("client_key");
    let authorized = dir.join("authorized_keys");
    std::fs::copy(client_key.with_extension("pub"), &authorized).expect("copy");
    let repo = base.join("repo.git");
    let only = dir.join("only-upload-pack");
    std::fs::write(
        &only,
        format!(
            r#"#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
"git-upload-pack '{repo}'") exec git-shell -c "$SSH_ORIGINAL_COMMAND" ;;
*) echo "only git-upload-pack of {repo}" >&2; exit 1 ;;
esac
"#,
            repo = repo.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&only, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let user = run_tool(&dir, "id", &["-un"]);
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
             AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
             PasswordAuthentication no
KbdInteractiveAuthentication no
             PermitRootLogin prohibit-password
AllowUsers {user}
             DisableForwarding yes
PermitTTY no
ForceCommand {only}
",
            host_key = host_key.display(),
            authorized = authorized.display(),
            only = only.display(),
        ),
    )
    .expect("write");
    // sshd started by root wants its privilege separation dir (made by the
    // service unit on a booted system)
    std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
    let server = Child(
        std::process::Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("sshd"),
    );
    let agent = kiln_integration_tests::SshAgent::start(&dir).expect("ssh-agent");
    let sock = agent.sock.clone();
    let added = std::process::Command::new("ssh-add")
        .arg("-q")
        .arg(&client_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .expect("ssh-add");
    assert!(
        added.status.success(),
        "ssh-add: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    wait_for(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "sshd",
    );
    let vars = vec![
        (
            "GIT_SSH",
            format!("ssh://{user}@127.0.0.1:{port}{}", base.display()),
        ),
        ("SSH_AGENT", sock.display().to_string()),
    ];
    (server, agent, vars)
}
