//! Writing one part (a shard's rows of a segment) into a node's local table.
//!
//! The node comes from the proxy's pick API (`purpose=write`, pinned to the part's shard
//! once it has one); if the API cannot be reached, from the sidecar's own picker, which
//! probes the same cluster. A node that fails the insert is set aside for this part and
//! another replica of the same shard tried; when none is left, the part waits (doubling
//! backoff) and tries again: a part is never dropped. A part ClickHouse refuses for its
//! data is split in halves until the refused rows are isolated; only those are returned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::batch::Part;
use crate::metrics::METRICS;
use crate::picker::{Cluster, Purpose};
use crate::proxy::body::ReqBody;
use crate::upstream::{Account, Node};

/// ClickHouse error codes that mean "this data is wrong", not "this node is unwell":
/// parse and conversion errors, 190 (the arrays of a Nested column differ in length), 349
/// (NULL into a non-Nullable column), 395 (`throwIf` in a materialized view), 469 (a
/// constraint).
const DATA_ERRORS: &[u32] = &[
    6, 26, 27, 32, 33, 38, 41, 53, 69, 70, 72, 117, 131, 190, 349, 395, 469,
];

#[derive(Debug)]
pub enum InsertError {
    /// The node refused the data itself: splitting finds the rows at fault.
    Data(String),
    /// The node, the network or the server's state: try another replica.
    Node(String),
}

/// The proxy's pick API.
pub struct PickApi {
    /// The proxy's admin listener, with a keep-alive pool like any node's.
    pub endpoint: Node,
    pub token: Option<HeaderValue>,
    pub timeout: Duration,
}

pub struct Target {
    pub task: String,
    /// `db.table`, for the metrics.
    pub table: String,
    pub cluster: Arc<Cluster>,
    pub account: Arc<Account>,
    /// `/?query=INSERT ...` for this table and column list.
    pub path_and_query: String,
    pub pick_api: Option<PickApi>,
    pub insert_timeout: Duration,
    /// The servers know `insert_deduplication_token` (22.2+): each insert names its
    /// segment, so two segments with identical rows are never taken for one.
    pub dedup_token: bool,
}

/// What became of a part.
#[derive(Debug)]
pub struct Written {
    pub shard: u32,
    /// (row index, ClickHouse's error) for rows it refused.
    pub refused: Vec<(usize, String)>,
}

