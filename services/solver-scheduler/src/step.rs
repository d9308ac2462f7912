//! One vertex (step) of a build: looked up by its fast key, then by its
//! content key, and run on a worker on a miss; its result recorded under
//! every key that leads to it, with what went into the key (for
//! `--explain-cache`). A failed step carries its name and where it came from.

use crate::Error;
use crate::build::Build;
use crate::cache::key::{digest_of, input_selectors};
use crate::cache::{Cache, CacheRecord, unix_nanos};
use crate::explain::{FileFact, InputRecord, StepRecord};
use crate::peer::{RunEvent, RunOp, RunOutputs, Selector, Worker};
use crate::solve::InputOrigin;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb::{self, op::Op as OpKind};
use kiln_proto::status::{Details, SourceLocation, chain};
use std::sync::Arc;

/// The result of a step as the builds waiting for it see it.
#[derive(Clone)]
pub(crate) struct Outcome {
    pub(crate) done: Arc<Done>,
    /// found in the cache (not run)
    pub(crate) cached: bool,
}

/// A finished vertex: the worker refs of its outputs and one cache key per
/// output.
#[derive(Debug)]
pub struct Done {
    pub outputs: RunOutputs,
    pub keys: Vec<String>,
    /// why the step ran in this build (empty when cached)
    pub why: Vec<String>,
    /// a result matched in an imported cache, loaded only when something
    /// reads it (its ref is then empty until loaded)
    pub(crate) lazy: Option<Lazy>,
    /// the imported result `lazy` loads (its layers), when it is one
    pub(crate) imported: Option<crate::remote::plan::Hit>,
}

/// The load of an imported result: the worker ref, once some step, export
/// or read needs it (shared by all of them, run once).
pub(crate) type Lazy = Shared<BoxFuture<'static, Result<String, Failure>>>;

/// One output of a finished vertex, as a step reading it sees it.
#[derive(Clone, Default)]
pub(crate) struct Output {
    /// the worker ref holding it (empty: scratch, or not loaded yet)
    pub(crate) r#ref: String,
    pub(crate) key: String,
    pub(crate) lazy: Option<Lazy>,
}

