//! The client-side frontend, as `buildctl build` runs it: the build's
//! `Control.Solve` stays open while this side drives the daemon's LLBBridge for
//! it (every call names the build in `buildkit-controlapi-buildid`), asks it to
//! run the frontend (or to solve an LLB definition) and hands the result over
//! with `Return`. The same calls work against kilnd and BuildKit's daemon.

use crate::build::FrontendSolve;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::moby::buildkit::v1::frontend::{
    PingRequest, ReturnRequest, SolveRequest, llb_bridge_client::LlbBridgeClient,
};
use kiln_session::dial::Channel;
use prost::Message as _;

/// gRPC metadata naming the build an LLBBridge call belongs to.
const BUILD_ID_KEY: &str = "buildkit-controlapi-buildid";
/// The capability of answering a frontend's result with `Return` (older
/// daemons take it as a `final` Solve instead).
const CAP_RETURN: &str = "return";

/// One build's LLBBridge, as its client-side frontend sees it.
pub struct Gateway {
    client: LlbBridgeClient<Channel>,
    build_id: String,
}

/// Why the frontend failed: the daemon's answer.
#[derive(Debug)]
pub struct FrontendError(pub tonic::Status);

impl Gateway {
    pub fn new(channel: Channel, build_id: &str) -> Gateway {
        Gateway {
            client: LlbBridgeClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            build_id: build_id.to_string(),
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.build_id.parse() {
            r.metadata_mut().insert(BUILD_ID_KEY, v);
        }
        r
    }

    /// Runs the frontend for the build and returns its result (or its error)
    /// to the daemon, which exports it and answers the build's Solve.
    pub async fn run(&self, req: FrontendSolve) -> Result<(), FrontendError> {
        let mut c = self.client.clone();
        let caps = c
            .ping(self.request(PingRequest {}))
            .await
            .map_err(FrontendError)?
            .into_inner();
        let can_return = caps
            .frontend_api_caps
            .iter()
            .any(|cap| cap.id == CAP_RETURN && cap.enabled);
        let solve = SolveRequest {
            definition: req.definition,
            frontend: req.frontend,
            frontend_opt: req.frontend_opt,
            allow_result_return: true,
            allow_result_array_ref: true,
            r#final: !can_return,
            exporter_attr: if can_return {
                Vec::new()
            } else {
                b"{}".to_vec()
            },
            ..Default::default()
        };
        let solved = c.solve(self.request(solve)).await;
        if !can_return {
            return solved.map(|_| ()).map_err(FrontendError);
        }
        let (ret, out) = match solved {
            Ok(resp) => (
                ReturnRequest {
                    result: resp.into_inner().result,
                    error: None,
                },
                Ok(()),
            ),
            Err(status) => (
                ReturnRequest {
                    result: None,
                    // the frontend's own status, details (its Dockerfile
                    // location) included, as buildctl returns it
                    error: Some(RpcStatus {
                        code: status.code() as i32,
                        message: status.message().to_string(),
                        details: RpcStatus::decode(status.details())
                            .map(|s| s.details)
                            .unwrap_or_default(),
                    }),
                },
                Err(FrontendError(status)),
            ),
        };
        // the build may already have ended (its Solve failed): its answer says why
        let _ = c.r#return(self.request(ret)).await;
        out
    }
}
