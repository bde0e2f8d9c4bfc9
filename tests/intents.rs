//! The batch intents against the stack's ZooKeeper A: fencing by znode version, and a
//! write whose answer was lost told apart from a claim by another consumer.

use chgate::ingest::intents::{Intent, Intents, RecordError};

fn intent(first: i64, last: i64, done: bool) -> Intent {
    Intent {
        first,
        last,
        clock: 0,
        shard: Some(1),
        done,
    }
}

async fn intents() -> (Intents, String) {
    let root = format!("/chgate-test/intents-{}", std::process::id());
    let i = Intents::connect(&["127.0.0.1:2181".to_string()], &root)
        .await
        .expect("ZooKeeper A (scripts/dev-stack up)");
    (i, root)
}

#[tokio::test]
async fn a_landed_write_is_recognised_and_a_claim_still_fences() {
    let (intents, _root) = intents().await;
    let (g, t, p) = ("group", "topic", 0);
    let (_, v0) = intents.claim(g, t, p).await.unwrap();
    let first = intent(0, 9, false);
    let v1 = intents.record(g, t, p, &first, v0).await.unwrap();
    assert_eq!(v1, v0 + 1);

    // The write at v1 landed but its answer was lost: the writer still holds v0. Its
    // retry is refused for the version...
    assert!(matches!(
        intents.record(g, t, p, &first, v0).await,
        Err(RecordError::Fenced)
    ));
    // ...and the znode shows the write was its own: it goes on from v1.
    assert_eq!(intents.landed(g, t, p, &first, v0).await.unwrap(), Some(v1));
    // A different intent at that version is not this writer's.
    assert_eq!(
        intents
            .landed(g, t, p, &intent(0, 9, true), v0)
            .await
            .unwrap(),
        None
    );

    // Another consumer claims after the write landed: the writer is fenced.
    let done = intent(0, 9, true);
    let v2 = intents.record(g, t, p, &done, v1).await.unwrap();
    let (seen, _) = intents.claim(g, t, p).await.unwrap();
    assert_eq!(seen, Some(done));
    assert_eq!(intents.landed(g, t, p, &done, v1).await.unwrap(), None);

    // A claim that came before the lost write (which then never landed): the claim wrote
    // back the old intent, so the znode holds something else.
    let (_, v3) = intents.claim(g, t, p).await.unwrap();
    let next = intent(10, 19, false);
    assert!(v3 > v2);
    assert_eq!(intents.landed(g, t, p, &next, v3 - 1).await.unwrap(), None);
    intents.forget(g, t, p).await.unwrap();
}

/// The alter fence of a task that adds columns (`DESIGN.md`, "New columns"): a pending
/// record checks the fence in the same write, so none is taken once an alterer has raised
/// it; the alterer sees every partition still pending; its lock is one at a time and goes
/// with its session.
#[tokio::test]
async fn a_raised_fence_stops_pending_records_and_the_alterer_sees_what_is_pending() {
    let (intents, root) = intents().await;
    let (g, t) = ("group", "fenced-topic");
    let (_, a0) = intents.claim(g, t, 0).await.unwrap();
    let (_, b0) = intents.claim(g, t, 1).await.unwrap();
    let (altering, f0) = intents.fence(g, t).await.unwrap();
    assert!(!altering);
    // Partition 0 records a pending segment past the fence; partition 1 has none.
    let a1 = intents
        .record_fenced(g, t, 0, &intent(0, 9, false), a0, f0)
        .await
        .unwrap();
    assert_eq!(intents.pending(g, t).await.unwrap(), [0]);

    // An alterer takes the lock (a second one cannot) and raises the fence.
    assert!(intents.lock_alter(g, t).await.unwrap());
    assert!(!intents.lock_alter(g, t).await.unwrap());
    assert!(intents.alter_locked(g, t).await.unwrap());
    assert!(intents.set_fence(g, t, true, None).await.unwrap());
    // Partition 1, which read the fence before it went up, cannot record a pending
    // segment: the write is refused whole, its intent untouched.
    assert!(matches!(
        intents
            .record_fenced(g, t, 1, &intent(0, 4, false), b0, f0)
            .await,
        Err(RecordError::FenceMoved)
    ));
    assert_eq!(intents.load(g, t, 1).await.unwrap(), None);
    let (altering, f1) = intents.fence(g, t).await.unwrap();
    assert!(altering && f1 > f0);
    // Partition 0 still finishes the segment it recorded before (done is not fenced),
    // and then nothing is pending: the alterer may go on.
    intents
        .record(g, t, 0, &intent(0, 9, true), a1)
        .await
        .unwrap();
    assert!(intents.pending(g, t).await.unwrap().is_empty());

    // Lowered again, the fence lets partition 1 record; a stale version is still refused
    // for the partition's own version (another consumer's claim), not for the fence.
    assert!(intents.set_fence(g, t, false, None).await.unwrap());
    intents.unlock_alter(g, t).await.unwrap();
    assert!(!intents.alter_locked(g, t).await.unwrap());
    let (_, f2) = intents.fence(g, t).await.unwrap();
    intents
        .record_fenced(g, t, 1, &intent(0, 4, false), b0, f2)
        .await
        .unwrap();
    assert!(matches!(
        intents
            .record_fenced(g, t, 1, &intent(5, 9, false), b0, f2)
            .await,
        Err(RecordError::Fenced)
    ));
    // Lowering only from the version a writer saw: a fence raised again since stays.
    assert!(intents.set_fence(g, t, true, None).await.unwrap());
    assert!(!intents.set_fence(g, t, false, Some(f2)).await.unwrap());
    assert!(intents.fence(g, t).await.unwrap().0);

    // An alter may be a topic's first use of the fence.
    assert!(intents
        .set_fence(g, "fresh-topic", true, None)
        .await
        .unwrap());
    assert!(intents.fence(g, "fresh-topic").await.unwrap().0);

    // The lock is ephemeral: it goes with the session that took it.
    let other = Intents::connect(&["127.0.0.1:2181".to_string()], &root)
        .await
        .unwrap();
    assert!(other.lock_alter(g, t).await.unwrap());
    assert!(intents.alter_locked(g, t).await.unwrap());
    drop(other);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while intents.alter_locked(g, t).await.unwrap() {
        assert!(
            std::time::Instant::now() < end,
            "the lock outlived its session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
