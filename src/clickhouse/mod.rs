//! What chgate knows about ClickHouse itself, with no I/O: the formats and rules every part
//! that talks to a server shares.
//!
//! - [`codes`]: error codes (the ones the gateway answers with, and which ones mean "the
//!   data is wrong" rather than "the node is unwell"), read from an answer the way each
//!   server version gives them.
//! - [`types`]: column types from `system.columns` names.
//! - [`rowbinary`]: values to RowBinary, converted to the column's type.
//! - [`compress`]: ClickHouse's compressed block format (LZ4 + CityHash128), for insert
//!   bodies that must be taken whole or not at all.
//! - [`insert`]: an `INSERT ... FORMAT RowBinary` as the HTTP interface takes it, and what
//!   its answer means.
//! - [`native`]: the Native format's blocks walked without decoding: where one ends (what a
//!   native-protocol relay needs to find the next packet).
//!
//! The sending is `upstream`'s; this module only says what to send and how to read what
//! comes back.

pub mod codes;
pub mod compress;
pub mod insert;
pub mod native;
pub mod rowbinary;
pub mod types;

pub use codes::Code;
