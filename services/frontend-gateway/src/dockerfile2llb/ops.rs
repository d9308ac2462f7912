//! The op arena: ops are recorded as they are dispatched, with inputs naming
//! other arena entries, and marshalled at the end in BuildKit's order
//! (depth-first post-order from the result), so stages that are never used
//! emit nothing and the build context source can carry the follow-paths of
//! every COPY.

use std::collections::{BTreeMap, BTreeSet};

use kiln_llb::{DefinitionBuilder, pb};

/// A handle on an op recorded in [`Ops`]; its output 0 is the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OpId(usize);

/// The Dockerfile lines (1-based, inclusive) an op comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lines {
    pub start: usize,
    pub end: usize,
}

impl Lines {
    /// The lines as a source map range (whole lines: character 0).
    pub(crate) fn range(self) -> pb::Range {
        let position = |line: usize| pb::Position {
            line: i32::try_from(line).unwrap_or(i32::MAX),
            character: 0,
        };
        pb::Range {
            start: Some(position(self.start)),
            end: Some(position(self.end)),
        }
    }

    pub(crate) fn one(line: usize) -> Lines {
        Lines {
            start: line,
            end: line,
        }
    }

    /// The lines of an instruction, continuations and heredocs included.
    pub(crate) fn of(cmd: &kiln_dockerfile::Command) -> Lines {
        Lines {
            start: cmd.location.start_line,
            end: cmd.location.end_line,
        }
    }
}

#[derive(Debug)]
enum Kind {
    Op(Box<pb::Op>),
    /// The main build context (`local://context`), built in [`Ops::finish`].
    Context,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    inputs: Vec<OpId>,
    metadata: pb::OpMetadata,
    lines: Option<Lines>,
}

/// What a local source (the build context, or a named `local:` context)
/// needs to know.
pub(crate) struct ContextSource {
    pub session_id: String,
    /// Paths (absolute, from COPY/ADD sources) the build reads from the context.
    pub paths: BTreeSet<String>,
    /// `.dockerignore` patterns (`local.excludepatterns`).
    pub excludes: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Ops {
    nodes: Vec<Node>,
    context: Option<OpId>,
}

/// Metadata with a description map and caps.
pub(crate) fn metadata(description: &[(&str, &str)], caps: &[&str]) -> pb::OpMetadata {
    pb::OpMetadata {
        description: description
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        caps: caps.iter().map(|c| (c.to_string(), true)).collect(),
        ..Default::default()
    }
}

/// A SourceOp reading `identifier` (`docker-image://…`, `local://…`, a git or http URL).
pub(crate) fn source_op(identifier: String, attrs: BTreeMap<String, String>) -> pb::Op {
    pb::Op {
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
        ..Default::default()
    }
}

/// A FileOp running `actions` in order.
pub(crate) fn file_op(actions: Vec<pb::FileAction>) -> pb::Op {
    pb::Op {
        constraints: Some(pb::WorkerConstraints::default()),
        op: Some(pb::op::Op::File(pb::FileOp { actions })),
        ..Default::default()
    }
}

/// An inline document (a heredoc) made as the file `path` (with `mode`) in scratch.
pub(crate) fn inline_document(
    ops: &mut Ops,
    path: String,
    mode: i32,
    data: String,
    lines: Lines,
) -> OpId {
    let mkfile = pb::FileAction {
        input: -1,
        secondary_input: -1,
        output: 0,
        action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
            path,
            mode,
            data: data.into_bytes(),
            owner: None,
            timestamp: -1,
        })),
    };
    let md = metadata(
        &[("llb.customname", "[internal] preparing inline document")],
        &["file.base"],
    );
    ops.push(file_op(vec![mkfile]), Vec::new(), md, Some(lines))
}

