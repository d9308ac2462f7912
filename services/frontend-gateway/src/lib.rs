//! frontend-gateway: runs frontends. A frontend turns a build request (for
//! `dockerfile.v0`: a Dockerfile plus build args) into an LLB definition and
//! result metadata such as the image config.
//!
//! The frontend reaches the solver only through [`Bridge`] (BuildKit's
//! LLBBridge): it asks the solver to fetch the Dockerfile from the client's
//! session, reads it back, and resolves base image configs. It never executes
//! ops and never talks to a worker, registry or client session directly.
//!
//! `grpc` is the only module that names tonic or generated gRPC types:
//! [`grpc::server`] serves `kiln.frontend.v1.Frontend`, and
//! [`grpc::client::GrpcBridge`] is the [`Bridge`] over a solver channel.

use std::collections::BTreeMap;
use std::future::Future;

use kiln_llb::{DefinitionBuilder, pb};
use kiln_oci::{ImageConfig, Platform};

use crate::dockerfile2llb::source_op;

pub mod dockerfile2llb;
pub mod grpc;
pub mod subrequest;

/// The only frontend served so far.
pub const DOCKERFILE_FRONTEND: &str = "dockerfile.v0";
/// Result metadata key holding the image config JSON.
pub const META_IMAGE_CONFIG: &str = "containerimage.config";
/// Result metadata key listing the platforms of a multi-platform result, as BuildKit's
/// exptypes: `{"platforms":[{"id":"linux/amd64","platform":{...}}]}`.
pub const META_PLATFORMS: &str = "refs.platforms";
/// Client-side local directory holding the Dockerfile.
const DOCKERFILE_LOCAL: &str = "dockerfile";
const DEFAULT_FILENAME: &str = "Dockerfile";
/// Client-side local directory holding the build context.
const CONTEXT_LOCAL: &str = "context";
const DOCKERIGNORE: &str = ".dockerignore";
/// The frontend that runs frontend images.
const GATEWAY_FRONTEND: &str = "gateway.v0";
/// Options naming the frontend image and the `# syntax=` line that chose it.
const SOURCE_OPT: &str = "source";
const CMDLINE_OPT: &str = "cmdline";
/// The option naming a subrequest (`frontend.outline`, `frontend.targets`, ...).
const REQUEST_ID_OPT: &str = "requestid";

/// A build request addressed to a frontend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendRequest {
    /// Sent back with every bridge call so the solver knows which build asks.
    pub build_id: String,
    /// Frontend name, e.g. `dockerfile.v0`.
    pub frontend: String,
    /// Frontend options (`filename`, `target`, `platform`, `build-arg:NAME`, ...).
    pub attrs: BTreeMap<String, String>,
    /// The client session the sources (Dockerfile, context) are read from.
    pub session_id: String,
}

/// What a frontend returns: the definition to solve and result metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrontendOutput {
    pub definition: pb::Definition,
    /// e.g. [`META_IMAGE_CONFIG`] -> image config JSON; for a multi-platform result
    /// [`META_PLATFORMS`] and `containerimage.config/<platform id>` per platform.
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// A multi-platform result: platform id (`linux/arm64`) -> its definition
    /// (`definition` is then the first platform's). Empty for a single result.
    pub refs: BTreeMap<String, pb::Definition>,
}

/// An image config resolved by the solver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// Manifest digest (`sha256:...`) the reference resolved to.
    pub digest: String,
    /// Raw image config JSON.
    pub config: Vec<u8>,
    /// Canonical reference (e.g. `docker.io/library/busybox:latest`); empty
    /// when the solver did not say.
    pub canonical_ref: String,
}

/// A warning about the build, attached to one of its steps (a build check
/// hangs on the step that loaded the Dockerfile).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildWarning {
    /// The step's vertex digest.
    pub vertex: String,
    pub level: i64,
    /// One line (`Rule: message (line N)`).
    pub short: String,
    pub detail: Vec<String>,
    pub url: String,
    /// The file the warning points into, and where.
    pub source: Option<pb::SourceInfo>,
    pub ranges: Vec<pb::Range>,
}

/// How a bridge call failed, as far as the caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeErrorKind {
    /// The file or image does not exist.
    NotFound,
    /// The solver rejected the request (bad definition, bad reference).
    InvalidArgument,
    /// The solver could not be reached.
    Unavailable,
    /// The call ran past its deadline.
    DeadlineExceeded,
    /// Anything else the solver reported.
    Failed,
}

/// A failed bridge call, with the solver's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BridgeError {
    pub kind: BridgeErrorKind,
    pub message: String,
}

/// The solver as seen by a frontend (BuildKit's LLBBridge). Every call names
/// the build it is made for.
pub trait Bridge: Send + Sync + 'static {
    /// Solves `definition` and returns the ref id of its result.
    fn solve(
        &self,
        build_id: &str,
        definition: pb::Definition,
    ) -> impl Future<Output = Result<String, BridgeError>> + Send;

    /// Reads the file at `path` inside the result `reference`.
    fn read_file(
        &self,
        build_id: &str,
        reference: &str,
        path: &str,
    ) -> impl Future<Output = Result<Vec<u8>, BridgeError>> + Send;

    /// Resolves an image reference to its manifest digest and config for `platform`.
    fn resolve_image_config(
        &self,
        build_id: &str,
        reference: &str,
        platform: &Platform,
    ) -> impl Future<Output = Result<ResolvedConfig, BridgeError>> + Send;

    /// Resolves the image `reference` (`NAME@sha256:…`) in the OCI layout
    /// the client serves as its content store `store` (BuildKit's
    /// `ResolveImageConfig` with the OCI layout resolver).
    fn resolve_oci_layout_config(
        &self,
        build_id: &str,
        reference: &str,
        platform: &Platform,
        store: &str,
    ) -> impl Future<Output = Result<ResolvedConfig, BridgeError>> + Send {
        let _ = (build_id, platform, store);
        let message = format!("oci-layout://{reference}: not served by this bridge");
        async move {
            Err(BridgeError {
                kind: BridgeErrorKind::Failed,
                message,
            })
        }
    }

    /// Shows a warning in the build's progress (BuildKit's LLBBridge `Warn`).
    fn warn(
        &self,
        build_id: &str,
        warning: BuildWarning,
    ) -> impl Future<Output = Result<(), BridgeError>> + Send {
        let _ = (build_id, warning);
        async { Ok(()) }
    }

    /// Runs another frontend (e.g. `gateway.v0` with a `source` image) with
    /// `opts` and returns its result as definitions.
    fn solve_frontend(
        &self,
        build_id: &str,
        frontend: &str,
        opts: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<FrontendOutput, BridgeError>> + Send {
        let _ = (build_id, opts);
        let frontend = frontend.to_string();
        async move {
            Err(BridgeError {
                kind: BridgeErrorKind::Failed,
                message: format!("this bridge cannot run frontend {frontend}"),
            })
        }
    }
}

