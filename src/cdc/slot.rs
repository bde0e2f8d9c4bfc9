//! The replication slot's WAL safety, watched: what `pg_replication_slots` says about the
//! WAL the slot holds back and how much more PostgreSQL allows before invalidating it.

use tokio_postgres::Client;

use crate::metrics::METRICS;

/// Exports the slot's WAL safety figures; warns before PostgreSQL would drop the slot.
pub async fn slot_metrics(client: &Client, slot: &str) {
    let row = client
        .query_opt(
            "SELECT wal_status, safe_wal_size,
                    (pg_current_wal_lsn() - restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::error!(slot, "The replication slot is gone");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the slot's state");
            return;
        }
    };
    let status: Option<String> = row.get(0);
    let safe: Option<i64> = row.get(1);
    let retained: Option<i64> = row.get(2);
    for s in ["reserved", "extended", "unreserved", "lost"] {
        METRICS
            .cdc_slot_wal_status
            .with_label_values(&[s])
            .set(i64::from(status.as_deref() == Some(s)));
    }
    METRICS.cdc_slot_safe_wal_bytes.set(safe.unwrap_or(-1));
    METRICS.cdc_slot_retained_bytes.set(retained.unwrap_or(0));
    match status.as_deref() {
        Some("unreserved") => tracing::error!(
            slot,
            "The slot's WAL is beyond max_slot_wal_keep_size: PostgreSQL may drop it at the next checkpoint"
        ),
        Some("lost") => tracing::error!(slot, "The slot has lost WAL it needed: it cannot be used"),
        _ => {}
    }
    if let Some(s) = safe.filter(|&s| s < 1 << 30) {
        tracing::warn!(
            slot,
            safe_wal_bytes = s,
            "Less than 1 GiB of WAL left before PostgreSQL would invalidate the slot"
        );
    }
}

/// The WAL behind the slot's confirmed position beyond which a start says how long the
/// first change may take.
const FAR_BEHIND: i64 = 1 << 30;

/// At the stream's start: warns when the server has much WAL past the slot's confirmed
/// position. PostgreSQL decodes all of it (every database's) before it sends the next
/// change, so a slot left idle while the server wrote gigabytes elsewhere starts slowly,
/// with nothing else to show for it.
pub async fn warn_if_far_behind(client: &Client, slot: &str) {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = row {
        let behind: Option<i64> = row.get(0);
        if let Some(b) = behind.filter(|&b| b > FAR_BEHIND) {
            tracing::warn!(
                slot,
                behind_mib = b >> 20,
                "The server has this much WAL past the slot's position; it decodes all of it \
                 before the next change reaches the capture, which may take minutes"
            );
        }
    }
}
