//! Dockerfile -> LLB, imitating BuildKit's `frontend/dockerfile/dockerfile2llb`
//! op for op: the same ops, attrs, metadata names and image config history.
//!
//! Entry point: [`convert`]. Images named by `FROM` (and `COPY --from=<image>`)
//! are resolved through an [`ImageResolver`]; nothing else does IO.
//!
//! Layout: `stage.rs` (per-stage state), `run.rs` (RUN), `copy.rs` (COPY/ADD,
//! WORKDIR), `image.rs` (config-only instructions), `ops.rs` (op arena and
//! marshalling order), `reference.rs` (image name normalisation).

mod copy;
mod git;
mod image;
mod mount;
mod ops;
mod reference;
mod run;
mod stage;
mod syntax;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use kiln_dockerfile::{ArgDecl, Command, Instruction, Lex};
use kiln_llb::pb;

pub use syntax::{frontend_image, syntax_note};

use copy::CopySource;
use ops::{ContextSource, OpId, Ops, metadata};
use stage::{StageState, empty_image, to_pb_platform};

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The stage to build (case-insensitive); the last stage when None.
    pub target: Option<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// The target platform.
    pub platform: kiln_oci::Platform,
    /// The client session that serves the build context (`local.session`).
    pub session_id: String,
    /// The Dockerfile's name, recorded in the definition's source map.
    pub filename: String,
    /// `.dockerignore` patterns, sent as the build context's
    /// `local.excludepatterns` so excluded files never leave the client.
    pub excludes: Vec<String>,
    /// Named contexts (`context:NAME=...`): replace `FROM NAME` and
    /// `COPY --from=NAME` when NAME is not a stage.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// `.dockerignore` patterns of named local contexts, by local dir name.
    pub local_excludes: BTreeMap<String, Vec<String>>,
    /// `--opt label:KEY=VALUE`: labels set on the image over the Dockerfile's.
    pub labels: BTreeMap<String, String>,
    /// The request came through the frontend image the Dockerfile names
    /// (BuildKit's `cmdline` option is set): its `# syntax=` is not followed again.
    pub syntax_followed: bool,
}

/// What a named context (`--opt context:NAME=VALUE`) points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// `local:DIR`: the client's local dir named DIR.
    Local(String),
    /// `docker-image://REF`: an image.
    Image(String),
}

impl NamedContext {
    /// Parses the value of a `context:NAME` option.
    pub fn parse(value: &str) -> Result<NamedContext, String> {
        if let Some(dir) = value.strip_prefix("local:") {
            if dir.is_empty() {
                return Err(format!("invalid named context {value:?}: empty local name"));
            }
            return Ok(NamedContext::Local(dir.to_string()));
        }
        if let Some(reference) = value.strip_prefix("docker-image://") {
            if reference.is_empty() {
                return Err(format!(
                    "invalid named context {value:?}: empty image reference"
                ));
            }
            return Ok(NamedContext::Image(reference.to_string()));
        }
        Err(format!(
            "unsupported named context {value:?}: expected local:NAME or docker-image://REF"
        ))
    }
}

/// A resolved base image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Normalised reference, e.g. `docker.io/library/busybox:latest`.
    pub canonical_ref: String,
    /// The manifest digest the image is pinned to (`sha256:...`).
    pub digest: String,
    pub config: kiln_oci::ImageConfig,
}

/// Looks up image configs for `FROM`.
pub trait ImageResolver: Send + Sync {
    /// `reference` is normalised (`docker.io/library/busybox:latest`).
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_oci::Platform,
    ) -> impl Future<Output = Result<ResolvedImage, String>> + Send;
}