/// Why a frontend request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("frontend {frontend:?} is not supported (only {DOCKERFILE_FRONTEND})")]
    UnsupportedFrontend { frontend: String },
    #[error("invalid platform {value:?}")]
    InvalidPlatform {
        value: String,
        source: kiln_oci::PlatformError,
    },
    #[error("load Dockerfile {filename} from session {session_id}")]
    LoadDockerfile {
        filename: String,
        session_id: String,
        #[source]
        source: BridgeError,
    },
    #[error("load Dockerfile {filename}: the solver returned no result ref")]
    MissingDockerfileRef { filename: String },
    #[error("read Dockerfile {filename}")]
    ReadDockerfile {
        filename: String,
        #[source]
        source: BridgeError,
    },
    /// The converter's message names the Dockerfile line (`Dockerfile:LINE`).
    #[error(transparent)]
    Convert(Box<ConvertError>),
    #[error("invalid option context:{name}")]
    InvalidNamedContext {
        name: String,
        source: dockerfile2llb::NamedContextError,
    },
    #[error("unsupported request {request}")]
    UnsupportedSubrequest { request: String },
    /// A `# check=` directive or `BUILDKIT_DOCKERFILE_CHECK` that does not parse.
    #[error("{0}")]
    CheckOptions(String),
    /// A subrequest that could not be answered (e.g. an unknown target).
    #[error("{0}")]
    Subrequest(String),
    /// `check=error=true` and a build check fired.
    #[error("{0}")]
    LintViolation(String),
    /// `origin` names the directive or build arg that asked for the image.
    #[error("{origin}")]
    FrontendImage {
        origin: String,
        #[source]
        source: BridgeError,
    },
    #[error("encode image config")]
    EncodeImageConfig {
        #[source]
        source: serde_json::Error,
    },
    /// For the converter, through [`dockerfile2llb::ResolveError`], whose
    /// message names the image.
    #[error("llbbridge ResolveImageConfig")]
    ResolveImageConfig {
        reference: String,
        source: BridgeError,
    },
    /// For the converter, through [`dockerfile2llb::ResolveError`].
    #[error("parse image config of {reference}")]
    ParseImageConfig {
        reference: String,
        source: serde_json::Error,
    },
}

/// A Dockerfile that did not convert, kept with the error so the gRPC edge
/// can point at its lines (BuildKit's `errdefs.Source`).
#[derive(Debug)]
pub struct ConvertError {
    /// The Dockerfile's name as the client gave it.
    pub filename: String,
    pub dockerfile: Vec<u8>,
    pub error: dockerfile2llb::Error,
}

/// Shows as the converter's error (which names the line); its causes are the error's.
impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ConvertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Serves frontend requests, reaching the solver through `B`.
pub struct Gateway<B> {
    bridge: B,
}

impl<B: Bridge> Gateway<B> {
    pub fn new(bridge: B) -> Self {
        Gateway { bridge }
    }

    /// Runs the requested frontend.
    #[tracing::instrument(skip_all, fields(build_id = %req.build_id, frontend = %req.frontend))]
    pub async fn solve(&self, req: FrontendRequest) -> Result<FrontendOutput, Error> {
        match req.frontend.as_str() {
            DOCKERFILE_FRONTEND => self.solve_dockerfile(&req).await,
            other => Err(Error::UnsupportedFrontend {
                frontend: other.to_string(),
            }),
        }
    }

    async fn solve_dockerfile(&self, req: &FrontendRequest) -> Result<FrontendOutput, Error> {
        let mut opts = convert_options(req)?;
        let (dockerfile, reference, vertex) = self.load_dockerfile(req, &opts.filename).await?;
        if !opts.syntax_followed
            && let Some(image) = dockerfile2llb::frontend_image(&dockerfile, &opts.build_args)
        {
            // `# syntax=IMAGE`: that frontend image builds this Dockerfile
            let mut fwd = req.attrs.clone();
            fwd.insert(SOURCE_OPT.to_string(), image.reference.clone());
            fwd.insert(CMDLINE_OPT.to_string(), image.cmdline.clone());
            return self
                .bridge
                .solve_frontend(&req.build_id, GATEWAY_FRONTEND, fwd)
                .await
                .map_err(|source| Error::FrontendImage {
                    origin: image.origin,
                    source,
                });
        }
        let checks = check_config(&dockerfile, &opts)?;
        if let Some(request) = req.attrs.get(REQUEST_ID_OPT) {
            return answer_subrequest(request, &dockerfile, &opts, checks);
        }
        if let Some(note) = dockerfile2llb::syntax_note(&dockerfile, &opts.build_args) {
            self.show_syntax_note(req, &opts.filename, &note).await;
        }
        let config = checks.map_err(Error::CheckOptions)?;
        self.load_excludes(req, &reference, &mut opts).await;
        let mut warnings = static_checks(&dockerfile, &opts, &config);
        self.show_warnings(req, &dockerfile, &opts, &vertex, &warnings)
            .await;
        let (out, found) = self.convert(req, &dockerfile, &opts).await?;
        // the checks made while converting (UndefinedVar)
        let found: Vec<_> = found
            .into_iter()
            .filter(|w| config.enabled(w.rule))
            .collect();
        self.show_warnings(req, &dockerfile, &opts, &vertex, &found)
            .await;
        warnings.extend(found);
        match config.violation(&warnings) {
            Some(message) => Err(Error::LintViolation(message)),
            None => Ok(out),
        }
    }

