//! Solving an LLB graph: every vertex the result needs runs once, each as
//! soon as its inputs are done (so independent vertices run in parallel),
//! each in a task of its own; see [`crate::step`] for one vertex and
//! [`crate::cache`] for the keys that let results be reused.

use crate::Error;
use crate::build::Build;
use crate::cache::key::{definition_key, digest_of};
use crate::inflight::Joined;
use crate::peer::Worker;
use crate::progress::now;
use crate::remote::plan as remote;
use crate::step::{Done, Failure, Step, is_git_source, is_local_source, is_oci_layout_source};
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb::{self, op::Op as OpKind};
use kiln_proto::status::Details;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::Instrument as _;

// fuzz/ reaches these through `solve`
pub use crate::cache::Cache;
pub use crate::cache::key::input_selectors;
pub use crate::step::{EXPLAIN_PREFIX, source_location, vertex_name};

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

/// Tasks aborted when the solve or call that spawned them ends or is dropped.
#[derive(Default)]
pub(crate) struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl AbortOnDrop {
    /// Aborts `task` when dropped.
    pub(crate) fn new(task: tokio::task::AbortHandle) -> Self {
        AbortOnDrop(vec![task])
    }

    pub(crate) fn push(&mut self, task: tokio::task::AbortHandle) {
        self.0.push(task);
    }
}

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

/// A step's name as the steps after it name their inputs, and whether it is
/// a local source.
#[derive(Clone, Default)]
struct Label {
    name: String,
    local: bool,
}

/// Where an input of a step came from (cache-miss explanations).
#[derive(Clone, Debug, Default)]
pub(crate) struct InputOrigin {
    /// the name of the step that produced it
    pub(crate) step: String,
    /// that step is a local source (its files are listed, not its definition)
    pub(crate) local: bool,
    /// that step's first reason for running in this build (none: cached)
    pub(crate) why: Option<String>,
}

/// A vertex's output, once its task is done.
type VertexFuture = Shared<BoxFuture<'static, Result<Arc<Done>, Failure>>>;

/// What the vertex tasks of one solve share.
struct GraphRun<W> {
    worker: Arc<W>,
    cache: Arc<Cache>,
    build: Arc<Build>,
    /// with an image export: the vertices whose output (the index) is a
    /// layer of the result, computed as soon as its step has run
    eager: HashMap<String, i64>,
    /// the definition's source map (snippets are made for the step that
    /// fails, not ahead for every step)
    source: Option<pb::Source>,
    labels: HashMap<String, Label>,
    /// each vertex's identity across builds (see [`crate::explain::shape`])
    shapes: HashMap<String, String>,
    /// the build's remote cache, when it imports or exports one
    remote: Option<Arc<crate::remote::Remote>>,
    remote_outs: remote::Outs,
}

/// Solves `def` for `build` and returns the worker ref of its result
/// (empty for scratch).
pub async fn solve<W: Worker>(
    worker: Arc<W>,
    cache: Arc<Cache>,
    build: Arc<Build>,
    def: &pb::Definition,
) -> Result<String, Error> {
    match solve_unloaded(worker, cache, build, def).await? {
        SolvedTop::Ref(r) => Ok(r),
        SolvedTop::Imported { load, .. } => load.await.map_err(Error::from),
    }
}

/// A solved result: a worker ref, or an imported result not loaded yet.
pub(crate) enum SolvedTop {
    Ref(String),
    Imported {
        hit: remote::Hit,
        load: crate::step::Lazy,
    },
}

