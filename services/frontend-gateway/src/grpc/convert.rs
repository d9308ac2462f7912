//! Conversions between generated protobuf types and the domain types, and the
//! error → `tonic::Status` mapping.

use kiln_llb::pb;
use kiln_proto::kiln::frontend::v1 as proto;
use kiln_proto::status::{self, Details, SourceLocation};
use tonic::{Code, Status};

use crate::{BridgeError, BridgeErrorKind, ConvertError, Error, FrontendOutput, FrontendRequest};

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

/// A failed LLBBridge call, keeping the solver's message (the error that
/// wraps it names the call).
pub(crate) fn bridge_error(status: Status) -> BridgeError {
    let kind = match status.code() {
        Code::NotFound => BridgeErrorKind::NotFound,
        Code::InvalidArgument | Code::FailedPrecondition => BridgeErrorKind::InvalidArgument,
        Code::Unavailable => BridgeErrorKind::Unavailable,
        Code::DeadlineExceeded => BridgeErrorKind::DeadlineExceeded,
        _ => BridgeErrorKind::Failed,
    };
    BridgeError {
        kind,
        message: status.message().to_string(),
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

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::UnsupportedSubrequest { .. } => Code::Unimplemented,
            Error::UnsupportedFrontend { .. }
            | Error::InvalidPlatform { .. }
            | Error::InvalidNamedContext { .. }
            | Error::CheckOptions(_)
            | Error::Subrequest(_)
            | Error::Convert(_) => Code::InvalidArgument,
            Error::LintViolation(_) => Code::Unknown,
            Error::LoadDockerfile { source, .. }
            | Error::ReadDockerfile { source, .. }
            | Error::FrontendImage { source, .. }
            | Error::ResolveImageConfig { source, .. } => bridge_code(source.kind),
            Error::MissingDockerfileRef { .. }
            | Error::EncodeImageConfig { .. }
            | Error::ParseImageConfig { .. } => Code::Internal,
        };
        let status = status::from_error(code, &e);
        match &e {
            Error::Convert(c) => dockerfile_location(c).attach(status),
            _ => status,
        }
    }
}

/// The Dockerfile lines a conversion error points at, as BuildKit's
/// dockerfile frontend sends them (`parser.WithLocation`): the whole
/// instruction, 1-based lines.
fn dockerfile_location(c: &ConvertError) -> Details {
    let Some(line) = c.error.line() else {
        return Details::default();
    };
    let lines = crate::dockerfile2llb::instruction_lines(&c.dockerfile, line);
    let position = |line: usize| pb::Position {
        line: i32::try_from(line).unwrap_or(i32::MAX),
        character: 0,
    };
    Details {
        vertex: None,
        sources: vec![SourceLocation {
            info: pb::SourceInfo {
                filename: c.filename.clone(),
                data: c.dockerfile.clone(),
                language: "Dockerfile".to_string(),
                definition: None,
            },
            ranges: vec![pb::Range {
                start: Some(position(*lines.start())),
                end: Some(position(*lines.end())),
            }],
        }],
    }
}

#[cfg(test)]
mod tests {
    use kiln_oci::Platform;

    use super::*;

    #[test]
    fn read_failure_keeps_code_and_message_chain() {
        let e = Error::ReadDockerfile {
            filename: "Dockerfile".into(),
            source: bridge_error(Status::not_found("open Dockerfile: no such file")),
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            s.message(),
            "read Dockerfile Dockerfile: open Dockerfile: no such file"
        );
    }

    fn convert_error(dockerfile: &str) -> Error {
        let opts = crate::dockerfile2llb::ConvertOptions {
            filename: "ci/Dockerfile".into(),
            ..Default::default()
        };
        let error = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(crate::dockerfile2llb::convert(
                dockerfile.as_bytes(),
                &opts,
                &NoImages,
            ))
            .expect_err("conversion fails");
        Error::Convert(Box::new(ConvertError {
            filename: opts.filename,
            dockerfile: dockerfile.as_bytes().to_vec(),
            error,
        }))
    }

    struct NoImages;

    impl crate::dockerfile2llb::ImageResolver for NoImages {
        async fn resolve(
            &self,
            reference: &str,
            _: &Platform,
        ) -> Result<crate::dockerfile2llb::ResolvedImage, crate::dockerfile2llb::ResolveError>
        {
            Err(format!("{reference}: not found").into())
        }
    }

    fn range(d: &Details) -> Vec<(i32, i32)> {
        d.sources[0]
            .ranges
            .iter()
            .map(|r| {
                let line = |p: &Option<pb::Position>| p.as_ref().map_or(0, |p| p.line);
                (line(&r.start), line(&r.end))
            })
            .collect()
    }

    #[test]
    fn a_dockerfile_error_carries_its_instructions_lines() {
        let dockerfile = "FROM scratch\nRUN --network=bogus \\\n  true\n";
        let s = Status::from(convert_error(dockerfile));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "Dockerfile:2: RUN: unsupported network mode \"bogus\""
        );
        let details = Details::of(&s);
        assert_eq!(details.vertex, None);
        assert_eq!(details.sources.len(), 1);
        let info = &details.sources[0].info;
        assert_eq!(info.filename, "ci/Dockerfile");
        assert_eq!(info.language, "Dockerfile");
        assert_eq!(info.data, dockerfile.as_bytes());
        assert_eq!(range(&details), [(2, 3)], "the RUN and its continuation");
    }

    #[test]
    fn parse_and_resolve_errors_carry_their_line_and_whole_chain() {
        let s = Status::from(convert_error("FROM scratch\n\nFROBNICATE x\n"));
        assert_eq!(s.message(), "Dockerfile:3: unknown instruction: FROBNICATE");
        assert_eq!(range(&Details::of(&s)), [(3, 3)]);
        let s = Status::from(convert_error("FROM scratch\nCOPY --from=nope /a /b\n"));
        assert_eq!(
            s.message(),
            "Dockerfile:2: failed to resolve source metadata for docker.io/library/nope:latest: docker.io/library/nope:latest: not found"
        );
        assert_eq!(range(&Details::of(&s)), [(2, 2)]);
    }

    #[test]
    fn an_error_without_a_line_has_no_location() {
        let s = Status::from(convert_error(""));
        assert_eq!(s.message(), "the Dockerfile cannot be empty");
        assert!(Details::of(&s).is_empty());
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
