//! [`Bridge`] over the solver's LLBBridge gRPC service.

use std::time::Duration;

use kiln_llb::pb;
use kiln_oci::Platform;
use kiln_proto::moby::buildkit::v1::frontend::{
    ReadFileRequest, ResolveImageConfigRequest, SolveRequest, llb_bridge_client::LlbBridgeClient,
    result,
};
use kiln_session::dial::Channel;

use super::convert::bridge_error;
use crate::{Bridge, BridgeError, BridgeErrorKind, FrontendOutput, ResolvedConfig};

/// gRPC metadata key carrying the build id on every bridge call.
pub const BUILD_ID_HEADER: &str = "kiln-build-id";
/// Deadline for bridge calls other than Solve (which runs as long as the build needs).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The solver's LLBBridge, reached over a gRPC channel.
#[derive(Clone)]
pub struct GrpcBridge {
    client: LlbBridgeClient<Channel>,
}

/// The ResolveImageConfig request for `reference` on `platform`, shown as BuildKit
/// shows it (`[internal] load metadata for REF`).
fn config_request(reference: &str, platform: &Platform) -> ResolveImageConfigRequest {
    ResolveImageConfigRequest {
        r#ref: reference.to_string(),
        platform: Some(pb::Platform::from(platform)),
        log_name: format!("[internal] load metadata for {reference}"),
        ..Default::default()
    }
}

impl GrpcBridge {
    pub fn new(channel: Channel) -> Self {
        GrpcBridge {
            client: LlbBridgeClient::new(channel),
        }
    }

    /// One LLBBridge Solve for the build (no deadline: it runs as long as the build needs).
    async fn solve_request(
        &self,
        build_id: &str,
        msg: SolveRequest,
    ) -> Result<kiln_proto::moby::buildkit::v1::frontend::SolveResponse, BridgeError> {
        let req = request(build_id, msg, None)?;
        Ok(self
            .client
            .clone()
            .solve(req)
            .await
            .map_err(bridge_error)?
            .into_inner())
    }

