//! In-memory connections for protocol tests: a server gets one end of a
//! `tokio::io::duplex` pipe, the test's client the other, with no socket in between.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;

/// The peer address an in-memory client appears to connect from.
pub const PEER: &str = "10.9.8.7:40000";

/// Runs `serve` on one end of a fresh in-memory connection; returns the other end.
pub fn connect<F, Fut>(serve: F) -> DuplexStream
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(server));
    client
}

/// An HTTP/1.1 client connected in memory to `frontend`, as from [`PEER`].
pub async fn http_client(frontend: Arc<chgate::http::Frontend>) -> SendRequest<Full<Bytes>> {
    let peer: SocketAddr = PEER.parse().unwrap();
    let stream = connect(move |server| async move {
        let _ = frontend.serve_stream(server, peer).await;
    });
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends `req` once the connection is ready; the status, headers and whole body.
pub async fn send(
    client: &mut SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    client.ready().await.unwrap();
    let resp = client.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}
