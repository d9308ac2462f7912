//! Building a `pb.Definition` the way BuildKit's client marshals a state.

use std::collections::{BTreeMap, HashSet};

use crate::{digest, marshal_op, pb};

/// Accumulates ops in dependency order (caller adds inputs before users) and
/// dedupes them by digest.
///
/// [`DefinitionBuilder::finish`] produces what BuildKit's `State.Marshal` would:
/// the ops, a terminal op naming the result, a metadata entry for every op
/// (the terminal one carries the `constraints`/`platform`/`meta.*` caps) and a
/// `Source` with a (possibly empty) locations entry for every non-terminal op.
#[derive(Debug, Default, Clone)]
pub struct DefinitionBuilder {
    def: Vec<Vec<u8>>,
    seen: HashSet<String>,
    metadata: BTreeMap<String, pb::OpMetadata>,
    locations: BTreeMap<String, pb::Locations>,
    infos: Vec<pb::SourceInfo>,
}

/// A definition of one source op and nothing else (`docker-image://REF`,
/// `local://NAME`, ...).
pub fn source_definition(
    identifier: &str,
    attrs: std::collections::BTreeMap<String, String>,
) -> pb::Definition {
    let op = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: identifier.to_string(),
            attrs,
        })),
        ..Default::default()
    };
    let mut b = DefinitionBuilder::new();
    let out = b.add(op, pb::OpMetadata::default());
    b.finish(Some(out))
}

