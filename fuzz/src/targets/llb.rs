//! `llb`: a client's LLB definition, from the bytes to the worker.
//!
//! The bytes are a `pb.Definition` (prost). It is loaded with
//! `kiln_llb::load`, every loaded op goes through the worker's output check
//! (`worker_executor::ops::check_outputs`), and the definition is solved by
//! the real solver (`solver_scheduler::solve::solve`: cache keys, selectors,
//! explanations, eager layer chains, shared vertices) against a worker that
//! runs nothing: each op it gets is decoded and checked as the real worker
//! does, and gets one made-up ref per output. Each op's worker constraints
//! are parsed and placed as the farm does. The definition is solved twice
//! on one cache, so the second solve takes the cache-hit paths.

use std::sync::Arc;

use kiln_llb::pb;
use kiln_llb::pb::op::Op as OpKind;
use prost::Message;
use solver_scheduler::Error;
use solver_scheduler::peer::{PathEntry, RunEvent, RunOp, RunOutputs, Selector, Worker};

use crate::{Rng, Target, mutate};

pub fn target() -> Target {
    Target {
        name: "llb",
        about: "pb.Definition bytes: kiln_llb::load, the worker's check_outputs, the solver's solve() on a worker that runs nothing",
        run,
        seeds,
        tokens: TOKENS,
        mutate: Some(mutate_definition),
        max_len: 64 * 1024,
    }
}

const TOKENS: &[&[u8]] = &[
    b"docker-image://docker.io/library/busybox:latest",
    b"local://context",
    b"git://github.com/x/y",
    b"https://example.com/a.tar",
    b"oci-layout://x",
    b"sha256:",
    b"/",
    b"../",
    b"/etc/passwd",
    b"*",
    b"**",
    b"llb.customname",
    b"labels.\"",
    b"==",
    b"!=",
    b"id==",
    b"platforms==linux/amd64",
    b"local.sharedkeyhint",
    b"image.recordtype",
];

/// The number of outputs the worker produces for `op` (one ref each).
fn output_count(op: &pb::Op) -> usize {
    match &op.op {
        Some(OpKind::Exec(e)) => e
            .mounts
            .iter()
            .filter(|m| m.mount_type == pb::MountType::Bind as i32 && m.output >= 0)
            .count(),
        Some(OpKind::File(f)) => f.actions.iter().filter(|a| a.output >= 0).count(),
        _ => 1,
    }
}

/// A worker that checks each op as the real one does and runs nothing.
struct NullWorker;

impl Worker for NullWorker {
    fn address(&self) -> String {
        "fuzz".into()
    }
    async fn run(
        &self,
        op: RunOp,
        _events: Arc<dyn Fn(RunEvent) + Send + Sync>,
    ) -> Result<RunOutputs, Error> {
        // what the worker's Run does before running anything
        let decoded = pb::Op::decode(op.op_bytes.as_slice())
            .map_err(|e| invalid(format!("decode op: {e}")))?;
        if op.inputs.len() != decoded.inputs.len() {
            return Err(invalid(format!(
                "{} inputs for an op with {}",
                op.inputs.len(),
                decoded.inputs.len()
            )));
        }
        worker_executor::ops::check_outputs(&decoded).map_err(|e| invalid(e.to_string()))?;
        let refs: Vec<String> = (0..output_count(&decoded))
            .map(|i| format!("{}-{i}", op.digest))
            .collect();
        Ok(RunOutputs {
            content_keys: refs.iter().map(|r| format!("key-{r}")).collect(),
            refs,
            ..Default::default()
        })
    }
    async fn checksum(&self, r: &str, selectors: &[Selector]) -> Result<String, Error> {
        Ok(kiln_oci::digest::sha256(
            format!("{r}{selectors:?}").as_bytes(),
        ))
    }
    async fn path_entries(&self, r: &str, selectors: &[Selector]) -> Result<Vec<PathEntry>, Error> {
        Ok(selectors
            .iter()
            .map(|s| PathEntry {
                path: s.path.clone(),
                content: kiln_oci::digest::sha256(r.as_bytes()),
                mode: 0o644,
                uid: 0,
                gid: 0,
            })
            .collect())
    }
    async fn exists(&self, refs: &[String]) -> Result<Vec<bool>, Error> {
        Ok(vec![true; refs.len()])
    }
}

