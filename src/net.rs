//! Listener plumbing both frontends share: accepting a TCP connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Accepts one connection, or waits forever if there is no listener. Accept errors (e.g.
/// out of file descriptors) are logged and paced instead of spinning.
pub async fn accept(listener: Option<&TcpListener>) -> Option<(TcpStream, SocketAddr)> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer))
        }
        Err(e) => {
            tracing::warn!(error = %e, "Accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