/// An exec op running `meta` on `root` as its root filesystem, whose changes
/// are its one output (`llb.Image(…).Run(…)` without extra mounts). Platform,
/// network and the rest go on the op it returns.
pub fn exec_op(root: pb::Input, meta: pb::Meta) -> pb::Op {
    pb::Op {
        inputs: vec![root],
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(meta),
            mounts: vec![pb::Mount {
                input: 0,
                dest: "/".into(),
                output: 0,
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

impl DefinitionBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marshals `op` (byte-exact, see [`crate::marshal`]), records `metadata`
    /// and returns the input pointing at output 0 of that op. Adding the same op
    /// twice stores it once; the second metadata is merged into the first.
    pub fn add(&mut self, op: pb::Op, metadata: pb::OpMetadata) -> pb::Input {
        self.add_with_locations(op, metadata, Vec::new())
    }

    /// Like [`DefinitionBuilder::add`], also attaching source ranges (e.g. the
    /// Dockerfile lines of the instruction). `Location.source_index` refers to
    /// an index returned by [`DefinitionBuilder::add_source_info`].
    pub fn add_with_locations(
        &mut self,
        op: pb::Op,
        metadata: pb::OpMetadata,
        locations: Vec<pb::Location>,
    ) -> pb::Input {
        let bytes = marshal_op(&op);
        let dgst = digest(&bytes);
        if self.seen.insert(dgst.clone()) {
            self.def.push(bytes);
            self.metadata.insert(dgst.clone(), metadata);
        } else if let Some(existing) = self.metadata.get_mut(&dgst) {
            merge_metadata(existing, metadata);
        }
        self.locations
            .entry(dgst.clone())
            .or_default()
            .locations
            .extend(locations);
        pb::Input {
            digest: dgst,
            index: 0,
        }
    }

    /// Registers a source file (e.g. the Dockerfile) and returns its index for
    /// `pb::Location::source_index`.
    pub fn add_source_info(&mut self, info: pb::SourceInfo) -> i32 {
        self.infos.push(info);
        i32::try_from(self.infos.len() - 1).expect("fewer than 2^31 source files")
    }

    /// Appends the terminal op (only `inputs: [result]`) when `result` is Some;
    /// returns an empty Definition for None (scratch).
    pub fn finish(self, result: Option<pb::Input>) -> pb::Definition {
        let Some(result) = result else {
            return pb::Definition::default();
        };
        let mut caps: BTreeMap<String, bool> = [("constraints", true), ("platform", true)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        for md in self.metadata.values() {
            if md.ignore_cache {
                caps.insert("meta.ignorecache".into(), true);
            }
            if !md.description.is_empty() {
                caps.insert("meta.description".into(), true);
            }
            if md.export_cache.is_some() {
                caps.insert("meta.exportcache".into(), true);
            }
        }
        let terminal = marshal_op(&pb::Op {
            inputs: vec![result],
            ..Default::default()
        });
        let mut metadata = self.metadata;
        metadata.insert(
            digest(&terminal),
            pb::OpMetadata {
                caps,
                ..Default::default()
            },
        );
        let mut def = self.def;
        def.push(terminal);
        pb::Definition {
            def,
            metadata,
            source: Some(pb::Source {
                locations: self.locations,
                infos: self.infos,
            }),
        }
    }
}

fn merge_metadata(into: &mut pb::OpMetadata, from: pb::OpMetadata) {
    into.ignore_cache |= from.ignore_cache;
    for (k, v) in from.description {
        into.description.entry(k).or_insert(v);
    }
    into.caps.extend(from.caps);
    if into.export_cache.is_none() {
        into.export_cache = from.export_cache;
    }
    if into.progress_group.is_none() {
        into.progress_group = from.progress_group;
    }
    if into.linux_resources.is_none() {
        into.linux_resources = from.linux_resources;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load;

    fn image(reference: &str) -> pb::Op {
        pb::Op {
            platform: Some(pb::Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            constraints: Some(Default::default()),
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("docker-image://{reference}"),
                attrs: Default::default(),
            })),
            ..Default::default()
        }
    }

    fn exec(root: pb::Input, args: &[&str]) -> pb::Op {
        let meta = pb::Meta {
            args: args.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            remove_mount_stubs_recursive: true,
            ..Default::default()
        };
        pb::Op {
            platform: Some(pb::Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            constraints: Some(Default::default()),
            ..exec_op(root, meta)
        }
    }

    fn caps(names: &[&str]) -> pb::OpMetadata {
        pb::OpMetadata {
            caps: names.iter().map(|n| (n.to_string(), true)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn image_then_exec_round_trips_through_load() {
        let mut b = DefinitionBuilder::new();
        let base = b.add(
            image("docker.io/library/busybox:latest"),
            caps(&["source.image"]),
        );
        let run_op = exec(base.clone(), &["sh", "-c", "true"]);
        let run = b.add(run_op.clone(), caps(&["exec.meta.base"]));
        let def = b.finish(Some(run.clone()));
        assert_eq!(def.def.len(), 3, "two ops and the terminal");
        assert_eq!(def.metadata.len(), 3);

        let graph = load(&def).expect("builder output loads");
        assert_eq!(graph.result, Some(run.clone()));
        let digests: Vec<&str> = graph.vertices.iter().map(|v| v.digest.as_str()).collect();
        assert_eq!(digests, [base.digest.as_str(), run.digest.as_str()]);
        let v = graph.result_vertex().expect("result vertex");
        assert_eq!(v.op, run_op);
        assert_eq!(v.metadata.caps.get("exec.meta.base"), Some(&true));
        assert_eq!(v.op.inputs, vec![base]);
        let terminal_md = &def.metadata[&digest(&def.def[2])];
        assert_eq!(
            terminal_md.caps.keys().collect::<Vec<_>>(),
            ["constraints", "platform"]
        );
        let source = def.source.expect("source set once there are ops");
        assert_eq!(
            source.locations.len(),
            2,
            "one (empty) entry per non-terminal op"
        );
    }

    #[test]
    fn adding_the_same_op_twice_stores_it_once() {
        let mut b = DefinitionBuilder::new();
        let first = b.add(image("busybox"), caps(&["source.image"]));
        let mut described = caps(&[]);
        described
            .description
            .insert("llb.customname".into(), "again".into());
        let second = b.add(image("busybox"), described);
        assert_eq!(first, second);
        let def = b.finish(Some(second));
        assert_eq!(def.def.len(), 2, "one op plus the terminal");
        let md = &def.metadata[&first.digest];
        assert_eq!(md.caps.get("source.image"), Some(&true));
        assert_eq!(
            md.description.get("llb.customname").map(String::as_str),
            Some("again")
        );
        let terminal_md = &def.metadata[&digest(&def.def[1])];
        assert_eq!(terminal_md.caps.get("meta.description"), Some(&true));
    }

    #[test]
    fn scratch_is_an_empty_definition() {
        let mut b = DefinitionBuilder::new();
        b.add(image("busybox"), pb::OpMetadata::default());
        assert_eq!(b.finish(None), pb::Definition::default());
    }
}