/// Like [`solve`], but a result found in an imported cache is returned
/// unloaded (an image push can mount its layers without pulling them).
pub(crate) async fn solve_unloaded<W: Worker>(
    worker: Arc<W>,
    cache: Arc<Cache>,
    build: Arc<Build>,
    def: &pb::Definition,
) -> Result<SolvedTop, Error> {
    let graph = kiln_llb::load(def)?;
    let Some(result) = graph.result.clone() else {
        return Ok(SolvedTop::Ref(String::new()));
    };
    check_local_sessions(&graph, &build)?;
    let needed = reachable(&graph, &result.digest);
    let remote = build.remote.wait().await.clone();
    let run = Arc::new(GraphRun::new(worker, cache, build, remote, &graph));
    // only what the result needs runs; each vertex is a task of its own that awaits
    // its inputs' tasks, so no poll or drop nests deeper than one level however long
    // the chain (a 100,000-op chain would otherwise overflow the stack)
    let mut tasks = AbortOnDrop::default();
    let mut futs: HashMap<String, VertexFuture> = HashMap::new();
    for v in graph.vertices {
        if !needed.contains(&v.digest) {
            continue;
        }
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
        let digest = v.digest.clone();
        let task = tokio::spawn(run.clone().vertex(v, inputs).in_current_span());
        tasks.push(task.abort_handle());
        let fut = async move {
            task.await
                .unwrap_or_else(|e| Err(Failure::task_ended("step task", &e)))
        };
        futs.insert(digest, fut.boxed().shared());
    }
    let fut = futs
        .get(&result.digest)
        .cloned()
        .ok_or_else(|| Error::MissingVertex(result.digest.clone()))?;
    drop(futs);
    let done = fut.await.map_err(Error::from)?;
    if let Some(r) = &run.remote
        && let Some(node) = run.remote_outs.lock().ok().and_then(|o| {
            o.get(&(result.digest.clone(), result.index))
                .and_then(|x| x.node)
        })
        && let Ok(mut tops) = r.tops.lock()
    {
        tops.push(node);
    }
    let out = done.output(result.index);
    match (out.lazy.clone(), done.imported.clone()) {
        (Some(load), Some(hit)) if result.index == 0 => Ok(SolvedTop::Imported { hit, load }),
        _ => out.resolve().await.map(SolvedTop::Ref).map_err(Error::from),
    }
}

/// The LLB names the session a local source syncs from (or an OCI layout
/// source reads from): only this build's own; and no source loads an imported cache (only the solver makes those).
fn check_local_sessions(graph: &kiln_llb::Graph, build: &Build) -> Result<(), Error> {
    for v in &graph.vertices {
        if let Some(OpKind::Source(s)) = &v.op.op
            && s.identifier.starts_with(remote::INTERNAL_PREFIX)
        {
            return Err(Error::CacheSource(s.identifier.clone()));
        }
        // an OCI layout is read from a session's content store too
        let attr = if is_local_source(&v.op) {
            "local.session"
        } else {
            kiln_session::ocilayout::ATTR_SESSION
        };
        if let Some(OpKind::Source(s)) = &v.op.op
            && (is_local_source(&v.op) || s.identifier.starts_with(kiln_session::ocilayout::SCHEME))
            && let Some(session) = s.attrs.get(attr)
            && !session.is_empty()
            && *session != build.session_id
        {
            return Err(Error::ForeignSession {
                name: s.identifier.clone(),
                session: session.clone(),
            });
        }
    }
    Ok(())
}

impl<W: Worker> GraphRun<W> {
    fn new(
        worker: Arc<W>,
        cache: Arc<Cache>,
        build: Arc<Build>,
        remote: Option<Arc<crate::remote::Remote>>,
        graph: &kiln_llb::Graph,
    ) -> Self {
        let labels: HashMap<String, Label> = graph
            .vertices
            .iter()
            .map(|v| {
                let local = is_local_source(&v.op);
                // a local source is named by its local dir ("context")
                let name = match &v.op.op {
                    Some(OpKind::Source(s)) if local => {
                        s.identifier.trim_start_matches("local://").to_string()
                    }
                    _ => vertex_name(&v.op, &v.metadata),
                };
                (v.digest.clone(), Label { name, local })
            })
            .collect();
        let scope = build.scope();
        let shapes = graph
            .vertices
            .iter()
            .map(|v| {
                let name = labels.get(&v.digest).map(|l| l.name.as_str()).unwrap_or("");
                let shape = crate::explain::shape(&scope, graph, &v.digest, &v.op, name);
                (v.digest.clone(), shape)
            })
            .collect();
        let eager = match build.eager_layers {
            Some(_) => image_chain(graph),
            None => HashMap::new(),
        };
        GraphRun {
            worker,
            cache,
            remote,
            remote_outs: remote::Outs::default(),
            build,
            eager,
            source: graph.source.clone(),
            labels,
            shapes,
        }
    }