    /// Shows each build check warning on the step that loaded the Dockerfile.
    async fn show_warnings(
        &self,
        req: &FrontendRequest,
        dockerfile: &[u8],
        opts: &dockerfile2llb::ConvertOptions,
        vertex: &str,
        warnings: &[dockerfile2llb::lint::Warning],
    ) {
        let source = pb::SourceInfo {
            filename: opts.filename.clone(),
            data: dockerfile.to_vec(),
            definition: Some(dockerfile_source_definition(&req.session_id, &opts.filename).0),
            language: "Dockerfile".to_string(),
        };
        for w in warnings {
            let position = |line: usize| pb::Position {
                line: line as i32,
                character: 0,
            };
            let warning = BuildWarning {
                vertex: vertex.to_string(),
                level: 1,
                short: w.short(),
                detail: vec![w.rule.description.to_string()],
                url: w.rule.url.to_string(),
                source: Some(source.clone()),
                ranges: vec![pb::Range {
                    start: Some(position(w.start_line)),
                    end: Some(position(w.end_line)),
                }],
            };
            if let Err(e) = self.bridge.warn(&req.build_id, warning).await {
                tracing::warn!(error = %kiln_proto::status::Chain(&e), "build check warning not shown");
            }
        }
    }

    /// `# syntax=docker/dockerfile:...`: say so in the progress as a vertex
    /// (the Dockerfile alone, synced apart from the build's own copy).
    async fn show_syntax_note(&self, req: &FrontendRequest, filename: &str, note: &str) {
        let include = [filename.to_string()];
        let def = local_source_definition(
            &req.session_id,
            DOCKERFILE_LOCAL,
            "dockerfile-syntax",
            &include,
            note,
            false,
        );
        if let Err(e) = self.bridge.solve(&req.build_id, def).await {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "{note}");
        }
    }

    /// The `.dockerignore` patterns of the build context and of each named
    /// local context (which honours its own, as in BuildKit).
    async fn load_excludes(
        &self,
        req: &FrontendRequest,
        dockerfile_ref: &str,
        opts: &mut dockerfile2llb::ConvertOptions,
    ) {
        let patterns = |ignore: Vec<u8>| {
            kiln_dockerfile::parse_dockerignore(&String::from_utf8_lossy(&ignore))
        };
        if let Some(ignore) = self
            .load_dockerignore(req, dockerfile_ref, &opts.filename)
            .await
        {
            opts.excludes = patterns(ignore);
        }
        let dirs: Vec<String> = opts
            .named_contexts
            .values()
            .filter_map(|c| match c {
                dockerfile2llb::NamedContext::Local(dir) => Some(dir.clone()),
                dockerfile2llb::NamedContext::Image(_)
                | dockerfile2llb::NamedContext::OciLayout { .. } => None,
            })
            .collect();
        for dir in dirs {
            if opts.local_excludes.contains_key(&dir) {
                continue;
            }
            if let Some(ignore) = self.load_context_dockerignore(req, &dir).await {
                opts.local_excludes.insert(dir, patterns(ignore));
            }
        }
    }

    /// Converts the Dockerfile for each target platform: one result, or one
    /// ref per platform (TARGETPLATFORM and friends are that platform's,
    /// BUILDPLATFORM stays this host's); with the build checks the first
    /// platform's conversion found.
    async fn convert(
        &self,
        req: &FrontendRequest,
        dockerfile: &[u8],
        opts: &dockerfile2llb::ConvertOptions,
    ) -> Result<(FrontendOutput, Vec<dockerfile2llb::lint::Warning>), Error> {
        let resolver = BridgeResolver {
            bridge: &self.bridge,
            build_id: &req.build_id,
        };
        let convert = async |opts: &dockerfile2llb::ConvertOptions| {
            let converted = dockerfile2llb::convert(dockerfile, opts, &resolver)
                .await
                .map_err(|error| {
                    Error::Convert(Box::new(ConvertError {
                        filename: opts.filename.clone(),
                        dockerfile: dockerfile.to_vec(),
                        error,
                    }))
                })?;
            let config = serde_json::to_vec(&converted.image_config)
                .map_err(|source| Error::EncodeImageConfig { source })?;
            Ok::<_, Error>((converted.definition, config, converted.warnings))
        };
        let platforms = target_platforms(req)?;
        if platforms.len() < 2 {
            let (definition, config, warnings) = convert(opts).await?;
            let out = FrontendOutput {
                definition,
                metadata: BTreeMap::from([(META_IMAGE_CONFIG.to_string(), config)]),
                refs: BTreeMap::new(),
            };
            return Ok((out, warnings));
        }
        let mut out = FrontendOutput::default();
        let mut listed = Vec::new();
        let mut first_warnings = None;
        for platform in platforms {
            let id = platform.to_string();
            let opts = dockerfile2llb::ConvertOptions {
                platform: platform.clone(),
                ..opts.clone()
            };
            let (definition, config, warnings) = convert(&opts).await?;
            first_warnings.get_or_insert(warnings);
            out.metadata
                .insert(format!("{META_IMAGE_CONFIG}/{id}"), config);
            if out.refs.is_empty() {
                out.definition = definition.clone();
            }
            out.refs.insert(id.clone(), definition);
            listed.push(serde_json::json!({"id": id, "platform": platform}));
        }
        let exptypes = serde_json::to_vec(&serde_json::json!({ "platforms": listed }))
            .map_err(|source| Error::EncodeImageConfig { source })?;
        out.metadata.insert(META_PLATFORMS.to_string(), exptypes);
        Ok((out, first_warnings.unwrap_or_default()))
    }

    /// The ignore file, as BuildKit finds it: `<Dockerfile>.dockerignore` next
    /// to the Dockerfile, else `.dockerignore` at the root of the build
    /// context. None when neither exists.
    async fn load_dockerignore(
        &self,
        req: &FrontendRequest,
        dockerfile_ref: &str,
        filename: &str,
    ) -> Option<Vec<u8>> {
        let own = format!("{filename}.dockerignore");
        if let Ok(data) = self
            .bridge
            .read_file(&req.build_id, dockerfile_ref, &own)
            .await
        {
            return Some(data);
        }
        self.load_context_dockerignore(req, CONTEXT_LOCAL).await
    }

    /// `.dockerignore` at the root of the client's local dir `local`.
    async fn load_context_dockerignore(
        &self,
        req: &FrontendRequest,
        local: &str,
    ) -> Option<Vec<u8>> {
        let progress = if local == CONTEXT_LOCAL {
            format!("[internal] load {DOCKERIGNORE}")
        } else {
            format!("[context {local}] load {DOCKERIGNORE}")
        };
        let definition = local_source_definition(
            &req.session_id,
            local,
            &format!("{local}:{DOCKERIGNORE}"),
            &[DOCKERIGNORE.to_string()],
            &progress,
            true,
        );
        let reference = self.bridge.solve(&req.build_id, definition).await.ok()?;
        if reference.is_empty() {
            return None;
        }
        self.bridge
            .read_file(&req.build_id, &reference, DOCKERIGNORE)
            .await
            .ok()
    }

    /// Has the solver sync the client's `dockerfile` local dir, then reads the
    /// file; returns its contents and the ref of the synced dir.
    async fn load_dockerfile(
        &self,
        req: &FrontendRequest,
        filename: &str,
    ) -> Result<(Vec<u8>, String, String), Error> {
        let (definition, vertex) = dockerfile_source_definition(&req.session_id, filename);
        let reference = self
            .bridge
            .solve(&req.build_id, definition)
            .await
            .map_err(|source| Error::LoadDockerfile {
                filename: filename.to_string(),
                session_id: req.session_id.clone(),
                source,
            })?;
        if reference.is_empty() {
            return Err(Error::MissingDockerfileRef {
                filename: filename.to_string(),
            });
        }
        let data = match self
            .bridge
            .read_file(&req.build_id, &reference, filename)
            .await
        {
            Ok(data) => data,
            Err(source) => {
                let lower = match lowercase_dockerfile(filename) {
                    Some(lower) => {
                        self.bridge
                            .read_file(&req.build_id, &reference, &lower)
                            .await
                    }
                    None => Err(source.clone()),
                };
                lower.map_err(|_| Error::ReadDockerfile {
                    filename: filename.to_string(),
                    source,
                })?
            }
        };
        Ok((data, reference, vertex))
    }
}

