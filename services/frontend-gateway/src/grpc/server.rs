//! `kiln.frontend.v1.Frontend` served over a [`Gateway`].

use std::sync::Arc;

use kiln_proto::kiln::frontend::v1::{
    FrontendRequest, FrontendResult,
    frontend_server::{Frontend, FrontendServer},
};
use tonic::{Request, Response, Status};

use crate::{Bridge, Gateway};

/// The generated Frontend service trait implemented over a [`Gateway`].
pub struct FrontendService<B> {
    gateway: Arc<Gateway<B>>,
}

/// The Frontend gRPC service, ready to add to a tonic router.
pub fn server<B: Bridge>(gateway: Arc<Gateway<B>>) -> FrontendServer<FrontendService<B>> {
    FrontendServer::new(FrontendService { gateway })
}

#[tonic::async_trait]
impl<B: Bridge> Frontend for FrontendService<B> {
    async fn solve(
        &self,
        request: Request<FrontendRequest>,
    ) -> Result<Response<FrontendResult>, Status> {
        let output = self.gateway.solve(request.into_inner().into()).await?;
        Ok(Response::new(output.into()))
    }
}
