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
