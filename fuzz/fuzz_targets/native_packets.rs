//! Fuzzes the native protocol's readers: server and client packets one after another (as a
//! relay receiving them in pieces too), Native-format blocks, Hellos and Queries. The
//! input's layout and the properties checked are in `../check.rs`, shared with
//! `tests/native_corpus.rs`, which replays the seeds and regressions under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::check(data);
});
