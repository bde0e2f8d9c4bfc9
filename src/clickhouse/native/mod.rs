//! ClickHouse's native protocol and Native format, read without decoding: where a block
//! ends, where a packet ends. A relay of the native protocol must know where each packet
//! ends to parse the next one, and a compressed frame's end is not a block's end (a block
//! larger than ~1 MiB spans several frames), so it walks blocks over their column types the
//! way the server reads them, without building anything.
//!
//! - [`reader`]: a cursor over received bytes; an incomplete read is `Incomplete`, never a
//!   panic;
//! - [`block`]: a block's end, over its column types;
//! - [`kind`]: the server's packet types;
//! - [`server`]: a server packet's end at a negotiated revision, compressed blocks
//!   included;
//! - [`tail`]: the rest of a packet whose end is known before it is all at hand, passed
//!   on as it comes;
//! - [`stream`]: a block walked as its bytes come, so it can be passed on and let go;
//! - [`lz4`]: the start of an LZ4 frame, decompressed without the rest;
//! - [`settings`]: the binary form of each query setting, which a Query below revision 54429
//!   can only be stepped over with.

pub mod block;
pub mod client;
pub mod kind;
pub mod lz4;
pub mod reader;
pub mod server;
pub mod settings;
pub mod stream;
pub mod tail;

pub use block::{walk_block, Block, Framing};
pub use reader::{Reader, WalkError};

/// A xorshift generator of test inputs from `seed`: the same bytes on every run.
#[cfg(test)]
pub(crate) fn test_random(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