impl Output {
    /// The worker ref, loading an imported result first.
    pub(crate) async fn resolve(&self) -> Result<String, Failure> {
        match &self.lazy {
            Some(l) => l.clone().await,
            None => Ok(self.r#ref.clone()),
        }
    }
}

impl Done {
    pub(crate) fn output(&self, index: i64) -> Output {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        Output {
            r#ref: self.outputs.refs.get(i).cloned().unwrap_or_default(),
            key: self.keys.get(i).cloned().unwrap_or_default(),
            lazy: self.lazy.clone().filter(|_| i == 0),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) name: String,
    pub(crate) message: String,
    pub(crate) code: tonic::Code,
    /// the step's digest and source lines, once known
    pub(crate) details: Details,
}

impl Failure {
    /// A step whose task ended without a result: cancelled with its build,
    /// or panicked.
    pub(crate) fn task_ended(what: &str, e: &tokio::task::JoinError) -> Failure {
        let (message, code) = if e.is_cancelled() {
            ("build cancelled".to_string(), tonic::Code::Cancelled)
        } else {
            (format!("{what}: {e}"), tonic::Code::Internal)
        };
        Failure {
            name: String::new(),
            message,
            code,
            details: Details::default(),
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        Error::Vertex {
            name: f.name,
            message: f.message,
            code: f.code,
            details: f.details,
        }
    }
}

/// A range's first and last line within a file of `count` lines: `None`
/// when it starts outside the file, its end clamped to the file.
fn clamp_range(range: &pb::Range, count: i64) -> Option<(i64, i64)> {
    let start = i64::from(range.start.as_ref()?.line);
    if start < 1 || start > count.max(1) {
        return None;
    }
    let end =
        i64::from(range.end.as_ref().map(|p| p.line).unwrap_or(0)).clamp(start, count.max(start));
    Some((start, end))
}

/// Where a vertex came from, for the status details of its failure
/// (BuildKit's `errdefs.Source`): the source file and the vertex's ranges,
/// clamped to the file (the client renders them; `kiln`'s `source.rs`
/// also bounds how many lines it prints).
pub fn source_location(source: &pb::Source, digest: &str) -> Option<SourceLocation> {
    let loc = source.locations.get(digest)?.locations.first()?;
    let info = source.infos.get(usize::try_from(loc.source_index).ok()?)?;
    let count = String::from_utf8_lossy(&info.data).lines().count() as i64;
    let line = |l: i64, at: &Option<pb::Position>| pb::Position {
        line: i32::try_from(l).unwrap_or(i32::MAX),
        character: at.as_ref().map(|p| p.character.max(0)).unwrap_or(0),
    };
    let ranges: Vec<pb::Range> = loc
        .ranges
        .iter()
        .filter_map(|r| {
            let (start, end) = clamp_range(r, count)?;
            Some(pb::Range {
                start: Some(line(start, &r.start)),
                end: Some(line(end, &r.end)),
            })
        })
        .collect();
    if ranges.is_empty() {
        return None;
    }
    Some(SourceLocation {
        info: pb::SourceInfo {
            filename: info.filename.chars().take(256).collect(),
            data: info.data.clone(),
            language: info.language.clone(),
            definition: None,
        },
        ranges,
    })
}

/// Prefix of the log lines that explain why a step ran (`--explain-cache`).
pub const EXPLAIN_PREFIX: &str = "explain-cache: ";

/// A name for progress output: the frontend's custom name, else one
/// derived from the op.
pub fn vertex_name(op: &pb::Op, md: &pb::OpMetadata) -> String {
    if let Some(n) = md.description.get("llb.customname") {
        return n.clone();
    }
    match &op.op {
        Some(OpKind::Source(s)) => s.identifier.clone(),
        Some(OpKind::Exec(e)) => e
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default(),
        Some(OpKind::File(f)) => {
            let kinds: Vec<&str> = f
                .actions
                .iter()
                .map(|a| match &a.action {
                    Some(pb::file_action::Action::Copy(_)) => "copy",
                    Some(pb::file_action::Action::Mkfile(_)) => "mkfile",
                    Some(pb::file_action::Action::Mkdir(_)) => "mkdir",
                    Some(pb::file_action::Action::Rm(_)) => "rm",
                    Some(pb::file_action::Action::Symlink(_)) => "symlink",
                    None => "?",
                })
                .collect();
            kinds.join(", ")
        }
        Some(OpKind::Merge(_)) => "merge".into(),
        Some(OpKind::Diff(_)) => "diff".into(),
        _ => "op".into(),
    }
}

pub(crate) fn is_local_source(op: &pb::Op) -> bool {
    matches!(&op.op, Some(OpKind::Source(s)) if s.identifier.starts_with("local://"))
}

/// A git source: like BuildKit, which asks the remote what the ref is now (with
/// the build's own credentials) before it looks the step up, kiln fetches it on
/// every build, never from the cache by its op, so a moved branch is seen and a
/// build without the token or agent cannot reuse what another fetched with it;
/// what is built on it is still cached, keyed by the fetched commit.
pub(crate) fn is_git_source(op: &pb::Op) -> bool {
    matches!(&op.op, Some(OpKind::Source(s)) if s.identifier.starts_with("git://"))
}

/// An OCI layout source: like BuildKit, which asks the client's store for
/// the image before it looks the step up, kiln reads the index, manifest
/// and config from the client on every build, never from the cache by its
/// op, so a build reuses what another loaded only when its client holds the
/// image too; its layers are found again by chain id, and what is built on
/// it is cached by its digest.
pub(crate) fn is_oci_layout_source(op: &pb::Op) -> bool {
    matches!(&op.op, Some(OpKind::Source(s)) if s.identifier.starts_with(kiln_session::ocilayout::SCHEME))
}

/// An op's kind as the metrics label it.
pub(crate) fn op_kind(op: &pb::Op) -> &'static str {
    match &op.op {
        Some(OpKind::Exec(_)) => "exec",
        Some(OpKind::Source(_)) => "source",
        Some(OpKind::File(_)) => "file",
        Some(OpKind::Build(_)) => "build",
        Some(OpKind::Merge(_)) => "merge",
        Some(OpKind::Diff(_)) => "diff",
        Some(OpKind::Passthrough(_)) => "passthrough",
        None => "none",
    }
}

/// What one vertex needs to run, owned so it can run in its own task.
pub(crate) struct Step<W> {
    pub(crate) worker: Arc<W>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) build: Arc<Build>,
    pub(crate) digest: String,
    pub(crate) op: pb::Op,
    pub(crate) op_bytes: Vec<u8>,
    pub(crate) name: String,
    pub(crate) ignore_cache: bool,
    /// look results up (false with --no-cache / ignore_cache)
    pub(crate) lookup: bool,
    pub(crate) inputs: Vec<Output>,
    pub(crate) def_key: String,
    pub(crate) key: String,
    pub(crate) pv: ProgressVertex,
    /// the step's identity across builds (cache-miss explanations)
    pub(crate) shape: String,
    /// per input: the step that produced it (cache-miss explanations)
    pub(crate) input_from: Vec<InputOrigin>,
    /// what an imported cache knows of the step, used on a local miss
    pub(crate) remote_hit: Option<crate::remote::plan::Matched>,
}

impl<W: Worker> Step<W> {
    fn fail(&self, message: String, code: tonic::Code) -> Failure {
        Failure {
            name: self.name.clone(),
            message,
            code,
            details: Details::default(),
        }
    }