/// The build checks that read the Dockerfile (and `.dockerignore`) alone,
/// for the stages the target reaches; none when it does not parse (the
/// converter says why).
fn static_checks(
    dockerfile: &[u8],
    opts: &dockerfile2llb::ConvertOptions,
    config: &dockerfile2llb::lint::CheckConfig,
) -> Vec<dockerfile2llb::lint::Warning> {
    let text = String::from_utf8_lossy(dockerfile);
    let Ok(df) = kiln_dockerfile::parse(&text) else {
        return Vec::new();
    };
    let target = opts.target.as_deref().unwrap_or_default();
    let mut warnings = dockerfile2llb::lint::check(&text, &df, config, Some(target));
    warnings.extend(dockerfile2llb::lint::check_copies(
        &df,
        config,
        target,
        &opts.excludes,
    ));
    warnings
}

/// The build checks' config: `BUILDKIT_DOCKERFILE_CHECK`, else `# check=`;
/// an error message when it does not parse.
fn check_config(
    dockerfile: &[u8],
    opts: &dockerfile2llb::ConvertOptions,
) -> Result<Result<dockerfile2llb::lint::CheckConfig, String>, Error> {
    let arg = opts
        .build_args
        .get("BUILDKIT_DOCKERFILE_CHECK")
        .map(String::as_str);
    // BuildKit rejects a bad build arg before anything else
    if let Some(v) = arg {
        dockerfile2llb::lint::CheckConfig::of_build(None, Some(v)).map_err(Error::CheckOptions)?;
    }
    let directive = kiln_dockerfile::parse_directives(&String::from_utf8_lossy(dockerfile))
        .ok()
        .and_then(|d| d.check);
    Ok(dockerfile2llb::lint::CheckConfig::of_build(
        directive.as_deref(),
        arg,
    ))
}

/// Answers a subrequest (`requestid`) about the Dockerfile.
fn answer_subrequest(
    request: &str,
    dockerfile: &[u8],
    opts: &dockerfile2llb::ConvertOptions,
    checks: Result<dockerfile2llb::lint::CheckConfig, String>,
) -> Result<FrontendOutput, Error> {
    let text = String::from_utf8_lossy(dockerfile);
    let filename = opts.filename.as_str();
    // without a target a lint request checks every stage
    let target = opts.target.as_deref();
    let metadata = match request {
        subrequest::DESCRIBE => subrequest::describe(),
        subrequest::TARGETS | subrequest::OUTLINE => {
            let df = kiln_dockerfile::parse(&text).map_err(|error| {
                Error::Convert(Box::new(ConvertError {
                    filename: filename.to_string(),
                    dockerfile: dockerfile.to_vec(),
                    error: error.into(),
                }))
            })?;
            if request == subrequest::TARGETS {
                subrequest::targets(dockerfile, &df)
            } else {
                subrequest::outline(
                    dockerfile,
                    &df,
                    target.unwrap_or_default(),
                    &opts.build_args,
                )
                .map_err(Error::Subrequest)?
            }
        }
        subrequest::LINT => {
            let parsed = match checks {
                Err(message) => Err((message, None)),
                Ok(config) => match kiln_dockerfile::parse(&text) {
                    Ok(df) => {
                        return Ok(FrontendOutput {
                            metadata: subrequest::lint(
                                dockerfile,
                                filename,
                                Ok(&df),
                                &config,
                                target,
                            ),
                            ..Default::default()
                        });
                    }
                    Err(e) => Err((e.to_string(), e.line())),
                },
            };
            subrequest::lint(
                dockerfile,
                filename,
                parsed,
                &dockerfile2llb::lint::CheckConfig::default(),
                target,
            )
        }
        other => {
            return Err(Error::UnsupportedSubrequest {
                request: other.to_string(),
            });
        }
    };
    Ok(FrontendOutput {
        metadata,
        ..Default::default()
    })
}

