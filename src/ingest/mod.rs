//! `chgate ingest` (issue 4, in progress): Kafka to ClickHouse through lock-free rings and
//! parser workers, one picked node per batch.
//!
//! Done so far, the parsing core:
//! - [`types`]: ClickHouse column types from `system.columns` names;
//! - [`encode`]: message values to RowBinary, converted to the column's type;
//! - [`template`]: format templates (JSON paths, delimited text with a multi-character
//!   separator and quoting, mapping by name or position, defaults, the time window),
//!   compiled against the table's columns;
//! - [`ring`]: the lock-free consumer-to-worker hand-off;
//! - [`config`]: the sidecar's config file.

pub mod config;
pub mod encode;
pub mod ring;
pub mod template;
pub mod types;
