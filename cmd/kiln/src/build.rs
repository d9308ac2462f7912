//! `kiln build`: buildctl's flags, plus `kiln build [DIR]`.

use crate::progress::{Mode, Printer};
use anyhow::{Context, bail};
use kiln_proto::moby::buildkit::v1::{
    CacheOptions, CacheOptionsEntry, Exporter, SolveRequest, SolveResponse, StatusRequest,
    control_client::ControlClient,
};
use kiln_session::attachable::{self, Attachables, OutputTarget, SecretSource};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Frontend attr asking kilnd for cache-miss explanations.
const EXPLAIN_CACHE_ATTR: &str = "explain-cache";
/// Prefix of the log lines in which kilnd explains why a step ran.
const EXPLAIN_PREFIX: &str = "explain-cache: ";

/// The explanations of a build's steps, from its progress.
#[derive(Default)]
struct Explanations {
    names: BTreeMap<String, String>,
    /// vertex digest → reasons, in the order vertices first explained
    order: Vec<String>,
    reasons: BTreeMap<String, Vec<String>>,
}

impl Explanations {
    fn update(&mut self, msg: &kiln_proto::moby::buildkit::v1::StatusResponse) {
        for v in &msg.vertexes {
            self.names.insert(v.digest.clone(), v.name.clone());
        }
        for l in &msg.logs {
            let text = String::from_utf8_lossy(&l.msg);
            for line in text.lines() {
                if let Some(r) = line.strip_prefix(EXPLAIN_PREFIX) {
                    if !self.reasons.contains_key(&l.vertex) {
                        self.order.push(l.vertex.clone());
                    }
                    self.reasons
                        .entry(l.vertex.clone())
                        .or_default()
                        .push(r.to_string());
                }
            }
        }
    }

    /// `Cache misses:` and per step that ran, its name and reasons.
    fn render(&self) -> String {
        if self.order.is_empty() {
            return "Cache misses: none (every step was cached)\n".into();
        }
        let mut out = String::from("Cache misses:\n");
        for d in &self.order {
            let name = self.names.get(d).map(String::as_str).unwrap_or(d);
            out.push_str(&format!("  {name}\n"));
            for r in self.reasons.get(d).into_iter().flatten() {
                out.push_str(&format!("    - {r}\n"));
            }
        }
        out
    }
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Frontend to use (dockerfile.v0)
    #[arg(long)]
    frontend: Option<String>,
    /// Local directory exposed to the build: NAME=PATH (context, dockerfile)
    #[arg(long = "local", value_name = "NAME=PATH")]
    locals: Vec<String>,
    /// Frontend option: KEY=VALUE (target=, build-arg:K=V, filename=, platform=)
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Output: type=local|tar|oci|docker|image,dest=PATH,name=REF,push=true
    #[arg(long = "output", short = 'o')]
    outputs: Vec<String>,
    /// Progress output: auto, plain, tty, rawjson, quiet
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Do not use cached results
    #[arg(long)]
    no_cache: bool,
    /// Say, for every step that ran again, what changed since its last run
    /// (build arg, context file, base image digest, input step)
    #[arg(long)]
    explain_cache: bool,
    /// Export build cache: type=registry,ref=REF[,mode=min|max], type=local,dest=DIR, type=inline
    /// (a bare REF means type=registry,ref=REF)
    #[arg(long = "export-cache", value_name = "type=TYPE,KEY=VALUE")]
    export_cache: Vec<String>,
    /// Import build cache: type=registry,ref=REF, type=local,src=DIR (a bare REF means
    /// type=registry,ref=REF); several may be given
    #[arg(long = "import-cache", value_name = "type=TYPE,KEY=VALUE")]
    import_cache: Vec<String>,
    /// Secret exposed to the build: id=ID,src=PATH or id=ID,env=VAR (id=ID alone reads $ID)
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    secrets: Vec<String>,
    /// SSH agent exposed to the build: default (=$SSH_AUTH_SOCK) or ID=SOCKET
    #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
    ssh: Vec<String>,
    /// Entitlement to grant the build: network.host, security.insecure
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<String>,
    /// Write the exporter's response (image digest, ...) as JSON to this file
    #[arg(long)]
    metadata_file: Option<PathBuf>,
    /// Dockerfile path (short form)
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Build argument (short form): KEY=VALUE
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// Target stage (short form)
    #[arg(long)]
    target: Option<String>,
    /// Named context, as buildx takes it: NAME=DIR (a local dir, synced),
    /// NAME=docker-image://REF, NAME=oci-layout://DIR[:TAG|@DIGEST], a git
    /// or http(s) URL, or target:STAGE
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    build_contexts: Vec<String>,
    /// OCI layout directory served to the build as the content store NAME,
    /// which `--opt context:X=oci-layout://NAME@sha256:DIGEST` (or
    /// `NAME:TAG`, looked up in DIR/index.json) names
    #[arg(long = "oci-layout", value_name = "NAME=DIR")]
    oci_layouts: Vec<String>,
    /// Image name to give the result, as --output type=image,name=TAG (short form)
    #[arg(long, short = 't')]
    tag: Vec<String>,
    /// Run the frontend in the daemon (one Control.Solve naming it), as clients
    /// did before client-side frontends; by default kiln runs it through the
    /// daemon's LLBBridge, as buildctl does
    #[arg(long)]
    daemon_frontend: bool,
    /// Ask the frontend instead of building: check (its build checks), targets,
    /// outline, subrequests.describe; `,format=json` prints the raw result,
    /// `,ignorestatus=true` exits 0 whatever the checks found
    #[arg(long, value_name = "NAME[,format=json]")]
    call: Option<String>,
    /// Short for --call=check
    #[arg(long)]
    check: bool,
    /// Context directory: `kiln build DIR` is the short form of
    /// `--frontend dockerfile.v0 --local context=DIR --local dockerfile=DIR`
    dir: Option<PathBuf>,
}

