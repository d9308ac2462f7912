//! Conversions between generated protobuf types and the domain types, and the
//! error → `tonic::Status` mapping.

use std::error::Error as _;

use kiln_llb::pb;
use kiln_oci::Platform;
use kiln_proto::kiln::frontend::v1 as proto;
use tonic::{Code, Status};

use crate::{BridgeError, BridgeErrorKind, Error, FrontendOutput, FrontendRequest};

impl From<proto::FrontendRequest> for FrontendRequest {
    fn from(r: proto::FrontendRequest) -> Self {
        FrontendRequest {
            build_id: r.build_id,
            frontend: r.frontend,
            attrs: r.attrs,
            session_id: r.session_id,
        }
    }
}

impl From<FrontendOutput> for proto::FrontendResult {
    fn from(o: FrontendOutput) -> Self {
        proto::FrontendResult {
            definition: Some(o.definition),
            metadata: o.metadata,
            refs: o.refs,
        }
    }
}

pub(crate) fn platform_to_pb(p: &Platform) -> pb::Platform {
    pb::Platform {
        architecture: p.architecture.clone(),
        os: p.os.clone(),
        variant: p.variant.clone().unwrap_or_default(),
        os_version: p.os_version.clone().unwrap_or_default(),
        os_features: p.os_features.clone().unwrap_or_default(),
    }
}

/// A failed LLBBridge call, keeping the solver's message.
pub(crate) fn bridge_error(call: &str, status: Status) -> BridgeError {
    let kind = match status.code() {
        Code::NotFound => BridgeErrorKind::NotFound,
        Code::InvalidArgument | Code::FailedPrecondition => BridgeErrorKind::InvalidArgument,
        Code::Unavailable => BridgeErrorKind::Unavailable,
        Code::DeadlineExceeded => BridgeErrorKind::DeadlineExceeded,
        _ => BridgeErrorKind::Failed,
    };
    BridgeError {
        kind,
        message: format!("llbbridge {call}: {}", status.message()),
    }
}

fn bridge_code(kind: BridgeErrorKind) -> Code {
    match kind {
        BridgeErrorKind::NotFound => Code::NotFound,
        BridgeErrorKind::InvalidArgument => Code::InvalidArgument,
        BridgeErrorKind::Unavailable => Code::Unavailable,
        BridgeErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        BridgeErrorKind::Failed => Code::Internal,
    }
}

/// The error and its causes, `outer: inner: ...`.
fn chain(e: &Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::UnsupportedSubrequest { .. } => Code::Unimplemented,
            Error::UnsupportedFrontend { .. }
            | Error::InvalidPlatform { .. }
            | Error::InvalidNamedContext { .. }
            | Error::Convert { .. } => Code::InvalidArgument,
            Error::LoadDockerfile { source, .. }
            | Error::ReadDockerfile { source, .. }
            | Error::FrontendImage { source, .. } => bridge_code(source.kind),
            Error::MissingDockerfileRef { .. } | Error::EncodeImageConfig { .. } => Code::Internal,
        };
        Status::new(code, chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_failure_keeps_code_and_message_chain() {
        let e = Error::ReadDockerfile {
            filename: "Dockerfile".into(),
            source: bridge_error(
                "read file",
                Status::not_found("open Dockerfile: no such file"),
            ),
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            s.message(),
            "read Dockerfile Dockerfile: llbbridge read file: open Dockerfile: no such file"
        );
    }

    #[test]
    fn unsupported_frontend_is_invalid_argument() {
        let s = Status::from(Error::UnsupportedFrontend {
            frontend: "gateway.v0".into(),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("gateway.v0"), "{}", s.message());
    }
}