    /// One vertex, once its inputs are done: looked up or run (shared with
    /// concurrent builds that need the same key), shown in the build's
    /// progress, and on failure named with the source lines it came from.
    async fn vertex(
        self: Arc<Self>,
        v: kiln_llb::Vertex,
        inputs: Vec<(VertexFuture, i64)>,
    ) -> Result<Arc<Done>, Failure> {
        let name = vertex_name(&v.op, &v.metadata);
        // the step's span in the build's trace (made only while traces are exported)
        let span = tracing::info_span!(
            target: "kiln_trace",
            "step",
            otel.name = %name,
            kiln.vertex.digest = %v.digest,
            kiln.vertex.name = %name,
            kiln.cached = tracing::field::Empty,
            kiln.worker = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        let (step, plan) = self
            .step(&v, name.clone(), inputs)
            .instrument(span.clone())
            .await?;
        let mut pv = step.pv.clone();
        // identical vertices of concurrent builds run once; vertices
        // that must not be shared run in this build's own task, and so do
        // steps this build's imports know (another build must not take an
        // imported result for its own)
        let key = if step.lookup && step.remote_hit.is_none() {
            step.key.clone()
        } else {
            format!("unshared:{}", uuid::Uuid::new_v4())
        };
        let exec_span = span.clone();
        let home = self.worker.home_id();
        let Joined { flight, leader } = self
            .cache
            .join(&key, move || step.execute().instrument(exec_span).boxed());
        let res = flight.fut.clone().instrument(span.clone()).await;
        pv.completed = Some(now());
        match res {
            Ok(o) => {
                span.record("kiln.cached", o.cached);
                span.record("kiln.worker", step_worker(&o.done, home.as_deref()));
                // a build that joined a running step shows it as it ran,
                // as BuildKit shows a vertex shared by several builds
                pv.cached = o.cached;
                self.build.progress.vertex(pv);
                if leader && !o.cached {
                    self.prepare_layers(&v.digest, &o.done);
                }
                if let (Some(r), Some(plan)) = (&self.remote, &plan) {
                    let lazy = o.done.lazy.clone();
                    remote::record(
                        r,
                        &self.remote_outs,
                        &v.digest,
                        plan,
                        &o.done.outputs.refs,
                        lazy,
                    );
                }
                Ok(o.done)
            }
            Err(mut f) => {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_message", f.message.as_str());
                pv.error = f.message.clone();
                self.build.progress.vertex(pv);
                f.name = name;
                f.details = Details {
                    vertex: Some(v.digest.clone()),
                    sources: self
                        .source
                        .as_ref()
                        .and_then(|s| source_location(s, &v.digest))
                        .into_iter()
                        .collect(),
                };
                Err(f)
            }
        }
    }

    /// The step of `v` once its inputs are done, with its cache key.
    async fn step(
        &self,
        v: &kiln_llb::Vertex,
        name: String,
        inputs: Vec<(VertexFuture, i64)>,
    ) -> Result<(Step<W>, Option<remote::Plan>), Failure> {
        let outputs = futures::future::join_all(inputs.into_iter().map(|(f, idx)| async move {
            f.await.map(|d| (d.output(idx), d.why.first().cloned()))
        }))
        .await;
        let mut done_inputs = Vec::new();
        let mut input_from = Vec::new();
        for (r, i) in outputs.into_iter().zip(&v.op.inputs) {
            let (out, why) = r?;
            done_inputs.push(out);
            let label = self.labels.get(&i.digest).cloned().unwrap_or_default();
            input_from.push(InputOrigin {
                step: label.name,
                local: label.local,
                why,
            });
        }
        let def_key = definition_key(&v.op);
        let mut parts: Vec<&str> = vec![def_key.as_str()];
        parts.extend(done_inputs.iter().map(|i| i.key.as_str()));
        let key = digest_of(&parts);
        let local = is_local_source(&v.op);
        if let Some(r) = &self.remote
            && let Ok(mut ids) = r.cache_mounts.lock()
        {
            ids.extend(remote::cache_mount_ids(&v.op));
        }
        let plan = match &self.remote {
            Some(r) => {
                let (w, c) = (self.worker.as_ref(), self.cache.as_ref());
                remote::plan(r, &self.remote_outs, w, c, &v.op, &done_inputs).await
            }
            None => None,
        };
        let remote_hit = match (&self.remote, &plan) {
            (Some(r), Some(p)) => remote::matched(r, &v.op, p),
            _ => None,
        };
        let pv = ProgressVertex {
            digest: v.digest.clone(),
            inputs: v.op.inputs.iter().map(|i| i.digest.clone()).collect(),
            name: name.clone(),
            started: Some(now()),
            ..Default::default()
        };
        Ok((
            Step {
                worker: self.worker.clone(),
                cache: self.cache.clone(),
                build: self.build.clone(),
                digest: v.digest.clone(),
                op: v.op.clone(),
                op_bytes: v.bytes.clone(),
                name,
                ignore_cache: v.metadata.ignore_cache,
                lookup: !v.metadata.ignore_cache
                    && !self.build.no_cache
                    && !local
                    && !is_git_source(&v.op)
                    && !is_oci_layout_source(&v.op),
                inputs: done_inputs,
                def_key,
                key,
                pv,
                shape: self.shapes.get(&v.digest).cloned().unwrap_or_default(),
                input_from,
                remote_hit,
            },
            plan,
        ))
    }

    /// With an image export, the layer a step that ran makes is computed
    /// now, alongside the steps after it. Best effort and not tied to this
    /// solve: the export, after it, is what uses the layer.
    fn prepare_layers(&self, digest: &str, done: &Done) {
        let (Some(index), Some(options)) = (self.eager.get(digest), &self.build.eager_layers)
        else {
            return;
        };
        let r = done.output(*index).r#ref;
        if r.is_empty() {
            return;
        }
        let (worker, options) = (self.worker.clone(), *options);
        tokio::spawn(async move {
            if let Err(e) = worker.prepare_layers(&r, &options).await {
                tracing::debug!(error = %kiln_proto::status::Chain(&e), "layers ahead of the export");
            }
        });
    }
}

/// The worker holding a step's result: where it ran, else where its first
/// output is (the home worker's refs are bare).
fn step_worker(done: &Done, home: Option<&str>) -> String {
    if !done.outputs.worker.is_empty() {
        return done.outputs.worker.clone();
    }
    let on = done
        .outputs
        .refs
        .iter()
        .find(|r| !r.is_empty())
        .map(|r| crate::farm::split_ref(r).0);
    match on {
        Some(Some(w)) => w.to_string(),
        _ => home.unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::BuildRequest;
    use crate::cache::key::input_selectors;
    use crate::cache::{MemoryStore, RedbStore};
    use crate::peer::{RunEvent, RunOp, RunOutputs, Selector};
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;
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
                ..Default::default()
            })
        }
        async fn checksum(&self, _r: &str, selectors: &[Selector]) -> Result<String, Error> {
            self.checksums.fetch_add(1, Ordering::SeqCst);
            let files = self.files.lock().expect("lock");
            let parts: Vec<String> = selectors
                .iter()
                .map(|s| format!("{}={:?}", s.path, files.get(&s.path)))
                .collect();
            Ok(digest_of(
                &parts.iter().map(String::as_str).collect::<Vec<_>>(),
            ))
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
        async fn prepare_layers(
            &self,
            r: &str,
            options: &kiln_oci::LayerOptions,
        ) -> Result<(), Error> {
            self.layers
                .lock()
                .expect("lock")
                .push((r.to_string(), options.spec()));
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
        let exec = kiln_llb::exec_op(
            copied,
            pb::Meta {
                args: vec!["sh".into(), "-c".into(), cmd.into()],
                cwd: "/".into(),
                ..Default::default()
            },
        );
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
    async fn a_client_cannot_name_the_source_that_loads_imported_layers() {
        let w = Arc::new(FakeWorker::default());
        let cache = Arc::new(Cache::new(Arc::new(MemoryStore::default())));
        let mut b = kiln_llb::DefinitionBuilder::new();
        let src = source(&mut b, "kiln-cache://registry.example/cache", "evil");
        let def = b.finish(Some(src));
        let err = solve(w.clone(), cache, build("evil", false), &def)
            .await
            .expect_err("refused");
        assert!(matches!(err, Error::CacheSource(_)), "{err}");
        assert!(w.runs().is_empty(), "nothing ran");
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
}
