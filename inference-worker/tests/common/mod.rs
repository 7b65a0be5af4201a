//! A scripted fake cloud worker for the edge worker's tests: one that answers too late, or
//! answers garbage (the only fake in these tests, and only for faults).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use sedge_inference_worker::pb;
use sedge_inference_worker::pb::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};

/// What the fake cloud does wrong.
#[derive(Clone, Copy)]
pub enum Fault {
    /// Answers an error after this long.
    Slow(Duration),
    /// Answers 7 bytes that are no FP32 row.
    Garbage,
}

/// The fake cloud.
pub struct FakeCloud(pub Fault);

#[tonic::async_trait]
impl GrpcInferenceService for FakeCloud {
    async fn server_live(
        &self,
        _: tonic::Request<pb::ServerLiveRequest>,
    ) -> Result<tonic::Response<pb::ServerLiveResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: tonic::Request<pb::ServerReadyRequest>,
    ) -> Result<tonic::Response<pb::ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ServerReadyResponse {
            ready: true,
        }))
    }
    async fn model_ready(
        &self,
        _: tonic::Request<pb::ModelReadyRequest>,
    ) -> Result<tonic::Response<pb::ModelReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ModelReadyResponse { ready: true }))
    }
    async fn server_metadata(
        &self,
        _: tonic::Request<pb::ServerMetadataRequest>,
    ) -> Result<tonic::Response<pb::ServerMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn model_metadata(
        &self,
        _: tonic::Request<pb::ModelMetadataRequest>,
    ) -> Result<tonic::Response<pb::ModelMetadataResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
    async fn model_infer(
        &self,
        _: tonic::Request<pb::ModelInferRequest>,
    ) -> Result<tonic::Response<pb::ModelInferResponse>, tonic::Status> {
        match self.0 {
            Fault::Slow(d) => {
                tokio::time::sleep(d).await;
                Err(tonic::Status::internal("too late anyway"))
            }
            Fault::Garbage => Ok(tonic::Response::new(pb::ModelInferResponse {
                raw_output_contents: vec![vec![0xff; 7]],
                ..Default::default()
            })),
        }
    }
}

/// Serves a fake cloud on a free loopback port.
pub async fn fake_cloud(fault: Fault) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(FakeCloud(fault)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}