fn split_kv(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => bail!("invalid {what} {s:?}: expected KEY=VALUE"),
    }
}

/// Parses `type=local,dest=out` (CSV; quoted fields allowed).
fn parse_output(s: &str) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let mut attrs = BTreeMap::new();
    for field in split_csv(s) {
        let (k, v) = split_kv(&field, "output field")?;
        attrs.insert(k, v);
    }
    let ty = attrs
        .remove("type")
        .with_context(|| format!("output {s:?} has no type="))?;
    Ok((ty, attrs))
}

/// Parses one `--export-cache`/`--import-cache` value as buildctl does: CSV
/// fields with `type=` required, keys lower-cased; a value without `type=` is
/// a registry reference (`type=registry,ref=VALUE`).
fn parse_cache_entry(s: &str, flag: &str) -> anyhow::Result<CacheOptionsEntry> {
    if !s.contains("type=") {
        return Ok(CacheOptionsEntry {
            r#type: "registry".into(),
            attrs: [("ref".to_string(), s.to_string())].into(),
        });
    }
    let mut entry = CacheOptionsEntry::default();
    for field in split_csv(s) {
        let (k, v) = split_kv(&field, &format!("{flag} field"))?;
        match k.to_lowercase().as_str() {
            "type" => entry.r#type = v,
            k => {
                entry.attrs.insert(k.to_string(), v);
            }
        }
    }
    if entry.r#type.is_empty() {
        bail!("{flag} {s:?} requires type=<type>");
    }
    Ok(entry)
}

/// A local cache directory whose `index.json` tags the exported cache.
type LocalCacheTag = (PathBuf, String);

/// The build's `CacheOptions` (none when no cache flag is given). Local cache
/// directories are served on the session (in `att`); an import finds its
/// manifest through the directory's `index.json` (tag `latest` unless
/// `tag=` or `digest=` says otherwise), and an export is tagged there after
/// the build (returned).
fn cache_options(
    args: &BuildArgs,
    att: &mut Attachables,
) -> anyhow::Result<(Option<CacheOptions>, Vec<LocalCacheTag>)> {
    if args.export_cache.is_empty() && args.import_cache.is_empty() {
        return Ok((None, Vec::new()));
    }
    let store = |dir: &str| format!("{}{dir}", kiln_session::content::LOCAL_PREFIX);
    let mut tags = Vec::new();
    let mut exports = Vec::new();
    for s in &args.export_cache {
        let e = parse_cache_entry(s, "--export-cache")?;
        if e.r#type == "local" {
            let dest = e
                .attrs
                .get("dest")
                .filter(|d| !d.is_empty())
                .with_context(|| {
                    format!("--export-cache {s:?}: local cache exporter requires dest")
                })?;
            std::fs::create_dir_all(dest).with_context(|| format!("create {dest}"))?;
            att.content.stores.insert(store(dest), PathBuf::from(dest));
            let tag = e
                .attrs
                .get("tag")
                .cloned()
                .unwrap_or_else(|| "latest".into());
            tags.push((PathBuf::from(dest), tag));
        }
        exports.push(e);
    }
    let mut imports = Vec::new();
    for s in &args.import_cache {
        let mut e = parse_cache_entry(s, "--import-cache")?;
        if e.r#type == "local" {
            let src = e
                .attrs
                .get("src")
                .filter(|d| !d.is_empty())
                .cloned()
                .with_context(|| {
                    format!("--import-cache {s:?}: local cache importer requires src")
                })?;
            if e.attrs.get("digest").is_none_or(String::is_empty) {
                let tag = e
                    .attrs
                    .get("tag")
                    .cloned()
                    .unwrap_or_else(|| "latest".into());
                match kiln_session::content::tagged(std::path::Path::new(&src), &tag) {
                    Some(d) => {
                        e.attrs.insert("digest".into(), d);
                    }
                    None => {
                        eprintln!(
                            "warning: local cache import at {src} skipped: no cache tagged {tag:?} in its index.json"
                        );
                        continue;
                    }
                }
            }
            att.content.stores.insert(store(&src), PathBuf::from(&src));
        }
        imports.push(e);
    }
    Ok((
        Some(CacheOptions {
            exports,
            imports,
            ..Default::default()
        }),
        tags,
    ))
}

