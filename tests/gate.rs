//! The idempotency stores against their real backends: the embedded file, a
//! real Redis server (`SLUICE_REDIS_URL`, default 127.0.0.1:6379) and a
//! JetStream key-value bucket (`SLUICE_NATS_URL`); `cargo xtask test`
//! starts what is not listening.

use sluice::idempotency::{bucket_key, Claim, FileStore, IdempotencyStore, MemoryStore, NatsKvStore, RedisStore};
use sluice_tests::{nats, unique};
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
    // The dead worker's late completion does not take the key from its new
    // holder: the key stays busy, not done.
    store.complete(&key("c"), "dead", ttl).await.unwrap();
    assert!(
        matches!(store.claim(&key("c"), "w3", lease).await.unwrap(), Claim::Busy { .. }),
        "a late completion by the lease's former holder counted"
    );
    store.complete(&key("c"), "w2", ttl).await.unwrap();
    assert_eq!(store.claim(&key("c"), "w3", lease).await.unwrap(), Claim::Done);

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

/// Two replicas' stores on one backend: one sees the other's records, and
/// of many claims racing for one key exactly one wins.
async fn shared(a: &dyn IdempotencyStore, b: &dyn IdempotencyStore, ns: &str) {
    let key = format!("{ns}:shared");
    let lease = Duration::from_secs(5);
    assert_eq!(a.claim(&key, "replica-a", lease).await.unwrap(), Claim::Acquired);
    assert!(matches!(
        b.claim(&key, "replica-b", lease).await.unwrap(),
        Claim::Busy { .. }
    ));
    a.complete(&key, "replica-a", Duration::from_secs(60)).await.unwrap();
    assert_eq!(b.claim(&key, "replica-b", lease).await.unwrap(), Claim::Done);

    let raced = format!("{ns}:raced");
    let claims = (0..16).map(|i| {
        let (store, owner) = if i % 2 == 0 {
            (a, format!("a{i}"))
        } else {
            (b, format!("b{i}"))
        };
        let raced = raced.clone();
        async move { store.claim(&raced, &owner, lease).await.unwrap() }
    });
    let answers = futures_util::future::join_all(claims).await;
    let won = answers.iter().filter(|c| **c == Claim::Acquired).count();
    assert_eq!(won, 1, "{answers:?}");
}

#[tokio::test]
async fn redis_store_keeps_the_contract_and_is_shared_between_replicas() {
    let url = redis_url();
    let a = RedisStore::connect(&url, "sluice-test:")
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} is needed (cargo xtask test starts one): {e}"));
    let ns = unique();
    contract(&a, &ns).await;
    let b = RedisStore::connect(&url, "sluice-test:").await.unwrap();
    shared(&a, &b, &ns).await;
}

#[tokio::test]
async fn nats_kv_store_keeps_the_contract_and_is_shared_between_replicas() {
    let url = nats::url();
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("nats-server at {url} is needed: {e}"));
    let js = async_nats::jetstream::new(client);
    let bucket = format!("sluice_test_{}", unique());
    let a = NatsKvStore::open(&js, &bucket, Duration::from_secs(600)).await.unwrap();
    let ns = unique();
    contract(&a, &ns).await;
    // The second replica opens the bucket the first created.
    let b = NatsKvStore::open(&js, &bucket, Duration::from_secs(600)).await.unwrap();
    shared(&a, &b, &ns).await;

    // Keys are the producer's: any bytes and any length map to one valid key.
    for hostile in ["a.b.*.>", "", "sp ace/\\0", &"k".repeat(5_000)] {
        let key = format!("{ns}:{hostile}");
        assert_eq!(
            a.claim(&key, "w", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired,
            "{hostile:?}"
        );
        a.complete(&key, "w", Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            b.claim(&key, "v", Duration::from_secs(5)).await.unwrap(),
            Claim::Done,
            "{hostile:?}"
        );
    }

    // A value sluice did not write (another tool's, or damaged) is replaced
    // by compare-and-set: refusing it would jam the key's messages forever.
    let kv = js.get_key_value(&bucket).await.unwrap();
    let foreign = format!("{ns}:foreign");
    kv.put(bucket_key(&foreign), "not a record".into()).await.unwrap();
    assert_eq!(
        a.claim(&foreign, "w", Duration::from_secs(5)).await.unwrap(),
        Claim::Acquired
    );
    a.complete(&foreign, "w", Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        b.claim(&foreign, "v", Duration::from_secs(5)).await.unwrap(),
        Claim::Done
    );

    // A bucket keeping records for less than the longest ttl is raised to
    // it when opened (a reload with a longer ttl does the same).
    let age = || async {
        let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
        stream.cached_info().config.max_age
    };
    assert_eq!(age().await, Duration::from_secs(600));
    let _c = NatsKvStore::open(&js, &bucket, Duration::from_secs(900)).await.unwrap();
    assert_eq!(age().await, Duration::from_secs(900));
    let _d = NatsKvStore::open(&js, &bucket, Duration::from_secs(60)).await.unwrap();
    assert_eq!(age().await, Duration::from_secs(900), "never lowered");
    js.delete_key_value(&bucket).await.unwrap();
}
