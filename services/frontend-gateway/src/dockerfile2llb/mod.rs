//! Dockerfile -> LLB, imitating BuildKit's `frontend/dockerfile/dockerfile2llb`
//! op for op: the same ops, attrs, metadata names and image config history.
//!
//! Entry point: [`convert`]. Images named by `FROM` (and `COPY --from=<image>`)
//! are resolved through an [`ImageResolver`]; nothing else does IO.
//!
//! Phases: [`convert`] parses, `args.rs` sets the global ARGs, `plan.rs`
//! decides what each stage is built on and reads, the images the target needs
//! are resolved, `dispatch.rs` dispatches the reachable stages one
//! instruction at a time into the op arena (`ops.rs`), which marshals the
//! definition in BuildKit's order.
//!
//! Per instruction: `run.rs` + `mount.rs` (RUN), `copy.rs` (COPY/ADD,
//! WORKDIR), `image.rs` (config-only instructions), `args.rs` (ARG);
//! `stage.rs` holds a stage's state, `reference.rs` normalises image names.

mod args;
mod copy;
mod dispatch;
mod git;
mod image;
pub mod lint;
mod mount;
mod ops;
mod plan;
mod reference;
mod run;
mod stage;
mod syntax;

use std::collections::BTreeMap;
use std::future::Future;

use kiln_dockerfile::{Command, Dockerfile, Lex};
use kiln_llb::pb;

pub use reference::ReferenceError;
pub use syntax::{frontend_image, syntax_note};

use dispatch::{DispatchContext, Stages};
pub(crate) use ops::source_op;
use ops::{ContextSource, Lines, OpId, Ops, metadata};
use plan::{ImageUse, Plan, ResolvedBase};

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
    /// Named contexts (`context:NAME=...`): replace the stage named NAME
    /// (its instructions are not run), else `FROM NAME` and `COPY --from=NAME`.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// `.dockerignore` patterns of named local contexts, by local dir name.
    pub local_excludes: BTreeMap<String, Vec<String>>,
    /// `--opt label:KEY=VALUE`: labels set on the image over the Dockerfile's.
    pub labels: BTreeMap<String, String>,
    /// The request came through the frontend image the Dockerfile names
    /// (BuildKit's `cmdline` option is set): its `# syntax=` is not followed again.
    pub syntax_followed: bool,
    /// The hostname RUN steps see (`hostname`, or the build arg
    /// `BUILDKIT_SANDBOX_HOSTNAME`); empty: the worker's default.
    pub hostname: String,
    /// Put before every cache mount's id (`BUILDKIT_CACHE_MOUNT_NS`).
    pub cache_namespace: String,
}

/// What a named context (`--opt context:NAME=VALUE`) points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// `local:DIR`: the client's local dir named DIR.
    Local(String),
    /// `docker-image://REF`: an image.
    Image(String),
    /// `oci-layout://STORE[:TAG]@DIGEST`: an image in the OCI layout the
    /// client serves as its content store STORE (`kiln build --oci-layout`).
    OciLayout { store: String, digest: String },
}

impl NamedContext {
    /// Parses the value of a `context:NAME` option.
    pub fn parse(value: &str) -> Result<NamedContext, NamedContextError> {
        let value_ = || value.to_string();
        if let Some(dir) = value.strip_prefix("local:") {
            if dir.is_empty() {
                return Err(NamedContextError::EmptyLocalName { value: value_() });
            }
            return Ok(NamedContext::Local(dir.to_string()));
        }
        if let Some(reference) = value.strip_prefix("docker-image://") {
            if reference.is_empty() {
                return Err(NamedContextError::EmptyImageReference { value: value_() });
            }
            return Ok(NamedContext::Image(reference.to_string()));
        }
        if let Some(r) = value.strip_prefix(kiln_session::ocilayout::SCHEME) {
            let r = kiln_session::ocilayout::Reference::parse(r).map_err(|e| {
                NamedContextError::InvalidOciLayout {
                    value: value_(),
                    reason: e.to_string(),
                }
            })?;
            let digest = r
                .digest
                .ok_or_else(|| NamedContextError::OciLayoutNoDigest {
                    reference: value[kiln_session::ocilayout::SCHEME.len()..].to_string(),
                })?;
            return Ok(NamedContext::OciLayout {
                store: r.name,
                digest,
            });
        }
        Err(NamedContextError::UnsupportedScheme { value: value_() })
    }
}