/// Sends one request on a pooled connection and reads the whole answer.
async fn exchange(
    node: &Node,
    req: Request<ReqBody>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let work = async {
        let mut upstream = node.checkout().await.map_err(|e| e.to_string())?;
        let resp = upstream.send(req).await.map_err(|f| f.error.to_string())?;
        let status = resp.status().as_u16();
        let body = upstream
            .read_body(resp.into_body())
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        node.checkin(upstream);
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Resolves once the picker's probes mark `node` down.
async fn went_down(node: &Node) {
    while !node.state.is_down() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn error_code(text: &str) -> Option<u32> {
    let at = text.find("Code: ")? + 6;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl Target {
    /// The node for a part: the pick API's choice, or the embedded picker's; never one of
    /// `failed`. `Err` says why no node can take it now.
    async fn pick(
        &self,
        shard: Option<u32>,
        failed: &[Arc<Node>],
    ) -> Result<(u32, Arc<Node>), String> {
        if failed.is_empty() {
            if let Some(api) = &self.pick_api {
                match self.pick_from_api(api, shard).await {
                    Ok(Some(pick)) => return Ok(pick),
                    Ok(None) => {}
                    Err(refusal) => return Err(refusal),
                }
            }
        }
        let view = self.cluster.view();
        let t = &view.topology;
        let tried: Vec<usize> = (0..t.nodes.len())
            .filter(|&i| failed.iter().any(|f| Arc::ptr_eq(f, &t.nodes[i])))
            .collect();
        let pick = if tried.is_empty() {
            view.pick(Purpose::Write, shard, [rand::random(), rand::random()])
                .map_err(|no| {
                    let reasons: Vec<String> = no
                        .reasons
                        .iter()
                        .map(|(i, e)| format!("{}: {e}", t.nodes[*i].label))
                        .collect();
                    format!("no node can take writes ({})", reasons.join("; "))
                })?
        } else {
            // A replica of the same shard that has not failed this part.
            let shard_index = shard.and_then(|n| t.shard_index(n));
            let candidates: Vec<usize> = match shard_index {
                Some(s) => t.shards[s]
                    .nodes
                    .iter()
                    .copied()
                    .filter(|i| !tried.contains(i))
                    .collect(),
                None => (0..t.nodes.len()).filter(|i| !tried.contains(i)).collect(),
            };
            candidates
                .into_iter()
                .filter(|&i| view.standings[i].get(Purpose::Write).is_ok())
                .max_by_key(|&i| *view.standings[i].get(Purpose::Write).as_ref().unwrap_or(&0))
                .ok_or_else(|| "every replica of the shard failed this batch".to_string())?
        };
        let number = t.shards[t.replicas[pick].shard].number;
        Ok((number, t.nodes[pick].clone()))
    }

    /// `Ok(None)`: the API could not be reached (use the embedded picker); `Err`: it
    /// answered that no node can take the write.
    async fn pick_from_api(
        &self,
        api: &PickApi,
        shard: Option<u32>,
    ) -> Result<Option<(u32, Arc<Node>)>, String> {
        let mut uri = format!("/v1/pick?cluster={}&purpose=write", self.cluster.name);
        if let Some(s) = shard {
            uri.push_str(&format!("&shard={s}"));
        }
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::HOST, api.endpoint.authority.clone());
        if let Some(t) = &api.token {
            req = req.header(header::AUTHORIZATION, t.clone());
        }
        let Ok(req) = req.body(ReqBody::Empty) else {
            return Ok(None);
        };
        let (status, body) = match exchange(&api.endpoint, req, api.timeout).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "Pick API unreachable; using the embedded picker");
                return Ok(None);
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match status {
            200 => {
                let (Some(host), Some(port), Some(shard)) = (
                    v["host"].as_str(),
                    v["http_port"].as_u64(),
                    v["shard"].as_u64(),
                ) else {
                    return Ok(None);
                };
                // Reuse our own node (its pool) when it is one we know.
                let topology = self.cluster.topology();
                let known = topology
                    .nodes
                    .iter()
                    .find(|n| n.host == host && u64::from(n.port) == port)
                    .cloned();
                let node = known.unwrap_or_else(|| {
                    Arc::new(Node::new(host, port as u16, 9000, &Default::default()))
                });
                Ok(Some((shard as u32, node)))
            }
            503 => Err(v["reason"].as_str().unwrap_or("no node").to_string()),
            _ => Ok(None),
        }
    }

    /// One insert, its body one compressed block (see `compress`: a body cut short is
    /// refused whole, never inserted as a smaller block).
    async fn insert(
        &self,
        node: &Node,
        body: &[u8],
        token: Option<&str>,
    ) -> Result<(), InsertError> {
        let body = super::compress::lz4_block(body).map_err(InsertError::Node)?;
        let uri = match token {
            Some(t) if self.dedup_token => format!(
                "{}&insert_deduplication_token={}",
                self.path_and_query,
                form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            ),
            _ => self.path_and_query.clone(),
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::HOST, node.authority.clone())
            .header(header::AUTHORIZATION, self.account.authorization.clone())
            .header(header::CONTENT_LENGTH, body.len())
            .body(ReqBody::Full(http_body_util::Full::new(body)))
            .map_err(|e| InsertError::Node(e.to_string()))?;
        let (status, text) = exchange(node, req, self.insert_timeout)
            .await
            .map_err(InsertError::Node)?;
        if status == 200 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&text).trim().to_string();
        match error_code(&text) {
            Some(code) if DATA_ERRORS.contains(&code) => Err(InsertError::Data(text)),
            _ => Err(InsertError::Node(format!("HTTP {status}: {text}"))),
        }
    }

    /// The shard for a random-sharded segment, as the picker chooses it now (waiting while
    /// no shard can take writes); `None` only if stopped first.
    pub async fn choose_shard(&self, stop: &CancellationToken) -> Option<u32> {
        let mut backoff = Backoff::default();
        loop {
            match self.pick(None, &[]).await {
                Ok((shard, _)) => return Some(shard),
                Err(why) => {
                    tracing::warn!(task = %self.task, reason = %why, "No shard takes writes; waiting");
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Writes a part, whatever it takes; `None` only if stopped first. `token` names the
    /// part (topic, partition, offsets) for servers that take a deduplication token.
    pub async fn write(
        &self,
        part: &Part,
        token: &str,
        stop: &CancellationToken,
    ) -> Option<Written> {
        let mut shard = part.shard;
        let mut refused = Vec::new();
        // Row ranges still to write; a refused range is split.
        let mut pending = vec![(0usize, part.rows())];
        let mut failed: Vec<Arc<Node>> = Vec::new();
        let mut backoff = Backoff::default();
        while let Some((from, to)) = pending.pop() {
            loop {
                if stop.is_cancelled() {
                    return None;
                }
                let (number, node) = match self.pick(shard, &failed).await {
                    Ok(p) => p,
                    Err(why) => {
                        tracing::warn!(task = %self.task, shard = ?shard, reason = %why, retry_in_ms = backoff.next().as_millis() as u64, "No node for a batch; waiting");
                        failed.clear();
                        if !backoff.wait(stop).await {
                            return None;
                        }
                        continue;
                    }
                };
                // The first pick decides the shard of a random-sharded part: a retry must go
                // back to the same shard.
                shard = Some(number);
                let started = Instant::now();
                let body = part.slice(from, to);
                let range_token = format!("{token}:{from}-{to}");
                // A node that goes down under an insert (stopped, partitioned) would hold
                // it until the timeout: give up on it as soon as the probes say so. The
                // retry on another replica is safe: the shard deduplicates the block.
                let outcome = tokio::select! {
                    r = self.insert(&node, body, Some(&range_token)) => r,
                    _ = went_down(&node) => Err(InsertError::Node("the node went down during the insert".into())),
                };
                tracing::debug!(task = %self.task, node = %node.label, shard = number, token = %range_token, ok = outcome.is_ok(), "Insert");
                match outcome {
                    Ok(()) => {
                        let labels = [
                            self.task.as_str(),
                            self.table.as_str(),
                            &number.to_string(),
                            node.label.as_str(),
                        ];
                        METRICS
                            .ingest_rows
                            .with_label_values(&labels)
                            .inc_by((to - from) as u64);
                        METRICS.ingest_batches.with_label_values(&labels).inc();
                        METRICS
                            .ingest_insert_seconds
                            .with_label_values(&[self.task.as_str()])
                            .observe(started.elapsed().as_secs_f64());
                        backoff.reset();
                        break;
                    }
                    Err(InsertError::Data(e)) if to - from == 1 => {
                        refused.push((from, e));
                        break;
                    }
                    Err(InsertError::Data(e)) => {
                        tracing::warn!(task = %self.task, node = %node.label, rows = to - from, error = %e, "ClickHouse refused the batch's data; splitting it");
                        let mid = from + (to - from) / 2;
                        pending.push((mid, to));
                        pending.push((from, mid));
                        break;
                    }
                    Err(InsertError::Node(e)) => {
                        tracing::warn!(task = %self.task, node = %node.label, shard = number, error = %e, "Insert failed; trying another replica");
                        METRICS
                            .ingest_insert_failures
                            .with_label_values(&[self.task.as_str(), node.label.as_str()])
                            .inc();
                        failed.push(node);
                    }
                }
            }
        }
        refused.sort_by_key(|(row, _)| *row);
        Some(Written {
            shard: shard.unwrap_or(0),
            refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_clickhouse_error_codes() {
        assert_eq!(
            error_code("Code: 33, e.displayText() = DB::Exception: Cannot read all data"),
            Some(33)
        );
        assert_eq!(
            error_code("Code: 252. DB::Exception: Too many parts"),
            Some(252)
        );
        assert_eq!(error_code("bad gateway"), None);
    }
}
