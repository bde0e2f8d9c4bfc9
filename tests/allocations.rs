//! The auth fast path, statement classification and picks allocate nothing per call: counted with
//! a counting global allocator (this test binary only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn hot_paths_do_not_allocate() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let check = chgate::auth::PasswordCheck::new(&chgate::auth::hash_password("pw").unwrap());
    let verifier = chgate::auth::Verifier::new(1);
    assert!(runtime.block_on(verifier.verify(&check, "pw")));

    let ids: Vec<String> = (0..64).map(|i| format!("10.0.0.{i}:8123")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let weights: Vec<u32> = (0..64).map(|i| 1 + i % 5).collect();
    let snapshot =
        arc_swap::ArcSwap::from_pointee(chgate::picker::select::Snapshot::new(&weights, &refs));
    let in_flight: Vec<std::sync::atomic::AtomicU32> =
        (0..64).map(|_| Default::default()).collect();
    // The thread-local RNG allocates once, on first use.
    let _warm: u64 = rand::random();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut ok = 0;
    for _ in 0..1000 {
        ok += verifier.verify_cached(&check, "pw") as usize;
        ok += (!verifier.verify_cached(&check, "wrong")) as usize;
        ok += (chgate::proxy::sql::classify(b"-- x\n(SELECT 1)", true)
            == chgate::proxy::sql::StatementKind::Read) as usize;
        let picked = snapshot
            .load()
            .pick(&in_flight, [rand::random(), rand::random()]);
        ok += picked.is_some() as usize;
        ok += snapshot.load().pick_sticky(b"session").is_some() as usize;
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(ok, 5000);
    assert_eq!(
        allocated, 0,
        "{allocated} allocations in 5000 hot-path calls"
    );
}