    /// One LLBBridge ResolveImageConfig for the build: the digest, config and
    /// canonical reference.
    async fn resolve_config(
        &self,
        build_id: &str,
        msg: ResolveImageConfigRequest,
    ) -> Result<ResolvedConfig, BridgeError> {
        let req = request(build_id, msg, Some(CALL_TIMEOUT))?;
        let resp = self
            .client
            .clone()
            .resolve_image_config(req)
            .await
            .map_err(bridge_error)?
            .into_inner();
        Ok(ResolvedConfig {
            digest: resp.digest,
            config: resp.config,
            canonical_ref: resp.r#ref,
        })
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
    async fn warn(&self, build_id: &str, w: crate::BuildWarning) -> Result<(), BridgeError> {
        let msg = kiln_proto::moby::buildkit::v1::frontend::WarnRequest {
            digest: w.vertex,
            level: w.level,
            short: w.short.into_bytes(),
            detail: w.detail.into_iter().map(String::into_bytes).collect(),
            url: w.url,
            info: w.source,
            ranges: w.ranges,
        };
        let req = request(build_id, msg, Some(CALL_TIMEOUT))?;
        self.client.clone().warn(req).await.map_err(bridge_error)?;
        Ok(())
    }

    async fn solve_frontend(
        &self,
        build_id: &str,
        frontend: &str,
        opts: std::collections::BTreeMap<String, String>,
    ) -> Result<FrontendOutput, BridgeError> {
        let resp = self
            .solve_request(
                build_id,
                SolveRequest {
                    frontend: frontend.to_string(),
                    frontend_opt: opts,
                    allow_result_return: true,
                    allow_result_array_ref: true,
                    ..Default::default()
                },
            )
            .await?;
        let res = resp.result.unwrap_or_default();
        let def = |r: kiln_proto::moby::buildkit::v1::frontend::Ref| r.def.unwrap_or_default();
        let mut out = FrontendOutput {
            metadata: res.metadata,
            ..Default::default()
        };
        match res.result {
            Some(result::Result::Ref(r)) => out.definition = def(r),
            Some(result::Result::Refs(m)) => {
                out.refs = m.refs.into_iter().map(|(k, r)| (k, def(r))).collect();
                out.definition = out.refs.values().next().cloned().unwrap_or_default();
            }
            Some(result::Result::RefDeprecated(_) | result::Result::RefsDeprecated(_)) => {
                return Err(BridgeError {
                    kind: BridgeErrorKind::Failed,
                    message: format!("frontend {frontend} returned refs without definitions"),
                });
            }
            None => {}
        }
        Ok(out)
    }

    async fn solve(
        &self,
        build_id: &str,
        definition: pb::Definition,
    ) -> Result<String, BridgeError> {
        let resp = self
            .solve_request(
                build_id,
                SolveRequest {
                    definition: Some(definition),
                    allow_result_return: true,
                    // the frontend reads what it solves (or shows it as a step): now
                    evaluate: true,
                    ..Default::default()
                },
            )
            .await?;
        let from_result = resp.result.and_then(|r| match r.result {
            Some(result::Result::Ref(r)) => Some(r.id),
            Some(result::Result::RefDeprecated(id)) => Some(id),
            Some(result::Result::Refs(_) | result::Result::RefsDeprecated(_)) | None => None,
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
                mount_index: 0,
            },
            Some(CALL_TIMEOUT),
        )?;
        let resp = self
            .client
            .clone()
            .read_file(req)
            .await
            .map_err(bridge_error)?;
        Ok(resp.into_inner().data)
    }

    async fn resolve_image_config(
        &self,
        build_id: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, BridgeError> {
        self.resolve_config(
            build_id,
            ResolveImageConfigRequest {
                resolve_mode: "default".to_string(),
                ..config_request(reference, platform)
            },
        )
        .await
    }

    async fn resolve_oci_layout_config(
        &self,
        build_id: &str,
        reference: &str,
        platform: &Platform,
        store: &str,
    ) -> Result<ResolvedConfig, BridgeError> {
        self.resolve_config(
            build_id,
            ResolveImageConfigRequest {
                // BuildKit's ResolverTypeOCILayout; the store is the
                // build's own client's (no session named)
                resolver_type: 1,
                store_id: store.to_string(),
                ..config_request(reference, platform)
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::moby::buildkit::v1::frontend as fe;
    use std::sync::{Arc, Mutex};

    use kiln_proto::moby::buildkit::v1::frontend::{
        PingRequest, PongResponse, ReadFileResponse, ResolveImageConfigResponse,
        Result as BridgeResult, SolveResponse,
        llb_bridge_server::{LlbBridge, LlbBridgeServer},
    };
    use tonic::{Request, Response, Status};

    use super::*;

    /// A call the fake solver received.
    #[derive(Debug, PartialEq)]
    struct SeenCall {
        method: &'static str,
        /// The kiln-build-id header.
        build_id: Option<String>,
        /// Whether a grpc-timeout header (a deadline) came with it.
        has_deadline: bool,
    }

    type Seen = Arc<Mutex<Vec<SeenCall>>>;

    struct FakeSolver {
        seen: Seen,
    }

    impl FakeSolver {
        fn record<T>(&self, method: &'static str, req: &Request<T>) {
            let build_id = req
                .metadata()
                .get(BUILD_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let has_deadline = req.metadata().get("grpc-timeout").is_some();
            self.seen.lock().expect("lock").push(SeenCall {
                method,
                build_id,
                has_deadline,
            });
        }
    }

    /// `impl LlbBridge for FakeSolver`: the calls written out, then every call kiln's
    /// Dockerfile frontend does not make, answering `unimplemented`.
    macro_rules! fake_solver {
        ({ $($made:tt)* } not made: $($call:ident($req:ty) -> $resp:ty;)*) => {
            #[tonic::async_trait]
            impl LlbBridge for FakeSolver {
                $($made)*
                $(
                    async fn $call(&self, _r: Request<$req>) -> Result<Response<$resp>, Status> {
                        Err(Status::unimplemented("fake"))
                    }
                )*
            }
        };
    }

    fake_solver! {
        {
            async fn resolve_image_config(
                &self,
                req: Request<ResolveImageConfigRequest>,
            ) -> Result<Response<ResolveImageConfigResponse>, Status> {
                self.record("resolve", &req);
                let r = req.into_inner();
                let platform = r.platform.unwrap_or_default();
                Ok(Response::new(ResolveImageConfigResponse {
                    digest: "sha256:abc".into(),
                    config: format!("{}/{}", platform.os, platform.architecture).into_bytes(),
                    r#ref: format!("docker.io/library/{}:latest", r.r#ref),
                }))
            }

            async fn solve(
                &self,
                req: Request<SolveRequest>,
            ) -> Result<Response<SolveResponse>, Status> {
                self.record("solve", &req);
                let ops = req.into_inner().definition.map_or(0, |d| d.def.len());
                Ok(Response::new(SolveResponse {
                    r#ref: String::new(),
                    result: Some(BridgeResult {
                        result: Some(result::Result::Ref(
                            kiln_proto::moby::buildkit::v1::frontend::Ref {
                                id: format!("ref-{ops}"),
                                def: None,
                            },
                        )),
                        metadata: Default::default(),
                    }),
                }))
            }

            async fn read_file(
                &self,
                req: Request<ReadFileRequest>,
            ) -> Result<Response<ReadFileResponse>, Status> {
                self.record("read_file", &req);
                let r = req.into_inner();
                if r.file_path != "Dockerfile" {
                    return Err(Status::not_found(format!(
                        "open {}: no such file",
                        r.file_path
                    )));
                }
                Ok(Response::new(ReadFileResponse {
                    data: format!("from {}", r.r#ref).into_bytes(),
                }))
            }

            async fn ping(
                &self,
                _: Request<PingRequest>,
            ) -> Result<Response<PongResponse>, Status> {
                Ok(Response::new(PongResponse::default()))
            }

            type ExecProcessStream = tokio_stream::Empty<Result<fe::ExecMessage, Status>>;
        }
        not made:
        resolve_source_meta(fe::ResolveSourceMetaRequest) -> fe::ResolveSourceMetaResponse;
        read_dir(fe::ReadDirRequest) -> fe::ReadDirResponse;
        stat_file(fe::StatFileRequest) -> fe::StatFileResponse;
        evaluate(fe::EvaluateRequest) -> fe::EvaluateResponse;
        r#return(fe::ReturnRequest) -> fe::ReturnResponse;
        inputs(fe::InputsRequest) -> fe::InputsResponse;
        new_container(fe::NewContainerRequest) -> fe::NewContainerResponse;
        release_container(fe::ReleaseContainerRequest) -> fe::ReleaseContainerResponse;
        exec_process(tonic::Streaming<fe::ExecMessage>) -> Self::ExecProcessStream;
        read_file_container(ReadFileRequest) -> ReadFileResponse;
        read_dir_container(fe::ReadDirRequest) -> fe::ReadDirResponse;
        stat_file_container(fe::StatFileRequest) -> fe::StatFileResponse;
        warn(fe::WarnRequest) -> fe::WarnResponse;
    }

    async fn start_solver(seen: Seen) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LlbBridgeServer::new(FakeSolver { seen }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
            .into()
    }

    #[tokio::test]
    async fn every_call_carries_the_build_id_and_only_solve_has_no_deadline() {
        let seen = Seen::default();
        let bridge = GrpcBridge::new(start_solver(seen.clone()).await);

        let def = pb::Definition {
            def: vec![vec![], vec![]],
            ..Default::default()
        };
        assert_eq!(bridge.solve("b-1", def).await.expect("solve"), "ref-2");
        assert_eq!(
            bridge
                .read_file("b-1", "ref-2", "Dockerfile")
                .await
                .expect("read"),
            b"from ref-2"
        );
        let resolved = bridge
            .resolve_image_config("b-1", "busybox", &Platform::new("linux", "arm64", None))
            .await
            .expect("resolve");
        assert_eq!(resolved.config, b"linux/arm64");
        assert_eq!(resolved.canonical_ref, "docker.io/library/busybox:latest");
        assert_eq!(resolved.digest, "sha256:abc");

        let call = |method, has_deadline| SeenCall {
            method,
            build_id: Some("b-1".to_string()),
            has_deadline,
        };
        assert_eq!(
            *seen.lock().expect("lock"),
            [
                call("solve", false),
                call("read_file", true),
                call("resolve", true)
            ]
        );
    }

    #[tokio::test]
    async fn solver_status_becomes_a_bridge_error() {
        let bridge = GrpcBridge::new(start_solver(Seen::default()).await);
        let err = bridge
            .read_file("b-1", "ref-1", "Missing")
            .await
            .expect_err("not found");
        assert_eq!(err.kind, BridgeErrorKind::NotFound);
        assert!(
            err.message.contains("open Missing: no such file"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn frontend_server_maps_errors_to_status() {
        use kiln_proto::kiln::frontend::v1::{FrontendRequest, frontend_client::FrontendClient};

        let gateway = Arc::new(crate::Gateway::new(GrpcBridge::new(
            start_solver(Seen::default()).await,
        )));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(crate::grpc::server(gateway))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = FrontendClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");

        let status = client
            .solve(FrontendRequest {
                build_id: "b-1".into(),
                frontend: "gateway.v0".into(),
                ..Default::default()
            })
            .await
            .expect_err("unsupported frontend");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        let status = client
            .solve(FrontendRequest {
                build_id: "b-1".into(),
                frontend: crate::DOCKERFILE_FRONTEND.into(),
                attrs: [("filename".to_string(), "Missing".to_string())].into(),
                session_id: "s".into(),
            })
            .await
            .expect_err("no such Dockerfile");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().starts_with("read Dockerfile Missing: "),
            "{}",
            status.message()
        );
    }
}