/// The conversion result.
#[derive(Debug, Clone)]
pub struct Converted {
    pub definition: pb::Definition,
    /// The config of the image the target stage produces (`rootfs.diff_ids`
    /// empty: the exporter fills it).
    pub image_config: kiln_oci::ImageConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Dockerfile cannot be empty")]
    Empty,
    #[error(transparent)]
    Parse(#[from] kiln_dockerfile::Error),
    #[error("Dockerfile:{line}: {source}")]
    Expand {
        line: usize,
        source: kiln_dockerfile::Error,
    },
    #[error("target stage {target:?} could not be found")]
    TargetNotFound { target: String },
    #[error("Dockerfile:{line}: base name ({base}) should not be blank")]
    BlankBaseName { line: usize, base: String },
    #[error("Dockerfile:{line}: failed to parse platform {value}: {reason}")]
    InvalidPlatform {
        line: usize,
        value: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: invalid stage index {index}")]
    InvalidStageIndex { line: usize, index: String },
    #[error(
        "Dockerfile:{line}: cannot copy from stage {from:?}, it needs to be defined before current stage {stage:?}"
    )]
    StageNotDefinedYet {
        line: usize,
        from: String,
        stage: String,
    },
    #[error("Dockerfile:{line}: circular dependency detected on stage: {stage}")]
    CircularStage { line: usize, stage: String },
    #[error("Dockerfile:{line}: failed to parse stage name {reference:?}: {reason}")]
    InvalidReference {
        line: usize,
        reference: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: failed to resolve source metadata for {reference}: {reason}")]
    ResolveImage {
        line: usize,
        reference: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: {instruction}: {reason}")]
    InvalidInstruction {
        line: usize,
        instruction: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: {feature} is not supported yet")]
    Unsupported { line: usize, feature: String },
    #[error(
        "{origin}: external frontend images are not supported: {reference} (kiln builds only with its built-in Dockerfile frontend, which docker/dockerfile:<version> also selects)"
    )]
    ExternalFrontend {
        origin: String,
        line: Option<usize>,
        reference: String,
    },
    #[error("invalid SOURCE_DATE_EPOCH {value:?}: expected seconds since 1970-01-01")]
    InvalidSourceDateEpoch { value: String },
}

impl Error {
    /// The Dockerfile line the error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::Empty | Error::TargetNotFound { .. } | Error::InvalidSourceDateEpoch { .. } => {
                None
            }
            Error::Parse(e) => e.line(),
            Error::ExternalFrontend { line, .. } => *line,
            Error::Expand { line, .. }
            | Error::BlankBaseName { line, .. }
            | Error::InvalidPlatform { line, .. }
            | Error::InvalidStageIndex { line, .. }
            | Error::StageNotDefinedYet { line, .. }
            | Error::CircularStage { line, .. }
            | Error::InvalidReference { line, .. }
            | Error::ResolveImage { line, .. }
            | Error::InvalidInstruction { line, .. }
            | Error::Unsupported { line, .. } => Some(*line),
        }
    }
}

/// A node on a cycle of the graph with `n` nodes and these edges, if any.
fn find_cycle(n: usize, edges: impl Fn(usize) -> Vec<usize>) -> Option<usize> {
    // 0 = unvisited, 1 = on the current path, 2 = done
    let mut color = vec![0u8; n];
    for start in 0..n {
        if color[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, edges(start), 0usize)];
        color[start] = 1;
        while let Some((node, next, k)) = stack.last_mut() {
            if let Some(&to) = next.get(*k) {
                *k += 1;
                match color.get(to) {
                    Some(1) => return Some(to),
                    Some(0) => {
                        color[to] = 1;
                        let e = edges(to);
                        stack.push((to, e, 0));
                    }
                    _ => {}
                }
            } else {
                color[*node] = 2;
                stack.pop();
            }
        }
    }
    None
}

pub(crate) fn line_of(cmd: &Command) -> usize {
    cmd.location.start_line
}

/// What a stage is built on.
#[derive(Debug, Clone)]
enum Base {
    Scratch,
    /// A named local context (index into `locals`).
    Local(usize),
    /// An earlier stage, by index.
    Stage(usize),
    /// An image (index into `images`).
    Image(usize),
}

/// Where `COPY --from` reads.
#[derive(Debug, Clone, Copy)]
enum From {
    Stage(usize),
    Image(usize),
    /// A named local context (index into `locals`).
    Local(usize),
}