/// A worker's refusal of a bad op, as the real worker sends it.
fn invalid(message: String) -> Error {
    Error::Run(kiln_proto::status::Remote::new(
        tonic::Code::InvalidArgument,
        message,
    ))
}

fn build(id: &str, eager: bool) -> Arc<solver_scheduler::build::Build> {
    let mut b = solver_scheduler::build::Build::new(
        &solver_scheduler::BuildRequest {
            id: id.into(),
            session_id: "fuzz-session".into(),
            frontend_attrs: [("explain-cache".to_string(), "true".to_string())].into(),
            ..Default::default()
        },
        false,
    );
    if eager {
        b.eager_layers = Some(kiln_oci::LayerOptions::default());
    }
    Arc::new(b)
}

pub fn run(data: &[u8]) {
    let Ok(def) = pb::Definition::decode(data) else {
        return;
    };
    let loaded = kiln_llb::load(&def);
    crate::debug(|| match &loaded {
        Ok(g) => format!("loaded {} vertices", g.vertices.len()),
        Err(e) => format!("load: {e}"),
    });
    if let Ok(graph) = loaded {
        for v in &graph.vertices {
            let _ = worker_executor::ops::check_outputs(&v.op);
            let _ = solver_scheduler::solve::input_selectors(&v.op);
            if let Some(source) = &graph.source {
                let _ = solver_scheduler::solve::source_location(source, &v.digest);
            }
            let _ = solver_scheduler::solve::vertex_name(&v.op, &v.metadata);
            // the farm's placement reads the op's platform and worker-constraint
            // filters (containerd's filter grammar, from the client)
            if let Ok(want) = solver_scheduler::farm::want_of_op(&v.op) {
                let platforms = [kiln_oci::Platform::host()];
                let labels = [("zone".to_string(), "a".to_string())].into();
                let c = solver_scheduler::farm::place::Candidate {
                    id: "w",
                    platforms: &platforms,
                    labels: &labels,
                    running: 0,
                    capacity: 1,
                    holds: 0,
                    low_disk: false,
                };
                let _ = solver_scheduler::farm::place::choose(&[c], &want);
            }
            // what the worker parses from a copy before it touches a file
            if let Some(OpKind::File(f)) = &v.op.op {
                for a in &f.actions {
                    if let Some(pb::file_action::Action::Copy(c)) = &a.action {
                        if let Ok(m) = worker_executor::fscopy::ModeStr::parse(&c.mode_str) {
                            let _ = (m.apply(0o644, false), m.apply(0o755, true));
                        }
                        let _ = worker_executor::fscopy::Filter::new(
                            &c.include_patterns,
                            &c.exclude_patterns,
                        );
                    }
                }
            }
        }
    }
    crate::rt::block_on(async {
        let cache = Arc::new(solver_scheduler::solve::Cache::new(Arc::new(
            solver_scheduler::cache::MemoryStore::default(),
        )));
        let worker = Arc::new(NullWorker);
        let first = solver_scheduler::solve::solve(
            worker.clone(),
            cache.clone(),
            build("fuzz-1", true),
            &def,
        )
        .await;
        let second =
            solver_scheduler::solve::solve(worker, cache, build("fuzz-2", false), &def).await;
        crate::debug(|| format!("first solve: {first:?}\nsecond solve: {second:?}"));
        // the same definition on the same cache ends the same way
        assert_eq!(
            first.is_ok(),
            second.is_ok(),
            "first solve {first:?}, second {second:?}"
        );
    });
}