/// A `context:NAME` value kiln cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamedContextError {
    #[error("invalid named context {value:?}: empty local name")]
    EmptyLocalName { value: String },
    #[error("invalid named context {value:?}: empty image reference")]
    EmptyImageReference { value: String },
    #[error("could not parse oci-layout reference in {value:?}: {reason}")]
    InvalidOciLayout { value: String, reason: String },
    #[error("oci-layout reference {reference:?} has no digest")]
    OciLayoutNoDigest { reference: String },
    #[error(
        "unsupported named context {value:?}: expected local:NAME, docker-image://REF or oci-layout://STORE@DIGEST"
    )]
    UnsupportedScheme { value: String },
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

/// Why an [`ImageResolver`] could not resolve an image: the resolver's own error.
pub type ResolveError = Box<dyn std::error::Error + Send + Sync>;

/// Looks up image configs for `FROM`.
pub trait ImageResolver: Send + Sync {
    /// `reference` is normalised (`docker.io/library/busybox:latest`).
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_oci::Platform,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send;

    /// The image `reference` (`NAME@sha256:…`) in the OCI layout the
    /// client serves as its content store `store`.
    fn resolve_oci_layout(
        &self,
        reference: &str,
        platform: &kiln_oci::Platform,
        store: &str,
    ) -> impl Future<Output = Result<ResolvedImage, ResolveError>> + Send {
        let _ = (platform, store);
        let msg = format!("oci-layout://{reference}: OCI layouts cannot be read here");
        async move { Err(msg.into()) }
    }
}

/// The conversion result.
#[derive(Debug, Clone)]
pub struct Converted {
    pub definition: pb::Definition,
    /// The config of the image the target stage produces (`rootfs.diff_ids`
    /// empty: the exporter fills it).
    pub image_config: kiln_oci::ImageConfig,
    /// Build checks found while converting (`UndefinedVar`), unfiltered.
    pub warnings: Vec<lint::Warning>,
}

/// Why a Dockerfile could not be converted. Errors about a line start with
/// `Dockerfile:LINE` ([`Error::line`]); causes are sources, not repeated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Dockerfile cannot be empty")]
    Empty,
    #[error(transparent)]
    Parse(#[from] kiln_dockerfile::Error),
    #[error("Dockerfile:{line}")]
    Expand {
        line: usize,
        source: kiln_dockerfile::Error,
    },
    /// `hint`: ` (did you mean NAME?)` for the closest stage name, or empty.
    #[error("target stage {target:?} could not be found{hint}")]
    TargetNotFound { target: String, hint: String },
    #[error("Dockerfile:{line}: base name ({base}) should not be blank")]
    BlankBaseName { line: usize, base: String },
    #[error("Dockerfile:{line}: failed to parse platform {value}")]
    InvalidPlatform {
        line: usize,
        value: String,
        source: kiln_oci::PlatformError,
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
    #[error("Dockerfile:{line}: failed to parse stage name {reference:?}")]
    InvalidReference {
        line: usize,
        reference: String,
        source: ReferenceError,
    },
    #[error("Dockerfile:{line}: failed to resolve source metadata for {reference}")]
    ResolveImage {
        line: usize,
        reference: String,
        source: ResolveError,
    },
    /// A stage's base image was not resolved before the stage was dispatched.
    #[error("Dockerfile:{line}: image {reference} was not resolved")]
    UnresolvedImage { line: usize, reference: String },
    #[error("Dockerfile:{line}: RUN")]
    InvalidMount {
        line: usize,
        source: kiln_dockerfile::MountError,
    },
    #[error("Dockerfile:{line}: ONBUILD")]
    InvalidTrigger {
        line: usize,
        source: kiln_dockerfile::Error,
    },
    #[error("Dockerfile:{line}: HEALTHCHECK --{flag}")]
    InvalidHealthcheckDuration {
        line: usize,
        flag: &'static str,
        source: kiln_units::Error,
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
            | Error::UnresolvedImage { line, .. }
            | Error::InvalidMount { line, .. }
            | Error::InvalidTrigger { line, .. }
            | Error::InvalidHealthcheckDuration { line, .. }
            | Error::InvalidInstruction { line, .. }
            | Error::Unsupported { line, .. } => Some(*line),
        }
    }
}

/// The lines (1-based) of the instruction of `dockerfile` that starts at or
/// spans `line`: what an error about that line points at.
pub fn instruction_lines(dockerfile: &[u8], line: usize) -> std::ops::RangeInclusive<usize> {
    let nodes = kiln_dockerfile::parse_ast(&String::from_utf8_lossy(dockerfile))
        .map(|ast| ast.nodes)
        .unwrap_or_default();
    nodes
        .iter()
        .find(|n| (n.start_line..=n.end_line).contains(&line))
        .map_or(line..=line, |n| n.start_line..=n.end_line)
}