/// A `from=` as written and what it names; None reads the build context.
type NamedFrom = Option<(String, From)>;

/// An image to resolve: normalised reference, platform, line for errors.
#[derive(Debug)]
struct ImageUse {
    reference: String,
    platform: kiln_oci::Platform,
    line: usize,
    /// The FROM line (`com.docker.dockerfile.v1.command`), empty for COPY --from.
    command: String,
    resolved: Option<(Option<OpId>, kiln_oci::ImageConfig)>,
}

fn parse_platform(s: &str) -> Result<kiln_oci::Platform, String> {
    let parts: Vec<&str> = s.split('/').collect();
    let lower = |x: &str| x.to_ascii_lowercase();
    let norm_arch = |a: String| match a.as_str() {
        "x86_64" | "x86-64" => "amd64".to_string(),
        "aarch64" => "arm64".to_string(),
        _ => a,
    };
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(kiln_oci::Platform::new(
            &lower(os),
            &norm_arch(lower(arch)),
            None,
        )),
        [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => Ok(
            kiln_oci::Platform::new(&lower(os), &norm_arch(lower(arch)), Some(&lower(variant))),
        ),
        _ => Err(format!("{s:?}: unknown operating system or architecture")),
    }
}

fn format_platform(p: &kiln_oci::Platform) -> String {
    match &p.variant {
        Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
        _ => format!("{}/{}", p.os, p.architecture),
    }
}

fn set_arg(args: &mut Vec<(String, String)>, key: &str, value: &str) {
    args.retain(|(k, _)| k != key);
    args.push((key.to_string(), value.to_string()));
}

/// BuildKit's automatic platform ARGs.
fn platform_args(target: &kiln_oci::Platform, build: &kiln_oci::Platform) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (prefix, p) in [("BUILD", build), ("TARGET", target)] {
        set_arg(&mut v, &format!("{prefix}PLATFORM"), &format_platform(p));
        set_arg(&mut v, &format!("{prefix}OS"), &p.os);
        set_arg(&mut v, &format!("{prefix}ARCH"), &p.architecture);
        set_arg(
            &mut v,
            &format!("{prefix}VARIANT"),
            p.variant.as_deref().unwrap_or(""),
        );
    }
    v
}