/// Tags the exported cache manifest (the `cache.manifest` response) in each
/// local cache directory's `index.json`.
fn tag_local_caches(
    response: &std::collections::BTreeMap<String, String>,
    tags: &[LocalCacheTag],
) -> anyhow::Result<()> {
    let Some(desc) = response.get("cache.manifest") else {
        return Ok(());
    };
    let desc: serde_json::Value = serde_json::from_str(desc).context("cache.manifest")?;
    for (dir, tag) in tags {
        kiln_session::content::tag_in_index(dir, &desc, tag)
            .with_context(|| format!("tag the cache in {}", dir.display()))?;
    }
    Ok(())
}

/// Parses `id=foo,src=path` / `id=foo,env=VAR` (buildctl's --secret).
fn parse_secret(s: &str) -> anyhow::Result<(String, SecretSource)> {
    let mut id = None;
    let mut source = None;
    for field in split_csv(s) {
        let (k, v) = split_kv(&field, "secret field")?;
        match k.as_str() {
            "id" => id = Some(v),
            "src" | "source" => source = Some(SecretSource::File(PathBuf::from(v))),
            "env" => source = Some(SecretSource::Env(v)),
            "type" if v == "file" || v == "env" => {}
            other => bail!("invalid --secret {s:?}: unknown field {other:?}"),
        }
    }
    let id = id.with_context(|| format!("invalid --secret {s:?}: no id="))?;
    let source = source.unwrap_or_else(|| SecretSource::Env(id.clone()));
    Ok((id, source))
}

fn split_csv(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `--opt context:NAME=local:X` names a session local dir. When X is not a
/// `--local` name but a directory, expose it as the local `NAME` (buildctl
/// users pass `--local X=DIR` themselves; both forms work).
fn expose_named_context_dirs(args: &mut BuildArgs) -> anyhow::Result<()> {
    let local_names: Vec<String> = args
        .locals
        .iter()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n.to_string()))
        .collect();
    let mut added = Vec::new();
    for o in &mut args.opts {
        let Some((key, value)) = o.split_once('=') else {
            continue;
        };
        let (Some(name), Some(dir)) = (key.strip_prefix("context:"), value.strip_prefix("local:"))
        else {
            continue;
        };
        if local_names.iter().any(|n| n == dir) {
            continue;
        }
        if local_names.iter().any(|n| n == name) {
            bail!("--opt {o}: a --local named {name:?} already exists");
        }
        added.push(format!("{name}={dir}"));
        *o = format!("context:{name}=local:{name}");
    }
    args.locals.extend(added);
    Ok(())
}

pub async fn run(addr: &crate::Daemon, mut args: BuildArgs) -> anyhow::Result<()> {
    apply_shorthands(&mut args);
    apply_build_contexts(&mut args)?;
    let call = call_func(&args)?;
    if call.is_some() {
        // a subrequest builds nothing, so nothing is exported
        args.outputs.clear();
    }
    // no frontend: an LLB definition (a marshaled pb.Definition) on stdin, as buildctl reads it
    let definition = match &args.frontend {
        Some(_) => None,
        None => Some(read_definition()?),
    };
    let frontend = args.frontend.clone().unwrap_or_default();
    expose_named_context_dirs(&mut args)?;
    let mut att = attachables(&args)?;
    oci_layout_stores(&mut args, &mut att)?;
    let mut frontend_attrs = frontend_attrs(&args)?;
    if let Some(c) = &call {
        frontend_attrs.insert("requestid".into(), format!("frontend.{}", c.name));
    }
    let exporters = exporters(&args, &mut att)?;
    let (cache, local_caches) = cache_options(&args, &mut att)?;

    let channel = addr.connect().await?;
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let build_ref = uuid::Uuid::new_v4().simple().to_string();
    let shared_key = att
        .dirs
        .get("context")
        .map(|p| shared_key(p))
        .unwrap_or_default();
    let _session = attachable::attach(channel.clone(), &session_id, "kiln", &shared_key, att)
        .await
        .with_context(|| format!("open session with {addr}"))?;
    let printer = spawn_printer(&channel, &build_ref, Mode::parse(&args.progress)?);

    let req = SolveRequest {
        r#ref: build_ref.clone(),
        session: session_id,
        frontend_attrs: frontend_attrs.clone(),
        exporters,
        entitlements: args.allow.clone(),
        cache,
        ..Default::default()
    };
    let frontend_req = FrontendSolve {
        definition,
        frontend,
        frontend_opt: frontend_attrs,
    };
    let result = if args.daemon_frontend {
        solve_in_daemon(&channel, req, frontend_req).await
    } else {
        solve_with_local_frontend(&channel, &build_ref, req, frontend_req).await?
    };
    let misses = printer.await.unwrap_or_default();
    if args.explain_cache {
        eprint!("{}", misses.render());
    }
    let resp = match result {
        Ok(r) => r.into_inner(),
        Err(s) => {
            print_sources(&s);
            bail!("failed to solve: {}", s.message())
        }
    };
    tag_local_caches(&resp.exporter_response, &local_caches)?;
    if let Some(f) = &args.metadata_file {
        let json = serde_json::to_string_pretty(&resp.exporter_response)?;
        std::fs::write(f, json).with_context(|| format!("write {}", f.display()))?;
    }
    if let Some(c) = &call {
        let out = call_output(c, &resp.exporter_response)?;
        print!("{}", out.text);
        if let Some(e) = out.error {
            bail!("{e}");
        }
        if out.status != 0 {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(out.status);
        }
    }
    Ok(())
}