/// Maps `dockerfile.v0` attrs onto converter options.
fn convert_options(req: &FrontendRequest) -> Result<dockerfile2llb::ConvertOptions, Error> {
    let attr = |k: &str| req.attrs.get(k).filter(|v| !v.is_empty());
    let platform = match attr("platform") {
        Some(value) => parse_platform(value)?,
        None => default_platform(),
    };
    let build_args = req
        .attrs
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("build-arg:")
                .map(|name| (name.to_string(), v.clone()))
        })
        .collect();
    let mut named_contexts = BTreeMap::new();
    for (k, v) in &req.attrs {
        if let Some(name) = k.strip_prefix("context:") {
            let ctx = dockerfile2llb::NamedContext::parse(v).map_err(|source| {
                Error::InvalidNamedContext {
                    name: name.to_string(),
                    source,
                }
            })?;
            named_contexts.insert(name.to_string(), ctx);
        }
    }
    let hostname = attr("build-arg:BUILDKIT_SANDBOX_HOSTNAME")
        .or_else(|| attr("hostname"))
        .cloned()
        .unwrap_or_default();
    Ok(dockerfile2llb::ConvertOptions {
        hostname,
        cache_namespace: attr("build-arg:BUILDKIT_CACHE_MOUNT_NS")
            .cloned()
            .unwrap_or_default(),
        named_contexts,
        excludes: Vec::new(),
        local_excludes: BTreeMap::new(),
        target: attr("target").cloned(),
        build_args,
        platform,
        session_id: req.session_id.clone(),
        filename: attr("filename")
            .map_or(DEFAULT_FILENAME, String::as_str)
            .to_string(),
        syntax_followed: req.attrs.contains_key(CMDLINE_OPT),
        labels: req
            .attrs
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("label:").map(|k| (k.to_string(), v.clone())))
            .collect(),
    })
}