/// Converts a Dockerfile into an LLB definition and the image config of the target stage.
pub async fn convert<R: ImageResolver>(
    dockerfile: &[u8],
    opts: &ConvertOptions,
    resolver: &R,
) -> Result<Converted, Error> {
    if dockerfile.is_empty() {
        return Err(Error::Empty);
    }
    let text = String::from_utf8_lossy(dockerfile);
    let df = kiln_dockerfile::parse(&text)?;
    if !opts.syntax_followed {
        syntax::check(&df.directives, &opts.build_args)?;
    }
    let lex = Lex::new(df.directives.escape);

    // Global (meta) ARGs, usable in FROM.
    let mut global_args = platform_args(&opts.platform, &kiln_oci::Platform::host());
    for cmd in &df.meta_args {
        if let Instruction::Arg(decls) = &cmd.instruction {
            for d in decls {
                let value = match (opts.build_args.get(&d.key), &d.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(def)) => Some(lex.process_word(def, &global_args).map_err(
                        |e| Error::Expand {
                            line: line_of(cmd),
                            source: e,
                        },
                    )?),
                    (None, None) => None,
                };
                if let Some(v) = value {
                    set_arg(&mut global_args, &d.key, &v);
                }
            }
        }
    }

    // Plan stages: bases, names, platforms.
    let mut images: Vec<ImageUse> = Vec::new();
    let mut locals: Vec<String> = Vec::new();
    let mut bases: Vec<Base> = Vec::new();
    let mut platforms: Vec<Option<kiln_oci::Platform>> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, stage) in df.stages.iter().enumerate() {
        let line = stage.location.start_line;
        let base = lex
            .process_word(&stage.base, &global_args)
            .map_err(|e| Error::Expand { line, source: e })?;
        if base.is_empty() {
            return Err(Error::BlankBaseName {
                line,
                base: stage.base.clone(),
            });
        }
        let platform = match &stage.platform {
            Some(p) => {
                let value = lex
                    .process_word(p, &global_args)
                    .map_err(|e| Error::Expand { line, source: e })?;
                Some(
                    parse_platform(&value).map_err(|reason| Error::InvalidPlatform {
                        line,
                        value: p.clone(),
                        reason,
                    })?,
                )
            }
            None => None,
        };
        let named = opts.named_contexts.get(&base);
        let kind = if let Some(&j) = names.get(&base) {
            Base::Stage(j)
        } else if let Some(NamedContext::Local(dir)) = named {
            Base::Local(local_index(&mut locals, dir))
        } else if base.eq_ignore_ascii_case("scratch") && named.is_none() {
            Base::Scratch
        } else {
            let base = match named {
                Some(NamedContext::Image(r)) => r.clone(),
                _ => base.clone(),
            };
            let reference =
                reference::normalize(&base).map_err(|reason| Error::InvalidReference {
                    line,
                    reference: base.clone(),
                    reason,
                })?;
            images.push(ImageUse {
                reference,
                platform: platform.clone().unwrap_or_else(|| opts.platform.clone()),
                line,
                command: stage.original.clone(),
                resolved: None,
            });
            Base::Image(images.len() - 1)
        };
        bases.push(kind);
        platforms.push(platform);
        if let Some(name) = &stage.name {
            names.insert(name.clone(), i);
        }
    }

    let target = match &opts.target {
        Some(t) if !t.is_empty() => *names
            .get(&t.to_ascii_lowercase())
            .ok_or_else(|| Error::TargetNotFound { target: t.clone() })?,
        _ => df.stages.len() - 1,
    };

    // COPY --from and RUN --mount from= dependencies (stage by name or index, else an image).
    let mut deps: Vec<Vec<From>> = vec![Vec::new(); df.stages.len()];
    let mut cmd_sources: BTreeMap<(usize, usize), Vec<NamedFrom>> = BTreeMap::new();
    let mut image_by_ref: BTreeMap<String, usize> = BTreeMap::new();
    let mut has_mounts = false;
    for (i, stage) in df.stages.iter().enumerate() {
        for (c, cmd) in stage.commands.iter().enumerate() {
            let line = line_of(cmd);
            let froms: Vec<Option<String>> = match &cmd.instruction {
                Instruction::Copy(copy) => vec![copy.from.clone()],
                Instruction::Run(run) if !run.mounts.is_empty() => {
                    has_mounts = true;
                    run.mounts
                        .iter()
                        .map(|m| {
                            kiln_dockerfile::parse_mount(m)
                                .map(|m| m.from)
                                .map_err(|reason| Error::InvalidInstruction {
                                    line,
                                    instruction: "RUN".to_string(),
                                    reason,
                                })
                        })
                        .collect::<Result<_, _>>()?
                }
                _ => continue,
            };
            let mut resolved = Vec::new();
            for from in froms {
                let Some(from) = from else {
                    resolved.push(None);
                    continue;
                };
                let dep = if let Ok(index) = from.parse::<usize>() {
                    if index >= df.stages.len() {
                        return Err(Error::InvalidStageIndex { line, index: from });
                    }
                    From::Stage(index)
                } else if from.starts_with('-') && from[1..].parse::<usize>().is_ok() {
                    return Err(Error::InvalidStageIndex { line, index: from });
                } else if let Some(&j) = names.get(&from.to_ascii_lowercase()) {
                    From::Stage(j)
                } else if let Some(NamedContext::Local(dir)) = opts.named_contexts.get(&from) {
                    From::Local(local_index(&mut locals, dir))
                } else {
                    let image = match opts.named_contexts.get(&from) {
                        Some(NamedContext::Image(r)) => r.clone(),
                        _ => from.clone(),
                    };
                    let reference =
                        reference::normalize(&image).map_err(|reason| Error::InvalidReference {
                            line,
                            reference: from.clone(),
                            reason,
                        })?;
                    let idx = match image_by_ref.get(&reference) {
                        Some(&k) => k,
                        None => {
                            images.push(ImageUse {
                                reference: reference.clone(),
                                platform: opts.platform.clone(),
                                line,
                                command: String::new(),
                                resolved: None,
                            });
                            image_by_ref.insert(reference, images.len() - 1);
                            images.len() - 1
                        }
                    };
                    From::Image(idx)
                };
                deps[i].push(dep);
                resolved.push(Some((from, dep)));
            }
            cmd_sources.insert((i, c), resolved);
        }
    }

    // A stage that (through COPY --from, RUN --mount from= or FROM) needs itself.
    let stage_edges = |i: usize| -> Vec<usize> {
        let base = match bases[i] {
            Base::Stage(j) => Some(j),
            _ => None,
        };
        base.into_iter()
            .chain(deps[i].iter().filter_map(|d| match d {
                From::Stage(j) => Some(*j),
                _ => None,
            }))
            .collect()
    };
    if let Some(i) = find_cycle(df.stages.len(), stage_edges) {
        let stage = &df.stages[i];
        return Err(Error::CircularStage {
            line: stage.location.start_line,
            stage: stage.name.clone().unwrap_or_else(|| format!("stage-{i}")),
        });
    }

    // Stages reachable from the target.
    let mut reachable = vec![false; df.stages.len()];
    let mut needed_images = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut reachable[i], true) {
            continue;
        }
        match bases[i] {
            Base::Stage(j) => todo.push(j),
            Base::Image(k) => {
                needed_images.insert(k);
            }
            Base::Scratch | Base::Local(_) => {}
        }
        for d in &deps[i] {
            match *d {
                From::Stage(j) => todo.push(j),
                From::Image(k) => {
                    needed_images.insert(k);
                }
                From::Local(_) => {}
            }
        }
    }

    let single_state = df.stages.len() + image_by_ref.len() == 1 && !has_mounts;
    let mut ops = Ops::default();

    // Resolve images (in Dockerfile order).
    for &k in &needed_images {
        let use_ = &images[k];
        let resolved = resolver
            .resolve(&use_.reference, &use_.platform)
            .await
            .map_err(|reason| Error::ResolveImage {
                line: use_.line,
                reference: use_.reference.clone(),
                reason,
            })?;
        let config = resolved.config;
        // An image with no layers is scratch.
        let is_scratch = config.rootfs.diff_ids.is_empty()
            && config.history.iter().all(|h| h.empty_layer == Some(true));
        let state = if is_scratch {
            None
        } else {
            let name = match resolved.canonical_ref.split_once('@') {
                Some((n, _)) => n.to_string(),
                None => resolved.canonical_ref.clone(),
            };
            let pinned = if resolved.digest.is_empty() {
                name
            } else {
                format!("{name}@{}", resolved.digest)
            };
            Some((pinned, use_.platform.clone()))
        };
        let state = state.map(|(pinned, platform)| {
            let op = pb::Op {
                platform: Some(to_pb_platform(&platform)),
                constraints: Some(pb::WorkerConstraints::default()),
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: format!("docker-image://{pinned}"),
                    attrs: BTreeMap::new(),
                })),
                ..Default::default()
            };
            (op, pinned)
        });
        images[k].resolved = Some(match state {
            None => (None, config),
            Some((op, pinned)) => {
                // The FROM op's progress name is set when its stage is dispatched;
                // COPY --from images get a plain name.
                let line = use_.line;
                let md = metadata(
                    &[
                        ("com.docker.dockerfile.v1.command", use_.command.as_str()),
                        ("llb.customname", &format!("FROM {pinned}")),
                    ],
                    &["source.image"],
                );
                (
                    Some(ops.push(op, Vec::new(), md, Some((line, line)))),
                    config,
                )
            }
        });
    }

    // Dispatch reachable stages in order.
    let mut states: Vec<Option<StageState>> = vec![None; df.stages.len()];
    let mut ctx_paths = BTreeSet::new();
    let ignore = kiln_dockerfile::IgnoreMatcher::new(&opts.excludes);
    let mut local_ops: BTreeMap<usize, OpId> = BTreeMap::new();
    let mut local_op = |ops: &mut Ops, k: usize| -> OpId {
        *local_ops.entry(k).or_insert_with(|| {
            let excludes = opts
                .local_excludes
                .get(&locals[k])
                .map_or(&[][..], Vec::as_slice);
            ops.named_local(&locals[k], &opts.session_id, excludes)
        })
    };
    for i in 0..df.stages.len() {
        if !reachable[i] {
            continue;
        }
        let stage = &df.stages[i];
        let display_name = if single_state {
            String::new()
        } else {
            stage.name.clone().unwrap_or_else(|| format!("stage-{i}"))
        };
        let cmd_total = stage
            .commands
            .iter()
            .filter(|c| {
                matches!(
                    c.instruction,
                    Instruction::Run(_)
                        | Instruction::Copy(_)
                        | Instruction::Add(_)
                        | Instruction::Workdir(_)
                )
            })
            .count();
        let mut st = match bases[i] {
            Base::Local(k) => {
                let platform = platforms[i]
                    .clone()
                    .unwrap_or_else(|| opts.platform.clone());
                StageState::new(
                    Some(local_op(&mut ops, k)),
                    empty_image(&platform),
                    platform,
                )
            }
            Base::Scratch => {
                let platform = platforms[i]
                    .clone()
                    .unwrap_or_else(|| opts.platform.clone());
                StageState::new(None, empty_image(&platform), platform)
            }
            Base::Stage(j) => {
                let mut st = states[j].clone().ok_or_else(|| Error::StageNotDefinedYet {
                    line: stage.location.start_line,
                    from: stage.base.clone(),
                    stage: display_name.clone(),
                })?;
                st.cmd_set = false;
                st
            }
            Base::Image(k) => {
                let (state, config) =
                    images[k]
                        .resolved
                        .clone()
                        .ok_or_else(|| Error::ResolveImage {
                            line: stage.location.start_line,
                            reference: images[k].reference.clone(),
                            reason: "image was not resolved".to_string(),
                        })?;
                let platform = images[k].platform.clone();
                let mut st = StageState::new(state, config, platform);
                st.display_name = display_name.clone();
                st.cmd_total = cmd_total + usize::from(state.is_some());
                if let Some(id) = state {
                    // Give the source op its stage progress name.
                    let name = st.progress_name(&format!(
                        "FROM {}",
                        ops.source_identifier(id)
                            .trim_start_matches("docker-image://")
                    ));
                    ops.set_custom_name(id, &name);
                } else {
                    st.cmd_total = cmd_total;
                }
                st
            }
        };
        st.display_name = display_name;
        if !matches!(bases[i], Base::Image(_)) {
            st.cmd_index = 0;
            st.cmd_total = cmd_total;
        }

        // ONBUILD triggers of the base (image config or parent stage) run first.
        let triggers = st.image.config.on_build.take().unwrap_or_default();
        st.cmd_total += triggers.len();
        st.onbuild = true;
        for trigger in &triggers {
            let mut cmd =
                kiln_dockerfile::parse_command(trigger, df.directives.escape).map_err(|e| {
                    Error::InvalidInstruction {
                        line: stage.location.start_line,
                        instruction: "ONBUILD".to_string(),
                        reason: e.to_string(),
                    }
                })?;
            cmd.location = stage.location;
            let sources = trigger_sources(&cmd, &names, &states, i)?;
            dispatch(
                &mut ops,
                &lex,
                &mut st,
                &cmd,
                &sources,
                &opts.build_args,
                &global_args,
                &mut ctx_paths,
                &ignore,
            )?;
        }
        st.onbuild = false;

        for (c, cmd) in stage.commands.iter().enumerate() {
            let mut sources = Vec::new();
            for from in cmd_sources.get(&(i, c)).into_iter().flatten() {
                sources.push(match from {
                    None => CopySource::Context,
                    Some((from, From::Stage(j))) => {
                        if *j >= i {
                            return Err(Error::StageNotDefinedYet {
                                line: line_of(cmd),
                                from: from.clone(),
                                stage: stage.name.clone().unwrap_or_else(|| format!("stage-{i}")),
                            });
                        }
                        CopySource::State(states[*j].as_ref().and_then(|s| s.state))
                    }
                    Some((_, From::Image(k))) => {
                        CopySource::State(images[*k].resolved.as_ref().and_then(|r| r.0))
                    }
                    Some((_, From::Local(k))) => CopySource::State(Some(local_op(&mut ops, *k))),
                });
            }
            dispatch(
                &mut ops,
                &lex,
                &mut st,
                cmd,
                &sources,
                &opts.build_args,
                &global_args,
                &mut ctx_paths,
                &ignore,
            )?;
        }
        states[i] = Some(st);
    }

    let target_state = states[target].take().ok_or_else(|| Error::TargetNotFound {
        target: opts.target.clone().unwrap_or_default(),
    })?;
    let mut image_config = target_state.image;
    image_config.architecture = opts.platform.architecture.clone();
    image_config.os = opts.platform.os.clone();
    image_config.variant = opts.platform.variant.clone().filter(|v| !v.is_empty());
    image_config.rootfs = kiln_oci::RootFs::default();
    image_config.created = None;
    if !opts.labels.is_empty() {
        image_config
            .config
            .labels
            .get_or_insert_with(BTreeMap::new)
            .extend(opts.labels.clone());
    }
    if let Some(epoch) = opts
        .build_args
        .get("SOURCE_DATE_EPOCH")
        .filter(|v| !v.is_empty())
    {
        let secs: i64 = epoch
            .trim()
            .parse()
            .map_err(|_| Error::InvalidSourceDateEpoch {
                value: epoch.clone(),
            })?;
        let created = rfc3339_utc(secs);
        // BuildKit clamps history to the epoch and stamps what this build added.
        for h in &mut image_config.history {
            if h.created
                .as_ref()
                .is_none_or(|c| c.as_str() > created.as_str())
            {
                h.created = Some(created.clone());
            }
        }
        image_config.created = Some(created);
    }

    let filename = if opts.filename.is_empty() {
        "Dockerfile".to_string()
    } else {
        opts.filename.clone()
    };
    let definition = ops.finish(
        target_state.state,
        ContextSource {
            session_id: opts.session_id.clone(),
            paths: ctx_paths,
            excludes: opts.excludes.clone(),
        },
        pb::SourceInfo {
            filename,
            data: dockerfile.to_vec(),
            definition: None,
            language: "Dockerfile".to_string(),
        },
    );
    Ok(Converted {
        definition,
        image_config,
    })
}

