//! The gRPC backend of `bench/grpc.sh`: a tonic server of the test service
//! (`proto/test/echo.proto`) whose `Unary` answers with the request's message and payload.
//! h2c only (HTTP/2 with prior knowledge), one thread, as the HTTP/1.1 benchmarks' backend.
//!
//! ```sh
//! cargo build --release --example grpc_echo
//! target/release/examples/grpc_echo 127.0.0.1:19000
//! ```
//!
//! An example rather than a binary of the package: tonic's server side is a dev-dependency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

mod pb {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]
    include!(concat!(env!("OUT_DIR"), "/skyline.test.rs"));
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

struct Service;

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = request.into_inner();
        Ok(Response::new(EchoReply {
            message: req.message,
            payload: req.payload,
            index: 0,
        }))
    }

    type ServerStreamStream = Replies;

    async fn server_stream(&self, _: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented(
            "the benchmark backend answers Unary only",
        ))
    }

    async fn client_stream(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented(
            "the benchmark backend answers Unary only",
        ))
    }

    type BidiStream = Replies;

    async fn bidi(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented(
            "the benchmark backend answers Unary only",
        ))
    }
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .expect("usage: grpc_echo ADDR:PORT")
        .parse()
        .expect("ADDR:PORT");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(Service))
                .serve(addr)
                .await
                .unwrap();
        });
}
