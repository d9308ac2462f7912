//! kiln-llb: BuildKit's LLB as values — op encoding, digests, a definition
//! builder and a loader that turns a `pb.Definition` into a checked graph.
//!
//! This crate is pure: no IO, no async, no solving. It knows how to write op
//! bytes exactly as BuildKit's Go client does (see [`marshal`]), because an op's
//! digest is the sha256 of those bytes and must match BuildKit's. It does not
//! know what an op *means*; executing ops belongs to the worker.

pub use kiln_proto::pb;

mod builder;
mod graph;
pub mod marshal;

pub use builder::{DefinitionBuilder, exec_op, source_definition};
pub use graph::{Graph, Vertex, load};
pub use marshal::{marshal_definition, marshal_op};

/// `"sha256:<hex>"` of `bytes`: the digest BuildKit gives an op (`digest.FromBytes`).
pub use kiln_digest::sha256 as digest;

/// Why a definition could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `def` entry is not a valid `pb.Op`.
    #[error("decode op {index} of definition")]
    DecodeOp {
        index: usize,
        #[source]
        source: prost::DecodeError,
    },
    /// An op names an input that is not an earlier op of the definition.
    #[error("op {digest} refers to input {input} which is not an earlier op")]
    UnknownInput { digest: String, input: String },
    /// More ops than a definition may hold (`MAX_OPS`).
    #[error("definition holds {count} ops; the limit is {limit}")]
    TooManyOps { count: usize, limit: usize },
    /// The last `def` entry is not a terminal op (no body, exactly one input).
    #[error("last op {digest} of definition is not a terminal op: {reason}")]
    InvalidTerminal {
        digest: String,
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            super::digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
