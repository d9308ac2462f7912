//! Running an LLB graph: every vertex once, each as soon as its inputs are
//! done (so independent vertices run in parallel), results reused by cache
//! key.
//!
//! A vertex's cache key is the digest of its op bytes combined with the
//! cache keys of the input outputs it reads. Outputs whose content the
//! definition does not determine (local sources) are keyed by the content
//! digest the worker reports.

use crate::build::Build;
use crate::peer::{RunEvent, RunOp, RunOutputs, Worker};
use crate::progress::now;
use crate::Error;
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_proto::moby::buildkit::v1::Vertex as ProgressVertex;
use kiln_proto::pb::{self, op::Op as OpKind};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Results of vertices that ran before, by cache key.
#[derive(Default)]
pub struct ResultCache {
    entries: Mutex<HashMap<String, Arc<Done>>>,
}

impl ResultCache {
    fn get(&self, key: &str) -> Option<Arc<Done>> {
        self.entries.lock().ok().and_then(|m| m.get(key).cloned())
    }
    fn put(&self, key: String, d: Arc<Done>) {
        if let Ok(mut m) = self.entries.lock() {
            m.insert(key, d);
        }
    }
}

/// A finished vertex: the worker refs of its outputs and one cache key per
/// output.
#[derive(Debug)]
pub struct Done {
    pub outputs: RunOutputs,
    pub keys: Vec<String>,
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
        Error::Vertex { name: f.name, message: f.message, code: f.code, snippet: f.snippet }
    }
}

/// The source lines a vertex came from, BuildKit style:
/// `Dockerfile:4`, a rule, the lines around it with `>>>` marking the
/// vertex's lines, a rule.
pub fn source_snippet(graph: &kiln_llb::Graph, digest: &str) -> Option<String> {
    let source = graph.source.as_ref()?;
    let loc = graph.locations(digest).first()?;
    let info = source.infos.get(usize::try_from(loc.source_index).ok()?)?;
    let range = loc.ranges.first()?;
    let (start, end) = (range.start.as_ref()?.line, range.end.as_ref().map(|p| p.line).unwrap_or(0));
    let end = end.max(start);
    let text = String::from_utf8_lossy(&info.data);
    let lines: Vec<&str> = text.lines().collect();
    let first = (start - 2).max(1);
    let last = (end + 2).min(lines.len() as i32);
    let mut out = format!("{}:{}\n--------------------\n", info.filename, if start == end { start.to_string() } else { format!("{start}-{end}") });
    for n in first..=last {
        let line = lines.get((n - 1) as usize).copied().unwrap_or("");
        let mark = if n >= start && n <= end { ">>>" } else { "   " };
        out.push_str(&format!(" {n:>3} | {mark} {line}\n"));
    }
    out.push_str("--------------------");
    Some(out)
}

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
        Some(OpKind::Exec(e)) => e.meta.as_ref().map(|m| m.args.join(" ")).unwrap_or_default(),
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
    if let Some(OpKind::Source(s)) = &mut op.op {
        for k in ["local.session", "local.unique", "local.sharedkeyhint"] {
            s.attrs.remove(k);
        }
    }
    sha(&[&hex_encode(&op.encode_to_vec())])
}

fn is_local_source(op: &pb::Op) -> bool {
    matches!(&op.op, Some(OpKind::Source(s)) if s.identifier.starts_with("local://"))
}

/// Solves `def` for `build` and returns the worker ref of its result
/// (empty for scratch).
pub async fn solve<W: Worker>(
    worker: Arc<W>,
    cache: Arc<ResultCache>,
    build: Arc<Build>,
    def: &pb::Definition,
) -> Result<String, Error> {
    let graph = kiln_llb::load(def)?;
    let Some(result) = graph.result.clone() else {
        return Ok(String::new());
    };
    let mut futs: HashMap<String, VertexFuture> = HashMap::new();
    let snippets: HashMap<String, String> = graph
        .vertices
        .iter()
        .filter_map(|v| source_snippet(&graph, &v.digest).map(|s| (v.digest.clone(), s)))
        .collect();
    for v in graph.vertices {
        let snippet = snippets.get(&v.digest).cloned();
        let inputs: Vec<(VertexFuture, i64)> = v
            .op
            .inputs
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
        let fut = async move {
            let name = vertex_name(&v.op, &v.metadata);
            let mut done_inputs = Vec::new();
            for r in futures::future::join_all(inputs.iter().map(|(f, idx)| {
                let f = f.clone();
                let idx = *idx;
                async move { f.await.map(|d| d.output(idx)) }
            }))
            .await
            {
                done_inputs.push(r?);
            }
            let input_digests: Vec<String> = v.op.inputs.iter().map(|i| i.digest.clone()).collect();
            let def_key = definition_key(&v.op);
            let mut parts: Vec<&str> = vec![def_key.as_str()];
            for (_, key) in &done_inputs {
                parts.push(key.as_str());
            }
            let key = sha(&parts);
            let cacheable = !v.metadata.ignore_cache && !build.no_cache && !is_local_source(&v.op);
            let started = now();
            let mut pv = ProgressVertex {
                digest: v.digest.clone(),
                inputs: input_digests,
                name: name.clone(),
                started: Some(started),
                ..Default::default()
            };
            if cacheable {
                if let Some(hit) = cache.get(&key) {
                    pv.cached = true;
                    pv.completed = Some(now());
                    build.progress.vertex(pv);
                    return Ok(hit);
                }
            }
            build.progress.vertex(pv.clone());
            let progress_build = build.clone();
            let vdigest = v.digest.clone();
            let events: Arc<dyn Fn(RunEvent) + Send + Sync> = Arc::new(move |e| match e {
                RunEvent::Log { stream, data } => progress_build.progress.log(&vdigest, stream, data),
            });
            let run = worker
                .run(
                    RunOp {
                        build_id: build.id.clone(),
                        session_id: build.session_id.clone(),
                        digest: v.digest.clone(),
                        op_bytes: v.bytes.clone(),
                        inputs: done_inputs.iter().map(|(r, _)| r.clone()).collect(),
                        name: name.clone(),
                    },
                    events,
                )
                .await;
            pv.completed = Some(now());
            let outputs = match run {
                Ok(o) => o,
                Err(e) => {
                    let (message, code) = match &e {
                        Error::Vertex { message, code, .. } => (message.clone(), *code),
                        other => (other.to_string(), tonic::Code::Unknown),
                    };
                    pv.error = message.clone();
                    build.progress.vertex(pv);
                    return Err(Failure { name, message, code, snippet });
                }
            };
            build.progress.vertex(pv);
            let keys: Vec<String> = (0..outputs.refs.len())
                .map(|i| match outputs.content_keys.get(i).filter(|k| !k.is_empty()) {
                    Some(ck) => sha(&[def_key.as_str(), ck.as_str()]),
                    // content unknown: nothing downstream may be reused
                    None if is_local_source(&v.op) => sha(&[&uuid::Uuid::new_v4().to_string()]),
                    None => sha(&[key.as_str(), &i.to_string()]),
                })
                .collect();
            let done = Arc::new(Done { outputs, keys });
            if !v.metadata.ignore_cache {
                cache.put(key, done.clone());
            }
            Ok(done)
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
