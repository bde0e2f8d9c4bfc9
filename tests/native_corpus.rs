//! Replays the native-protocol fuzz corpus under `cargo test`, on the stable toolchain: every
//! seed in `fuzz/seeds/native_packets/` and every reproducer in
//! `fuzz/regressions/native_packets/` goes through the same property checks as the
//! `native_packets` fuzz target (`fuzz/check.rs`, included here as is): no panic, no
//! over-read, a walk that succeeds gives the same answer over exactly its bytes and
//! `Incomplete` over fewer, a reader keeping state answers as a new one would.
//!
//! The seeds come from real traffic (`fuzz/make-corpus` regenerates them; this test only
//! reads them), so it also checks that they still walk as far as they were made to: a
//! change to the input's layout in `fuzz/check.rs` that left them unreadable would make the
//! fuzzer start from noise. Running the fuzzer itself is described in `fuzz/README.md`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/check.rs"]
mod check;

/// The files of `dir` under the crate's root, sorted (none if it does not exist).
fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs the checks over each file; what they found, added up.
fn replay(files: &[PathBuf]) -> check::Found {
    let mut total = check::Found::default();
    for path in files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Before the checks, so a failing file is named first.
        eprint!("{}: ", path.display());
        let found = check::check(&data);
        eprintln!("{found:?}");
        total.server_packets += found.server_packets;
        total.client_packets += found.client_packets;
        total.blocks += found.blocks;
        total.lone += found.lone;
    }
    total
}

#[test]
fn every_seed_keeps_the_properties_and_still_walks() {
    let seeds = files("fuzz/seeds/native_packets");
    assert!(seeds.len() >= 50, "{} seeds", seeds.len());
    let found = replay(&seeds);
    eprintln!("{} seeds: {found:?}", seeds.len());
    // Each kind of seed (see fuzz/make-corpus) walks: server streams and packets, client
    // streams and packets, bare blocks, lone Hellos and Queries.
    assert!(found.server_packets >= 100, "{found:?}");
    assert!(found.client_packets >= 20, "{found:?}");
    assert!(found.blocks >= 20, "{found:?}");
    assert!(found.lone >= 5, "{found:?}");
}

#[test]
fn every_regression_keeps_the_properties() {
    let regressions = files("fuzz/regressions/native_packets");
    replay(&regressions);
    eprintln!("{} regressions", regressions.len());
}