/// A `--call` as buildx reads it: a name (`check` is `lint`) and options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CallFunc {
    name: String,
    json: bool,
    ignore_status: bool,
}

/// The `--call`/`--check` asked for; None for a plain build (`--call build`).
fn call_func(args: &BuildArgs) -> anyhow::Result<Option<CallFunc>> {
    let spec = match (&args.call, args.check) {
        (Some(c), _) => c.clone(),
        (None, true) => "check".to_string(),
        (None, false) => return Ok(None),
    };
    let mut f = CallFunc {
        name: String::new(),
        json: false,
        ignore_status: false,
    };
    for field in split_csv(&spec) {
        match field.split_once('=') {
            Some(("format", v)) => f.json = v == "json",
            Some(("ignorestatus", v)) => {
                f.ignore_status = matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True");
            }
            Some(_) => bail!("invalid print field: {field}"),
            None if f.name.is_empty() => f.name = field,
            None => bail!("invalid print value: {spec}"),
        }
    }
    if f.name == "check" {
        f.name = "lint".into();
    }
    Ok((f.name != "build").then_some(f))
}

/// What a `--call` prints.
#[derive(Debug, Default, PartialEq, Eq)]
struct CallOutput {
    text: String,
    /// `result.statuscode` unless `ignorestatus`
    status: i32,
    /// the Dockerfile did not parse: the check fails with this
    error: Option<String>,
}

/// What buildx prints for a `--call` from the result metadata.
fn call_output(c: &CallFunc, res: &BTreeMap<String, String>) -> anyhow::Result<CallOutput> {
    let get = |k: &str| res.get(k).map(String::as_str);
    let mut out = String::new();
    if c.json {
        if let Some(j) = get("result.json") {
            out.push_str(j);
            out.push('\n');
        }
    } else if c.name == "lint" {
        let results: serde_json::Value = serde_json::from_str(get("result.json").unwrap_or("{}"))
            .context("decode result.json")?;
        let warnings = results["warnings"].as_array().map_or(0, Vec::len);
        match warnings {
            0 => {}
            1 => out.push_str("Check complete, 1 warning has been found!\n"),
            n => out.push_str(&format!("Check complete, {n} warnings have been found!\n")),
        }
        out.push_str(get("result.txt").unwrap_or_default());
        if let Some(e) = results.get("buildError") {
            if warnings > 0 {
                out.push('\n');
            }
            let error = Some(e["message"].as_str().unwrap_or_default().to_string());
            return Ok(CallOutput {
                text: out,
                status: 0,
                error,
            });
        }
        if warnings == 0 {
            out.push_str("Check complete, no warnings found.\n");
        }
    } else if let Some(t) = get("result.txt") {
        out.push_str(t);
    } else {
        out.push_str(&format!("{} {res:?}\n", c.name));
    }
    let status = match get("result.statuscode") {
        Some(v) if !c.ignore_status => v.trim().parse().unwrap_or(0),
        _ => 0,
    };
    Ok(CallOutput {
        text: out,
        status,
        error: None,
    })
}

/// `kiln build DIR`, `-f`, `--build-arg`, `--target` and `-t` as the
/// `--local`/`--opt`/`--output` values they stand for.
fn apply_shorthands(args: &mut BuildArgs) {
    if let Some(dir) = args.dir.take() {
        if args.frontend.is_none() {
            args.frontend = Some("dockerfile.v0".into());
        }
        let dir = dir.to_string_lossy().to_string();
        if !args.locals.iter().any(|l| l.starts_with("context=")) {
            args.locals.push(format!("context={dir}"));
        }
        if !args.locals.iter().any(|l| l.starts_with("dockerfile=")) {
            args.locals.push(format!("dockerfile={dir}"));
        }
    }
    if let Some(file) = &args.file {
        let parent = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        args.locals.retain(|l| !l.starts_with("dockerfile="));
        args.locals.push(format!("dockerfile={}", parent.display()));
        if let Some(name) = file.file_name() {
            args.opts
                .push(format!("filename={}", name.to_string_lossy()));
        }
    }
    for b in &args.build_args {
        args.opts.push(format!("build-arg:{b}"));
    }
    if let Some(t) = &args.target {
        args.opts.push(format!("target={t}"));
    }
    if !args.tag.is_empty() {
        args.outputs
            .push(format!("type=image,\"name={}\"", args.tag.join(",")));
    }
}

