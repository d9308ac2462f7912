//! Where one vertex of a solve enters the build's remote cache: the links
//! of its records (for export), the imported records it matches (for
//! lookups), and the op that loads an imported result instead of running.

use super::Remote;
use super::graph::{InputMatch, Link, ROOT_SELECTOR, matches};
use super::keys::{self, CacheMap};
use crate::cache::Cache;
use crate::peer::{Selector, Worker};
use crate::step::{Lazy, Output};
use kiln_proto::pb::{self, op::Op as OpKind};
use prost::Message as _;
use std::collections::HashMap;
use std::sync::Mutex;

pub use kiln_oci::cache_config::MOUNT_ID_ANNOTATION;
pub use kiln_oci::cache_config::sources::{
    CACHE_LAYERS_ATTR, CACHE_SCHEME, INTERNAL_PREFIX, MOUNT_EXPORT_SCHEME, MOUNT_IMPORT_SCHEME,
    MOUNT_REPOSITORY_ATTR,
};
/// The repository of an import from a client's directory (not a registry).
pub use kiln_session::content::LOCAL_PREFIX as LOCAL_STORE_PREFIX;

/// The cache mounts `op` uses that are keyed by id alone (not seeded from
/// an input).
pub fn cache_mount_ids(op: &pb::Op) -> Vec<String> {
    let Some(OpKind::Exec(e)) = &op.op else {
        return Vec::new();
    };
    e.mounts
        .iter()
        .filter(|m| m.mount_type == pb::MountType::Cache as i32 && m.input < 0)
        .map(
            |m| match m.cache_opt.as_ref().filter(|c| !c.id.is_empty()) {
                Some(c) => c.id.clone(),
                None => m.dest.clone(),
            },
        )
        .collect()
}

