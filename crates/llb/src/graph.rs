//! Loading a `pb.Definition` into a checked graph of vertices.

use std::collections::HashMap;

use prost::Message;

use crate::{Error, digest, pb};

/// A decoded definition: vertices by digest in def order, and the result edge.
///
/// The terminal op (the last `def` entry, which only names the result) is not a
/// vertex; its input is [`Graph::result`].
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Every op except the terminal one, in definition order (inputs first).
    /// An op listed twice in the definition appears once.
    pub vertices: Vec<Vertex>,
    /// The graph's result; `None` for an empty definition (scratch).
    pub result: Option<pb::Input>,
    /// `Definition.source`, kept for error reporting (Dockerfile line ranges).
    pub source: Option<pb::Source>,
    index: HashMap<String, usize>,
}

/// One op of a definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Vertex {
    /// `sha256:` digest of [`Vertex::bytes`].
    pub digest: String,
    pub op: pb::Op,
    /// The op bytes exactly as they appeared in the definition.
    pub bytes: Vec<u8>,
    /// `Definition.metadata[digest]`, default when absent.
    pub metadata: pb::OpMetadata,
}

impl Graph {
    /// The vertex with this digest.
    pub fn get(&self, digest: &str) -> Option<&Vertex> {
        self.index.get(digest).map(|&i| &self.vertices[i])
    }

    /// The vertex the result edge points at; `None` for scratch.
    pub fn result_vertex(&self) -> Option<&Vertex> {
        self.result.as_ref().and_then(|r| self.get(&r.digest))
    }

    /// Source ranges recorded for a vertex (`Definition.source.locations`).
    pub fn locations(&self, digest: &str) -> &[pb::Location] {
        self.source
            .as_ref()
            .and_then(|s| s.locations.get(digest))
            .map(|l| l.locations.as_slice())
            .unwrap_or(&[])
    }
}

/// Decodes every op, checks that each input refers to an earlier op, and finds
/// the result through the terminal op. An empty definition is scratch.
/// The most ops one definition may hold (a chain of this many builds; more would
/// only be a way to make the daemon hold gigabytes of vertices).
pub const MAX_OPS: usize = 1_000_000;

pub fn load(def: &pb::Definition) -> Result<Graph, Error> {
    if def.def.len() > MAX_OPS {
        return Err(Error::TooManyOps {
            count: def.def.len(),
            limit: MAX_OPS,
        });
    }
    let mut graph = Graph {
        source: def.source.clone(),
        ..Graph::default()
    };
    let Some((last, ops)) = def.def.split_last() else {
        return Ok(graph);
    };
    for (i, bytes) in ops.iter().enumerate() {
        let op = pb::Op::decode(bytes.as_slice())
            .map_err(|source| Error::DecodeOp { index: i, source })?;
        let dgst = digest(bytes);
        if graph.index.contains_key(&dgst) {
            continue;
        }
        check_inputs(&graph, &dgst, &op)?;
        graph.index.insert(dgst.clone(), graph.vertices.len());
        graph.vertices.push(Vertex {
            metadata: def.metadata.get(&dgst).cloned().unwrap_or_default(),
            digest: dgst,
            op,
            bytes: bytes.clone(),
        });
    }
    let terminal = pb::Op::decode(last.as_slice()).map_err(|source| Error::DecodeOp {
        index: ops.len(),
        source,
    })?;
    let terminal_digest = digest(last);
    if terminal.op.is_some() {
        return Err(Error::InvalidTerminal {
            digest: terminal_digest,
            reason: "it has an op body",
        });
    }
    if terminal.inputs.len() != 1 {
        return Err(Error::InvalidTerminal {
            digest: terminal_digest,
            reason: "it must have exactly one input",
        });
    }
    check_inputs(&graph, &terminal_digest, &terminal)?;
    graph.result = terminal.inputs.into_iter().next();
    Ok(graph)
}

fn check_inputs(graph: &Graph, dgst: &str, op: &pb::Op) -> Result<(), Error> {
    match op
        .inputs
        .iter()
        .find(|i| !graph.index.contains_key(&i.digest))
    {
        Some(missing) => Err(Error::UnknownInput {
            digest: dgst.to_string(),
            input: missing.digest.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marshal_op;

    fn source(id: &str) -> pb::Op {
        pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: id.into(),
                attrs: Default::default(),
            })),
            constraints: Some(Default::default()),
            ..Default::default()
        }
    }

    fn terminal(dgst: &str) -> Vec<u8> {
        marshal_op(&pb::Op {
            inputs: vec![pb::Input {
                digest: dgst.into(),
                index: 0,
            }],
            ..Default::default()
        })
    }

    #[test]
    fn empty_definition_is_scratch() {
        let g = load(&pb::Definition::default()).expect("loads");
        assert!(g.vertices.is_empty());
        assert!(g.result.is_none());
    }

    #[test]
    fn input_must_be_an_earlier_op() {
        let a = marshal_op(&source("docker-image://a"));
        let dgst = digest(&a);
        // Terminal before the op it names: the input is unknown at that point.
        let def = pb::Definition {
            def: vec![terminal(&dgst), a.clone(), terminal(&dgst)],
            ..Default::default()
        };
        match load(&def) {
            Err(Error::UnknownInput { input, .. }) => assert_eq!(input, dgst),
            other => panic!("expected UnknownInput, got {other:?}"),
        }
    }

    #[test]
    fn last_op_must_be_terminal() {
        let a = marshal_op(&source("docker-image://a"));
        let def = pb::Definition {
            def: vec![a.clone(), a],
            ..Default::default()
        };
        assert!(matches!(load(&def), Err(Error::InvalidTerminal { .. })));
    }

    #[test]
    fn garbage_op_is_a_decode_error() {
        let def = pb::Definition {
            def: vec![vec![0xff, 0xff], vec![]],
            ..Default::default()
        };
        assert!(matches!(load(&def), Err(Error::DecodeOp { index: 0, .. })));
    }

    #[test]
    fn too_many_ops_is_refused_by_count() {
        let def = pb::Definition {
            def: vec![Vec::new(); MAX_OPS + 1],
            ..Default::default()
        };
        let err = load(&def).expect_err("too many");
        assert!(err.to_string().contains("the limit is 1000000"), "{err}");
    }
}