/// `--build-context NAME=VALUE` as buildx turns it into frontend options: a
/// URL, `docker-image://` or `target:` value is passed as `context:NAME`; a
/// directory is synced as the local dir NAME (`_context`/`_dockerfile` for
/// those two names) that `context:NAME=local:...` names.
fn apply_build_contexts(args: &mut BuildArgs) -> anyhow::Result<()> {
    const PASSED: [&str; 8] = [
        "docker-image://",
        "target:",
        "http://",
        "https://",
        "git://",
        "ssh://",
        "git@",
        "github.com/",
    ];
    for c in &args.build_contexts {
        let (name, value) = split_kv(c, "--build-context")?;
        if name.is_empty() {
            bail!("--build-context {c}: no name");
        }
        if PASSED.iter().any(|p| value.starts_with(p)) {
            args.opts.push(format!("context:{name}={value}"));
            continue;
        }
        if let Some(layout) = value.strip_prefix(kiln_session::ocilayout::SCHEME) {
            // as buildx does: the directory becomes a store of its own, named
            // at random, and the tag is looked up here
            let (dir, tag, digest) = split_layout_path(layout);
            let store = uuid::Uuid::new_v4().simple().to_string();
            let digest = match digest {
                Some(d) => d,
                None => layout_tag(std::path::Path::new(&dir), &tag)
                    .with_context(|| format!("--build-context {c}"))?,
            };
            args.oci_layouts.push(format!("{store}={dir}"));
            args.opts.push(format!(
                "context:{name}={}{store}:{tag}@{digest}",
                kiln_session::ocilayout::SCHEME
            ));
            continue;
        }
        let meta = std::fs::metadata(&value)
            .with_context(|| format!("failed to get build context {name}"))?;
        if !meta.is_dir() {
            bail!("failed to get build context path {value}: not a directory");
        }
        let local = match name.as_str() {
            "context" | "dockerfile" => format!("_{name}"),
            _ => name.clone(),
        };
        if args
            .locals
            .iter()
            .any(|l| l.split_once('=').is_some_and(|(n, _)| n == local))
        {
            bail!("--build-context {c}: a --local named {local:?} already exists");
        }
        args.locals.push(format!("{local}={value}"));
        args.opts.push(format!("context:{name}=local:{local}"));
    }
    Ok(())
}

/// A buildx `oci-layout://` path: the directory, its tag (`latest` when
/// neither a tag nor a digest is given) and its digest.
fn split_layout_path(s: &str) -> (String, String, Option<String>) {
    let mut path = s;
    let mut digest = None;
    if let Some((p, d)) = s.rsplit_once('@')
        && kiln_session::ocilayout::is_digest(d)
    {
        path = p;
        digest = Some(d.to_string());
    }
    let mut tag = None;
    if let Some((p, t)) = path.rsplit_once(':')
        && !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        path = p;
        tag = Some(t.to_string());
    }
    let tag = tag.unwrap_or_else(|| "latest".to_string());
    (path.to_string(), tag, digest)
}

/// The digest `tag` names in the OCI layout `dir` (its `index.json`), or the
/// layout's one image when no entry has that tag.
fn layout_tag(dir: &std::path::Path, tag: &str) -> anyhow::Result<String> {
    if let Some(d) = kiln_session::content::tagged(dir, tag) {
        return Ok(d);
    }
    let path = dir.join("index.json");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("parse {}", path.display()))?;
    let one = match index["manifests"].as_array().map(Vec::as_slice) {
        Some([one]) => one["digest"].as_str(),
        _ => None,
    };
    match one {
        Some(d) if kiln_session::ocilayout::is_digest(d) => Ok(d.to_string()),
        _ => bail!("no image tagged {tag:?} in {}", path.display()),
    }
}

/// `--oci-layout NAME=DIR`: each directory served as the content store
/// `oci:NAME`; a `context:X=oci-layout://NAME:TAG` without a digest gets the
/// digest the tag names in DIR/index.json.
fn oci_layout_stores(args: &mut BuildArgs, att: &mut Attachables) -> anyhow::Result<()> {
    use kiln_session::ocilayout::{self, SCHEME};
    let mut dirs = BTreeMap::new();
    for l in &args.oci_layouts {
        let (name, dir) = split_kv(l, "--oci-layout")?;
        if name.is_empty() {
            bail!("oci-layout option must be 'id=path/to/layout', instead had invalid {l}");
        }
        let dir = PathBuf::from(&dir)
            .canonicalize()
            .with_context(|| format!("oci-layout context at {dir} failed to initialize"))?;
        if !dir.is_dir() {
            bail!("oci-layout {name}: {} is not a directory", dir.display());
        }
        if dirs.insert(name.clone(), dir.clone()).is_some() {
            bail!("oci store key {name:?} already exists");
        }
        att.content.stores.insert(ocilayout::store_id(&name), dir);
    }
    for o in &mut args.opts {
        let Some((key, value)) = o.split_once('=') else {
            continue;
        };
        let (true, Some(r)) = (key.starts_with("context:"), value.strip_prefix(SCHEME)) else {
            continue;
        };
        let Ok(r) = ocilayout::Reference::parse(r) else {
            // the frontend says what is wrong with it
            continue;
        };
        if r.digest.is_some() {
            continue;
        }
        let Some(dir) = dirs.get(&r.name) else {
            continue;
        };
        let tag = r.tag.unwrap_or_else(|| "latest".to_string());
        let digest = layout_tag(dir, &tag).with_context(|| format!("--opt {o}"))?;
        *o = format!("{key}={SCHEME}{}:{tag}@{digest}", r.name);
    }
    Ok(())
}

