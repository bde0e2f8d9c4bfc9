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
    assert!(runtime.block_on(verifier.verify("u", &check, "pw")));

    let mut text = String::new();
    for shard in 0..32 {
        text.push_str(&format!(
            "[[shards]]\nreplicas = [{{ host = \"10.0.{shard}.1\" }}, {{ host = \"10.0.{shard}.2\", weight = 2.0 }}]\n"
        ));
    }
    let cluster = chgate::picker::Cluster::new(
        "alloc",
        &toml::from_str(&text).unwrap(),
        &Default::default(),
        &Default::default(),
        &Default::default(),
    );
    use chgate::picker::Purpose;
    // The thread-local RNG allocates once, on first use.
    let _warm: u64 = rand::random();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut ok = 0;
    for _ in 0..1000 {
        ok += verifier.verify_cached(&check, "pw") as usize;
        ok += (!verifier.verify_cached(&check, "wrong")) as usize;
        ok += (chgate::gateway::sql::classify(b"-- x\n(SELECT 1)", true)
            == chgate::gateway::sql::StatementKind::Read) as usize;
        let view = cluster.view();
        ok += view
            .choose(Purpose::Read, None, [rand::random(), rand::random()])
            .is_some() as usize;
        ok += view
            .choose(Purpose::Read, Some(b"session"), [1, 2])
            .is_some() as usize;
        ok += view
            .pick(Purpose::Write, None, [rand::random(), rand::random()])
            .is_ok() as usize;
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(ok, 6000);
    assert_eq!(
        allocated, 0,
        "{allocated} allocations in 6000 hot-path calls"
    );
}
