//! Running as a frontend image (`gateway.v0`): the daemon starts this
//! process with LLBBridge on its stdin/stdout and the request in BuildKit's
//! environment contract (`BUILDKIT_FRONTEND_OPT_<n>=key=value`,
//! `BUILDKIT_SESSION_ID`). The Dockerfile frontend runs as it does inside
//! kilnd; its definitions are solved through the bridge and handed back with
//! `Return`, so any daemon that runs frontend images (kilnd or BuildKit) can
//! build with it.

use std::collections::BTreeMap;

use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::moby::buildkit::v1::frontend::{
    self as fe, llb_bridge_client::LlbBridgeClient, result::Result as FeResult,
};
use kiln_session::dial::Channel;
use prost::Message as _;

use crate::{DOCKERFILE_FRONTEND, FrontendOutput, FrontendRequest, Gateway};

const OPT_PREFIX: &str = "BUILDKIT_FRONTEND_OPT_";

/// The frontend request as the daemon passed it in the environment.
pub fn request_from_env(env: impl Iterator<Item = (String, String)>) -> FrontendRequest {
    let mut attrs = BTreeMap::new();
    let mut session_id = String::new();
    for (k, v) in env {
        if k == "BUILDKIT_SESSION_ID" {
            session_id = v;
        } else if k.starts_with(OPT_PREFIX) {
            let (key, value) = v.split_once('=').unwrap_or((v.as_str(), ""));
            attrs.insert(key.to_string(), value.to_string());
        }
    }
    FrontendRequest {
        build_id: String::new(),
        frontend: DOCKERFILE_FRONTEND.to_string(),
        attrs,
        session_id,
    }
}

/// Builds the request of the environment with the Dockerfile frontend over
/// `channel` (LLBBridge) and returns the result, or the error, to the daemon.
/// Fails only when the daemon cannot be told.
pub async fn run(channel: Channel, req: FrontendRequest) -> Result<(), tonic::Status> {
    let gateway = Gateway::new(super::client::GrpcBridge::new(channel.clone()));
    let mut bridge = LlbBridgeClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let ret = match gateway.solve(req).await {
        Ok(out) => match solve_output(&mut bridge, out).await {
            Ok(result) => fe::ReturnRequest {
                result: Some(result),
                error: None,
            },
            Err(s) => error_return(s),
        },
        Err(e) => error_return(tonic::Status::from(e)),
    };
    bridge.r#return(ret).await?;
    Ok(())
}

/// The error as the daemon gets it, with the status details (the Dockerfile
/// location of a conversion error) kept.
fn error_return(s: tonic::Status) -> fe::ReturnRequest {
    let details = RpcStatus::decode(s.details())
        .map(|st| st.details)
        .unwrap_or_default();
    fe::ReturnRequest {
        result: None,
        error: Some(RpcStatus {
            code: s.code() as i32,
            message: s.message().to_string(),
            details,
        }),
    }
}

/// Hands the frontend's definitions to the daemon and returns the result that
/// names them.
async fn solve_output(
    bridge: &mut LlbBridgeClient<Channel>,
    out: FrontendOutput,
) -> Result<fe::Result, tonic::Status> {
    let mut solve = async |def| -> Result<fe::Ref, tonic::Status> {
        let resp = bridge
            .solve(fe::SolveRequest {
                definition: Some(def),
                allow_result_return: true,
                allow_result_array_ref: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        match resp.result.and_then(|r| r.result) {
            Some(FeResult::Ref(r)) => Ok(r),
            Some(FeResult::RefDeprecated(id)) => Ok(fe::Ref { id, def: None }),
            _ => Ok(fe::Ref {
                id: resp.r#ref,
                def: None,
            }),
        }
    };
    let result = if out.refs.is_empty() {
        FeResult::Ref(solve(out.definition).await?)
    } else {
        let mut refs = BTreeMap::new();
        for (platform, def) in out.refs {
            refs.insert(platform, solve(def).await?);
        }
        FeResult::Refs(fe::RefMap { refs })
    };
    Ok(fe::Result {
        result: Some(result),
        metadata: out.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_returned_to_the_daemon_keeps_its_details() {
        let details = kiln_proto::status::Details {
            vertex: Some("sha256:abc".into()),
            sources: Vec::new(),
        };
        let status = details.attach(tonic::Status::invalid_argument("Dockerfile:2: RUN"));
        let ret = error_return(status);
        let error = ret.error.expect("an error");
        assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
        assert_eq!(error.message, "Dockerfile:2: RUN");
        assert_eq!(error.details.len(), 1);
        assert_eq!(
            error.details[0].type_url,
            kiln_proto::status::VERTEX_TYPE_URL
        );
        let plain = error_return(tonic::Status::internal("x"));
        assert!(plain.error.expect("an error").details.is_empty());
    }

    #[test]
    fn options_and_session_come_from_buildkits_environment() {
        let env = [
            ("PATH", "/bin"),
            ("BUILDKIT_FRONTEND_OPT_0", "build-arg:A=b=c"),
            ("BUILDKIT_FRONTEND_OPT_1", "target=final"),
            ("BUILDKIT_FRONTEND_OPT_2", "no-cache"),
            ("BUILDKIT_SESSION_ID", "s1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let req = request_from_env(env.into_iter());
        assert_eq!(req.session_id, "s1");
        assert_eq!(req.frontend, "dockerfile.v0");
        assert_eq!(
            req.attrs.get("build-arg:A").map(String::as_str),
            Some("b=c")
        );
        assert_eq!(req.attrs.get("target").map(String::as_str), Some("final"));
        assert_eq!(req.attrs.get("no-cache").map(String::as_str), Some(""));
        assert!(!req.attrs.contains_key("PATH"));
    }
}