/// What the session serves: local dirs, secrets, ssh agents (outputs are
/// added by [`exporters`]).
fn attachables(args: &BuildArgs) -> anyhow::Result<Attachables> {
    let mut att = Attachables::default();
    for l in &args.locals {
        let (name, path) = split_kv(l, "--local")?;
        let path = PathBuf::from(&path);
        let path = path
            .canonicalize()
            .with_context(|| format!("local {name}: {}", path.display()))?;
        if !path.is_dir() {
            bail!("local {name}: {} is not a directory", path.display());
        }
        att.dirs.insert(name, path);
    }
    for sec in &args.secrets {
        let (id, source) = parse_secret(sec)?;
        att.secrets.insert(id, source);
    }
    for s in &args.ssh {
        let (id, path) = match s.split_once('=') {
            Some((id, p)) => (id.to_string(), PathBuf::from(p)),
            None => {
                let sock = std::env::var_os("SSH_AUTH_SOCK")
                    .with_context(|| format!("--ssh {s}: SSH_AUTH_SOCK is not set"))?;
                (s.clone(), PathBuf::from(sock))
            }
        };
        att.ssh.insert(id, path);
    }
    for e in &args.allow {
        if !matches!(e.as_str(), "network.host" | "security.insecure") {
            bail!("invalid --allow {e:?}: expected network.host or security.insecure");
        }
    }
    Ok(att)
}

fn frontend_attrs(args: &BuildArgs) -> anyhow::Result<BTreeMap<String, String>> {
    let mut attrs = BTreeMap::new();
    for o in &args.opts {
        let (k, v) = split_kv(o, "--opt")?;
        attrs.insert(k, v);
    }
    if args.explain_cache {
        attrs.insert(EXPLAIN_CACHE_ATTR.into(), "true".into());
    }
    if args.no_cache {
        attrs.insert("no-cache".into(), String::new());
    }
    Ok(attrs)
}

