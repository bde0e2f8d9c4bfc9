//! Asking the proxy's pick API (`/v1/pick`) for a node, over a kept-alive connection.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request};

use crate::picker::{Backend, Cluster};
use crate::upstream::{Body, Node};

/// The proxy's pick API.
pub struct PickApi {
    /// The proxy's admin listener, with a keep-alive pool like any node's.
    pub endpoint: Node,
    /// `Bearer <token>`, if the admin listener needs one.
    pub token: Option<HeaderValue>,
    pub timeout: Duration,
}

impl PickApi {
    /// A node for a write of `cluster` (within `shard` if given). `Ok(None)`: the API could
    /// not be reached or gave no usable answer (use the embedded picker); `Err`: it answered
    /// that no node can take the write, and why.
    pub async fn pick(
        &self,
        cluster: &Cluster,
        shard: Option<u32>,
    ) -> Result<Option<(u32, Arc<Backend>)>, String> {
        let mut uri = format!("/v1/pick?cluster={}&purpose=write", cluster.name);
        if let Some(s) = shard {
            uri.push_str(&format!("&shard={s}"));
        }
        let Ok(uri) = uri.parse::<http::Uri>() else {
            return Ok(None);
        };
        let make = || {
            let mut req = Request::new(Body::Empty);
            *req.method_mut() = Method::GET;
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            h.insert(header::HOST, self.endpoint.authority.clone());
            if let Some(t) = &self.token {
                h.insert(header::AUTHORIZATION, t.clone());
            }
            req
        };
        let answer = match self.endpoint.exchange(make, self.timeout).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "Pick API unreachable; using the embedded picker");
                return Ok(None);
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        match answer.status.as_u16() {
            200 => {
                let (Some(host), Some(port), Some(shard)) = (
                    v["host"].as_str(),
                    v["http_port"].as_u64().and_then(|p| u16::try_from(p).ok()),
                    v["shard"].as_u64().and_then(|s| u32::try_from(s).ok()),
                ) else {
                    return Ok(None);
                };
                // Our own backend (its pool) when it is one we know.
                let topology = cluster.topology();
                let known = topology
                    .nodes
                    .iter()
                    .find(|n| n.node.host == host && n.node.port == port)
                    .cloned();
                let backend = known.unwrap_or_else(|| {
                    Arc::new(Backend::new(Node::new(
                        host,
                        port,
                        9000,
                        &Default::default(),
                    )))
                });
                Ok(Some((shard, backend)))
            }
            503 => Err(v["reason"].as_str().unwrap_or("no node").to_string()),
            _ => Ok(None),
        }
    }
}