    fn store_err(&self, e: Error) -> Failure {
        self.fail(chain(&e), tonic::Code::Internal)
    }

    /// A record that may be used: its refs still exist on the worker.
    /// A record whose refs are gone is removed.
    async fn usable(&self, key: &str) -> Result<Option<CacheRecord>, Failure> {
        let k = key.to_string();
        let Some(rec) = self
            .cache
            .with_store(move |s| s.get(&k))
            .await
            .map_err(|e| self.store_err(e))?
        else {
            return Ok(None);
        };
        let refs: Vec<String> = rec.refs.iter().filter(|r| !r.is_empty()).cloned().collect();
        let present = if refs.is_empty() {
            true
        } else {
            match self.worker.exists(&refs).await {
                Ok(v) => v.len() == refs.len() && v.iter().all(|x| *x),
                Err(e) => {
                    tracing::warn!(key, error = %kiln_proto::status::Chain(&e), "cache hit not verified; running the step");
                    return Ok(None);
                }
            }
        };
        if !present {
            tracing::info!(key, record = %rec.id, "cached result is gone from the worker; dropping the record");
            let id = rec.id.clone();
            self.cache
                .with_store(move |s| s.remove(&id))
                .await
                .map_err(|e| self.store_err(e))?;
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// The content key: like the fast key, but inputs the op reads only at
    /// some paths count through a checksum of those paths. `None` when the
    /// op reads every input whole.
    async fn content_key(&self) -> Result<Option<String>, Failure> {
        let sels = input_selectors(&self.op);
        if sels.iter().all(Option::is_none) {
            return Ok(None);
        }
        // an imported input not loaded yet is not read for a key
        if self
            .inputs
            .iter()
            .zip(&sels)
            .any(|(i, s)| s.is_some() && i.lazy.is_some())
        {
            return Ok(None);
        }
        let mut parts = vec![self.def_key.clone()];
        for (Output { r#ref: r, key, .. }, sel) in self.inputs.iter().zip(sels) {
            match sel {
                Some(sel) if !r.is_empty() => {
                    let digest = match self.cache.memo(r, &sel) {
                        Some(d) => d,
                        None => {
                            let d = self.worker.checksum(r, &sel).await.map_err(|e| {
                                self.fail(
                                    format!("failed to compute cache key: {}", chain(&e)),
                                    tonic::Code::Unknown,
                                )
                            })?;
                            self.cache.remember(r, &sel, &d);
                            d
                        }
                    };
                    parts.push(format!("content:{digest}"));
                }
                _ => parts.push(key.clone()),
            }
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        Ok(Some(digest_of(&refs)))
    }

    fn hit(&self, rec: CacheRecord) -> Outcome {
        Outcome {
            done: Arc::new(Done {
                outputs: RunOutputs {
                    refs: rec.refs,
                    content_keys: vec![],
                    worker: String::new(),
                },
                keys: rec.output_keys,
                why: vec![],
                lazy: None,
                imported: None,
            }),
            cached: true,
        }
    }

    /// What went into this step's cache key (see [`crate::explain`]); the
    /// files it reads are listed only when the build asked for explanations.
    async fn step_record(&self) -> StepRecord {
        let sels = input_selectors(&self.op);
        let mut inputs = Vec::new();
        for (i, (Output { r#ref: r, key, .. }, sel)) in self.inputs.iter().zip(sels).enumerate() {
            let (from, from_local) = self
                .input_from
                .get(i)
                .map(|x| (x.step.clone(), x.local))
                .unwrap_or_default();
            let content = sel
                .as_ref()
                .filter(|_| !r.is_empty())
                .and_then(|s| self.cache.memo(r, s));
            let list = sel.or_else(|| {
                from_local.then(|| {
                    vec![Selector {
                        path: "/".into(),
                        wildcard: false,
                        follow_links: false,
                    }]
                })
            });
            let files = match list {
                Some(sel) if self.build.explain && !r.is_empty() => {
                    match self.worker.path_entries(r, &sel).await {
                        Ok(entries) => Some(
                            entries
                                .into_iter()
                                .map(|e| {
                                    (
                                        e.path,
                                        FileFact {
                                            content: e.content,
                                            mode: e.mode,
                                            uid: e.uid,
                                            gid: e.gid,
                                        },
                                    )
                                })
                                .collect(),
                        ),
                        Err(e) => {
                            tracing::warn!(vertex = %self.digest, error = %kiln_proto::status::Chain(&e), "paths not listed");
                            None
                        }
                    }
                }
                _ => None,
            };
            inputs.push(InputRecord {
                key: key.clone(),
                from,
                content,
                files,
            });
        }
        StepRecord {
            name: self.name.clone(),
            op: crate::explain::op_facts(&self.op),
            inputs,
            build_args: self.build.build_args.clone(),
        }
    }

    /// On a hit in a build that asked for explanations: records the step
    /// with the files it reads when its stored record has none (it last ran
    /// without `--explain-cache`), so its next miss can name files.
    async fn backfill_record(&self) {
        if !self.build.explain || is_local_source(&self.op) {
            return;
        }
        let sels = input_selectors(&self.op);
        let prev = self.previous_record().await;
        let lacks = prev.is_none_or(|p| {
            p.inputs.iter().enumerate().any(|(i, inp)| {
                let reads = sels.get(i).is_some_and(Option::is_some)
                    || self.input_from.get(i).is_some_and(|x| x.local);
                reads && inp.files.is_none()
            })
        });
        if !lacks {
            return;
        }
        let rec = self.step_record().await;
        let (shape, store) = (self.shape.clone(), self.cache.store().clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.put_step(&shape, &rec)).await
        {
            tracing::warn!(vertex = %self.digest, error = %kiln_proto::status::Chain(&e), "step inputs not recorded");
        }
    }

    /// A step an imported cache knew, once something reads its result:
    /// the imported result loaded (its layers, pulled by the worker; used by
    /// this build only, never recorded in the daemon's cache), or the step
    /// run when there is none or it cannot be loaded (recorded).
    async fn deferred(
        self,
        matched: crate::remote::plan::Matched,
        content_key: Option<String>,
    ) -> Result<String, Failure> {
        let loaded = match &matched {
            crate::remote::plan::Matched::Result(hit) => {
                let op = crate::remote::plan::load_op(hit, self.op.platform.clone());
                match self.run(op, Vec::new()).await {
                    Ok(o) => Some(o),
                    Err(f) => {
                        let line = format!(
                            "imported cache not loaded, running the step: {}\n",
                            f.message
                        );
                        self.build.progress.log(&self.digest, 2, line.into_bytes());
                        None
                    }
                }
            }
            crate::remote::plan::Matched::Key => None,
        };
        let outputs = match loaded {
            Some(o) => {
                let r = o.refs.first().cloned().unwrap_or_default();
                if let Some(Some(remote)) = self.build.remote.get()
                    && let Ok(mut l) = remote.loaded.lock()
                {
                    l.push(r.clone());
                }
                return Ok(r);
            }
            None => {
                // shown again, running now
                let mut pv = self.pv.clone();
                pv.started = Some(crate::progress::now());
                self.build.progress.vertex(pv.clone());
                let r = match self.input_refs().await {
                    Ok(inputs) => self.run(self.op_bytes.clone(), inputs).await,
                    Err(f) => Err(f),
                };
                pv.completed = Some(crate::progress::now());
                if let Err(f) = &r {
                    pv.error.clone_from(&f.message);
                }
                self.build.progress.vertex(pv);
                r?
            }
        };
        self.record(&outputs, content_key).await;
        Ok(outputs.refs.first().cloned().unwrap_or_default())
    }

    /// The worker refs of the inputs, imported results loaded.
    async fn input_refs(&self) -> Result<Vec<String>, Failure> {
        futures::future::try_join_all(self.inputs.iter().map(Output::resolve)).await
    }

    /// Looks the vertex up (fast key, then content key) and runs it on a miss.
    /// Runs the step or finds it cached, counting it in the metrics.
    pub(crate) async fn execute(self) -> Result<Outcome, Failure> {
        let kind = op_kind(&self.op);
        let t0 = std::time::Instant::now();
        let r = self.execute_uncounted().await;
        match &r {
            Ok(o) if !o.cached => {
                kiln_metrics::STEPS.inc(&[kind, "miss"]);
                kiln_metrics::STEP_DURATION.observe(&[kind], t0.elapsed().as_secs_f64());
            }
            Ok(o) if o.done.lazy.is_some() => kiln_metrics::STEPS.inc(&[kind, "remote"]),
            Ok(_) => kiln_metrics::STEPS.inc(&[kind, "hit"]),
            Err(_) => kiln_metrics::STEP_FAILURES.inc(&[kind]),
        }
        r
    }

    async fn execute_uncounted(self) -> Result<Outcome, Failure> {
        let t0 = std::time::Instant::now();
        let content_key = match self.lookup().await? {
            Lookup::Hit(rec) => {
                self.backfill_record().await;
                return Ok(self.hit(rec));
            }
            Lookup::Miss { content_key } => content_key,
        };
        if self.lookup
            && let Some(hit) = self.remote_hit.clone()
        {
            // a step that will run is keyed as one that ran; an imported
            // result by its layers too, so what is built on it is recorded
            // under keys only that same content reaches (an import cannot
            // poison other builds' cache)
            let base = content_key.clone().unwrap_or_else(|| self.key.clone());
            let keys = match &hit {
                crate::remote::plan::Matched::Key => vec![digest_of(&[base.as_str(), "0"])],
                crate::remote::plan::Matched::Result(h) => {
                    let mut parts = vec![base.as_str(), "imported"];
                    parts.extend(h.layers.iter().map(|l| l.digest.as_str()));
                    vec![digest_of(&parts)]
                }
            };
            let imported = match &hit {
                crate::remote::plan::Matched::Result(h) => Some(h.clone()),
                crate::remote::plan::Matched::Key => None,
            };
            let load = async move { self.deferred(hit, content_key).await }
                .boxed()
                .shared();
            return Ok(Outcome {
                done: Arc::new(Done {
                    outputs: RunOutputs {
                        refs: vec![String::new()],
                        content_keys: vec![],
                        worker: String::new(),
                    },
                    keys,
                    why: vec![],
                    lazy: Some(load),
                    imported,
                }),
                cached: true,
            });
        }
        self.build.progress.vertex(self.pv.clone());
        let local = is_local_source(&self.op);
        let (record, why) = if local {
            (None, vec![])
        } else {
            let (rec, why) = self.explain_miss().await;
            (Some(rec), why)
        };
        let t_lookup = t0.elapsed();
        let inputs = self.input_refs().await?;
        let outputs = self.run(self.op_bytes.clone(), inputs).await?;
        let t_run = t0.elapsed();
        if let Some(rec) = record {
            self.put_step_record(rec).await;
        }
        let keys = self.record(&outputs, content_key).await;
        tracing::debug!(
            target: "kiln_timing",
            "step {}: lookup {} ms, worker run {} ms, records {} ms",
            self.digest,
            t_lookup.as_millis(),
            (t_run - t_lookup).as_millis(),
            (t0.elapsed() - t_run).as_millis()
        );
        Ok(Outcome {
            done: Arc::new(Done {
                outputs,
                keys,
                why,
                lazy: None,
                imported: None,
            }),
            cached: false,
        })
    }

    /// A usable record under the fast key (marked used), else under the
    /// content key (linked to the fast key too, so the next lookup needs no
    /// checksum).
    async fn lookup(&self) -> Result<Lookup, Failure> {
        if self.lookup
            && let Some(rec) = self.usable(&self.key).await?
        {
            let id = rec.id.clone();
            self.cache
                .with_store(move |s| s.touch(&id))
                .await
                .map_err(|e| self.store_err(e))?;
            return Ok(Lookup::Hit(rec));
        }
        let content_key = if self.ignore_cache {
            None
        } else {
            self.content_key().await?
        };
        if self.lookup
            && let Some(ck) = &content_key
            && let Some(rec) = self.usable(ck).await?
        {
            let (id, key) = (rec.id.clone(), self.key.clone());
            self.cache
                .with_store(move |s| s.link(&id, &key))
                .await
                .map_err(|e| self.store_err(e))?;
            return Ok(Lookup::Hit(rec));
        }
        Ok(Lookup::Miss { content_key })
    }

    /// What went into this step's key the last time it ran, if recorded.
    async fn previous_record(&self) -> Option<StepRecord> {
        let (shape, store) = (self.shape.clone(), self.cache.store().clone());
        tokio::task::spawn_blocking(move || store.get_step(&shape))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }

    /// What went into the key of a step about to run, and why it runs (the
    /// first reason; all of them are logged when the build asked).
    async fn explain_miss(&self) -> (StepRecord, Vec<String>) {
        let rec = self.step_record().await;
        let prev = self.previous_record().await;
        let mut why = if self.lookup {
            crate::explain::explain(prev.as_ref(), &rec, &|i| {
                self.input_from.get(i).and_then(|x| x.why.clone())
            })
        } else if is_oci_layout_source(&self.op) && !self.build.no_cache && !self.ignore_cache {
            vec!["an OCI layout's image is read from the client on every build".to_string()]
        } else {
            vec!["cache lookups are off (--no-cache or ignore-cache)".to_string()]
        };
        if self.build.explain {
            for w in &why {
                let line = format!("{EXPLAIN_PREFIX}{w}\n").into_bytes();
                self.build.progress.log(&self.digest, 2, line);
            }
        }
        why.truncate(1);
        (rec, why)
    }

    /// Runs `op_bytes` (the step's op, or the op loading its imported
    /// result) on the worker (within the parallelism limit), its logs and
    /// progress going to the build's progress.
    async fn run(&self, op_bytes: Vec<u8>, inputs: Vec<String>) -> Result<RunOutputs, Failure> {
        let events = run_events(&self.build, &self.digest);
        let _permit = match &self.cache.limit {
            Some(s) => Some(s.clone().acquire_owned().await.map_err(|e| {
                self.fail(format!("parallelism limit: {e}"), tonic::Code::Internal)
            })?),
            None => None,
        };
        let op = RunOp {
            build_id: self.build.id.clone(),
            session_id: self.build.session_id.clone(),
            session_shared_key: self.build.shared_key(),
            digest: self.digest.clone(),
            op_bytes,
            inputs,
            name: self.name.clone(),
            entitlements: self.build.entitlements.clone(),
        };
        self.worker.run(op, events).await.map_err(|e| match e {
            Error::Vertex { message, code, .. } => self.fail(message, code),
            other => self.fail(other.to_string(), tonic::Code::Unknown),
        })
    }

    async fn put_step_record(&self, rec: StepRecord) {
        let (shape, store) = (self.shape.clone(), self.cache.store().clone());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.put_step(&shape, &rec)).await
        {
            tracing::warn!(vertex = %self.digest, error = %kiln_proto::status::Chain(&e), "step inputs not recorded");
        }
    }

    /// The cache keys of the step's outputs, and its result recorded under
    /// the fast and content keys (not for local sources or ignore-cache).
    async fn record(&self, outputs: &RunOutputs, content_key: Option<String>) -> Vec<String> {
        let local = is_local_source(&self.op);
        let base = content_key.clone().unwrap_or_else(|| self.key.clone());
        let keys: Vec<String> = (0..outputs.refs.len())
            .map(
                |i| match outputs.content_keys.get(i).filter(|k| !k.is_empty()) {
                    Some(ck) => digest_of(&[self.def_key.as_str(), ck.as_str()]),
                    // content unknown: nothing downstream may be reused
                    None if local => digest_of(&[&uuid::Uuid::new_v4().to_string()]),
                    None => digest_of(&[base.as_str(), &i.to_string()]),
                },
            )
            .collect();
        if self.ignore_cache || local {
            return keys;
        }
        let now = unix_nanos();
        let mut links = vec![self.key.clone()];
        links.extend(content_key.filter(|ck| *ck != self.key));
        let rec = CacheRecord {
            id: base,
            worker: self.worker.address(),
            refs: outputs.refs.clone(),
            output_keys: keys.clone(),
            links,
            description: self.name.clone(),
            created: now,
            last_used: now,
            usage_count: 1,
            size: None,
        };
        if let Err(e) = self.cache.with_store(move |s| s.put(&rec)).await {
            tracing::warn!(vertex = %self.digest, error = %kiln_proto::status::Chain(&e), "result not cached");
        }
        keys
    }
}

/// A worker run's logs and progress, shown under vertex `digest` of `build`.
pub(crate) fn run_events(build: &Arc<Build>, digest: &str) -> Arc<dyn Fn(RunEvent) + Send + Sync> {
    let (build, vdigest) = (build.clone(), digest.to_string());
    Arc::new(move |e| match e {
        RunEvent::Log { stream, data } => build.progress.log(&vdigest, stream, data),
        RunEvent::Progress {
            id,
            current,
            total,
            completed,
        } => build
            .progress
            .status(&vdigest, id, current, total, completed),
    })
}

/// A status line sink shown as log lines of vertex `digest` of `build`.
pub(crate) fn status_lines(build: &Arc<Build>, digest: &str) -> Arc<dyn Fn(String) + Send + Sync> {
    let (build, vdigest) = (build.clone(), digest.to_string());
    Arc::new(move |s: String| {
        build
            .progress
            .log(&vdigest, 1, format!("{s}\n").into_bytes())
    })
}

/// What a step's lookup found.
enum Lookup {
    Hit(CacheRecord),
    /// nothing usable: the step runs (its content key, when it has one, is
    /// recorded with the result)
    Miss {
        content_key: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_clamp_the_clients_ranges() {
        let source = |start: i32, end: i32, lines: usize| {
            let data: String = (1..=lines).map(|n| format!("line {n}\n")).collect();
            let mut s = pb::Source {
                infos: vec![pb::SourceInfo {
                    filename: "Dockerfile".into(),
                    data: data.into_bytes(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            s.locations.insert(
                "v".into(),
                pb::Locations {
                    locations: vec![pb::Location {
                        source_index: 0,
                        ranges: vec![pb::Range {
                            start: Some(pb::Position {
                                line: start,
                                character: 0,
                            }),
                            end: Some(pb::Position {
                                line: end,
                                character: 0,
                            }),
                        }],
                    }],
                },
            );
            s
        };
        let lines = |loc: &SourceLocation| {
            let r = &loc.ranges[0];
            (r.start.map(|p| p.line), r.end.map(|p| p.line))
        };
        let ok = source_location(&source(3, 3, 5), "v").expect("location");
        assert_eq!(lines(&ok), (Some(3), Some(3)));
        // whole-file and past-the-end ranges end at the file's last line
        let long = source_location(&source(1, i32::MAX, 100_000), "v").expect("location");
        assert_eq!(lines(&long), (Some(1), Some(100_000)));
        for (start, end) in [(i32::MIN, i32::MAX), (i32::MAX, i32::MIN), (0, 0), (-5, 2)] {
            assert!(source_location(&source(start, end, 5), "v").is_none());
        }
        assert!(source_location(&source(6, 9, 5), "v").is_none());
        assert!(source_location(&source(5, i32::MAX, 5), "v").is_some());
        // the status details carry the same lines
        let loc = source_location(&source(3, i32::MAX, 5), "v").expect("location");
        assert_eq!(loc.info.filename, "Dockerfile");
        assert_eq!(lines(&loc), (Some(3), Some(5)), "clamped to the file");
        assert!(source_location(&source(6, 9, 5), "v").is_none());
    }
}