/// A source op only kiln makes.
pub fn internal_op(
    identifier: String,
    attrs: std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    pb::Op {
        op: Some(OpKind::Source(pb::SourceOp { identifier, attrs })),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A vertex output's place in the remote cache.
#[derive(Debug, Clone, Default)]
pub struct Out {
    /// its record in the build's graph (none: an input had no key)
    pub node: Option<usize>,
    /// the imported records it matched: (import, record)
    pub matched: Vec<(usize, usize)>,
}

/// The outputs of a solve's vertices, by (vertex digest, output index).
pub type Outs = Mutex<HashMap<(String, i64), Out>>;

/// How a vertex enters the remote cache, once its inputs are done.
#[derive(Debug, Clone)]
pub struct Plan {
    cm: CacheMap,
    /// per input, the records it may come from (none: an input has none)
    links: Option<Vec<Vec<Link>>>,
    inputs: Vec<InputMatch>,
}

/// An imported result a step loads instead of running.
#[derive(Debug, Clone)]
pub struct Hit {
    pub repository: String,
    pub layers: Vec<kiln_oci::Descriptor>,
}

/// The plan of `op` whose inputs are `inputs` (`None`: it has no key).
pub(crate) async fn plan<W: Worker>(
    remote: &Remote,
    outs: &Outs,
    worker: &W,
    cache: &Cache,
    op: &pb::Op,
    inputs: &[Output],
) -> Option<Plan> {
    let cm = keys::cache_map(op)?;
    let mut links = Some(Vec::with_capacity(inputs.len()));
    let mut matched = Vec::with_capacity(inputs.len());
    for (i, (inp, out)) in op.inputs.iter().zip(inputs).enumerate() {
        let dep = cm.deps.get(i).cloned().unwrap_or_default();
        let producer = outs
            .lock()
            .ok()
            .and_then(|o| o.get(&(inp.digest.clone(), inp.index)).cloned())
            .unwrap_or_default();
        let content = match &dep.content {
            Some(sels) if !out.r#ref.is_empty() && out.lazy.is_none() => {
                checksum(worker, cache, &out.r#ref, sels)
                    .await
                    .map(|c| keys::content_record(&c))
            }
            _ => None,
        };
        let mut l = Vec::new();
        if let Some(p) = producer.node {
            l.push(Link {
                selector: dep.selector.clone(),
                node: p,
            });
            if dep.selector == ROOT_SELECTOR {
                // BuildKit before v0.13 looks the whole input up with no selector
                l.push(Link {
                    selector: String::new(),
                    node: p,
                });
            }
        }
        if let Some(c) = &content
            && let Ok(mut g) = remote.graph.lock()
        {
            let node = g.add(c.clone(), Vec::new());
            l.push(Link {
                selector: String::new(),
                node,
            });
        }
        match (&mut links, l.is_empty()) {
            (Some(ls), false) => ls.push(l),
            _ => links = None,
        }
        matched.push(InputMatch {
            selector: dep.selector,
            matched: producer.matched,
            content,
        });
    }
    Some(Plan {
        cm,
        links,
        inputs: matched,
    })
}

async fn checksum<W: Worker>(
    worker: &W,
    cache: &Cache,
    r: &str,
    sels: &[Selector],
) -> Option<String> {
    if let Some(d) = cache.memo(r, sels) {
        return Some(d);
    }
    match worker.checksum(r, sels).await {
        Ok(d) => {
            cache.remember(r, sels, &d);
            Some(d)
        }
        Err(e) => {
            tracing::debug!(error = %kiln_proto::status::Chain(&e), "content of an input not keyed for the remote cache");
            None
        }
    }
}

/// How many outputs `op` has (`None`: a build op, never deferred). Of the
/// sources only pinned images have keys, so only they are matched: a base
/// image an import knows is pulled only if a step that runs reads it.
fn outputs(op: &pb::Op) -> Option<usize> {
    match op.op.as_ref()? {
        OpKind::Exec(e) => Some(e.mounts.iter().filter(|m| m.output >= 0).count()),
        OpKind::File(f) => Some(f.actions.iter().filter(|a| a.output >= 0).count()),
        OpKind::Merge(_) | OpKind::Diff(_) | OpKind::Source(_) => Some(1),
        _ => None,
    }
}

/// What an imported cache knows of a step.
#[derive(Debug, Clone)]
pub enum Matched {
    /// its result, to load instead of running it
    Result(Hit),
    /// its key only: it runs if something reads its result (a later step
    /// may be found with a result and make it unneeded)
    Key,
}

/// What the imported caches know of `op` (with one output) whose inputs
/// are `plan`'s.
pub(crate) fn matched(remote: &Remote, op: &pb::Op, plan: &Plan) -> Option<Matched> {
    if outputs(op) != Some(1) {
        return None;
    }
    let found = matches(&remote.imports, &plan.cm, 0, &plan.inputs);
    if found.is_empty() {
        return None;
    }
    let hit = found.into_iter().find_map(|(k, r)| {
        let imp = remote.imports.get(k)?;
        let layers = imp.result(r).filter(|l| !l.is_empty())?;
        Some(Hit {
            repository: imp.repo.clone(),
            layers,
        })
    });
    Some(hit.map_or(Matched::Key, Matched::Result))
}

/// Records the outputs of a finished vertex (`refs`, by output index) in
/// the build's graph and in `outs`; an imported result not loaded yet
/// (`lazy`, output 0) is loaded only if an export wants it.
pub(crate) fn record(
    remote: &Remote,
    outs: &Outs,
    digest: &str,
    plan: &Plan,
    refs: &[String],
    lazy: Option<Lazy>,
) {
    let now = crate::cache::unix_nanos();
    for (i, r) in refs.iter().enumerate() {
        let output = i as i64;
        let node = plan.links.as_ref().and_then(|links| {
            let mut g = remote.graph.lock().ok()?;
            let n = g.add(keys::root_key(&plan.cm.digest, output), links.clone());
            g.set_result(n, r, now);
            Some(n)
        });
        if let (Some(n), Some(l), 0) = (node, &lazy, i)
            && let Ok(mut m) = remote.lazy.lock()
        {
            m.insert(n, l.clone());
        }
        let matched = matches(&remote.imports, &plan.cm, output, &plan.inputs);
        tracing::debug!(
            vertex = digest,
            output,
            record = %keys::root_key(&plan.cm.digest, output),
            links = ?plan.links,
            matched = matched.len(),
            "remote cache record"
        );
        if let Ok(mut o) = outs.lock() {
            o.insert((digest.to_string(), output), Out { node, matched });
        }
    }
}

/// The op a worker runs to load `hit` for a step of `platform`.
pub fn load_op(hit: &Hit, platform: Option<pb::Platform>) -> Vec<u8> {
    let layers = serde_json::to_string(&hit.layers).unwrap_or_default();
    pb::Op {
        op: Some(OpKind::Source(pb::SourceOp {
            identifier: format!("{CACHE_SCHEME}{}", hit.repository),
            attrs: [(CACHE_LAYERS_ATTR.to_string(), layers)].into(),
        })),
        platform,
        ..Default::default()
    }
    .encode_to_vec()
}
