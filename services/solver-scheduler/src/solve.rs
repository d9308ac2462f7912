//! Running an LLB graph: every vertex once, each as soon as its inputs are
//! done (so independent vertices run in parallel), results reused by cache
//! key.
//!
//! A vertex's cache key is the digest of its op bytes combined with the
//! cache keys of the input outputs it reads. Outputs whose content the
//! definition does not determine (local sources) are keyed by the content
//! digest the worker reports.

use crate::Error;
use crate::build::Build;
use crate::cache::{CacheRecord, CacheStore, unix_nanos};
use crate::explain::{FileFact, InputRecord, StepRecord};
use crate::peer::{RunEvent, RunOp, RunOutputs, Selector, Worker};
use crate::progress::now;
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb::{self, op::Op as OpKind};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The result cache: records in a [`CacheStore`], vertices running now
/// (shared by every build that needs the same cache key) and memoized
/// content checksums (snapshots are immutable).
pub struct Cache {
    store: Arc<dyn CacheStore>,
    inflight: Mutex<HashMap<String, Weak<InFlight>>>,
    checksums: Mutex<HashMap<(String, Vec<Selector>), String>>,
    /// `max-parallelism`: permits for steps running on workers
    limit: Option<Arc<tokio::sync::Semaphore>>,
}

/// A vertex being computed; dropped (and its task aborted) when no build
/// waits for it any more.
struct InFlight {
    fut: Shared<BoxFuture<'static, Result<Outcome, Failure>>>,
    task: tokio::task::AbortHandle,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Outcome {
    done: Arc<Done>,
    cached: bool,
}

impl Cache {
    pub fn new(store: Arc<dyn CacheStore>) -> Self {
        Cache {
            store,
            inflight: Mutex::new(HashMap::new()),
            checksums: Mutex::new(HashMap::new()),
            limit: None,
        }
    }

    /// At most `n` steps run on workers at once (cache lookups do not count).
    pub fn with_parallelism(mut self, n: Option<usize>) -> Self {
        self.limit = n
            .filter(|n| *n > 0)
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        self
    }

    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.store
    }

    /// Runs `f` on the store in a blocking thread (redb commits fsync).
    pub async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn CacheStore) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::Worker(format!("cache store task: {e}")))?
    }

    /// Joins the computation of `key` if one is running, else starts `start`.
    /// Returns the shared computation and whether this caller started it.
    fn join(
        &self,
        key: &str,
        start: impl FnOnce() -> BoxFuture<'static, Result<Outcome, Failure>>,
    ) -> (Arc<InFlight>, bool) {
        let mut map = match self.inflight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(f) = map.get(key).and_then(Weak::upgrade) {
            return (f, false);
        }
        map.retain(|_, w| w.strong_count() > 0);
        let handle = tokio::spawn(start());
        let task = handle.abort_handle();
        let fut = async move {
            handle.await.unwrap_or_else(|e| {
                Err(Failure {
                    name: String::new(),
                    message: if e.is_cancelled() {
                        "build cancelled".into()
                    } else {
                        format!("vertex task: {e}")
                    },
                    code: tonic::Code::Cancelled,
                    snippet: None,
                })
            })
        }
        .boxed()
        .shared();
        let f = Arc::new(InFlight { fut, task });
        map.insert(key.to_string(), Arc::downgrade(&f));
        (f, true)
    }

    fn memo(&self, r: &str, sel: &[Selector]) -> Option<String> {
        self.checksums
            .lock()
            .ok()?
            .get(&(r.to_string(), sel.to_vec()))
            .cloned()
    }

    fn remember(&self, r: &str, sel: &[Selector], digest: &str) {
        if let Ok(mut m) = self.checksums.lock() {
            if m.len() > 10_000 {
                m.clear();
            }
            m.insert((r.to_string(), sel.to_vec()), digest.to_string());
        }
    }
}

/// A finished vertex: the worker refs of its outputs and one cache key per
/// output.
#[derive(Debug)]
pub struct Done {
    pub outputs: RunOutputs,
    pub keys: Vec<String>,
    /// why the step ran in this build (empty when cached)
    pub why: Vec<String>,
}

impl Done {
    fn output(&self, index: i64) -> (String, String) {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        (
            self.outputs.refs.get(i).cloned().unwrap_or_default(),
            self.keys.get(i).cloned().unwrap_or_default(),
        )
    }
}

#[derive(Debug, Clone)]
struct Failure {
    name: String,
    message: String,
    code: tonic::Code,
    snippet: Option<String>,
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        Error::Vertex {
            name: f.name,
            message: f.message,
            code: f.code,
            snippet: f.snippet,
        }
    }
}

/// The most lines of a vertex's range a snippet shows (the client sends the ranges).
const SNIPPET_LINES: i64 = 10;
/// The most bytes of one source line a snippet shows.
const SNIPPET_LINE_BYTES: usize = 512;

