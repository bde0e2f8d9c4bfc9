//! Logging a native client in: its Hello (and nothing else: no packet after it is read
//! before the user is known), the user checked by the gateway, a connection to a node made
//! with the user's cluster account, and the Hello the client gets, which carries the node's
//! name, version and timezone and the one revision both legs will speak.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::query::Refusal;
use super::upstream::{self, Target, Upstream};
use super::{Frontend, LOGIN_TIMEOUT};
use crate::clickhouse::codes;
use crate::clickhouse::native::client::{Hello, WITH_QUOTA_KEY};
use crate::clickhouse::native::server::{ServerHello, MAX_REVISION};
use crate::clickhouse::native::WalkError;
use crate::gateway::{Credentials, GatewayError, User};
use crate::metrics::METRICS;
use crate::picker::Purpose;

/// A Hello is a few short strings; anything this long is not one.
const MAX_HELLO: usize = 64 * 1024;

/// User names ClickHouse reserves for its own authentication schemes (interserver
/// secret, SSH keys, JWT): never a chgate user.
const RESERVED_USERS: [&str; 3] = [
    " INTERSERVER SECRET ",
    " SSH KEY AUTHENTICATION ",
    " JWT AUTHENTICATION ",
];

/// A logged-in client connection.
pub struct Connection<S> {
    pub client: S,
    pub peer: SocketAddr,
    /// Client bytes received after its Hello.
    pub buf: BytesMut,
    /// The client's Hello, its password cleared.
    pub hello: Hello,
    pub user: Arc<User>,
    /// The revision both legs speak.
    pub revision: u64,
    /// The Hello the client was given.
    pub told: ServerHello,
    pub upstream: Upstream,
}

/// Logs the client in, or answers it with an Exception and gives up (`None`).
pub async fn login<S>(frontend: &Frontend, mut client: S, peer: SocketAddr) -> Option<Connection<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let hello = match tokio::time::timeout(LOGIN_TIMEOUT, read_hello(&mut client, &mut buf)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(Some(refusal))) => {
            count("bad_hello");
            tracing::info!(%peer, error = ?refusal, "Native client sent no valid Hello");
            let _ = client.write_all(&refusal.packet()).await;
            return None;
        }
        Ok(Err(None)) | Err(_) => {
            count("bad_hello");
            tracing::debug!(%peer, "Native client left or timed out before its Hello");
            return None;
        }
    };
    match start(frontend, &hello, peer).await {
        Ok((user, revision, told, upstream)) => {
            let mut out = Vec::with_capacity(128);
            told.write(&mut out, revision);
            if client.write_all(&out).await.is_err() {
                return None;
            }
            count("ok");
            METRICS
                .native_bytes
                .with_label_values(&["to_client"])
                .inc_by(out.len() as u64);
            tracing::debug!(%peer, user = %user.name, client = %hello, node = upstream.backend.label(), revision, "Native client logged in");
            let mut hello = hello;
            hello.password.clear();
            Some(Connection {
                client,
                peer,
                buf,
                hello,
                user,
                revision,
                told,
                upstream,
            })
        }
        Err((result, refusal)) => {
            count(result);
            tracing::info!(%peer, user = %hello.user, client = %hello, error = ?refusal, "Native login refused");
            let _ = client.write_all(&refusal.packet()).await;
            let _ = client.shutdown().await;
            None
        }
    }
}

fn count(result: &str) {
    METRICS
        .native_connections
        .with_label_values(&[result])
        .inc();
}

/// Reads the client's Hello: `Err(None)` if the client left first.
async fn read_hello<S>(client: &mut S, buf: &mut BytesMut) -> Result<Hello, Option<Refusal>>
where
    S: AsyncRead + Unpin,
{
    loop {
        match Hello::read(buf) {
            Ok((hello, len)) => {
                let _ = buf.split_to(len);
                METRICS
                    .native_bytes
                    .with_label_values(&["to_server"])
                    .inc_by(len as u64);
                return Ok(hello);
            }
            Err(WalkError::Incomplete) if buf.len() < MAX_HELLO => {
                match client.read_buf(buf).await {
                    Ok(0) | Err(_) => return Err(None),
                    Ok(_) => {}
                }
            }
            Err(WalkError::Incomplete) => {
                return Err(Some(Refusal::Protocol {
                    code: codes::UNEXPECTED_PACKET_FROM_CLIENT,
                    message: "Unexpected packet from client: a Hello longer than 64 KiB".into(),
                }))
            }
            Err(e) => {
                return Err(Some(Refusal::Protocol {
                    code: codes::UNEXPECTED_PACKET_FROM_CLIENT,
                    message: format!("Unexpected packet from client: {e} (this is ClickHouse's native protocol port)"),
                }))
            }
        }
    }
}

type Started = (Arc<User>, u64, ServerHello, Upstream);

/// Authenticates the client and connects to a node; on failure, the result label and the
/// refusal.
async fn start(
    frontend: &Frontend,
    hello: &Hello,
    peer: SocketAddr,
) -> Result<Started, (&'static str, Refusal)> {
    let gateway = &frontend.gateway;
    if RESERVED_USERS.contains(&hello.user.as_str()) {
        let e =
            gateway.bad_credentials(format!("{:?} is reserved by ClickHouse", hello.user.trim()));
        return Err(("auth_failed", e.into()));
    }
    let creds = Credentials {
        user: if hello.user.is_empty() {
            "default".into()
        } else {
            hello.user.clone()
        },
        password: hello.password.clone(),
    };
    let user = gateway
        .authenticate(&creds, peer.ip())
        .await
        .map_err(|e: GatewayError| ("auth_failed", e.into()))?;
    if hello.revision < WITH_QUOTA_KEY {
        return Err((
            "refused",
            Refusal::Protocol {
                code: codes::UNKNOWN_PACKET_FROM_CLIENT,
                message: format!(
                    "The client speaks protocol revision {}; chgate needs {WITH_QUOTA_KEY} or later",
                    hello.revision
                ),
            },
        ));
    }
    let revision = hello.revision.min(MAX_REVISION);
    let purpose = if user.readonly {
        Purpose::Read
    } else {
        Purpose::Write
    };
    let target = Target {
        user: &user,
        client: hello,
        revision,
        database: &hello.database,
        purpose,
        max_attempts: gateway.settings.max_attempts(),
        same_as: None,
        avoid: &[],
    };
    let upstream = upstream::connect(&target)
        .await
        .map_err(|r| ("upstream_failed", r))?;
    let revision = revision.min(upstream.hello.revision);
    let mut told = upstream.hello.clone();
    told.revision = revision;
    Ok((user, revision, told, upstream))
}
