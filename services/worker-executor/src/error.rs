//! The worker's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {target}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("snapshot {id} not found")]
    SnapshotNotFound { id: String },
    #[error("container {id} not found (never made, or released)")]
    ContainerNotFound { id: String },
    #[error("invalid snapshot id {id:?}")]
    InvalidRef { id: String },
    #[error("snapshot {id} metadata")]
    SnapshotMeta {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("decode op")]
    DecodeOp(#[from] prost::DecodeError),
    #[error("unsupported op: {0}")]
    UnsupportedOp(String),
    #[error("cannot run {platform} steps on this {host} worker: {reason}")]
    NoEmulator {
        platform: String,
        host: String,
        reason: String,
    },
    #[error("op has {got} inputs but {want} refs were given")]
    InputCount { want: usize, got: usize },
    #[error("invalid op: {0}")]
    InvalidOp(String),
    /// Compiling a seccomp profile with libseccomp (see [`crate::seccomp::compile`]).
    #[error("seccomp filter: {0}")]
    Seccomp(String),
    #[error("syntax error in pattern {pattern:?}")]
    Pattern { pattern: String },
    #[error("unsupported source {identifier:?}")]
    UnsupportedSource { identifier: String },
    #[error("registry {reference}")]
    Registry {
        reference: String,
        #[source]
        source: kiln_registry::Error,
    },
    #[error("image {reference}: {reason}")]
    Image { reference: String, reason: String },
    #[error("layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: kiln_oci::Error,
    },
    #[error("session sync of local {name:?}")]
    Session {
        name: String,
        #[source]
        source: kiln_session::Error,
    },
    #[error("{op}")]
    CacheSession {
        op: &'static str,
        #[source]
        source: kiln_session::Error,
    },
    #[error("runtime spec")]
    Spec {
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("write runtime spec {path}")]
    SpecSave {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("encode runtime spec")]
    SpecEncode {
        #[source]
        source: serde_json::Error,
    },
    #[error("open a pty")]
    Pty {
        #[source]
        source: nix::Error,
    },
    /// fuse-overlayfs could not mount (see [`crate::snapshot::overlay`]).
    #[error("fuse-overlayfs mount on {target}: {message}")]
    FuseOverlay { target: PathBuf, message: String },
    /// No way to mount snapshots (see [`crate::snapshot::overlay::choose`]).
    #[error("snapshotter: {0}")]
    Snapshotter(String),
    /// What a rootless worker cannot do (see [`crate::rootless`]).
    #[error("rootless: {0}")]
    Rootless(String),
    /// Bridge mode could not be set up (see [`crate::network`]).
    #[error("bridge mode")]
    BridgeMode {
        #[source]
        source: Box<Error>,
    },
    #[error("bridge name {name:?}: 1 to 15 letters, digits, '-' or '_'")]
    BridgeName { name: String },
    #[error(
        "bridge {bridge} has address {have}, not {gateway} (the subnet {subnet}'s gateway): another subnet is configured for it"
    )]
    BridgeAddress {
        bridge: String,
        have: String,
        gateway: String,
        subnet: String,
    },
    #[error("{tool} not found (install {package})")]
    NetworkToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("run {program}")]
    NetworkToolStart {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A network tool (`ip`, `iptables`) failed; `output` is what it said.
    #[error("{command}: {output}")]
    NetworkTool { command: String, output: String },
    #[error("{op}")]
    NetworkSys {
        op: String,
        #[source]
        source: nix::Error,
    },
    #[error("every address of {subnet} on bridge {bridge} is in use")]
    NoStepAddress { subnet: String, bridge: String },
    #[error("set up the step network {ip}")]
    StepNetwork {
        ip: std::net::Ipv4Addr,
        #[source]
        source: Box<Error>,
    },
    #[error("network setup thread panicked")]
    NetworkThreadPanicked,
    #[error("start runc {runc}")]
    RuncStart {
        runc: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to containerd at {address}")]
    ContainerdConnect {
        address: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd {op} {id}")]
    Containerd {
        op: &'static str,
        id: String,
        #[source]
        source: tonic::Status,
    },
    #[error("containerd snapshot {key}: {reason}")]
    ContainerdSnapshot { key: String, reason: String },
    #[error("process {args:?} did not complete successfully: exit code: {code}")]
    ExitCode { args: String, code: i32 },
    #[error("unable to find user {user}: {reason}")]
    User { user: String, reason: String },
    #[error("{action} {path}: {reason}")]
    FileAction {
        action: &'static str,
        path: String,
        reason: String,
    },
    #[error("{action} {path}")]
    FileIo {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read dir pattern {pattern:?}")]
    ReadDirPattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("entitlement {entitlement}: {reason}")]
    Entitlement { entitlement: String, reason: String },
    #[error("ssh agent {id}")]
    SshAgentSession {
        id: String,
        #[source]
        source: kiln_session::Error,
    },
    #[error("secret {id}")]
    SecretSession {
        id: String,
        #[source]
        source: kiln_session::Error,
    },
    #[error("secret {id}: write it for the step")]
    SecretWrite {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh agent {id}: {reason}")]
    SshAgent { id: String, reason: String },
    #[error("secret {id}: {reason}")]
    Secret { id: String, reason: String },
    #[error("local source {name:?} without a session")]
    NoSession { name: String },
    #[error("source attribute {key}")]
    SourceAttr {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("git source {remote}: run git")]
    GitRun {
        remote: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http source {url}")]
    HttpRequest {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("git source {remote}: {reason}")]
    Git { remote: String, reason: String },
    #[error("http source {url}: {reason}")]
    Http { url: String, reason: String },
    /// Another worker of the farm failed a call (an import's layers or blobs).
    #[error("worker {peer}: {op}")]
    Peer {
        peer: String,
        op: String,
        #[source]
        source: tonic::Status,
    },
    #[error("invalid digest {digest:?}")]
    InvalidDigest { digest: String },
    #[error("blob {digest} not found")]
    BlobNotFound { digest: String },
    #[error("layer options")]
    LayerOptions {
        #[source]
        source: kiln_oci::Error,
    },
    #[error("layer of snapshot {id}: its thread panicked")]
    LayerPanicked { id: String },
    #[error("background task")]
    Join(#[from] tokio::task::JoinError),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// A file action's IO failure on `path` (as the build named it).
    pub(crate) fn file_io(
        action: &'static str,
        path: &str,
    ) -> impl Fn(std::io::Error) -> Error + Clone + use<> {
        let path = path.to_string();
        move |source| Error::FileIo {
            action,
            path: path.clone(),
            source,
        }
    }

    pub(crate) fn file(action: &'static str, path: &str, reason: impl ToString) -> Error {
        Error::FileAction {
            action,
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::SnapshotNotFound { .. }
            | Error::BlobNotFound { .. }
            | Error::ContainerNotFound { .. } => Code::NotFound,
            Error::InvalidRef { .. }
            | Error::DecodeOp(_)
            | Error::InvalidOp(_)
            | Error::NoSession { .. }
            | Error::SourceAttr { .. }
            | Error::Pattern { .. }
            | Error::ReadDirPattern { .. }
            | Error::InputCount { .. }
            | Error::InvalidDigest { .. }
            | Error::LayerOptions { .. } => Code::InvalidArgument,
            Error::UnsupportedOp(_) | Error::UnsupportedSource { .. } => Code::Unimplemented,
            Error::ExitCode { .. }
            | Error::User { .. }
            | Error::FileAction { .. }
            | Error::FileIo { .. }
            | Error::NoEmulator { .. } => Code::FailedPrecondition,
            Error::Registry { .. } | Error::Session { .. } => Code::Unavailable,
            Error::Entitlement { .. } => Code::PermissionDenied,
            Error::Git { .. }
            | Error::GitRun { .. }
            | Error::Http { .. }
            | Error::HttpRequest { .. } => Code::FailedPrecondition,
            Error::Secret { .. }
            | Error::SecretSession { .. }
            | Error::SecretWrite { .. }
            | Error::SshAgent { .. }
            | Error::SshAgentSession { .. } => Code::FailedPrecondition,
            // the farm tells a holder it cannot reach from a step that failed
            Error::Peer { source, .. } if source.code() == Code::NotFound => Code::NotFound,
            Error::Peer { .. } => Code::Unavailable,
            _ => Code::Internal,
        };
        // the whole cause chain, not just the top message
        kiln_proto::status::from_error(code, &e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_carries_the_whole_cause_chain_once() {
        let e = Error::io("open", "/x/blob")(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ));
        assert_eq!(
            e.to_string(),
            "open /x/blob",
            "a message never repeats its source"
        );
        let st = tonic::Status::from(e);
        assert_eq!(st.message(), "open /x/blob: connection refused");
    }
}
