//! Dockerfile front half: the line parser (directives, continuations, heredocs,
//! flags), BuildKit-compatible shell-word expansion, and typed instructions
//! grouped into build stages.
//!
//! This crate is pure: no IO, no async, no LLB. It never panics on any input;
//! every problem is an [`Error`] naming the Dockerfile line. Turning the typed
//! instructions into LLB is the job of `frontend-gateway`'s `dockerfile2llb`.
//!
//! ```
//! let df = kiln_dockerfile::parse("FROM busybox AS base\nRUN echo hi\n").unwrap();
//! assert_eq!(df.stages[0].name.as_deref(), Some("base"));
//! ```

mod dockerignore;
mod instructions;
mod mount;
mod parser;
mod path;
mod shell;
#[cfg(test)]
mod tests;

pub use dockerignore::{IgnoreMatcher, parse_dockerignore};
pub use instructions::{
    ArgDecl, Command, CommandLine, Copy, Dockerfile, Healthcheck, Instruction, KeyValue, Location,
    Run, Stage, parse, parse_command,
};
pub use mount::{MountError, MountType, RunMount, Sharing, mount_from, parse_mount};
pub use parser::{Ast, Directives, Heredoc, Node, detect_directives, parse_ast, parse_directives};
pub use path::clean_path;
pub use shell::{EnvLookup, Lex};

/// Everything that can go wrong while parsing or expanding a Dockerfile.
/// `Display` starts with `Dockerfile:LINE:` whenever the line is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("Dockerfile:{line}: unknown instruction: {instruction}")]
    UnknownInstruction { line: usize, instruction: String },
    #[error("Dockerfile:{line}: unknown flag: {flag} for {instruction}")]
    UnknownFlag {
        line: usize,
        instruction: String,
        flag: String,
    },
    #[error("Dockerfile:{line}: {instruction}: {reason}")]
    InvalidInstruction {
        line: usize,
        instruction: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: invalid parser directive {name}: {reason}")]
    InvalidDirective {
        line: usize,
        name: String,
        reason: String,
    },
    #[error("Dockerfile:{line}: unterminated heredoc: missing {delimiter}")]
    UnterminatedHeredoc { line: usize, delimiter: String },
    #[error("Dockerfile:{line}: no build stage in current context: {instruction} before FROM")]
    InstructionBeforeFrom { line: usize, instruction: String },
    #[error("file with no instructions")]
    NoInstructions,
    #[error("dockerfile contains no stages to build")]
    NoStages,
    #[error("failed to process {word:?}: {reason}")]
    Expand { word: String, reason: String },
}

impl Error {
    /// The 1-based Dockerfile line this error points at, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::UnknownInstruction { line, .. }
            | Error::UnknownFlag { line, .. }
            | Error::InvalidInstruction { line, .. }
            | Error::InvalidDirective { line, .. }
            | Error::UnterminatedHeredoc { line, .. }
            | Error::InstructionBeforeFrom { line, .. } => Some(*line),
            Error::NoInstructions | Error::NoStages | Error::Expand { .. } => None,
        }
    }
}
