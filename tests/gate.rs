//! The idempotency stores against their real backends: the embedded file and
//! a real Redis server (`SLUICE_REDIS_URL`, default 127.0.0.1:6379; started
//! by `cargo xtask test` when none is listening).

use sluice::idempotency::{Claim, FileStore, IdempotencyStore, MemoryStore, RedisStore};
use sluice_tests::unique;
use std::time::Duration;

fn redis_url() -> String {
    std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The behaviour every store must have.
async fn contract(store: &dyn IdempotencyStore, ns: &str) {
    let key = |k: &str| format!("{ns}:{k}");
    let lease = Duration::from_secs(5);
    let ttl = Duration::from_secs(60);
    assert_eq!(store.claim(&key("a"), "w1", lease).await.unwrap(), Claim::Acquired);
    match store.claim(&key("a"), "w2", lease).await.unwrap() {
        Claim::Busy { retry_in } => assert!(retry_in <= lease && retry_in > Duration::ZERO, "{retry_in:?}"),
        other => panic!("expected busy, got {other:?}"),
    }
    // Only the holder can release or complete.
    store.release(&key("a"), "w2").await.unwrap();
    assert!(matches!(
        store.claim(&key("a"), "w2", lease).await.unwrap(),
        Claim::Busy { .. }
    ));
    store.complete(&key("a"), "w1", ttl).await.unwrap();
    assert_eq!(store.claim(&key("a"), "w3", lease).await.unwrap(), Claim::Done);

    assert_eq!(store.claim(&key("b"), "w1", lease).await.unwrap(), Claim::Acquired);
    store.release(&key("b"), "w1").await.unwrap();
    assert_eq!(store.claim(&key("b"), "w2", lease).await.unwrap(), Claim::Acquired);

    // A lease that runs out frees the key (a crashed worker).
    assert_eq!(
        store
            .claim(&key("c"), "dead", Duration::from_millis(100))
            .await
            .unwrap(),
        Claim::Acquired
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(store.claim(&key("c"), "w2", lease).await.unwrap(), Claim::Acquired);

    // A done key is forgotten after its TTL.
    assert_eq!(store.claim(&key("d"), "w1", lease).await.unwrap(), Claim::Acquired);
    store
        .complete(&key("d"), "w1", Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(store.claim(&key("d"), "w2", lease).await.unwrap(), Claim::Acquired);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new(), &unique()).await;
}

#[tokio::test]
async fn file_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(&dir.path().join("idem.redb")).unwrap();
    contract(&store, &unique()).await;
    store.close();
}

#[tokio::test]
async fn redis_store_keeps_the_contract_and_is_shared_between_replicas() {
    let url = redis_url();
    let a = RedisStore::connect(&url, "sluice-test:")
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} is needed (cargo xtask test starts one): {e}"));
    let ns = unique();
    contract(&a, &ns).await;
    // A second replica sees the first one's records.
    let b = RedisStore::connect(&url, "sluice-test:").await.unwrap();
    let key = format!("{ns}:shared");
    assert_eq!(
        a.claim(&key, "replica-a", Duration::from_secs(5)).await.unwrap(),
        Claim::Acquired
    );
    assert!(matches!(
        b.claim(&key, "replica-b", Duration::from_secs(5)).await.unwrap(),
        Claim::Busy { .. }
    ));
    a.complete(&key, "replica-a", Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        b.claim(&key, "replica-b", Duration::from_secs(5)).await.unwrap(),
        Claim::Done
    );
}
