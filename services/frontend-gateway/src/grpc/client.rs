//! [`Bridge`] over the solver's LLBBridge gRPC service.

use std::time::Duration;

use kiln_llb::pb;
use kiln_oci::Platform;
use kiln_proto::moby::buildkit::v1::frontend::{
    ReadFileRequest, ResolveImageConfigRequest, SolveRequest, llb_bridge_client::LlbBridgeClient,
    result,
};
use tonic::transport::Channel;

use super::convert::{bridge_error, platform_to_pb};
use crate::{Bridge, BridgeError, BridgeErrorKind, ResolvedConfig};

/// gRPC metadata key carrying the build id on every bridge call.
pub const BUILD_ID_HEADER: &str = "kiln-build-id";
/// Deadline for bridge calls other than Solve (which runs as long as the build needs).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The solver's LLBBridge, reached over a gRPC channel.
#[derive(Clone)]
pub struct GrpcBridge {
    client: LlbBridgeClient<Channel>,
}

impl GrpcBridge {
    pub fn new(channel: Channel) -> Self {
        GrpcBridge {
            client: LlbBridgeClient::new(channel),
        }
    }
}

fn request<T>(
    build_id: &str,
    message: T,
    timeout: Option<Duration>,
) -> Result<tonic::Request<T>, BridgeError> {
    let mut req = tonic::Request::new(message);
    let value = build_id.parse().map_err(|_| BridgeError {
        kind: BridgeErrorKind::InvalidArgument,
        message: format!("build id {build_id:?} is not a valid gRPC metadata value"),
    })?;
    req.metadata_mut().insert(BUILD_ID_HEADER, value);
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    Ok(req)
}

impl Bridge for GrpcBridge {
    async fn solve(
        &self,
        build_id: &str,
        definition: pb::Definition,
    ) -> Result<String, BridgeError> {
        let req = request(
            build_id,
            SolveRequest {
                definition: Some(definition),
                allow_result_return: true,
                ..Default::default()
            },
            None,
        )?;
        let resp = self
            .client
            .clone()
            .solve(req)
            .await
            .map_err(|s| bridge_error("solve", s))?
            .into_inner();
        let from_result = resp.result.and_then(|r| match r.result {
            Some(result::Result::Ref(r)) => Some(r.id),
            Some(result::Result::RefDeprecated(id)) => Some(id),
            Some(result::Result::Refs(_)) | None => None,
        });
        Ok(from_result.unwrap_or(resp.r#ref))
    }

    async fn read_file(
        &self,
        build_id: &str,
        reference: &str,
        path: &str,
    ) -> Result<Vec<u8>, BridgeError> {
        let req = request(
            build_id,
            ReadFileRequest {
                r#ref: reference.to_string(),
                file_path: path.to_string(),
                range: None,
            },
            Some(CALL_TIMEOUT),
        )?;
        let resp = self
            .client
            .clone()
            .read_file(req)
            .await
            .map_err(|s| bridge_error("read file", s))?;
        Ok(resp.into_inner().data)
    }

    async fn resolve_image_config(
        &self,
        build_id: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, BridgeError> {
        let req = request(
            build_id,
            ResolveImageConfigRequest {
                r#ref: reference.to_string(),
                platform: Some(platform_to_pb(platform)),
                resolve_mode: "default".to_string(),
                log_name: format!("[internal] load metadata for {reference}"),
                ..Default::default()
            },
            Some(CALL_TIMEOUT),
        )?;
        let resp = self
            .client
            .clone()
            .resolve_image_config(req)
            .await
            .map_err(|s| bridge_error("resolve image config", s))?
            .into_inner();
        Ok(ResolvedConfig {
            digest: resp.digest,
            config: resp.config,
            canonical_ref: resp.r#ref,
        })
    }
}