fn seeds() -> Vec<Vec<u8>> {
    let mut b = kiln_llb::DefinitionBuilder::new();
    let source = |b: &mut kiln_llb::DefinitionBuilder, id: &str| {
        b.add(
            pb::Op {
                op: Some(OpKind::Source(pb::SourceOp {
                    identifier: id.into(),
                    attrs: Default::default(),
                })),
                ..Default::default()
            },
            Default::default(),
        )
    };
    let base = source(&mut b, "docker-image://docker.io/library/busybox:latest");
    let ctx = source(&mut b, "local://context");
    let copy = b.add(
        pb::Op {
            inputs: vec![base, ctx],
            op: Some(OpKind::File(pb::FileOp {
                actions: vec![pb::FileAction {
                    input: 0,
                    secondary_input: 1,
                    output: 0,
                    action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                        src: "/a*".into(),
                        dest: "/a/".into(),
                        mode: -1,
                        allow_wildcard: true,
                        ..Default::default()
                    })),
                }],
            })),
            ..Default::default()
        },
        Default::default(),
    );
    let exec = b.add(
        pb::Op {
            inputs: vec![copy],
            op: Some(OpKind::Exec(pb::ExecOp {
                meta: Some(pb::Meta {
                    args: vec!["sh".into(), "-c".into(), "true".into()],
                    cwd: "/".into(),
                    ..Default::default()
                }),
                mounts: vec![
                    pb::Mount {
                        input: 0,
                        dest: "/".into(),
                        output: 0,
                        ..Default::default()
                    },
                    pb::Mount {
                        input: -1,
                        dest: "/cache".into(),
                        output: -1,
                        mount_type: pb::MountType::Cache as i32,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })),
            ..Default::default()
        },
        Default::default(),
    );
    vec![b.finish(Some(exec)).encode_to_vec()]
}

/// Structure-aware mutation: decode the definition, change one op (its bytes,
/// or one field), then usually point every input that lost its op at an
/// earlier op again, so the definition still loads and reaches the solver.
fn mutate_definition(rng: &mut Rng, data: &mut Vec<u8>, tokens: &[&'static [u8]]) {
    let Ok(mut def) = pb::Definition::decode(data.as_slice()) else {
        return;
    };
    if def.def.is_empty() {
        return;
    }
    let n = def.def.len();
    let i = rng.below(n);
    match rng.below(6) {
        0 => mutate::mutate_bytes(rng, &mut def.def[i], tokens, &[], 16 * 1024),
        1 | 2 => {
            if let Ok(mut op) = pb::Op::decode(def.def[i].as_slice()) {
                mutate_op(rng, &mut op, tokens);
                def.def[i] = op.encode_to_vec();
            }
        }
        3 => {
            let j = rng.below(n);
            def.def.swap(i, j);
        }
        4 => {
            let copy = def.def[i].clone();
            let at = rng.below(n);
            def.def.insert(at, copy);
        }
        _ => {
            if n > 1 {
                def.def.remove(i);
            }
        }
    }
    if rng.below(4) != 0 {
        relink(rng, &mut def);
    }
    if rng.one_in(8) {
        let d = kiln_llb::digest(&def.def[rng.below(def.def.len())]);
        def.metadata.entry(d).or_default().ignore_cache = rng.one_in(2);
    }
    *data = def.encode_to_vec();
}

/// Points every input naming no earlier op at a random earlier op.
fn relink(rng: &mut Rng, def: &mut pb::Definition) {
    let mut seen: Vec<String> = Vec::new();
    for bytes in def.def.iter_mut() {
        let Ok(mut op) = pb::Op::decode(bytes.as_slice()) else {
            seen.push(kiln_llb::digest(bytes));
            continue;
        };
        let mut changed = false;
        for input in &mut op.inputs {
            if !seen.contains(&input.digest) && !seen.is_empty() {
                input.digest = rng.pick(&seen).clone();
                changed = true;
            }
        }
        if changed {
            *bytes = op.encode_to_vec();
        }
        seen.push(kiln_llb::digest(bytes));
    }
}

fn interesting_int(rng: &mut Rng) -> i64 {
    *rng.pick(&[
        -1,
        0,
        1,
        2,
        3,
        -2,
        i64::MAX,
        i64::MIN,
        i32::MAX as i64,
        u32::MAX as i64,
        1 << 40,
    ])
}

fn token_string(rng: &mut Rng, tokens: &[&[u8]]) -> String {
    let mut s = Vec::new();
    for _ in 0..=rng.below(3) {
        s.extend_from_slice(*rng.pick::<&[u8]>(tokens));
    }
    String::from_utf8_lossy(&s).into_owned()
}

fn mutate_op(rng: &mut Rng, op: &mut pb::Op, tokens: &[&[u8]]) {
    match rng.below(4) {
        0 => {
            if op.inputs.is_empty() || rng.one_in(3) {
                op.inputs.push(pb::Input {
                    digest: String::new(),
                    index: 0,
                });
            } else {
                let k = rng.below(op.inputs.len());
                if rng.one_in(2) {
                    op.inputs[k].index = interesting_int(rng);
                } else {
                    op.inputs.remove(k);
                }
            }
            return;
        }
        1 if rng.one_in(4) => {
            op.op = None;
            return;
        }
        _ => {}
    }
    match &mut op.op {
        Some(OpKind::Exec(e)) => {
            if e.mounts.is_empty() || rng.one_in(4) {
                e.mounts.push(pb::Mount {
                    input: interesting_int(rng),
                    dest: token_string(rng, tokens),
                    output: interesting_int(rng),
                    mount_type: rng.below(6) as i32,
                    ..Default::default()
                });
            } else {
                let k = rng.below(e.mounts.len());
                let m = &mut e.mounts[k];
                match rng.below(5) {
                    0 => m.input = interesting_int(rng),
                    1 => m.output = interesting_int(rng),
                    2 => m.dest = token_string(rng, tokens),
                    3 => m.selector = token_string(rng, tokens),
                    _ => m.mount_type = rng.below(6) as i32,
                }
            }
        }
        Some(OpKind::File(f)) => {
            if f.actions.is_empty() || rng.one_in(4) {
                f.actions.push(pb::FileAction {
                    input: interesting_int(rng),
                    secondary_input: interesting_int(rng),
                    output: interesting_int(rng),
                    action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                        path: token_string(rng, tokens),
                        mode: 0o755,
                        make_parents: true,
                        ..Default::default()
                    })),
                });
            } else {
                let k = rng.below(f.actions.len());
                let a = &mut f.actions[k];
                match rng.below(4) {
                    0 => a.input = interesting_int(rng),
                    1 => a.secondary_input = interesting_int(rng),
                    2 => a.output = interesting_int(rng),
                    _ => {
                        if let Some(pb::file_action::Action::Copy(c)) = &mut a.action {
                            c.src = token_string(rng, tokens);
                        }
                    }
                }
            }
        }
        Some(OpKind::Source(s)) => {
            if rng.one_in(2) {
                s.identifier = token_string(rng, tokens);
            } else {
                s.attrs
                    .insert(token_string(rng, tokens), token_string(rng, tokens));
            }
        }
        Some(OpKind::Merge(m)) => m.inputs.push(pb::MergeInput {
            input: interesting_int(rng),
        }),
        Some(OpKind::Diff(d)) => {
            d.lower = Some(pb::LowerDiffInput {
                input: interesting_int(rng),
            });
            d.upper = Some(pb::UpperDiffInput {
                input: interesting_int(rng),
            });
        }
        _ => {
            op.op = Some(if rng.one_in(2) {
                OpKind::Merge(pb::MergeOp {
                    inputs: vec![pb::MergeInput { input: 0 }, pb::MergeInput { input: 1 }],
                })
            } else {
                OpKind::Diff(pb::DiffOp {
                    lower: Some(pb::LowerDiffInput { input: 0 }),
                    upper: Some(pb::UpperDiffInput { input: 1 }),
                })
            });
        }
    }
}