/// The `--output`s as the daemon's exporters; the session receives what
/// goes to a local dir or file.
fn exporters(args: &BuildArgs, att: &mut Attachables) -> anyhow::Result<Vec<Exporter>> {
    let mut exporters = Vec::new();
    for (i, o) in args.outputs.iter().enumerate() {
        let (ty, mut attrs) = parse_output(o)?;
        let dest = attrs.remove("dest");
        match ty.as_str() {
            "local" => {
                let d = dest.with_context(|| "output type=local needs dest=DIR")?;
                std::fs::create_dir_all(&d).with_context(|| format!("create {d}"))?;
                att.outputs
                    .insert(i as u32, OutputTarget::Dir(PathBuf::from(d)));
            }
            "tar" | "oci" | "docker" => {
                let d =
                    dest.with_context(|| format!("output type={ty} needs dest=FILE (or dest=-)"))?;
                att.outputs
                    .insert(i as u32, OutputTarget::File(PathBuf::from(d)));
            }
            "image" | "registry" => {
                if ty == "registry" {
                    attrs.insert("push".into(), "true".into());
                }
            }
            other => {
                bail!("unknown output type {other:?} (local, tar, oci, docker, image, registry)")
            }
        }
        let ty = if ty == "registry" {
            "image".to_string()
        } else {
            ty
        };
        exporters.push(Exporter { r#type: ty, attrs });
    }
    Ok(exporters)
}

/// Prints the source lines a failure points at, as buildctl does.
fn print_sources(status: &tonic::Status) {
    for s in crate::source::render_all(status) {
        eprintln!("{s}");
    }
}

/// Prints the build's progress until it ends; yields the cache misses seen.
fn spawn_printer(
    channel: &kiln_session::dial::Channel,
    build_ref: &str,
    mode: Mode,
) -> tokio::task::JoinHandle<Explanations> {
    let mut status_client = ControlClient::new(channel.clone());
    let status_ref = build_ref.to_string();
    tokio::spawn(async move {
        let mut p = Printer::new(mode);
        let mut misses = Explanations::default();
        match status_client
            .status(StatusRequest { r#ref: status_ref })
            .await
        {
            Ok(resp) => {
                let mut s = resp.into_inner();
                while let Ok(Some(msg)) = s.message().await {
                    misses.update(&msg);
                    p.update(msg);
                }
            }
            Err(e) => eprintln!("progress unavailable: {}", e.message()),
        }
        p.finish();
        misses
    })
}

type SolveResult = Result<tonic::Response<SolveResponse>, tonic::Status>;

/// An older client's way: the daemon runs the frontend named in the request.
async fn solve_in_daemon(
    channel: &kiln_session::dial::Channel,
    mut req: SolveRequest,
    frontend: FrontendSolve,
) -> SolveResult {
    req.frontend = frontend.frontend;
    req.definition = frontend.definition;
    control(channel).solve(req).await
}

/// As buildctl: the workers, then the build's Solve kept open while the
/// frontend runs here through the daemon's LLBBridge.
async fn solve_with_local_frontend(
    channel: &kiln_session::dial::Channel,
    build_ref: &str,
    req: SolveRequest,
    frontend: FrontendSolve,
) -> anyhow::Result<SolveResult> {
    control(channel)
        .list_workers(kiln_proto::moby::buildkit::v1::ListWorkersRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("list workers: {}", s.message()))?;
    let solve = tokio::spawn({
        let ch = channel.clone();
        async move { control(&ch).solve(req).await }
    });
    let gw = crate::gateway::Gateway::new(channel.clone(), build_ref);
    let frontend_failure = gw.run(frontend).await.err();
    match solve.await {
        // the daemon fails the build with the frontend's error; where the
        // build's status lost its source lines, the frontend's still has them
        Ok(Err(s)) if !s.details().is_empty() => Ok(Err(s)),
        Ok(Err(s)) => match frontend_failure {
            Some(f) if !f.0.details().is_empty() => {
                Ok(Err(kiln_proto::status::Details::of(&f.0).attach(s)))
            }
            _ => Ok(Err(s)),
        },
        Ok(r) => Ok(r),
        Err(e) => bail!("build task: {e}"),
    }
}

/// A Control client for big messages (definitions, exporter responses).
/// The session's shared key for the context dir `dir`: kilnd keeps one synced copy of
/// a context per key, so it must be this client's alone. The dir's path joined with a
/// random id kept private in this user's state dir (`$XDG_STATE_HOME/kiln/node-id`): a
/// client elsewhere with a context at the same path (`/src` in CI) cannot name, or plant
/// files in, this client's copy. Without a place for the id, a fresh key per build (the
/// context is then sent whole).
fn shared_key(dir: &std::path::Path) -> String {
    let id = node_id().unwrap_or_else(|e| {
        eprintln!("warning: no kiln node id ({e:#}); sending the whole context");
        uuid::Uuid::new_v4().simple().to_string()
    });
    format!("{}:{id}", dir.display())
}

fn node_id() -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".local/state")
        }
    };
    let dir = state.join("kiln");
    let path = dir.join("node-id");
    let valid = |s: &str| s.len() >= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Ok(s) = std::fs::read_to_string(&path)
        && valid(s.trim())
    {
        return Ok(s.trim().to_string());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let id = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let tmp = dir.join(format!("node-id.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(id.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    // the first of concurrent clients wins; the others read its id
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            Ok(id)
        }
        Err(_) => {
            let _ = std::fs::remove_file(&tmp);
            let s = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            if valid(s.trim()) {
                Ok(s.trim().to_string())
            } else {
                anyhow::bail!("{} does not hold a node id", path.display())
            }
        }
    }
}

fn control(ch: &kiln_session::dial::Channel) -> ControlClient<kiln_session::dial::Channel> {
    ControlClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// What the client-side frontend asks the daemon to solve.
pub struct FrontendSolve {
    pub definition: Option<kiln_proto::pb::Definition>,
    pub frontend: String,
    pub frontend_opt: BTreeMap<String, String>,
}

/// Reads a marshaled `pb.Definition` from stdin (`kiln build < def.llb`).
fn read_definition() -> anyhow::Result<kiln_proto::pb::Definition> {
    use prost::Message;
    use std::io::{IsTerminal, Read};
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!(
            "nothing to build: give --frontend dockerfile.v0 (with --local context=DIR --local dockerfile=DIR), a directory, or pipe an LLB definition to stdin"
        );
    }
    let mut buf = Vec::new();
    stdin
        .read_to_end(&mut buf)
        .context("read the LLB definition from stdin")?;
    let def = kiln_proto::pb::Definition::decode(buf.as_slice())
        .context("stdin does not hold an LLB definition (a marshaled pb.Definition)")?;
    if def.def.is_empty() {
        bail!("empty definition sent to build: give --frontend instead");
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(spec: &str) -> anyhow::Result<Option<CallFunc>> {
        let mut full = vec!["kiln".to_string()];
        if !spec.is_empty() {
            full.push(format!("--call={spec}"));
        }
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BuildArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(full)?;
        call_func(&cli.args)
    }

    #[test]
    fn build_contexts_become_named_contexts_as_buildx_passes_them() -> anyhow::Result<()> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BuildArgs,
        }
        let dir = std::env::temp_dir();
        let dir = dir.to_string_lossy();
        let parse = |extra: &[String]| -> anyhow::Result<BuildArgs> {
            let mut full = vec!["kiln".to_string()];
            full.extend(extra.iter().cloned());
            let mut cli = <Cli as clap::Parser>::try_parse_from(full)?;
            apply_build_contexts(&mut cli.args)?;
            Ok(cli.args)
        };
        let args = parse(&[
            format!("--build-context=src={dir}"),
            format!("--build-context=context={dir}"),
            "--build-context=base=docker-image://busybox:latest".to_string(),
            "--build-context=repo=https://github.com/moby/buildkit.git".to_string(),
        ])?;
        assert_eq!(
            args.opts,
            [
                "context:src=local:src",
                "context:context=local:_context",
                "context:base=docker-image://busybox:latest",
                "context:repo=https://github.com/moby/buildkit.git",
            ]
        );
        assert_eq!(
            args.locals,
            [format!("src={dir}"), format!("_context={dir}")]
        );
        assert!(parse(&["--build-context=x=/no/such/dir".to_string()]).is_err());
        assert!(parse(&["--build-context=x".to_string()]).is_err());
        assert!(parse(&["--build-context=x=oci-layout:///tmp/l".to_string()]).is_err());
        Ok(())
    }

    #[test]
    fn oci_layout_paths_and_tags_as_buildx_reads_them() -> anyhow::Result<()> {
        let d = format!("sha256:{}", "a".repeat(64));
        let split = split_layout_path;
        assert_eq!(
            split("/l/dir"),
            ("/l/dir".to_string(), "latest".to_string(), None)
        );
        assert_eq!(
            split("/l/dir:v1"),
            ("/l/dir".to_string(), "v1".to_string(), None)
        );
        assert_eq!(
            split(&format!("/l/dir@{d}")),
            ("/l/dir".to_string(), "latest".to_string(), Some(d.clone()))
        );
        assert_eq!(
            split(&format!("/l/dir:v1@{d}")),
            ("/l/dir".to_string(), "v1".to_string(), Some(d.clone()))
        );
        // a colon in a directory name that is no tag stays in the path
        assert_eq!(split("/l/a:b/c").0, "/l/a:b/c");

        let dir = std::env::temp_dir().join(format!("kiln-layout-tags-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let index = |manifests: serde_json::Value| {
            std::fs::write(
                dir.join("index.json"),
                serde_json::json!({"schemaVersion": 2, "manifests": manifests}).to_string(),
            )
        };
        let d2 = format!("sha256:{}", "b".repeat(64));
        index(serde_json::json!([
            {"digest": d, "annotations": {"org.opencontainers.image.ref.name": "v1"}},
            {"digest": d2, "annotations": {"io.containerd.image.name": "example.com/x:v2"}},
        ]))?;
        assert_eq!(layout_tag(&dir, "v1")?, d);
        assert!(
            layout_tag(&dir, "v3").is_err(),
            "two images, none tagged v3"
        );
        index(serde_json::json!([{"digest": d2}]))?;
        assert_eq!(layout_tag(&dir, "latest")?, d2, "the one image");
        index(serde_json::json!([{"digest": "sha256:../../x"}]))?;
        assert!(layout_tag(&dir, "latest").is_err(), "not a digest");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn call_names_as_buildx_reads_them() -> anyhow::Result<()> {
        assert_eq!(call("")?, None);
        assert_eq!(call("build")?, None);
        let c = call("check,format=json")?.context("a call")?;
        assert_eq!((c.name.as_str(), c.json), ("lint", true));
        assert_eq!(
            call("targets")?.map(|c| c.name),
            Some("targets".to_string())
        );
        assert!(call("targets,outline").is_err());
        assert!(call("targets,colour=red").is_err());
        Ok(())
    }

    #[test]
    fn check_output_counts_warnings_and_exits_with_the_status() -> anyhow::Result<()> {
        let lint = CallFunc {
            name: "lint".into(),
            json: false,
            ignore_status: false,
        };
        let res = BTreeMap::from([
            (
                "result.json".to_string(),
                r#"{"warnings":[{"ruleName":"A"},{"ruleName":"B"}],"sources":[]}"#.to_string(),
            ),
            ("result.txt".to_string(), "\nWARNING: A\n".to_string()),
            ("result.statuscode".to_string(), "1".to_string()),
        ]);
        let out = call_output(&lint, &res)?;
        assert_eq!(
            out.text,
            "Check complete, 2 warnings have been found!\n\nWARNING: A\n"
        );
        assert_eq!((out.status, out.error), (1, None));
        let clean = BTreeMap::from([
            (
                "result.json".to_string(),
                r#"{"warnings":[],"sources":[]}"#.to_string(),
            ),
            ("result.statuscode".to_string(), "0".to_string()),
        ]);
        let out = call_output(&lint, &clean)?;
        assert_eq!(out.text, "Check complete, no warnings found.\n");
        assert_eq!(out.status, 0);
        let ignore = CallFunc {
            ignore_status: true,
            ..lint
        };
        assert_eq!(call_output(&ignore, &res)?.status, 0);
        Ok(())
    }
}