pub(crate) fn line_of(cmd: &Command) -> usize {
    cmd.location.start_line
}

/// Converts a Dockerfile into an LLB definition and the image config of the target stage.
pub async fn convert<R: ImageResolver>(
    dockerfile: &[u8],
    opts: &ConvertOptions,
    resolver: &R,
) -> Result<Converted, Error> {
    let df = parse(dockerfile, opts)?;
    let lex = Lex::new(df.directives.escape);
    let global_args = args::global_args(
        &df,
        &lex,
        &opts.build_args,
        &opts.platform,
        opts.target.as_deref(),
    )?;
    let mut plan = Plan::new(&df, opts, &lex, &global_args)?;
    let (reachable, needed_images) = plan.reachable();
    let mut cx = DispatchContext::new(opts, lex, global_args);
    let needed_images: Vec<usize> = needed_images.into_iter().collect();
    resolve_images(&mut plan.images, &needed_images, resolver, &mut cx.ops).await?;
    for &k in &needed_images {
        let image = &plan.images[k];
        let Some(resolved) = image.resolved.as_ref() else {
            continue;
        };
        // FROM of an image with layers (COPY --from names no base)
        if image.command.is_empty() || resolved.state.is_none() {
            continue;
        }
        let actual = kiln_oci::Platform {
            os: resolved.config.os.clone(),
            architecture: resolved.config.architecture.clone(),
            variant: resolved.config.variant.clone(),
            ..Default::default()
        };
        cx.warnings.extend(lint::base_image_platform(
            &image.written,
            &image.platform,
            &actual,
            image.line,
        ));
    }
    let mut stages = Stages {
        df: &df,
        plan: &plan,
        cx: &mut cx,
        states: vec![None; df.stages.len()],
    };
    stages.dispatch_reachable(&reachable)?;
    let target = stages.states[plan.target]
        .take()
        .ok_or_else(|| Error::TargetNotFound {
            target: opts.target.clone().unwrap_or_default(),
            hint: String::new(),
        })?;
    let image_config = final_image_config(target.image, opts)?;
    let context = ContextSource {
        session_id: opts.session_id.clone(),
        paths: std::mem::take(&mut cx.ctx_paths),
        excludes: opts.excludes.clone(),
    };
    let definition = cx
        .ops
        .finish(target.state, context, source_info(dockerfile, opts));
    Ok(Converted {
        definition,
        image_config,
        warnings: std::mem::take(&mut cx.warnings),
    })
}

/// The Dockerfile's instructions, once the `# syntax=` it names is checked.
fn parse(dockerfile: &[u8], opts: &ConvertOptions) -> Result<Dockerfile, Error> {
    if dockerfile.is_empty() {
        return Err(Error::Empty);
    }
    let df = kiln_dockerfile::parse(&String::from_utf8_lossy(dockerfile))?;
    if !opts.syntax_followed {
        syntax::check(&df.directives, &opts.build_args)?;
    }
    Ok(df)
}

/// The Dockerfile as the definition's source map names it.
fn source_info(dockerfile: &[u8], opts: &ConvertOptions) -> pb::SourceInfo {
    let filename = if opts.filename.is_empty() {
        "Dockerfile".to_string()
    } else {
        opts.filename.clone()
    };
    pb::SourceInfo {
        filename,
        data: dockerfile.to_vec(),
        definition: None,
        language: "Dockerfile".to_string(),
    }
}

/// Resolves the planned images `needed` (indexes into `images`) and records
/// their source ops, in order. Each distinct image (reference and platform)
/// is resolved once, and all of them at once: many stages `FROM` one base ask
/// the registry one question, not one per stage in turn.
async fn resolve_images<R: ImageResolver>(
    images: &mut [ImageUse],
    needed: &[usize],
    resolver: &R,
    ops: &mut Ops,
) -> Result<(), Error> {
    let mut distinct: Vec<usize> = Vec::new();
    let mut of_image = Vec::with_capacity(needed.len());
    for &k in needed {
        let same = distinct.iter().position(|&d| {
            images[d].reference == images[k].reference
                && images[d].platform == images[k].platform
                && images[d].oci == images[k].oci
        });
        of_image.push(same.unwrap_or_else(|| {
            distinct.push(k);
            distinct.len() - 1
        }));
    }
    let shared: &[ImageUse] = images;
    let results = futures::future::join_all(distinct.iter().map(|&d| async move {
        let image = &shared[d];
        match &image.oci {
            Some(oci) => {
                resolver
                    .resolve_oci_layout(&image.reference, &image.platform, &oci.store)
                    .await
            }
            None => resolver.resolve(&image.reference, &image.platform).await,
        }
    }))
    .await;
    let mut resolved = Vec::with_capacity(results.len());
    for (r, &d) in results.into_iter().zip(&distinct) {
        resolved.push(r.map_err(|source| Error::ResolveImage {
            line: images[d].line,
            reference: images[d].reference.clone(),
            source,
        })?);
    }
    for (&k, &i) in needed.iter().zip(&of_image) {
        record_image(&mut images[k], resolved[i].clone(), ops);
    }
    Ok(())
}