impl Ops {
    /// Records `op` (its `inputs` field is filled in at the end from `inputs`).
    pub(crate) fn push(
        &mut self,
        op: pb::Op,
        inputs: Vec<OpId>,
        metadata: pb::OpMetadata,
        lines: Option<Lines>,
    ) -> OpId {
        self.nodes.push(Node {
            kind: Kind::Op(Box::new(op)),
            inputs,
            metadata,
            lines,
        });
        OpId(self.nodes.len() - 1)
    }

    /// The identifier of a recorded source op ("" for other ops).
    pub(crate) fn source_identifier(&self, id: OpId) -> String {
        match &self.nodes[id.0].kind {
            Kind::Op(op) => match &op.op {
                Some(pb::op::Op::Source(s)) => s.identifier.clone(),
                _ => String::new(),
            },
            _ => String::new(),
        }
    }

    /// Replaces the `llb.customname` of a recorded op.
    pub(crate) fn set_custom_name(&mut self, id: OpId, name: &str) {
        self.nodes[id.0]
            .metadata
            .description
            .insert("llb.customname".to_string(), name.to_string());
    }

    /// The (single, shared) build context source.
    pub(crate) fn context(&mut self) -> OpId {
        if let Some(id) = self.context {
            return id;
        }
        self.nodes.push(Node {
            kind: Kind::Context,
            inputs: Vec::new(),
            metadata: metadata(
                &[("llb.customname", "[internal] load build context")],
                &[
                    "source.local",
                    "source.local.followpaths",
                    "source.local.sessionid",
                    "source.local.sharedkeyhint",
                ],
            ),
            lines: None,
        });
        let id = OpId(self.nodes.len() - 1);
        self.context = Some(id);
        id
    }

    /// A named local context (`context:NAME=local:DIR`): the client's dir DIR.
    pub(crate) fn named_local(&mut self, dir: &str, session_id: &str, excludes: &[String]) -> OpId {
        let mut caps = vec![
            "source.local",
            "source.local.sessionid",
            "source.local.sharedkeyhint",
        ];
        if !excludes.is_empty() {
            caps.insert(1, "source.local.excludepatterns");
        }
        let op = local_op(
            dir,
            &ContextSource {
                session_id: session_id.to_string(),
                paths: BTreeSet::new(),
                excludes: excludes.to_vec(),
            },
        );
        let name = format!("[context {dir}] load from client");
        self.push(
            op,
            Vec::new(),
            metadata(&[("llb.customname", name.as_str())], &caps),
            None,
        )
    }

    /// Marshals everything reachable from `result` into a Definition.
    pub(crate) fn finish(
        mut self,
        result: Option<OpId>,
        context: ContextSource,
        source_info: pb::SourceInfo,
    ) -> pb::Definition {
        let mut builder = DefinitionBuilder::new();
        let Some(result) = result else {
            return builder.finish(None);
        };
        let source_index = builder.add_source_info(source_info);
        // Pass 1: post-order walk computing every op (inputs filled) and digest.
        let mut done: BTreeMap<usize, pb::Input> = BTreeMap::new();
        let mut order: Vec<(usize, pb::Op, String)> = Vec::new();
        // Iterative post-order DFS: (node, next input to visit).
        let mut stack: Vec<(usize, usize)> = vec![(result.0, 0)];
        while let Some((id, next)) = stack.pop() {
            if done.contains_key(&id) {
                continue;
            }
            let inputs = &self.nodes[id].inputs;
            if let Some(input) = inputs.get(next) {
                let input = input.0;
                stack.push((id, next + 1));
                if !done.contains_key(&input) {
                    stack.push((input, 0));
                }
                continue;
            }
            let node = &mut self.nodes[id];
            if matches!(node.kind, Kind::Context) && !context.excludes.is_empty() {
                node.metadata
                    .caps
                    .insert("source.local.excludepatterns".to_string(), true);
            }
            let mut op = match &mut node.kind {
                Kind::Op(op) => std::mem::take(op.as_mut()),
                Kind::Context => context_op(&context),
            };
            op.inputs = node
                .inputs
                .iter()
                .filter_map(|i| done.get(&i.0).cloned())
                .collect();
            dedupe_inputs(&mut op);
            let dgst = kiln_llb::digest(&kiln_llb::marshal_op(&op));
            done.insert(
                id,
                pb::Input {
                    digest: dgst.clone(),
                    index: 0,
                },
            );
            order.push((id, op, dgst));
        }
        // BuildKit keeps the metadata of the last visit of a repeated op.
        let mut last_meta: BTreeMap<String, usize> = BTreeMap::new();
        for (id, _, dgst) in &order {
            last_meta.insert(dgst.clone(), *id);
        }
        // Pass 2: add in order.
        for (id, op, dgst) in order {
            let meta_from = last_meta.get(&dgst).copied().unwrap_or(id);
            let metadata = self.nodes[meta_from].metadata.clone();
            let locations = match self.nodes[id].lines {
                Some(lines) => vec![pb::Location {
                    source_index,
                    ranges: vec![lines.range()],
                }],
                None => Vec::new(),
            };
            builder.add_with_locations(op, metadata, locations);
        }
        let result = done.get(&result.0).cloned();
        builder.finish(result)
    }
}