/// The source lines a vertex came from, BuildKit style:
/// `Dockerfile:4`, a rule, the lines around it with `>>>` marking the
/// vertex's lines, a rule. Ranges are clamped to the file and to
/// [`SNIPPET_LINES`], lines to [`SNIPPET_LINE_BYTES`].
pub fn source_snippet(source: &pb::Source, digest: &str) -> Option<String> {
    let loc = source.locations.get(digest)?.locations.first()?;
    let info = source.infos.get(usize::try_from(loc.source_index).ok()?)?;
    let range = loc.ranges.first()?;
    let text = String::from_utf8_lossy(&info.data);
    let lines: Vec<&str> = text.lines().collect();
    let count = lines.len() as i64;
    let start = i64::from(range.start.as_ref()?.line);
    if start < 1 || start > count.max(1) {
        return None;
    }
    let end =
        i64::from(range.end.as_ref().map(|p| p.line).unwrap_or(0)).clamp(start, count.max(start));
    let shown_end = end.min(start + SNIPPET_LINES - 1);
    let first = (start - 2).max(1);
    let last = (shown_end + 2).min(count);
    let mut out = format!(
        "{}:{}\n--------------------\n",
        info.filename.chars().take(256).collect::<String>(),
        if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        }
    );
    for n in first..=last {
        let line = lines.get((n - 1) as usize).copied().unwrap_or("");
        let mut cut = line.len().min(SNIPPET_LINE_BYTES);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let mark = if n >= start && n <= end { ">>>" } else { "   " };
        out.push_str(&format!(" {n:>3} | {mark} {}\n", &line[..cut]));
        if n == shown_end && shown_end < end {
            out.push_str(&format!("     | >>> ({} more lines)\n", end - shown_end));
        }
    }
    out.push_str("--------------------");
    Some(out)
}

/// Prefix of the log lines that explain why a step ran (`--explain-cache`).
pub const EXPLAIN_PREFIX: &str = "explain-cache: ";

type VertexFuture = Shared<BoxFuture<'static, Result<Arc<Done>, Failure>>>;

