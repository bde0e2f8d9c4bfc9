//! The Prometheus metrics chgate exports on the admin listener's `/metrics`.
//!
//! Labels are bounded: `user` and `node` come from the config (an unauthenticated request
//! is labelled `user="-"`), `status` is an HTTP status code (or `client_closed`), `kind`/`reason`/`result` are
//! fixed sets named in the code.

use std::sync::LazyLock;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_request_bytes: IntCounterVec,
    pub http_response_bytes: IntCounterVec,
    pub http_in_flight: IntGauge,
    pub http_errors: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    pub upstream_node_down: IntGaugeVec,
    pub upstream_connections: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub picks: IntCounterVec,
    pub failovers: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub declined_reads: IntCounterVec,
    pub hedges: IntCounterVec,
    pub hedge_after: GaugeVec,
    pub steered_reads: IntCounterVec,
    pub node_health: IntGaugeVec,
    pub node_weight: GaugeVec,
    pub node_probe_seconds: GaugeVec,
    pub node_replication_delay: IntGaugeVec,
    pub node_probe_failures: IntCounterVec,
    pub zookeeper_healthy: IntGaugeVec,
    pub topology_refreshes: IntCounterVec,
    pub ingest_consumed: IntCounterVec,
    pub ingest_parsed: IntCounterVec,
    pub ingest_dead_letters: IntCounterVec,
    pub ingest_rows: IntCounterVec,
    pub ingest_batches: IntCounterVec,
    pub ingest_insert_seconds: HistogramVec,
    pub ingest_insert_failures: IntCounterVec,
    pub ingest_ring_occupancy: IntGaugeVec,
    pub ingest_paused: IntGauge,
    pub ingest_pauses: IntCounter,
    pub ingest_pending_bytes: IntGauge,
    pub ingest_skipped_by_broker: IntCounter,
    pub ingest_fenced: IntCounterVec,
    pub ingest_columns_added: IntCounterVec,
    pub ingest_lag: IntGaugeVec,
    pub native_connections: IntCounterVec,
    pub native_open: IntGauge,
    pub native_queries: IntCounterVec,
    pub native_query_duration: HistogramVec,
    pub native_bytes: IntCounterVec,
    pub native_errors: IntCounterVec,
    pub native_reconnects: IntCounterVec,
    pub quota_rejections: IntCounterVec,
    pub quota_queue_wait: HistogramVec,
    pub queries_in_flight: IntGaugeVec,
    pub quota_queued: IntGaugeVec,
    pub quota_kills: IntCounterVec,
    pub query_kills: IntCounterVec,
    pub fleet_members: IntGauge,
    pub config_stale_seconds: prometheus::Gauge,
    pub config_version: IntGauge,
    pub remote_servers_leader: IntGauge,
    pub remote_servers_changes: IntCounterVec,
    pub remote_servers_removed: IntGaugeVec,
    pub remote_servers_stale_nodes: IntGaugeVec,
    pub remote_servers_publish_errors: IntCounterVec,
    pub cdc_events: IntCounterVec,
    pub cdc_snapshot_rows: IntCounterVec,
    pub cdc_snapshot_tables_pending: IntGauge,
    pub cdc_lag_bytes: IntGauge,
    pub cdc_lag_seconds: prometheus::Gauge,
    pub cdc_commit_to_ack: prometheus::Histogram,
    pub cdc_confirmed_lsn: IntGauge,
    pub cdc_slot_retained_bytes: IntGauge,
    pub cdc_slot_safe_wal_bytes: IntGauge,
    pub cdc_slot_wal_status: IntGaugeVec,
    pub cdc_skipped: IntCounterVec,
    pub cdc_reconciled_rows: IntCounterVec,
    pub cdc_transactions: IntCounterVec,
    pub cdc_spilled_bytes: IntCounter,
    pub cdc_outbox_events: IntGauge,
    pub cdc_leader: IntGauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let http_requests = counter(
            "chgate_http_requests_total",
            "HTTP requests, counted as they end, by mapped user, HTTP status (`client_closed` when the client went away before the answer was complete) and upstream node (\"-\" when none was used).",
            &["user", "status", "node"],
        );
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "chgate_http_request_duration_seconds",
                "Time from receiving a request to the last byte of its response, by mapped user.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            &["user"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_request_duration.clone()))
            .expect("unique metric");
        let http_request_bytes = counter(
            "chgate_http_request_body_bytes_total",
            "Request body bytes received from clients and forwarded, by mapped user.",
            &["user"],
        );
        let http_response_bytes = counter(
            "chgate_http_response_body_bytes_total",
            "Response body bytes sent to clients from ClickHouse, by mapped user.",
            &["user"],
        );
        let http_in_flight = IntGauge::new(
            "chgate_http_in_flight_requests",
            "HTTP requests being handled now, including streaming responses.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_in_flight.clone()))
            .expect("unique metric");
        let http_errors = counter(
            "chgate_http_errors_total",
            "Requests the gateway answered with an error of its own, by kind.",
            &["kind"],
        );
        let auth_failures = counter(
            "chgate_auth_failures_total",
            "Failed client logins, by reason (unknown_user, bad_password, network_not_allowed, bad_credentials).",
            &["reason"],
        );
        let upstream_errors = counter(
            "chgate_upstream_errors_total",
            "Failures talking to ClickHouse nodes, by node and kind (connect, connect_timeout, handshake, send, stale_connection: a pooled connection the server had closed; the request went on a fresh one).",
            &["node", "kind"],
        );
        let upstream_in_flight = gauge_vec(
            "chgate_upstream_in_flight_requests",
            "Requests in flight to each ClickHouse node.",
            &["node"],
        );
        let upstream_node_down = gauge_vec(
            "chgate_upstream_node_down",
            "1 while a node is being skipped after refusing connections, else 0.",
            &["node"],
        );
        let upstream_connections = counter(
            "chgate_upstream_connections_opened_total",
            "New TCP connections opened to each ClickHouse node (a low rate means keep-alive reuse works).",
            &["node"],
        );
        let config_reloads = counter(
            "chgate_config_reloads_total",
            "Config changes seen (a SIGHUP, or a change under the ZooKeeper root), by result (ok, rejected: invalid, the running config stays).",
            &["result"],
        );
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let picks = counter(
            "chgate_picks_total",
            "Nodes chosen by the picker, by node and purpose (read, write): the proxy's own requests and /v1/pick answers.",
            &["node", "purpose"],
        );
        let failovers = counter(
            "chgate_failovers_total",
            "Requests sent again to another node after this node failed before answering (or could not be reached).",
            &["node"],
        );
        let retry_budget_exhausted = counter(
            "chgate_retry_budget_exhausted_total",
            "Failovers refused because the cluster's retry budget was spent; the client got the error.",
            &["cluster"],
        );
        let declined_reads = counter(
            "chgate_declined_reads_total",
            "Reads this node answered with a fan-out error (it could not reach a node the query needed: codes 32, 209, 210, 279), sent again to another node.",
            &["node"],
        );
        let hedges = counter(
            "chgate_hedges_total",
            "Reads still waiting for an answer after the hedge bound, by what became of them: `sent` (a second node was asked too), then `won` (the second node answered first) or `lost` (the first did); `no_budget` and `no_node` (no hedge could be sent); `moved` (native: a read whose node fell silent before its result was sent to another node instead).",
            &["cluster", "result"],
        );
        let hedge_after = GaugeVec::new(
            Opts::new(
                "chgate_hedge_after_seconds",
                "How long a read of the cluster waits for the first byte of its answer before it is hedged (upstream.hedge_after; with `auto`, from the cluster's recent first-byte times).",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(hedge_after.clone()))
            .expect("unique metric");
        let steered_reads = counter(
            "chgate_steered_reads_total",
            "Reads sent with load_balancing=in_order while a replica of the cluster was down, so that a node fanning them out avoids it (upstream.avoid_down_replicas).",
            &["cluster"],
        );
        let node_health = gauge_vec(
            "chgate_node_up",
            "1 while a node passes its health probes (with hysteresis), 0 while it is down.",
            &["cluster", "shard", "node"],
        );
        let node_weight = float_gauge_vec(
            "chgate_node_weight",
            "A node's current picker weight by purpose (read, write); 0 = excluded. 1000 is an idle healthy node of weight 1.",
            &["cluster", "shard", "node", "purpose"],
        );
        let node_probe_seconds = float_gauge_vec(
            "chgate_node_probe_round_trip_seconds",
            "The last successful /ping round trip of each node's probe.",
            &["node"],
        );
        let node_replication_delay = gauge_vec(
            "chgate_node_replication_delay_seconds",
            "The largest absolute_delay of the node's replicated tables, from the last probe.",
            &["node"],
        );
        let node_probe_failures = counter(
            "chgate_node_probe_failures_total",
            "Failed node probes, by node and reason (timeout, connect, status, parse).",
            &["node", "reason"],
        );
        let zookeeper_healthy = gauge_vec(
            "chgate_zookeeper_healthy",
            "1 while a shard group's ZooKeeper ensemble has a healthy quorum, else 0.",
            &["cluster", "group"],
        );
        let topology_refreshes = counter(
            "chgate_topology_refreshes_total",
            "Topology refreshes from system.clusters, by result (unchanged, changed, failed).",
            &["cluster", "result"],
        );
        let ingest_consumed = counter(
            "chgate_ingest_consumed_total",
            "Kafka messages consumed by chgate ingest, by task.",
            &["task"],
        );
        let ingest_parsed = counter(
            "chgate_ingest_parsed_total",
            "Rows parsed from messages, by task (one per message, 0 to 2 for a debezium task; counted as their batch is cut; a batch rebuilt after a crash counts again).",
            &["task"],
        );
        let ingest_dead_letters = counter(
            "chgate_ingest_dead_letters_total",
            "Messages sent to the dead-letter topic, by task and reason (parse, type, time_window, refused; debezium tasks also envelope, truncate, table, column).",
            &["task", "reason"],
        );
        let ingest_fenced = counter(
            "chgate_ingest_fenced_total",
            "Times a partition's writer found that another consumer had claimed the partition and stopped writing it.",
            &["task"],
        );
        let ingest_columns_added = counter(
            "chgate_ingest_columns_added_total",
            "Columns a debezium task with new_columns = \"add\" added to its table (ALTER TABLE ... ADD COLUMN on every replica).",
            &["task"],
        );
        let ingest_rows = counter(
            "chgate_ingest_rows_written_total",
            "Rows inserted, by task, table, shard and node.",
            &["task", "table", "shard", "node"],
        );
        let ingest_batches = counter(
            "chgate_ingest_batches_written_total",
            "Inserts that succeeded, by task, table, shard and node.",
            &["task", "table", "shard", "node"],
        );
        let ingest_insert_seconds = HistogramVec::new(
            HistogramOpts::new(
                "chgate_ingest_insert_duration_seconds",
                "Time one insert took, by task.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["task"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(ingest_insert_seconds.clone()))
            .expect("unique metric");
        let ingest_insert_failures = counter(
            "chgate_ingest_insert_failures_total",
            "Inserts a node failed (the batch went to another replica or waited), by task and node.",
            &["task", "node"],
        );
        let ingest_ring_occupancy = gauge_vec(
            "chgate_ingest_ring_messages",
            "Messages waiting in each parser worker's ring.",
            &["worker"],
        );
        let ingest_paused = IntGauge::new(
            "chgate_ingest_paused_partitions",
            "Partitions paused because a ring or the memory ceiling (limits.max_pending_bytes) is full.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ingest_paused.clone()))
            .expect("unique metric");
        let ingest_pauses = IntCounter::new(
            "chgate_ingest_pauses_total",
            "Times consumption was paused for a full ring or the memory ceiling.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ingest_pauses.clone()))
            .expect("unique metric");
        let ingest_pending_bytes = IntGauge::new(
            "chgate_ingest_pending_bytes",
            "Bytes consumed and not yet committed: messages in the rings, rows (as encoded) and dead letters in batches.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ingest_pending_bytes.clone()))
            .expect("unique metric");
        let ingest_lag = gauge_vec(
            "chgate_ingest_consumer_lag_messages",
            "Messages in each partition not yet taken by the consumer (end offset minus position), every 5 s.",
            &["task", "partition"],
        );
        let native_connections = counter(
            "chgate_native_connections_total",
            "Native-protocol client connections by how their login ended: ok, auth_failed (unknown user, wrong password, network, reserved user), bad_hello (not a valid Hello), refused (a revision chgate does not speak), upstream_failed (no node could take the connection).",
            &["result"],
        );
        let native_open = IntGauge::new(
            "chgate_native_open_connections",
            "Native-protocol client connections open now (logged in or logging in).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(native_open.clone()))
            .expect("unique metric");
        let native_queries = counter(
            "chgate_native_queries_total",
            "Native-protocol queries, counted as they end, by mapped user, status (ok, exception: the server's; refused: chgate's policy or protocol checks; error: the node was lost; client_closed) and node (\"-\" when none).",
            &["user", "status", "node"],
        );
        let native_query_duration = HistogramVec::new(
            HistogramOpts::new(
                "chgate_native_query_duration_seconds",
                "Time from a native-protocol Query to the end of its answer, by mapped user.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            &["user"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(native_query_duration.clone()))
            .expect("unique metric");
        let native_bytes = counter(
            "chgate_native_bytes_total",
            "Native-protocol bytes relayed, by direction (to_server, to_client), handshakes included.",
            &["direction"],
        );
        let native_errors = counter(
            "chgate_native_errors_total",
            "Native-protocol connections ended or queries failed by chgate, by kind (unknown_setting, unsupported, malformed, unexpected_packet, upstream_lost, client_io, idle_timeout, client_send_timeout, node_send_timeout, query_too_large).",
            &["kind"],
        );
        let native_reconnects = counter(
            "chgate_native_reconnects_total",
            "Native-protocol connections moved to another node after theirs closed while idle, by result (ok, failed, pinned: the session held temporary tables).",
            &["result"],
        );
        let quota_rejections = counter(
            "chgate_quota_rejections_total",
            "Queries refused by a quota, by mapped user and reason (concurrency: no free slot and no queue; queue_full; queue_timeout: waited max_queue_wait; rate: requests_per_minute).",
            &["user", "reason"],
        );
        let quota_queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "chgate_quota_queue_wait_seconds",
                "Time queries of users with max_concurrent_queries waited for a slot (0 for those that found one free), by mapped user.",
            )
            .buckets(vec![
                0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["user"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(quota_queue_wait.clone()))
            .expect("unique metric");
        let queries_in_flight = gauge_vec(
            "chgate_user_queries_in_flight",
            "Queries of each mapped user with a quota admitted and not yet ended (both frontends).",
            &["user"],
        );
        let quota_queued = gauge_vec(
            "chgate_quota_queued",
            "Queries of each mapped user waiting in its quota's queue now (this instance).",
            &["user"],
        );
        let quota_kills = counter(
            "chgate_quota_kills_total",
            "Queries the gateway ended and killed on their node, by mapped user and reason (execution_time, result_bytes).",
            &["user", "reason"],
        );
        let query_kills = counter(
            "chgate_query_kills_total",
            "KILL QUERY the gateway sent to a node (a hedge that lost, a client gone, a limit reached), by node and result: sent, failed, withheld (not sent: the server cancels while holding its process list, before 22.9, and a node of the cluster does not answer).",
            &["node", "result"],
        );
        let fleet_members = IntGauge::new(
            "chgate_fleet_members",
            "chgate instances registered under the config root's members znode (1 with a file config); per-user concurrency and rate limits are divided by it.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(fleet_members.clone()))
            .expect("unique metric");
        let config_stale_seconds = prometheus::Gauge::new(
            "chgate_config_stale_seconds",
            "Seconds since the config source was last known to be current (0 while ZooKeeper is connected and watched; grows while it is not).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_stale_seconds.clone()))
            .expect("unique metric");
        let config_version = IntGauge::new(
            "chgate_config_version",
            "The version of the config in use (a ZooKeeper config's pushed version; 0 for a file).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_version.clone()))
            .expect("unique metric");
        let remote_servers_leader = IntGauge::new(
            "chgate_remote_servers_leader",
            "1 while this instance is the elected one that keeps the nodes' published remote_servers true (takes failed replicas out, puts them back).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(remote_servers_leader.clone()))
            .expect("unique metric");
        let remote_servers_changes = counter(
            "chgate_remote_servers_changes_total",
            "Replicas the elected instance took out of the published remote_servers or put back, by cluster and action (removed, restored).",
            &["cluster", "action"],
        );
        let remote_servers_removed = gauge_vec(
            "chgate_remote_servers_removed",
            "Replicas left out of the cluster's published remote_servers now (configured but failed), by cluster.",
            &["cluster"],
        );
        let remote_servers_stale_nodes = gauge_vec(
            "chgate_remote_servers_stale_nodes",
            "Nodes whose own system.clusters differs from the cluster published to them, on two checks 10 s apart (ClickHouse 18.16 stops following its from_zk config once its ZooKeeper session expired), by cluster.",
            &["cluster"],
        );
        let remote_servers_publish_errors = counter(
            "chgate_remote_servers_publish_errors_total",
            "Failed writes of the nodes' remote_servers by the elected instance, by ZooKeeper ensemble.",
            &["ensemble"],
        );
        let cdc_events = counter(
            "chgate_cdc_events_total",
            "Change events published to Kafka by chgate cdc, by table (schema.table) and Debezium op (c, u, d, r, t).",
            &["table", "op"],
        );
        let cdc_snapshot_rows = counter(
            "chgate_cdc_snapshot_rows_total",
            "Rows of the initial snapshot published, by table.",
            &["table"],
        );
        let cdc_skipped = counter(
            "chgate_cdc_skipped_total",
            "Changes not published, by reason: `seen_by_snapshot` (a resumed snapshot chunk already holds the change), `no_before` (an update or delete of a row the key-state store never saw: snapshot = never), `not_captured` (a table outside capture.tables), `in_topics` (after the store was rebuilt from the topics, a change the server sent again that the topics already hold).",
            &["reason"],
        );
        let cdc_reconciled_rows = counter(
            "chgate_cdc_reconciled_rows_total",
            "Rows of a table read again to reconcile the topics with it (another instance's snapshot of it stopped part way), by table and outcome: `unchanged` (as the topics hold it: nothing published), `changed` (a `u` event from the published row), `new` (an `r` event), `gone` (published, no longer in the table: a `d` event).",
            &["table", "outcome"],
        );
        let cdc_transactions = counter(
            "chgate_cdc_transactions_total",
            "Transactions received from the replication stream, by kind: `whole` (sent after its commit), `streamed` (sent in progress, protocol v2, applied at its commit), `aborted` (streamed, then rolled back: nothing published), `already_published` (sent again after a restart, already in Kafka).",
            &["kind"],
        );
        let cdc_spilled_bytes = IntCounter::new(
            "chgate_cdc_spilled_bytes_total",
            "Bytes of transactions streamed before their commit that went to disk (state_dir/spill) past capture.spill_bytes.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cdc_spilled_bytes.clone()))
            .expect("unique metric");
        let cdc_outbox_events = IntGauge::new(
            "chgate_cdc_outbox_events",
            "Events committed to the key-state store's outbox and not yet acknowledged by the broker (sent again after a crash); it grows while the broker is unreachable.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cdc_outbox_events.clone()))
            .expect("unique metric");
        let cdc_slot_wal_status = gauge_vec(
            "chgate_cdc_slot_wal_status",
            "1 for the replication slot's current pg_replication_slots.wal_status (reserved, extended, unreserved, lost), 0 for the others. `unreserved` means PostgreSQL may remove WAL the slot needs at the next checkpoint.",
            &["status"],
        );
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let cdc_snapshot_tables_pending = int_gauge(
            "chgate_cdc_snapshot_tables_pending",
            "Tables whose initial snapshot is not finished.",
        );
        let cdc_lag_bytes = int_gauge(
            "chgate_cdc_lag_bytes",
            "WAL between the server's current position (from its last keepalive) and the last position confirmed to it.",
        );
        let cdc_confirmed_lsn = int_gauge(
            "chgate_cdc_confirmed_lsn",
            "The last LSN confirmed to PostgreSQL: everything before it is in Kafka.",
        );
        let cdc_slot_retained_bytes = int_gauge(
            "chgate_cdc_slot_retained_bytes",
            "WAL the replication slot holds back (pg_current_wal_lsn() - restart_lsn), every 10 s.",
        );
        let cdc_slot_safe_wal_bytes = int_gauge(
            "chgate_cdc_slot_safe_wal_bytes",
            "pg_replication_slots.safe_wal_size: WAL that can still be written before the slot is lost (-1 when max_slot_wal_keep_size is unlimited).",
        );
        let cdc_leader = int_gauge(
            "chgate_cdc_leader",
            "1 while this instance holds the capture (with [coordination], the elected one), 0 on a standby.",
        );
        let cdc_lag_seconds = prometheus::Gauge::new(
            "chgate_cdc_lag_seconds",
            "Now minus the commit time of the last transaction published (0 when idle).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cdc_lag_seconds.clone()))
            .expect("unique metric");
        let cdc_commit_to_ack = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "chgate_cdc_commit_to_ack_seconds",
                "From a transaction's commit in PostgreSQL to the broker's acknowledgement of its last event.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(cdc_commit_to_ack.clone()))
            .expect("unique metric");
        let ingest_skipped_by_broker = IntCounter::new(
            "chgate_ingest_broker_skipped_offsets_total",
            "Offsets the broker did not deliver (at a partition's recorded start, or missing when read again with kafka.start_rewind): messages that will not be written.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ingest_skipped_by_broker.clone()))
            .expect("unique metric");
        let build = IntGaugeVec::new(
            Opts::new(
                "chgate_build_info",
                "Always 1; labelled with the chgate version.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            http_requests,
            http_request_duration,
            http_request_bytes,
            http_response_bytes,
            http_in_flight,
            http_errors,
            auth_failures,
            upstream_errors,
            upstream_in_flight,
            upstream_node_down,
            upstream_connections,
            config_reloads,
            picks,
            failovers,
            retry_budget_exhausted,
            declined_reads,
            hedges,
            hedge_after,
            steered_reads,
            node_health,
            node_weight,
            node_probe_seconds,
            node_replication_delay,
            node_probe_failures,
            zookeeper_healthy,
            topology_refreshes,
            ingest_consumed,
            ingest_parsed,
            ingest_dead_letters,
            ingest_rows,
            ingest_batches,
            ingest_insert_seconds,
            ingest_insert_failures,
            ingest_ring_occupancy,
            ingest_paused,
            ingest_pauses,
            ingest_pending_bytes,
            ingest_skipped_by_broker,
            ingest_fenced,
            ingest_columns_added,
            ingest_lag,
            native_connections,
            native_open,
            native_queries,
            native_query_duration,
            native_bytes,
            native_errors,
            native_reconnects,
            quota_rejections,
            quota_queue_wait,
            queries_in_flight,
            quota_queued,
            quota_kills,
            query_kills,
            fleet_members,
            config_stale_seconds,
            config_version,
            remote_servers_leader,
            remote_servers_changes,
            remote_servers_removed,
            remote_servers_stale_nodes,
            remote_servers_publish_errors,
            cdc_events,
            cdc_snapshot_rows,
            cdc_snapshot_tables_pending,
            cdc_lag_bytes,
            cdc_lag_seconds,
            cdc_commit_to_ack,
            cdc_confirmed_lsn,
            cdc_slot_retained_bytes,
            cdc_slot_safe_wal_bytes,
            cdc_slot_wal_status,
            cdc_skipped,
            cdc_reconciled_rows,
            cdc_transactions,
            cdc_spilled_bytes,
            cdc_outbox_events,
            cdc_leader,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding in-memory metric families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// One unit of a gauge that counts things in progress (requests in flight): raised when
/// made, lowered when dropped, whichever way the thing ends (answered, failed, the client
/// gone), so no path can forget to lower it.
#[must_use = "the gauge is lowered when the guard is dropped"]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_guard_lowers_what_it_raised() {
        let g = IntGauge::new("chgate_test_guard", "test").unwrap();
        let a = GaugeGuard::new(&g);
        let b = GaugeGuard::new(&g);
        assert_eq!(g.get(), 2);
        drop(a);
        assert_eq!(g.get(), 1);
        drop(b);
        assert_eq!(g.get(), 0);
    }
}