/// Inputs that are the same vertex output become one, as BuildKit's LLB
/// marshalling merges them for exec and file ops (two stages `FROM` the same
/// image, copied one into the other, read one input): the LLB, and so the
/// cache keys, are BuildKit's.
fn dedupe_inputs(op: &mut pb::Op) {
    let n = op.inputs.len();
    let mut uniq: Vec<pb::Input> = Vec::with_capacity(n);
    let mut map: Vec<i64> = Vec::with_capacity(n);
    for i in &op.inputs {
        let pos = match uniq.iter().position(|u| u == i) {
            Some(p) => p,
            None => {
                uniq.push(i.clone());
                uniq.len() - 1
            }
        };
        map.push(i64::try_from(pos).unwrap_or(i64::MAX));
    }
    if uniq.len() == n {
        return;
    }
    let (n, m) = (n as i64, uniq.len() as i64);
    // an index below n names an input; from n on, an earlier action's output
    let remap = |x: i64| match x {
        x if x < 0 => x,
        x if x < n => map[x as usize],
        x => x - n + m,
    };
    match &mut op.op {
        Some(pb::op::Op::Exec(e)) => {
            for mount in &mut e.mounts {
                if mount.input < n {
                    mount.input = remap(mount.input);
                }
            }
        }
        Some(pb::op::Op::File(f)) => {
            for a in &mut f.actions {
                a.input = remap(a.input);
                a.secondary_input = remap(a.secondary_input);
            }
        }
        _ => return,
    }
    op.inputs = uniq;
}

fn context_op(context: &ContextSource) -> pb::Op {
    local_op("context", context)
}

/// `local://NAME`: the client's dir NAME (its shared key hint too), as much of
/// it as `source` says.
fn local_op(name: &str, source: &ContextSource) -> pb::Op {
    let mut attrs = BTreeMap::new();
    // BuildKit's normalizeContextPaths: "/" anywhere means the whole dir.
    if !source.paths.is_empty() && !source.paths.contains("/") {
        let paths: Vec<String> = source
            .paths
            .iter()
            .map(|p| p.trim_start_matches('/').to_string())
            .collect();
        attrs.insert(
            "local.followpaths".to_string(),
            serde_json::to_string(&paths).unwrap_or_else(|_| "[]".to_string()),
        );
    }
    if !source.excludes.is_empty() {
        attrs.insert(
            "local.excludepatterns".to_string(),
            serde_json::to_string(&source.excludes).unwrap_or_else(|_| "[]".to_string()),
        );
    }
    if !source.session_id.is_empty() {
        attrs.insert("local.session".to_string(), source.session_id.clone());
    }
    attrs.insert("local.sharedkeyhint".to_string(), name.to_string());
    source_op(format!("local://{name}"), attrs)
}