fn local_index(locals: &mut Vec<String>, dir: &str) -> usize {
    match locals.iter().position(|l| l == dir) {
        Some(k) => k,
        None => {
            locals.push(dir.to_string());
            locals.len() - 1
        }
    }
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
fn rfc3339_utc(secs: i64) -> String {
    kiln_oci::rfc3339(secs)
}

/// Sources of an ONBUILD trigger's COPY --from / RUN --mount from=: only
/// stages already built are supported.
fn trigger_sources(
    cmd: &Command,
    names: &BTreeMap<String, usize>,
    states: &[Option<StageState>],
    current: usize,
) -> Result<Vec<CopySource>, Error> {
    let line = line_of(cmd);
    let froms: Vec<Option<String>> = match &cmd.instruction {
        Instruction::Copy(c) => vec![c.from.clone()],
        Instruction::Run(r) => r
            .mounts
            .iter()
            .map(|m| kiln_dockerfile::parse_mount(m).map(|m| m.from))
            .collect::<Result<_, _>>()
            .map_err(|reason| Error::InvalidInstruction {
                line,
                instruction: "RUN".to_string(),
                reason,
            })?,
        _ => return Ok(Vec::new()),
    };
    froms
        .into_iter()
        .map(|from| {
            let Some(from) = from else {
                return Ok(CopySource::Context);
            };
            let index = from
                .parse::<usize>()
                .ok()
                .or_else(|| names.get(&from.to_ascii_lowercase()).copied());
            match index {
                Some(j) if j < current => match &states[j] {
                    Some(s) => Ok(CopySource::State(s.state)),
                    None => Err(Error::Unsupported {
                        line,
                        feature: format!("ONBUILD reading from unbuilt stage {from:?}"),
                    }),
                },
                _ => Err(Error::Unsupported {
                    line,
                    feature: format!("ONBUILD reading from {from:?}"),
                }),
            }
        })
        .collect()
}

/// Dispatches one instruction of a stage.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    ops: &mut Ops,
    lex: &Lex,
    st: &mut StageState,
    cmd: &Command,
    sources: &[CopySource],
    build_args: &BTreeMap<String, String>,
    global_args: &[(String, String)],
    ctx_paths: &mut BTreeSet<String>,
    ignore: &kiln_dockerfile::IgnoreMatcher,
) -> Result<(), Error> {
    let line = line_of(cmd);
    let mut instruction = cmd.instruction.clone();
    instruction
        .expand(lex, &st.env)
        .map_err(|e| Error::Expand { line, source: e })?;
    let invalid = |reason: String| Error::InvalidInstruction {
        line,
        instruction: instruction.keyword().to_string(),
        reason,
    };
    match &instruction {
        Instruction::Run(r) => {
            let proxy = run::proxy_env(build_args);
            run::dispatch(ops, lex, st, r, sources, ctx_paths, proxy, cmd)?
        }
        Instruction::Copy(c) => {
            let source = sources.first().copied().unwrap_or(CopySource::Context);
            copy::dispatch(ops, lex, st, c, false, source, ctx_paths, ignore, cmd)?
        }
        Instruction::Add(c) => copy::dispatch(
            ops,
            lex,
            st,
            c,
            true,
            CopySource::Context,
            ctx_paths,
            ignore,
            cmd,
        )?,
        Instruction::Workdir(p) => copy::workdir(ops, lex, st, p, cmd)?,
        Instruction::Env(kvs) => image::env(st, kvs),
        Instruction::Arg(decls) => arg(lex, st, decls, build_args, global_args, line)?,
        Instruction::User(u) => image::user(st, u),
        Instruction::Cmd(c) => image::cmd(st, c),
        Instruction::Entrypoint(c) => image::entrypoint(st, c),
        Instruction::Label(kvs) => image::label(st, kvs),
        Instruction::Expose(p) => image::expose(st, p).map_err(invalid)?,
        Instruction::Shell(s) => image::shell(st, s),
        Instruction::Volume(v) => image::volume(st, v).map_err(invalid)?,
        Instruction::StopSignal(s) => image::stop_signal(st, s).map_err(invalid)?,
        Instruction::Maintainer(m) => image::maintainer(st, m),
        Instruction::Healthcheck(h) => image::healthcheck(st, h).map_err(invalid)?,
        Instruction::Onbuild(expr, _) => image::onbuild(st, expr),
    }
    Ok(())
}

/// ARG inside a stage: build arg, else default (expanded), else the global value.
fn arg(
    lex: &Lex,
    st: &mut StageState,
    decls: &[ArgDecl],
    build_args: &BTreeMap<String, String>,
    global_args: &[(String, String)],
    line: usize,
) -> Result<(), Error> {
    let mut commit = Vec::new();
    for d in decls {
        let value = if let Some(v) = build_args.get(&d.key) {
            Some(v.clone())
        } else if let Some(def) = &d.default {
            Some(
                lex.process_word(def, &st.env)
                    .map_err(|e| Error::Expand { line, source: e })?,
            )
        } else {
            global_args
                .iter()
                .rev()
                .find(|(k, _)| *k == d.key)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = &value {
            st.add_env(&d.key, v);
        }
        commit.push(match &value {
            Some(v) => format!("{}={v}", d.key),
            None => d.key.clone(),
        });
        st.build_args.push((d.key.clone(), value));
    }
    st.commit_empty(format!("ARG {}", commit.join(" ")));
    Ok(())
}

#[cfg(test)]
mod tests;