/// The target platforms of a `platform` attr (a comma-separated list), duplicates
/// dropped; empty when the attr is unset (the host's platform).
fn target_platforms(req: &FrontendRequest) -> Result<Vec<Platform>, Error> {
    let mut out: Vec<Platform> = Vec::new();
    if let Some(value) = req.attrs.get("platform") {
        for one in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let p = parse_platform(one)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// A platform specifier (containerd's rules: `linux/amd64`, `arm64`,
/// `linux/arm/v7`); of a comma-separated list only the first is used.
fn parse_platform(value: &str) -> Result<Platform, Error> {
    let first = value.split(',').next().unwrap_or_default().trim();
    Platform::parse(first).map_err(|source| Error::InvalidPlatform {
        value: value.to_string(),
        source,
    })
}

/// linux on the architecture kiln runs on, named the OCI way.
pub fn default_platform() -> Platform {
    Platform::host()
}

/// `dockerfile` in the directory of `filename` when its name is `Dockerfile`:
/// read when there is no `Dockerfile` (moby/moby#10858).
fn lowercase_dockerfile(filename: &str) -> Option<String> {
    let (dir, base) = filename.rsplit_once('/').unwrap_or(("", filename));
    (base == DEFAULT_FILENAME).then(|| {
        if dir.is_empty() {
            "dockerfile".to_string()
        } else {
            format!("{dir}/dockerfile")
        }
    })
}

/// A definition with a single local source reading the Dockerfile (and its
/// own ignore file) from the client's `dockerfile` dir, and the digest of
/// that source's step.
fn dockerfile_source_definition(session_id: &str, filename: &str) -> (pb::Definition, String) {
    let mut names = vec![filename.to_string(), format!("{filename}.dockerignore")];
    if let Some(lower) = lowercase_dockerfile(filename) {
        names.push(lower);
    }
    // followed too: a Dockerfile that is a symlink brings its target
    let def = local_source_definition(
        session_id,
        DOCKERFILE_LOCAL,
        DOCKERFILE_LOCAL,
        &names,
        "[internal] load build definition from Dockerfile",
        true,
    );
    let vertex = def
        .def
        .first()
        .map(|op| kiln_llb::digest(op))
        .unwrap_or_default();
    (def, vertex)
}

/// A definition with a single local source syncing only `include` of the
/// client's local dir `name`.
fn local_source_definition(
    session_id: &str,
    name: &str,
    shared_key_hint: &str,
    include: &[String],
    progress_name: &str,
    follow: bool,
) -> pb::Definition {
    let paths = serde_json::Value::from(include.to_vec()).to_string();
    let mut attrs = BTreeMap::from([
        ("local.session".to_string(), session_id.to_string()),
        (
            "local.sharedkeyhint".to_string(),
            shared_key_hint.to_string(),
        ),
        ("local.includepattern".to_string(), paths.clone()),
    ]);
    let mut caps = BTreeMap::from([
        ("source.local".to_string(), true),
        ("source.local.includepatterns".to_string(), true),
        ("source.local.sharedkeyhint".to_string(), true),
        ("source.local.sessionid".to_string(), true),
    ]);
    if follow {
        attrs.insert("local.followpaths".to_string(), paths);
        caps.insert("source.local.followpaths".to_string(), true);
    }
    let op = source_op(format!("local://{name}"), attrs);
    let metadata = pb::OpMetadata {
        description: BTreeMap::from([("llb.customname".to_string(), progress_name.to_string())]),
        caps,
        ..Default::default()
    };
    let mut builder = DefinitionBuilder::new();
    let result = builder.add(op, metadata);
    builder.finish(Some(result))
}

/// The image a resolve answered for `reference`: its config parsed, named by the
/// canonical reference when one came back.
fn resolved_image(
    reference: &str,
    resolved: ResolvedConfig,
) -> Result<dockerfile2llb::ResolvedImage, dockerfile2llb::ResolveError> {
    let config: ImageConfig =
        serde_json::from_slice(&resolved.config).map_err(|source| Error::ParseImageConfig {
            reference: reference.to_string(),
            source,
        })?;
    Ok(dockerfile2llb::ResolvedImage {
        canonical_ref: if resolved.canonical_ref.is_empty() {
            reference.to_string()
        } else {
            resolved.canonical_ref
        },
        digest: resolved.digest,
        config,
    })
}

/// Resolves `FROM` images for the converter through the bridge.
struct BridgeResolver<'a, B> {
    bridge: &'a B,
    build_id: &'a str,
}

impl<B: Bridge> dockerfile2llb::ImageResolver for BridgeResolver<'_, B> {
    async fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<dockerfile2llb::ResolvedImage, dockerfile2llb::ResolveError> {
        let resolved = self
            .bridge
            .resolve_image_config(self.build_id, reference, platform)
            .await
            .map_err(|source| Error::ResolveImageConfig {
                reference: reference.to_string(),
                source,
            })?;
        resolved_image(reference, resolved)
    }

    async fn resolve_oci_layout(
        &self,
        reference: &str,
        platform: &Platform,
        store: &str,
    ) -> Result<dockerfile2llb::ResolvedImage, dockerfile2llb::ResolveError> {
        let resolved = self
            .bridge
            .resolve_oci_layout_config(self.build_id, reference, platform, store)
            .await
            .map_err(|source| Error::ResolveImageConfig {
                reference: format!("{}{reference}", kiln_session::ocilayout::SCHEME),
                source,
            })?;
        // a layout's image keeps the name the Dockerfile gave it
        resolved_image(
            reference,
            ResolvedConfig {
                canonical_ref: String::new(),
                ..resolved
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every call; serves one Dockerfile and the busybox config.
    #[derive(Default)]
    struct FakeBridge {
        dockerfile: Vec<u8>,
        /// (ref, path) -> contents served besides the Dockerfile; solves
        /// return ref-1, ref-2, ... in order.
        files: BTreeMap<(String, String), Vec<u8>>,
        solved: Mutex<Vec<(String, pb::Definition)>>,
        reads: Mutex<Vec<(String, String, String)>>,
        resolves: Mutex<Vec<(String, String, Platform)>>,
    }

    const BUSYBOX_CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:aaaa"]}}"#;

    impl Bridge for FakeBridge {
        async fn solve(
            &self,
            build_id: &str,
            definition: pb::Definition,
        ) -> Result<String, BridgeError> {
            let mut solved = self.solved.lock().expect("lock");
            solved.push((build_id.into(), definition));
            Ok(format!("ref-{}", solved.len()))
        }

        async fn read_file(
            &self,
            build_id: &str,
            reference: &str,
            path: &str,
        ) -> Result<Vec<u8>, BridgeError> {
            self.reads
                .lock()
                .expect("lock")
                .push((build_id.into(), reference.into(), path.into()));
            if reference == "ref-1" && path == "Dockerfile" {
                Ok(self.dockerfile.clone())
            } else if let Some(data) = self.files.get(&(reference.to_string(), path.to_string())) {
                Ok(data.clone())
            } else {
                Err(BridgeError {
                    kind: BridgeErrorKind::NotFound,
                    message: format!("open {path}: no such file or directory"),
                })
            }
        }

        async fn resolve_image_config(
            &self,
            build_id: &str,
            reference: &str,
            platform: &Platform,
        ) -> Result<ResolvedConfig, BridgeError> {
            self.resolves.lock().expect("lock").push((
                build_id.into(),
                reference.into(),
                platform.clone(),
            ));
            Ok(ResolvedConfig {
                digest: "sha256:53ac7b30790c6a5d02bdec3263363b09b0a3ed2102917dbc2f97a1b2e98143e9"
                    .into(),
                config: BUSYBOX_CONFIG.as_bytes().to_vec(),
                canonical_ref: "docker.io/library/busybox:latest".into(),
            })
        }
    }

    fn request(attrs: &[(&str, &str)]) -> FrontendRequest {
        FrontendRequest {
            build_id: "build-7".into(),
            frontend: DOCKERFILE_FRONTEND.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            session_id: "sess-1".into(),
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn attrs_map_onto_convert_options() {
        let req = request(&[
            ("target", "test"),
            ("build-arg:VERSION", "1.2"),
            ("build-arg:EMPTY", ""),
            ("platform", "linux/arm64/v8"),
            ("filename", "ci/Dockerfile.ci"),
            ("no-cache", ""),
        ]);
        let opts = convert_options(&req).expect("valid attrs");
        assert_eq!(opts.target.as_deref(), Some("test"));
        assert_eq!(
            opts.build_args,
            BTreeMap::from([
                ("EMPTY".to_string(), String::new()),
                ("VERSION".to_string(), "1.2".to_string())
            ])
        );
        assert_eq!(opts.platform, Platform::new("linux", "arm64", Some("v8")));
        // containerd's normalisation; of a list only the first
        let listed = convert_options(&request(&[("platform", "Linux/X86_64,linux/arm64")]))
            .expect("valid platform");
        assert_eq!(listed.platform, Platform::new("linux", "amd64", None));
        assert_eq!(opts.filename, "ci/Dockerfile.ci");
        assert_eq!(opts.session_id, "sess-1");
    }

    #[test]
    fn defaults_are_dockerfile_and_host_platform() {
        let opts = convert_options(&request(&[])).expect("no attrs is valid");
        assert_eq!(opts.filename, "Dockerfile");
        assert_eq!(opts.target, None);
        assert_eq!(opts.platform.os, "linux");
        let want = if cfg!(target_arch = "x86_64") {
            "amd64"
        } else {
            "arm64"
        };
        assert_eq!(opts.platform.architecture, want);
    }

    #[test]
    fn malformed_platform_is_rejected() {
        for bad in ["linux/", "/amd64", "a/b/c/d", "nosuchos", "linux/$x"] {
            match convert_options(&request(&[("platform", bad)])) {
                Err(Error::InvalidPlatform { value, .. }) => assert_eq!(value, bad),
                other => panic!("{bad}: expected InvalidPlatform, got {:?}", other.err()),
            }
        }
    }

    #[test]
    fn dockerfile_is_loaded_through_a_local_source_with_the_build_id() {
        let bridge = FakeBridge {
            dockerfile: b"FROM busybox\nRUN echo hi\n".to_vec(),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        // Whatever the converter does with it, the Dockerfile must have been fetched first.
        let _ = run(gateway.solve(request(&[])));

        let solved = gateway.bridge.solved.lock().expect("lock");
        let (build_id, def) = &solved[0];
        assert_eq!(build_id, "build-7");
        let graph = kiln_llb::load(def).expect("valid definition");
        assert_eq!(graph.vertices.len(), 1);
        let Some(pb::op::Op::Source(src)) = &graph.vertices[0].op.op else {
            panic!("expected a source op, got {:?}", graph.vertices[0].op);
        };
        assert_eq!(src.identifier, "local://dockerfile");
        assert_eq!(src.attrs["local.session"], "sess-1");
        assert_eq!(src.attrs["local.sharedkeyhint"], "dockerfile");
        // the lowercase name is read when there is no Dockerfile; all are
        // followed through symlinks
        let names = r#"["Dockerfile","Dockerfile.dockerignore","dockerfile"]"#;
        assert_eq!(src.attrs["local.includepattern"], names);
        assert_eq!(src.attrs["local.followpaths"], names);
        assert_eq!(
            gateway.bridge.reads.lock().expect("lock")[0],
            (
                "build-7".to_string(),
                "ref-1".to_string(),
                "Dockerfile".to_string()
            )
        );
    }

    #[test]
    fn platform_list_gives_one_definition_and_config_per_platform() {
        let bridge = FakeBridge {
            dockerfile: b"FROM scratch\nARG TARGETARCH\nENV ARCH=$TARGETARCH\n".to_vec(),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out = run(gateway.solve(request(&[(
            "platform",
            "linux/arm64, linux/amd64,linux/arm64",
        )])))
        .expect("converts");
        assert_eq!(
            out.refs.keys().collect::<Vec<_>>(),
            vec!["linux/amd64", "linux/arm64"]
        );
        assert_eq!(out.definition, out.refs["linux/arm64"], "the first listed");
        let listed: serde_json::Value =
            serde_json::from_slice(&out.metadata[META_PLATFORMS]).expect("refs.platforms");
        assert_eq!(
            listed,
            serde_json::json!({"platforms": [
                {"id": "linux/arm64", "platform": {"architecture": "arm64", "os": "linux"}},
                {"id": "linux/amd64", "platform": {"architecture": "amd64", "os": "linux"}},
            ]})
        );
        for arch in ["amd64", "arm64"] {
            let config: ImageConfig =
                serde_json::from_slice(&out.metadata[&format!("{META_IMAGE_CONFIG}/linux/{arch}")])
                    .expect("config");
            assert_eq!(config.architecture, arch);
            assert!(
                config.config.env.contains(&format!("ARCH={arch}")),
                "{:?}",
                config.config.env
            );
        }
        assert!(!out.metadata.contains_key(META_IMAGE_CONFIG));
        // one platform is a plain result
        let gateway = Gateway::new(FakeBridge {
            dockerfile: b"FROM scratch\n".to_vec(),
            ..Default::default()
        });
        let single = run(gateway.solve(request(&[("platform", "linux/arm64")]))).expect("one");
        assert!(single.refs.is_empty());
        assert!(single.metadata.contains_key(META_IMAGE_CONFIG));
    }

    #[test]
    fn dockerfile_becomes_a_definition_and_image_config() {
        let bridge = FakeBridge {
            dockerfile: b"FROM busybox\nRUN echo hi > /hi\nCMD [\"cat\", \"/hi\"]\n".to_vec(),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out = run(gateway.solve(request(&[("platform", "linux/amd64")]))).expect("converts");

        let graph = kiln_llb::load(&out.definition).expect("valid definition");
        let identifiers: Vec<&str> = graph
            .vertices
            .iter()
            .filter_map(|v| match &v.op.op {
                Some(pb::op::Op::Source(s)) => Some(s.identifier.as_str()),
                _ => None,
            })
            .collect();
        assert!(
            identifiers.iter().any(|i| i
                .starts_with("docker-image://docker.io/library/busybox:latest@sha256:53ac7b30")),
            "{identifiers:?}"
        );
        let Some(pb::op::Op::Exec(exec)) = &graph.result_vertex().expect("result").op.op else {
            panic!("the last RUN is the result");
        };
        let args = &exec.meta.as_ref().expect("meta").args;
        assert_eq!(
            args.last().map(String::as_str),
            Some("echo hi > /hi"),
            "{args:?}"
        );

        let config: ImageConfig =
            serde_json::from_slice(&out.metadata[META_IMAGE_CONFIG]).expect("image config JSON");
        assert_eq!(
            config.config.cmd,
            Some(vec!["cat".to_string(), "/hi".to_string()])
        );
        assert!(
            config.config.env.iter().any(|e| e.starts_with("PATH=")),
            "{:?}",
            config.config.env
        );

        let resolves = gateway.bridge.resolves.lock().expect("lock");
        assert!(
            !resolves.is_empty(),
            "FROM busybox is resolved through the bridge"
        );
        assert!(
            resolves
                .iter()
                .all(|(id, _, p)| id == "build-7" && p.architecture == "amd64")
        );
    }

    #[test]
    fn dockerfile_error_names_the_line() {
        let bridge = FakeBridge {
            dockerfile: b"FROM busybox\nNOSUCHINSTRUCTION x\n".to_vec(),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let err = run(gateway.solve(request(&[]))).expect_err("invalid Dockerfile");
        assert!(matches!(err, Error::Convert(_)), "{err:?}");
        assert!(err.to_string().contains("Dockerfile:2"), "{err}");
    }

    #[test]
    fn missing_dockerfile_names_the_file() {
        let gateway = Gateway::new(FakeBridge::default());
        let err = run(gateway.solve(request(&[("filename", "Containerfile")])))
            .expect_err("no such file");
        match &err {
            Error::ReadDockerfile { filename, source } => {
                assert_eq!(filename, "Containerfile");
                assert_eq!(source.kind, BridgeErrorKind::NotFound);
            }
            other => panic!("expected ReadDockerfile, got {other:?}"),
        }
        let solved = gateway.bridge.solved.lock().expect("lock");
        let graph = kiln_llb::load(&solved[0].1).expect("valid definition");
        let Some(pb::op::Op::Source(src)) = &graph.vertices[0].op.op else {
            panic!("expected a source op");
        };
        assert_eq!(
            src.attrs["local.includepattern"],
            r#"["Containerfile","Containerfile.dockerignore"]"#
        );
    }

    /// The build context source op of a converted definition.
    fn context_source(def: &pb::Definition) -> pb::SourceOp {
        let graph = kiln_llb::load(def).expect("valid definition");
        graph
            .vertices
            .iter()
            .find_map(|v| match &v.op.op {
                Some(pb::op::Op::Source(s)) if s.identifier == "local://context" => Some(s.clone()),
                _ => None,
            })
            .expect("a local://context source")
    }

    const COPY_ALL: &[u8] = b"FROM busybox\nCOPY . /app/\n";

    #[test]
    fn context_dockerignore_becomes_exclude_patterns() {
        let bridge = FakeBridge {
            dockerfile: COPY_ALL.to_vec(),
            // ref-2 is the context's .dockerignore load
            files: BTreeMap::from([(
                ("ref-2".to_string(), ".dockerignore".to_string()),
                b"# comment\n/node_modules\n**/*.log\n!keep.log\n".to_vec(),
            )]),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out = run(gateway.solve(request(&[]))).expect("converts");
        let ctx = context_source(&out.definition);
        assert_eq!(
            ctx.attrs["local.excludepatterns"],
            r#"["node_modules","**/*.log","!keep.log"]"#
        );
        let solved = gateway.bridge.solved.lock().expect("lock");
        let graph = kiln_llb::load(&solved[1].1).expect("valid definition");
        let Some(pb::op::Op::Source(src)) = &graph.vertices[0].op.op else {
            panic!("expected a source op");
        };
        assert_eq!(src.identifier, "local://context");
        assert_eq!(src.attrs["local.includepattern"], r#"[".dockerignore"]"#);
    }

    #[test]
    fn dockerfile_specific_ignore_file_wins() {
        let bridge = FakeBridge {
            dockerfile: COPY_ALL.to_vec(),
            files: BTreeMap::from([
                (
                    ("ref-1".to_string(), "Dockerfile.dockerignore".to_string()),
                    b"only-this\n".to_vec(),
                ),
                (
                    ("ref-2".to_string(), ".dockerignore".to_string()),
                    b"not-this\n".to_vec(),
                ),
            ]),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out = run(gateway.solve(request(&[]))).expect("converts");
        assert_eq!(
            context_source(&out.definition).attrs["local.excludepatterns"],
            r#"["only-this"]"#
        );
    }

    #[test]
    fn no_ignore_file_means_no_exclude_patterns() {
        let bridge = FakeBridge {
            dockerfile: COPY_ALL.to_vec(),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out = run(gateway.solve(request(&[]))).expect("converts");
        assert!(
            !context_source(&out.definition)
                .attrs
                .contains_key("local.excludepatterns")
        );
    }

    #[test]
    fn copying_an_ignored_path_names_the_dockerignore() {
        let bridge = FakeBridge {
            dockerfile: b"FROM busybox\nCOPY secret.txt /\n".to_vec(),
            files: BTreeMap::from([(
                ("ref-2".to_string(), ".dockerignore".to_string()),
                b"secret.txt\n".to_vec(),
            )]),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let err = run(gateway.solve(request(&[]))).expect_err("ignored source");
        let msg = err.to_string();
        assert!(msg.contains("Dockerfile:2"), "{msg}");
        assert!(msg.contains("excluded by .dockerignore"), "{msg}");
    }

    #[test]
    fn named_local_context_gets_its_own_dockerignore() {
        let bridge = FakeBridge {
            dockerfile: b"FROM scratch\nCOPY --from=extra / /e/\n".to_vec(),
            // ref-2: the main context's .dockerignore (absent), ref-3: extradir's
            files: BTreeMap::from([(
                ("ref-3".to_string(), ".dockerignore".to_string()),
                b"secret\n".to_vec(),
            )]),
            ..Default::default()
        };
        let gateway = Gateway::new(bridge);
        let out =
            run(gateway.solve(request(&[("context:extra", "local:extradir")]))).expect("converts");
        let graph = kiln_llb::load(&out.definition).expect("valid definition");
        let src = graph
            .vertices
            .iter()
            .find_map(|v| match &v.op.op {
                Some(pb::op::Op::Source(s)) if s.identifier == "local://extradir" => Some(s),
                _ => None,
            })
            .expect("local://extradir source");
        assert_eq!(src.attrs["local.excludepatterns"], r#"["secret"]"#);
        assert_eq!(src.attrs["local.sharedkeyhint"], "extradir");
    }

    #[test]
    fn named_contexts_are_parsed() {
        let opts = convert_options(&request(&[
            ("context:src", "local:srcdir"),
            ("context:base", "docker-image://busybox:1"),
        ]))
        .expect("valid");
        assert_eq!(
            opts.named_contexts,
            BTreeMap::from([
                (
                    "base".to_string(),
                    dockerfile2llb::NamedContext::Image("busybox:1".to_string())
                ),
                (
                    "src".to_string(),
                    dockerfile2llb::NamedContext::Local("srcdir".to_string())
                ),
            ])
        );
        assert!(matches!(
            convert_options(&request(&[("context:x", "git://nope")])),
            Err(Error::InvalidNamedContext { .. })
        ));
    }

    #[test]
    fn other_frontends_are_refused_without_bridge_calls() {
        let gateway = Gateway::new(FakeBridge::default());
        let mut req = request(&[]);
        req.frontend = "gateway.v0".into();
        assert!(matches!(
            run(gateway.solve(req)),
            Err(Error::UnsupportedFrontend { .. })
        ));
        assert!(gateway.bridge.solved.lock().expect("lock").is_empty());
    }

    #[test]
    fn resolver_parses_the_config_and_keeps_the_build_id() {
        use dockerfile2llb::ImageResolver as _;
        let bridge = FakeBridge::default();
        let resolver = BridgeResolver {
            bridge: &bridge,
            build_id: "build-7",
        };
        let platform = Platform::new("linux", "amd64", None);
        let img = run(resolver.resolve("busybox", &platform)).expect("resolves");
        assert_eq!(img.canonical_ref, "docker.io/library/busybox:latest");
        assert!(img.digest.starts_with("sha256:53ac7b30"));
        assert_eq!(img.config.config.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(
            *bridge.resolves.lock().expect("lock"),
            [("build-7".to_string(), "busybox".to_string(), platform)]
        );
    }
}