/// Records a resolved image's source op (none for an image without layers,
/// which is scratch).
fn record_image(image: &mut ImageUse, resolved: ResolvedImage, ops: &mut Ops) {
    let config = resolved.config;
    let is_scratch = config.rootfs.diff_ids.is_empty()
        && config.history.iter().all(|h| h.empty_layer == Some(true));
    let state = if is_scratch {
        None
    } else {
        let name = match resolved.canonical_ref.split_once('@') {
            Some((n, _)) => n,
            None => resolved.canonical_ref.as_str(),
        };
        let pinned = if resolved.digest.is_empty() {
            name.to_string()
        } else {
            format!("{name}@{}", resolved.digest)
        };
        match &image.oci {
            Some(oci) => Some(oci_layout_source_op(ops, image, oci)),
            None => Some(image_source_op(ops, image, &pinned)),
        }
    };
    image.resolved = Some(ResolvedBase { state, config });
}

/// The `oci-layout://` source op of an image in an OCI layout the client
/// serves, as BuildKit's frontend makes it: named by the context's name and
/// the digest, reading from the store `oci.store` of session `oci.session`.
fn oci_layout_source_op(ops: &mut Ops, image: &ImageUse, oci: &plan::OciUse) -> OpId {
    use kiln_session::ocilayout::{ATTR_SESSION, ATTR_STORE, SCHEME};
    let attrs = BTreeMap::from([
        (ATTR_SESSION.to_string(), oci.session_id.clone()),
        (ATTR_STORE.to_string(), oci.store.clone()),
    ]);
    let op = pb::Op {
        platform: Some(pb::Platform::from(&image.platform)),
        ..source_op(format!("{SCHEME}{}", image.reference), attrs)
    };
    let name = format!("[context {}] OCI load from client", oci.context);
    let md = metadata(
        &[
            ("com.docker.dockerfile.v1.command", image.command.as_str()),
            ("llb.customname", &name),
        ],
        &["source.ocilayout"],
    );
    ops.push(op, Vec::new(), md, Some(Lines::one(image.line)))
}

/// The `docker-image://` source op of `image` pinned to a digest. Its
/// progress name is set when its stage is dispatched; COPY --from images keep
/// this plain one.
fn image_source_op(ops: &mut Ops, image: &ImageUse, pinned: &str) -> OpId {
    let op = pb::Op {
        platform: Some(pb::Platform::from(&image.platform)),
        ..source_op(format!("docker-image://{pinned}"), BTreeMap::new())
    };
    let md = metadata(
        &[
            ("com.docker.dockerfile.v1.command", image.command.as_str()),
            ("llb.customname", &format!("FROM {pinned}")),
        ],
        &["source.image"],
    );
    ops.push(op, Vec::new(), md, Some(Lines::one(image.line)))
}

/// The target stage's config as the image gets it: the target platform,
/// `label:` options over the Dockerfile's, `SOURCE_DATE_EPOCH` times.
fn final_image_config(
    mut image: kiln_oci::ImageConfig,
    opts: &ConvertOptions,
) -> Result<kiln_oci::ImageConfig, Error> {
    image.architecture = opts.platform.architecture.clone();
    image.os = opts.platform.os.clone();
    image.variant = opts.platform.variant.clone().filter(|v| !v.is_empty());
    image.rootfs = kiln_oci::RootFs::default();
    image.created = None;
    if !opts.labels.is_empty() {
        image
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
        for h in &mut image.history {
            if h.created
                .as_ref()
                .is_none_or(|c| c.as_str() > created.as_str())
            {
                h.created = Some(created.clone());
            }
        }
        image.created = Some(created);
    }
    Ok(image)
}

/// `secs` since the Unix epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
fn rfc3339_utc(secs: i64) -> String {
    kiln_oci::rfc3339(secs)
}

#[cfg(test)]
mod tests;
