//! The auth fast path and statement classification allocate nothing per call: counted with
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

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut ok = 0;
    for _ in 0..1000 {
        ok += verifier.verify_cached(&check, "pw") as usize;
        ok += (!verifier.verify_cached(&check, "wrong")) as usize;
        ok += (chgate::proxy::sql::classify(b"-- x\n(SELECT 1)", true)
            == chgate::proxy::sql::StatementKind::Read) as usize;
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(ok, 3000);
    assert_eq!(
        allocated, 0,
        "{allocated} allocations in 3000 hot-path calls"
    );
}