fn sha(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    format!("sha256:{}", hex_encode(&h.finalize()))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

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

/// The part of an op's cache key that comes from its definition: the op
/// without its input digests (inputs count through their own cache keys) and
/// without attributes that name the client session rather than content.
fn definition_key(op: &pb::Op) -> String {
    use prost::Message;
    let mut op = op.clone();
    op.inputs.iter_mut().for_each(|i| i.digest.clear());
    match &mut op.op {
        Some(OpKind::Source(s)) => {
            for k in ["local.session", "local.unique", "local.sharedkeyhint"] {
                s.attrs.remove(k);
            }
        }
        // proxy settings say how to reach the network, not what the step
        // produces: changing them re-runs nothing
        Some(OpKind::Exec(e)) => {
            if let Some(m) = e.meta.as_mut() {
                m.proxy_env = None;
            }
        }
        _ => {}
    }
    sha(&[&hex_encode(&op.encode_to_vec())])
}

fn is_local_source(op: &pb::Op) -> bool {
    matches!(&op.op, Some(OpKind::Source(s)) if s.identifier.starts_with("local://"))
}

fn abs_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// Per input of `op`: the paths the op reads from it, when it reads only
/// those paths (copy sources, read-only bind mounts with a selector); `None`
/// when it depends on the whole input.
pub fn input_selectors(op: &pb::Op) -> Vec<Option<Vec<Selector>>> {
    let n = op.inputs.len();
    let mut whole = vec![false; n];
    let mut sel: Vec<Vec<Selector>> = vec![Vec::new(); n];
    let slot = |i: i64| usize::try_from(i).ok().filter(|i| *i < n);
    match &op.op {
        Some(OpKind::File(f)) => {
            for a in &f.actions {
                if let Some(i) = slot(a.input) {
                    whole[i] = true;
                }
                if let Some(i) = slot(a.secondary_input) {
                    match &a.action {
                        Some(pb::file_action::Action::Copy(c)) => sel[i].push(Selector {
                            path: abs_path(&c.src),
                            wildcard: c.allow_wildcard,
                            follow_links: c.follow_symlink,
                        }),
                        _ => whole[i] = true,
                    }
                }
            }
        }
        Some(OpKind::Exec(e)) => {
            for m in &e.mounts {
                let Some(i) = slot(m.input) else { continue };
                let bind = m.mount_type == pb::MountType::Bind as i32;
                if bind && m.readonly && m.output < 0 && !m.selector.is_empty() && m.selector != "/"
                {
                    sel[i].push(Selector {
                        path: abs_path(&m.selector),
                        wildcard: false,
                        follow_links: true,
                    });
                } else {
                    whole[i] = true;
                }
            }
        }
        _ => whole.iter_mut().for_each(|w| *w = true),
    }
    whole
        .into_iter()
        .zip(sel)
        .map(|(w, mut s)| {
            if w || s.is_empty() {
                None
            } else {
                s.sort();
                s.dedup();
                Some(s)
            }
        })
        .collect()
}

/// What one vertex needs to run, owned so it can run in its own task.
struct Step<W> {
    worker: Arc<W>,
    cache: Arc<Cache>,
    build: Arc<Build>,
    digest: String,
    op: pb::Op,
    op_bytes: Vec<u8>,
    name: String,
    ignore_cache: bool,
    /// look results up (false with --no-cache / ignore_cache)
    lookup: bool,
    inputs: Vec<(String, String)>,
    def_key: String,
    key: String,
    pv: ProgressVertex,
    /// the step's identity across builds (cache-miss explanations)
    shape: String,
    /// per input: name of the step that produced it, whether that is a
    /// local source, and its first reason for running in this build
    input_from: Vec<(String, bool, Option<String>)>,
}

impl<W: Worker> Step<W> {
    fn fail(&self, message: String, code: tonic::Code) -> Failure {
        Failure {
            name: self.name.clone(),
            message,
            code,
            snippet: None,
        }
    }

    fn store_err(&self, e: Error) -> Failure {
        self.fail(e.to_string(), tonic::Code::Internal)
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
                    tracing::warn!(key, error = %e, "cache hit not verified; running the step");
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
        let mut parts = vec![self.def_key.clone()];
        for ((r, key), sel) in self.inputs.iter().zip(sels) {
            match sel {
                Some(sel) if !r.is_empty() => {
                    let digest = match self.cache.memo(r, &sel) {
                        Some(d) => d,
                        None => {
                            let d = self.worker.checksum(r, &sel).await.map_err(|e| {
                                self.fail(
                                    format!("failed to compute cache key: {e}"),
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
        Ok(Some(sha(&refs)))
    }

    fn hit(&self, rec: CacheRecord) -> Outcome {
        Outcome {
            done: Arc::new(Done {
                outputs: RunOutputs {
                    refs: rec.refs,
                    content_keys: vec![],
                },
                keys: rec.output_keys,
                why: vec![],
            }),
            cached: true,
        }
    }

    /// What went into this step's cache key (see [`crate::explain`]); the
    /// files it reads are listed only when the build asked for explanations.
    async fn step_record(&self) -> StepRecord {
        let sels = input_selectors(&self.op);
        let mut inputs = Vec::new();
        for (i, ((r, key), sel)) in self.inputs.iter().zip(sels).enumerate() {
            let (from, from_local) = self
                .input_from
                .get(i)
                .map(|x| (x.0.clone(), x.1))
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
                            tracing::warn!(vertex = %self.digest, error = %e, "paths not listed");
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
        let (shape, store) = (self.shape.clone(), self.cache.store().clone());
        let prev = tokio::task::spawn_blocking(move || store.get_step(&shape))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let lacks = prev.is_none_or(|p| {
            p.inputs.iter().enumerate().any(|(i, inp)| {
                let reads = sels.get(i).is_some_and(Option::is_some)
                    || self.input_from.get(i).is_some_and(|x| x.1);
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
            tracing::warn!(vertex = %self.digest, error = %e, "step inputs not recorded");
        }
    }

    /// Looks the vertex up (fast key, then content key) and runs it on a miss.
    async fn execute(self) -> Result<Outcome, Failure> {
        let t0 = std::time::Instant::now();
        if self.lookup
            && let Some(rec) = self.usable(&self.key).await?
        {
            let id = rec.id.clone();
            self.cache
                .with_store(move |s| s.touch(&id))
                .await
                .map_err(|e| self.store_err(e))?;
            self.backfill_record().await;
            return Ok(self.hit(rec));
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
            self.backfill_record().await;
            return Ok(self.hit(rec));
        }
        let build = self.build.clone();
        build.progress.vertex(self.pv.clone());
        let local = is_local_source(&self.op);
        let (record, why) = if local {
            (None, vec![])
        } else {
            let rec = self.step_record().await;
            let (shape, store) = (self.shape.clone(), self.cache.store().clone());
            let prev = tokio::task::spawn_blocking(move || store.get_step(&shape))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            let mut why = if self.lookup {
                crate::explain::explain(prev.as_ref(), &rec, &|i| {
                    self.input_from.get(i).and_then(|x| x.2.clone())
                })
            } else {
                vec!["cache lookups are off (--no-cache or ignore-cache)".to_string()]
            };
            if self.build.explain {
                for w in &why {
                    build.progress.log(
                        &self.digest,
                        2,
                        format!("{EXPLAIN_PREFIX}{w}\n").into_bytes(),
                    );
                }
            }
            why.truncate(1);
            (Some(rec), why)
        };
        let vdigest = self.digest.clone();
        let events: Arc<dyn Fn(RunEvent) + Send + Sync> = Arc::new(move |e| match e {
            RunEvent::Log { stream, data } => build.progress.log(&vdigest, stream, data),
            RunEvent::Progress {
                id,
                current,
                total,
                completed,
            } => build
                .progress
                .status(&vdigest, id, current, total, completed),
        });
        let t_lookup = t0.elapsed();
        let _permit = match &self.cache.limit {
            Some(s) => Some(s.clone().acquire_owned().await.map_err(|e| {
                self.fail(format!("parallelism limit: {e}"), tonic::Code::Internal)
            })?),
            None => None,
        };
        let outputs = self
            .worker
            .run(
                RunOp {
                    build_id: self.build.id.clone(),
                    session_id: self.build.session_id.clone(),
                    session_shared_key: self.build.shared_key(),
                    digest: self.digest.clone(),
                    op_bytes: self.op_bytes.clone(),
                    inputs: self.inputs.iter().map(|(r, _)| r.clone()).collect(),
                    name: self.name.clone(),
                    entitlements: self.build.entitlements.clone(),
                },
                events,
            )
            .await
            .map_err(|e| match e {
                Error::Vertex { message, code, .. } => self.fail(message, code),
                other => self.fail(other.to_string(), tonic::Code::Unknown),
            })?;
        let t_run = t0.elapsed();
        if let Some(rec) = record {
            let (shape, store) = (self.shape.clone(), self.cache.store().clone());
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || store.put_step(&shape, &rec)).await
            {
                tracing::warn!(vertex = %self.digest, error = %e, "step inputs not recorded");
            }
        }
        let base = content_key.clone().unwrap_or_else(|| self.key.clone());
        let keys: Vec<String> = (0..outputs.refs.len())
            .map(
                |i| match outputs.content_keys.get(i).filter(|k| !k.is_empty()) {
                    Some(ck) => sha(&[self.def_key.as_str(), ck.as_str()]),
                    // content unknown: nothing downstream may be reused
                    None if local => sha(&[&uuid::Uuid::new_v4().to_string()]),
                    None => sha(&[base.as_str(), &i.to_string()]),
                },
            )
            .collect();
        if !self.ignore_cache && !local {
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
                tracing::warn!(vertex = %self.digest, error = %e, "result not cached");
            }
        }
        tracing::debug!(
            target: "kiln_timing",
            "step {}: lookup {} ms, worker run {} ms, records {} ms",
            self.digest,
            t_lookup.as_millis(),
            (t_run - t_lookup).as_millis(),
            (t0.elapsed() - t_run).as_millis()
        );
        Ok(Outcome {
            done: Arc::new(Done { outputs, keys, why }),
            cached: false,
        })
    }
}

/// The exec and file ops whose output (the index given) is a new layer of the
/// result's image: the result, then each exec's root mount input and each
/// file op's base input, down to a source or another kind of op.
/// The vertices `top` depends on, itself included.
fn reachable(graph: &kiln_llb::Graph, top: &str) -> std::collections::HashSet<String> {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![top.to_string()];
    while let Some(d) = stack.pop() {
        if let Some(v) = graph.get(&d)
            && seen.insert(d)
        {
            stack.extend(v.op.inputs.iter().map(|i| i.digest.clone()));
        }
    }
    seen
}

/// Tasks aborted when the solve that spawned them ends or is dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn image_chain(graph: &kiln_llb::Graph) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    let mut next = graph.result.clone();
    while let Some(at) = next.take() {
        let Some(v) = graph.get(&at.digest) else {
            break;
        };
        if !matches!(v.op.op, Some(OpKind::Exec(_) | OpKind::File(_)))
            || out.insert(v.digest.clone(), at.index).is_some()
        {
            break;
        }
        let input = |i: i64| (i >= 0).then(|| v.op.inputs.get(i as usize).cloned())?;
        next = match &v.op.op {
            Some(OpKind::Exec(e)) => e
                .mounts
                .iter()
                .find(|m| m.dest == "/" && m.output == at.index)
                .and_then(|m| input(m.input)),
            Some(OpKind::File(f)) => {
                // the action writing this output, then back through the
                // actions it builds on to one of the op's inputs
                let n = v.op.inputs.len() as i64;
                let mut a = f.actions.iter().find(|a| a.output == at.index);
                let mut found = None;
                for _ in 0..f.actions.len() {
                    match a {
                        Some(x) if x.input >= n => a = f.actions.get((x.input - n) as usize),
                        Some(x) => {
                            found = input(x.input);
                            break;
                        }
                        None => break,
                    }
                }
                found
            }
            _ => None,
        };
    }
    out
}

/// Solves `def` for `build` and returns the worker ref of its result
/// (empty for scratch).
pub async fn solve<W: Worker>(
    worker: Arc<W>,
    cache: Arc<Cache>,
    build: Arc<Build>,
    def: &pb::Definition,
) -> Result<String, Error> {
    let graph = kiln_llb::load(def)?;
    let Some(result) = graph.result.clone() else {
        return Ok(String::new());
    };
    // the LLB names the session a local source syncs from: only this build's own
    for v in &graph.vertices {
        if let Some(OpKind::Source(s)) = &v.op.op
            && is_local_source(&v.op)
            && let Some(session) = s.attrs.get("local.session")
            && !session.is_empty()
            && *session != build.session_id
        {
            return Err(Error::ForeignSession {
                name: s.identifier.trim_start_matches("local://").to_string(),
                session: session.clone(),
            });
        }
    }
    let mut futs: HashMap<String, VertexFuture> = HashMap::new();
    // with an image export, each layer of the result is computed as soon as
    // its step has run, alongside the steps after it
    let eager: Arc<HashMap<String, i64>> = Arc::new(match build.eager_layers {
        Some(_) => image_chain(&graph),
        None => HashMap::new(),
    });
    // snippets are made for the step that fails, not ahead for every step
    let source = graph.source.clone().map(Arc::new);
    let scope = build.scope();
    let names: HashMap<String, (String, bool)> = graph
        .vertices
        .iter()
        .map(|v| {
            // a local source is named by its local dir ("context")
            let name = match &v.op.op {
                Some(OpKind::Source(s)) if is_local_source(&v.op) => {
                    s.identifier.trim_start_matches("local://").to_string()
                }
                _ => vertex_name(&v.op, &v.metadata),
            };
            (v.digest.clone(), (name, is_local_source(&v.op)))
        })
        .collect();
    let shapes: HashMap<String, String> = graph
        .vertices
        .iter()
        .map(|v| {
            let name = names.get(&v.digest).map(|n| n.0.as_str()).unwrap_or("");
            (
                v.digest.clone(),
                crate::explain::shape(&scope, &graph, &v.digest, &v.op, name),
            )
        })
        .collect();
    // only what the result needs runs; each vertex is a task of its own that awaits
    // its inputs' tasks, so no poll or drop nests deeper than one level however long
    // the chain (a 100,000-op chain would otherwise overflow the stack)
    let needed = reachable(&graph, &result.digest);
    let mut tasks = AbortOnDrop(Vec::new());
    for v in graph.vertices {
        if !needed.contains(&v.digest) {
            continue;
        }
        let source = source.clone();
        let shape = shapes.get(&v.digest).cloned().unwrap_or_default();
        let input_names: Vec<(String, bool)> =
            v.op.inputs
                .iter()
                .map(|i| names.get(&i.digest).cloned().unwrap_or_default())
                .collect();
        let inputs: Vec<(VertexFuture, i64)> =
            v.op.inputs
                .iter()
                .map(|i| {
                    futs.get(&i.digest)
                        .cloned()
                        .map(|f| (f, i.index))
                        .ok_or_else(|| Error::MissingVertex(i.digest.clone()))
                })
                .collect::<Result<_, _>>()?;
        let worker = worker.clone();
        let cache = cache.clone();
        let build = build.clone();
        let vertex_digest = v.digest.clone();
        let eager = eager.clone();
        let fut = async move {
            let layers_of = eager
                .get(&v.digest)
                .copied()
                .zip(build.eager_layers.clone());
            let layer_worker = worker.clone();
            let name = vertex_name(&v.op, &v.metadata);
            let mut done_inputs = Vec::new();
            let mut input_from = Vec::new();
            for (r, (from, local)) in futures::future::join_all(inputs.iter().map(|(f, idx)| {
                let f = f.clone();
                let idx = *idx;
                async move { f.await.map(|d| (d.output(idx), d.why.first().cloned())) }
            }))
            .await
            .into_iter()
            .zip(input_names)
            {
                let (out, why) = r?;
                done_inputs.push(out);
                input_from.push((from, local, why));
            }
            let input_digests: Vec<String> = v.op.inputs.iter().map(|i| i.digest.clone()).collect();
            let def_key = definition_key(&v.op);
            let mut parts: Vec<&str> = vec![def_key.as_str()];
            for (_, key) in &done_inputs {
                parts.push(key.as_str());
            }
            let key = sha(&parts);
            let local = is_local_source(&v.op);
            let lookup = !v.metadata.ignore_cache && !build.no_cache && !local;
            let started = now();
            let mut pv = ProgressVertex {
                digest: v.digest.clone(),
                inputs: input_digests,
                name: name.clone(),
                started: Some(started),
                ..Default::default()
            };
            let step = Step {
                worker,
                cache: cache.clone(),
                build: build.clone(),
                digest: v.digest.clone(),
                op: v.op.clone(),
                op_bytes: v.bytes.clone(),
                name: name.clone(),
                ignore_cache: v.metadata.ignore_cache,
                lookup,
                inputs: done_inputs,
                def_key,
                key: key.clone(),
                pv: pv.clone(),
                shape,
                input_from,
            };
            // identical vertices of concurrent builds run once; vertices
            // that must not be shared run in this build's own task
            let (flight, leader) = if lookup {
                cache.join(&key, move || step.execute().boxed())
            } else {
                cache.join(&format!("unshared:{}", uuid::Uuid::new_v4()), move || {
                    step.execute().boxed()
                })
            };
            let res = flight.fut.clone().await;
            pv.completed = Some(now());
            match res {
                Ok(o) => {
                    pv.cached = o.cached || !leader;
                    let ran = !pv.cached;
                    build.progress.vertex(pv);
                    if let Some((index, spec)) = layers_of
                        && ran
                    {
                        let r = o.done.output(index).0;
                        if !r.is_empty() {
                            tokio::spawn(async move {
                                if let Err(e) = layer_worker.prepare_layers(&r, &spec).await {
                                    tracing::debug!(error = %e, "layers ahead of the export");
                                }
                            });
                        }
                    }
                    Ok(o.done)
                }
                Err(mut f) => {
                    pv.error = f.message.clone();
                    build.progress.vertex(pv);
                    f.name = name;
                    f.snippet = source.and_then(|s| source_snippet(&s, &v.digest));
                    Err(f)
                }
            }
        };
        let task = tokio::spawn(fut);
        tasks.0.push(task.abort_handle());
        let fut = async move {
            task.await.unwrap_or_else(|e| {
                Err(Failure {
                    name: String::new(),
                    message: format!("step task ended: {e}"),
                    code: tonic::Code::Internal,
                    snippet: None,
                })
            })
        }
        .boxed()
        .shared();
        futs.insert(vertex_digest, fut);
    }
    let fut = futs
        .get(&result.digest)
        .cloned()
        .ok_or_else(|| Error::MissingVertex(result.digest.clone()))?;
    drop(futs);
    let done = fut.await.map_err(Error::from)?;
    Ok(done.output(result.index).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::BuildRequest;
    use crate::cache::{MemoryStore, RedbStore};
    use crate::peer::WorkerUsage;
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A worker whose "context" is a map of files; exec ops sleep a little.
    #[derive(Default)]
    struct FakeWorker {
        files: Mutex<BTreeMap<String, String>>,
        refs: Mutex<HashSet<String>>,
        runs: Mutex<Vec<String>>,
        checksums: AtomicUsize,
        cancelled: AtomicUsize,
        running: AtomicUsize,
        max_running: AtomicUsize,
        /// (ref, layer options) of every prepare_layers call
        layers: Mutex<Vec<(String, String)>>,
    }

    struct CountDrop<'a>(&'a AtomicUsize, bool);
    impl Drop for CountDrop<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Worker for FakeWorker {
        fn address(&self) -> String {
            "fake".into()
        }
        async fn run(
            &self,
            op: RunOp,
            _events: Arc<dyn Fn(RunEvent) + Send + Sync>,
        ) -> Result<RunOutputs, Error> {
            use prost::Message;
            let decoded = pb::Op::decode(op.op_bytes.as_slice()).expect("op");
            self.runs.lock().expect("lock").push(op.name.clone());
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            let mut content_keys = vec![];
            if is_local_source(&decoded) {
                content_keys.push(format!("{:?}", self.files.lock().expect("lock")));
            }
            if matches!(decoded.op, Some(OpKind::Exec(_))) {
                let mut guard = CountDrop(&self.cancelled, false);
                tokio::time::sleep(Duration::from_millis(300)).await;
                guard.1 = true;
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            let r = uuid::Uuid::new_v4().to_string();
            self.refs.lock().expect("lock").insert(r.clone());
            Ok(RunOutputs {
                refs: vec![r],
                content_keys,
            })
        }
        async fn read_file(
            &self,
            _r: crate::peer::FsTarget<'_>,
            _path: &str,
            _o: i64,
            _l: i64,
        ) -> Result<Vec<u8>, Error> {
            Ok(vec![])
        }
        async fn checksum(&self, _r: &str, selectors: &[Selector]) -> Result<String, Error> {
            self.checksums.fetch_add(1, Ordering::SeqCst);
            let files = self.files.lock().expect("lock");
            let parts: Vec<String> = selectors
                .iter()
                .map(|s| format!("{}={:?}", s.path, files.get(&s.path)))
                .collect();
            Ok(sha(&parts.iter().map(String::as_str).collect::<Vec<_>>()))
        }
        async fn path_entries(
            &self,
            _r: &str,
            selectors: &[Selector],
        ) -> Result<Vec<crate::peer::PathEntry>, Error> {
            let files = self.files.lock().expect("lock");
            Ok(selectors
                .iter()
                .filter_map(|s| {
                    files.get(&s.path).map(|c| crate::peer::PathEntry {
                        path: s.path.clone(),
                        content: c.clone(),
                        mode: 0o100644,
                        uid: 0,
                        gid: 0,
                    })
                })
                .collect())
        }
        async fn exists(&self, refs: &[String]) -> Result<Vec<bool>, Error> {
            let held = self.refs.lock().expect("lock");
            Ok(refs.iter().map(|r| held.contains(r)).collect())
        }
        async fn usage(&self, _refs: &[String]) -> Result<WorkerUsage, Error> {
            Ok(WorkerUsage::default())
        }
        async fn prune(&self, _keep: &[String], _before: i64) -> Result<WorkerUsage, Error> {
            Ok(WorkerUsage::default())
        }
        async fn prepare_layers(&self, r: &str, spec: &str) -> Result<(), Error> {
            self.layers
                .lock()
                .expect("lock")
                .push((r.to_string(), spec.to_string()));
            Ok(())
        }
    }

    impl FakeWorker {
        fn runs(&self) -> Vec<String> {
            self.runs.lock().expect("lock").clone()
        }
        /// the runs from index `from` on, sorted (independent vertices run in any order)
        fn runs_from(&self, from: usize) -> Vec<String> {
            let mut v = self.runs()[from..].to_vec();
            v.sort();
            v
        }
        fn set(&self, path: &str, content: &str) {
            self.files
                .lock()
                .expect("lock")
                .insert(path.into(), content.into());
        }
    }

    fn named(name: &str) -> pb::OpMetadata {
        pb::OpMetadata {
            description: [("llb.customname".to_string(), name.to_string())].into(),
            ..Default::default()
        }
    }

    fn source(b: &mut kiln_llb::DefinitionBuilder, id: &str, name: &str) -> pb::Input {
        let op = pb::Op {
            op: Some(OpKind::Source(pb::SourceOp {
                identifier: id.into(),
                attrs: Default::default(),
            })),
            ..Default::default()
        };
        b.add(op, named(name))
    }

    /// FROM base; COPY a.txt /; RUN cmd
    fn copy_then_run(cmd: &str) -> pb::Definition {
        let mut b = kiln_llb::DefinitionBuilder::new();
        let base = source(
            &mut b,
            "docker-image://docker.io/library/busybox:latest",
            "base",
        );
        let ctx = source(&mut b, "local://context", "context");
        let copy = pb::Op {
            inputs: vec![base, ctx],
            op: Some(OpKind::File(pb::FileOp {
                actions: vec![pb::FileAction {
                    input: 0,
                    secondary_input: 1,
                    output: 0,
                    action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                        src: "/a.txt".into(),
                        dest: "/a.txt".into(),
                        mode: -1,
                        ..Default::default()
                    })),
                }],
            })),
            ..Default::default()
        };
        let copied = b.add(copy, named("copy"));
        let exec = pb::Op {
            inputs: vec![copied],
            op: Some(OpKind::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["sh".into(), "-c".into(), cmd.into()],
                    cwd: "/".into(),
                    ..Default::default()
                }),
                mounts: vec![pb::Mount {
                    input: 0,
                    dest: "/".into(),
                    output: 0,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let out = b.add(exec, named("run"));
        b.finish(Some(out))
    }

    fn build(id: &str, no_cache: bool) -> Arc<Build> {
        Arc::new(Build::new(
            &BuildRequest {
                id: id.into(),
                ..Default::default()
            },
            no_cache,
        ))
    }

    async fn solve_once(
        w: &Arc<FakeWorker>,
        cache: &Arc<Cache>,
        def: &pb::Definition,
        no_cache: bool,
    ) -> String {
        solve(
            w.clone(),
            cache.clone(),
            build(&uuid::Uuid::new_v4().to_string(), no_cache),
            def,
        )
        .await
        .expect("solve")
    }

    #[tokio::test]
    async fn with_an_image_export_the_result_layers_are_prepared_as_their_steps_finish() {
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let def = copy_then_run("cat /a.txt");
        let graph = kiln_llb::load(&def).expect("load");
        let chain = image_chain(&graph);
        let name = |d: &String| graph.get(d).map(|v| vertex_name(&v.op, &v.metadata));
        let mut names: Vec<_> = chain.keys().filter_map(name).collect();
        names.sort();
        assert_eq!(names, ["copy", "run"], "sources are not new layers");
        let with_export = |id: &str| {
            Arc::new(Build::new(
                &BuildRequest {
                    id: id.into(),
                    exporters: vec![crate::build::ExporterSpec {
                        r#type: "image".into(),
                        attrs: [("compression".to_string(), "zstd".to_string())].into(),
                    }],
                    ..Default::default()
                },
                false,
            ))
        };
        let result = solve(w.clone(), cache.clone(), with_export("b1"), &def)
            .await
            .expect("solve");
        let prepared = || w.layers.lock().expect("lock").clone();
        for _ in 0..100 {
            if prepared().len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = prepared();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(_, spec)| spec == "zstd"), "{got:?}");
        assert!(got.iter().any(|(r, _)| *r == result), "{got:?}");
        // cached steps have their layers already; a build without an image
        // export asks for none
        solve(w.clone(), cache.clone(), with_export("b2"), &def)
            .await
            .expect("solve");
        solve_once(&w, &cache, &copy_then_run("cat /a.txt && true"), false).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(prepared().len(), 2, "{:?}", prepared());
    }

    #[tokio::test]
    async fn copy_stays_cached_when_a_file_it_does_not_read_changes() {
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        w.set("/b.txt", "b");
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let def = copy_then_run("cat /a.txt");
        let first = solve_once(&w, &cache, &def, false).await;
        assert_eq!(w.runs_from(0), ["base", "context", "copy", "run"]);
        w.set("/b.txt", "changed");
        let second = solve_once(&w, &cache, &def, false).await;
        assert_eq!(second, first, "same result ref");
        assert_eq!(
            w.runs()[4..],
            ["context"],
            "only the context is synced again"
        );
        // the content match was linked: the same context again needs no checksum
        let before = w.checksums.load(Ordering::SeqCst);
        solve_once(&w, &cache, &def, false).await;
        assert_eq!(w.checksums.load(Ordering::SeqCst), before);
        // the file the COPY reads changes: COPY and RUN run again
        w.set("/a.txt", "new");
        solve_once(&w, &cache, &def, false).await;
        assert_eq!(w.runs()[6..], ["context", "copy", "run"]);
        // --no-cache runs everything
        solve_once(&w, &cache, &def, true).await;
        assert_eq!(w.runs_from(9), ["base", "context", "copy", "run"]);
    }

    #[tokio::test]
    async fn records_survive_a_restart_and_gone_refs_rerun() {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = tmp.path().join("cache.redb");
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        let def = copy_then_run("true");
        {
            let cache = Arc::new(Cache::new(Arc::new(RedbStore::open(&db).expect("open"))));
            solve_once(&w, &cache, &def, false).await;
        }
        let cache = Arc::new(Cache::new(Arc::new(RedbStore::open(&db).expect("reopen"))));
        solve_once(&w, &cache, &def, false).await;
        assert_eq!(w.runs()[4..], ["context"], "cached across a reopen");
        // the worker lost its snapshots: the steps run again and the stale records go
        w.refs.lock().expect("lock").clear();
        solve_once(&w, &cache, &def, false).await;
        assert_eq!(w.runs_from(5), ["base", "context", "copy", "run"]);
        let records = cache.store().list().expect("list");
        assert_eq!(records.len(), 3, "base, copy, run: {records:?}");
    }

    #[tokio::test]
    async fn identical_steps_of_concurrent_builds_run_once() {
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let def = copy_then_run("sleep 1");
        let (a, b) = tokio::join!(
            solve_once(&w, &cache, &def, false),
            solve_once(&w, &cache, &def, false)
        );
        assert_eq!(a, b);
        let runs = w.runs();
        assert_eq!(runs.iter().filter(|r| *r == "run").count(), 1, "{runs:?}");
        assert_eq!(
            runs.iter().filter(|r| *r == "context").count(),
            2,
            "local sources are per build: {runs:?}"
        );
    }

    #[tokio::test]
    async fn a_cancelled_build_stops_its_steps_unless_shared() {
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let def = copy_then_run("sleep 1");
        // alone: dropping the build stops the RUN
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            solve_once(&w, &cache, &def, false),
        )
        .await;
        assert!(r.is_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(w.cancelled.load(Ordering::SeqCst), 1, "the RUN was stopped");
        // shared: the other build still gets the result
        let w2 = w.clone();
        let c2 = cache.clone();
        let d2 = def.clone();
        let keeper = tokio::spawn(async move { solve_once(&w2, &c2, &d2, false).await });
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            solve_once(&w, &cache, &def, false),
        )
        .await;
        assert!(r.is_err());
        keeper.await.expect("the other build finishes");
        assert_eq!(
            w.cancelled.load(Ordering::SeqCst),
            1,
            "the shared RUN was not stopped"
        );
        assert_eq!(w.runs().iter().filter(|r| *r == "run").count(), 2);
    }

    #[tokio::test]
    async fn explanations_name_the_changed_file_and_pass_it_downstream() {
        let w = Arc::new(FakeWorker::default());
        w.set("/a.txt", "a");
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let def = copy_then_run("cat /a.txt");
        let explaining = || {
            Arc::new(Build::new(
                &BuildRequest {
                    id: uuid::Uuid::new_v4().to_string(),
                    frontend_attrs: [(
                        crate::build::EXPLAIN_CACHE_ATTR.to_string(),
                        "true".to_string(),
                    )]
                    .into(),
                    ..Default::default()
                },
                false,
            ))
        };
        let lines = |b: &Build| -> Vec<String> {
            b.progress
                .logs()
                .iter()
                .map(|l| String::from_utf8_lossy(&l.msg).trim_end().to_string())
                .filter(|l| l.starts_with(EXPLAIN_PREFIX))
                .collect()
        };
        let first = explaining();
        solve(w.clone(), cache.clone(), first.clone(), &def)
            .await
            .expect("solve");
        assert!(
            lines(&first)
                .iter()
                .all(|l| l.ends_with("no earlier run of this step is recorded")),
            "{:?}",
            lines(&first)
        );
        w.set("/a.txt", "changed");
        let second = explaining();
        solve(w.clone(), cache.clone(), second.clone(), &def)
            .await
            .expect("solve");
        // a plain build (no file lists recorded), then an explaining build
        // that is all cached records them, so the next miss names the file
        w.set("/a.txt", "plain");
        solve_once(&w, &cache, &def, false).await;
        let cached = explaining();
        solve(w.clone(), cache.clone(), cached.clone(), &def)
            .await
            .expect("solve");
        assert!(lines(&cached).is_empty(), "{:?}", lines(&cached));
        w.set("/a.txt", "again");
        let third = explaining();
        solve(w.clone(), cache.clone(), third.clone(), &def)
            .await
            .expect("solve");
        assert_eq!(
            lines(&third).first().map(String::as_str),
            Some("explain-cache: file a.txt (context): content changed")
        );
        assert_eq!(
            lines(&second),
            [
                "explain-cache: file a.txt (context): content changed",
                "explain-cache: input \"copy\" changed: file a.txt (context): content changed"
            ]
        );
    }

    #[tokio::test]
    async fn max_parallelism_bounds_running_steps_across_builds() {
        for (limit, want) in [(Some(1), 1), (None, 2)] {
            let w = Arc::new(FakeWorker::default());
            w.set("/a.txt", "a");
            let cache =
                Arc::new(Cache::new(Arc::new(MemoryStore::default())).with_parallelism(limit));
            let (d1, d2) = (copy_then_run("sleep 1"), copy_then_run("sleep 2"));
            tokio::join!(
                solve_once(&w, &cache, &d1, false),
                solve_once(&w, &cache, &d2, false)
            );
            assert_eq!(w.runs().iter().filter(|r| *r == "run").count(), 2);
            assert_eq!(
                w.max_running.load(Ordering::SeqCst),
                want,
                "limit {limit:?}"
            );
        }
    }

    #[test]
    fn selectors_cover_copy_sources_and_read_only_bind_mounts() {
        let def = copy_then_run("true");
        let g = kiln_llb::load(&def).expect("load");
        let copy = g
            .vertices
            .iter()
            .find(|v| matches!(v.op.op, Some(OpKind::File(_))))
            .expect("copy");
        let sels = input_selectors(&copy.op);
        assert_eq!(sels.len(), 2);
        assert!(sels[0].is_none(), "the destination is read whole");
        assert_eq!(sels[1].as_ref().map(|s| s[0].path.as_str()), Some("/a.txt"));
        let exec = pb::Op {
            inputs: vec![pb::Input::default(), pb::Input::default()],
            op: Some(OpKind::Exec(pb::ExecOp {
                mounts: vec![
                    pb::Mount {
                        input: 0,
                        dest: "/".into(),
                        output: 0,
                        ..Default::default()
                    },
                    pb::Mount {
                        input: 1,
                        dest: "/src".into(),
                        selector: "/app".into(),
                        readonly: true,
                        output: -1,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })),
            ..Default::default()
        };
        let sels = input_selectors(&exec);
        assert!(sels[0].is_none());
        assert_eq!(sels[1].as_ref().map(|s| s[0].path.as_str()), Some("/app"));
    }

    #[test]
    fn proxy_settings_are_not_part_of_a_steps_definition_key() {
        let exec = |proxy: Option<&str>| pb::Op {
            op: Some(OpKind::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
                    proxy_env: proxy.map(|p| pb::ProxyEnv {
                        http_proxy: p.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let base = definition_key(&exec(None));
        assert_eq!(base, definition_key(&exec(Some("http://a:1"))));
        assert_eq!(base, definition_key(&exec(Some("http://b:2"))));
        let mut other = exec(None);
        if let Some(OpKind::Exec(e)) = &mut other.op {
            e.meta.as_mut().expect("meta").args[2] = "false".into();
        }
        assert_ne!(base, definition_key(&other), "the command still counts");
    }

    #[test]
    fn snippets_clamp_the_clients_ranges() {
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
        let ok = source_snippet(&source(3, 3, 5), "v").expect("snippet");
        assert!(ok.starts_with("Dockerfile:3\n"), "{ok}");
        assert!(ok.contains("   3 | >>> line 3"), "{ok}");
        assert!(ok.contains("   5 |     line 5"), "{ok}");
        // whole-file and past-the-end ranges show a bounded number of lines
        let long = source_snippet(&source(1, i32::MAX, 100_000), "v").expect("snippet");
        assert!(long.lines().count() < 20, "{long}");
        assert!(long.contains("more lines"), "{long}");
        for (start, end) in [(i32::MIN, i32::MAX), (i32::MAX, i32::MIN), (0, 0), (-5, 2)] {
            assert!(source_snippet(&source(start, end, 5), "v").is_none());
        }
        assert!(source_snippet(&source(6, 9, 5), "v").is_none());
        assert!(source_snippet(&source(5, i32::MAX, 5), "v").is_some());
    }
}
