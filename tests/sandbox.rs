//! The sandbox holds: a looping, memory-hungry or trapping plugin is stopped
//! and reported with the right kind, and the next message is handled normally.

use sluice::config::Isolation;
use sluice::engine::{Engine, EngineSettings, FailureKind, Outcome, Plugin, PluginError, PluginSpec};
use sluice::message::{Header, Message};
use sluice_tests::plugin;
use std::time::{Duration, Instant};

fn engine() -> Engine {
    Engine::new(EngineSettings {
        max_instances: 16,
        ..Default::default()
    })
    .expect("engine")
}

fn msg(payload: &[u8]) -> Message {
    Message {
        id: "1".into(),
        subject: "test.subject".into(),
        key: None,
        headers: vec![Header::new("a", "b")],
        payload: payload.to_vec(),
        attempt: 1,
        timestamp_ms: 0,
        reply_to: None,
    }
}

fn load(engine: &Engine, name: &str, isolation: Isolation, timeout: Duration) -> Plugin {
    let mut spec = PluginSpec::new(name, plugin(name));
    spec.isolation = isolation;
    spec.timeout = timeout;
    spec.publish_allow = vec![">".into()];
    engine.load(spec).unwrap_or_else(|e| panic!("{e}"))
}

fn failure(outcome: &Outcome) -> (FailureKind, String) {
    match outcome {
        Outcome::Failed { kind, reason } => (*kind, reason.clone()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn infinite_loop_is_interrupted_at_its_deadline_and_the_route_goes_on() {
    let engine = engine();
    for isolation in [Isolation::Fresh, Isolation::Reuse] {
        let p = load(&engine, "fixture_spin", isolation, Duration::from_millis(300));
        let started = Instant::now();
        let inv = p.invoke("r", &msg(b"spin")).await;
        let took = started.elapsed();
        let (kind, reason) = failure(&inv.outcome);
        assert_eq!(kind, FailureKind::Timeout, "{reason}");
        assert!(took >= Duration::from_millis(300), "stopped early: {took:?}");
        assert!(took < Duration::from_millis(300 + 700), "not stopped in time: {took:?}");
        let next = p.invoke("r", &msg(b"ok")).await;
        assert!(
            matches!(next.outcome, Outcome::Ok { .. }),
            "{isolation:?}: {:?}",
            next.outcome
        );
    }
}

#[tokio::test]
async fn spinning_plugin_does_not_starve_other_tasks() {
    let engine = engine();
    let p = load(&engine, "fixture_spin", Isolation::Fresh, Duration::from_millis(500));
    // One worker thread: the spinning guest must yield for the ticker task to run.
    let handle = tokio::spawn(async move { p.invoke("r", &msg(b"spin")).await });
    let ticks = tokio::spawn(async {
        let mut n = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(300) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            n += 1;
        }
        n
    });
    let n = ticks.await.unwrap();
    assert!(n >= 5, "other task ran only {n} times while the plugin spun");
    let inv = handle.await.unwrap();
    assert_eq!(failure(&inv.outcome).0, FailureKind::Timeout);
}

#[tokio::test]
async fn one_gib_allocation_is_stopped_by_the_memory_cap() {
    let engine = engine();
    for isolation in [Isolation::Fresh, Isolation::Reuse] {
        let p = load(&engine, "fixture_hog", isolation, Duration::from_secs(5));
        let inv = p.invoke("r", &msg(b"hog")).await;
        let (kind, reason) = failure(&inv.outcome);
        assert_eq!(kind, FailureKind::Memory, "{reason}");
        assert!(reason.contains("64 MiB"), "{reason}");
        let next = p.invoke("r", &msg(b"ok")).await;
        assert!(matches!(next.outcome, Outcome::Ok { .. }), "{:?}", next.outcome);
    }
}

#[tokio::test]
async fn trap_is_reported_with_the_panic_message() {
    let engine = engine();
    for isolation in [Isolation::Fresh, Isolation::Reuse] {
        let p = load(&engine, "fixture_trap", isolation, Duration::from_secs(5));
        let inv = p.invoke("r", &msg(b"trap")).await;
        let (kind, reason) = failure(&inv.outcome);
        assert_eq!(kind, FailureKind::Trap, "{reason}");
        assert!(reason.contains("fixture asked to trap"), "{reason}");
        let next = p.invoke("r", &msg(b"fine")).await;
        assert!(matches!(next.outcome, Outcome::Ok { .. }), "{:?}", next.outcome);
    }
}

#[tokio::test]
async fn publishes_are_kept_on_success_and_dropped_on_failure() {
    let engine = engine();
    let p = load(&engine, "fixture_flaky", Isolation::Fresh, Duration::from_secs(5));
    let mut m = msg(b"x");
    m.headers.push(Header::new("fail-times", "1"));
    let first = p.invoke("r", &m).await;
    assert_eq!(failure(&first.outcome).0, FailureKind::Retryable);
    assert!(first.publishes.is_empty());
    m.attempt = 2;
    let second = p.invoke("r", &m).await;
    assert!(matches!(second.outcome, Outcome::Ok { .. }), "{:?}", second.outcome);
    let subjects: Vec<&str> = second.publishes.iter().map(|p| p.subject.as_str()).collect();
    assert_eq!(subjects, ["flaky.attempt", "flaky.done"]);
}

#[tokio::test]
async fn publish_outside_the_allow_list_is_denied() {
    let engine = engine();
    let mut spec = PluginSpec::new("order-processor", plugin("order_processor"));
    spec.publish_allow = vec!["elsewhere.>".into()];
    let p = engine.load(spec).unwrap();
    let body = br#"{"order_id":"o1","user_id":"u1","amount_cents":1250,"event_type":"created"}"#;
    let inv = p.invoke("orders", &msg(body)).await;
    let (kind, reason) = failure(&inv.outcome);
    assert_eq!(kind, FailureKind::Permanent, "{reason}");
    assert!(reason.contains("allow-list"), "{reason}");
}

#[test]
fn bad_wasm_files_are_refused_with_the_reason() {
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, bytes: &[u8], expect: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = engine
            .load(PluginSpec::new("bad", &path))
            .err()
            .expect("must be refused");
        let text = err.to_string();
        assert!(text.contains(expect), "{name}: {text}");
        err
    };
    check("text.wasm", b"hello world, not wasm", "not WebAssembly");
    // The smallest core module: magic + version 1.
    let err = check("core.wasm", b"\0asm\x01\0\0\0", "core WebAssembly module");
    assert!(matches!(err, PluginError::CoreModule { .. }));
    // The smallest component: magic + component version/layer, no exports.
    let err = check("empty.wasm", b"\0asm\x0d\0\x01\0", "exports neither `handle`");
    assert!(matches!(err, PluginError::MissingExport { .. }));
    let mut truncated = std::fs::read(plugin("noop")).unwrap();
    truncated.truncate(truncated.len() / 2);
    check("truncated.wasm", &truncated, "not a valid component");
}

/// A `wasi:messaging` component attacking the host: metadata past the
/// bound trap; a reply through a handle kept from an earlier message (reuse
/// mode) is refused, even when the current message is a request.
#[tokio::test]
async fn a_wasi_messaging_component_cannot_exceed_metadata_bounds_or_reply_through_a_stale_message() {
    let engine = engine();
    let p = load(&engine, "fixture_messaging", Isolation::Reuse, Duration::from_secs(5));
    let with_mode = |mode: &str, reply_to: Option<&str>| Message {
        headers: vec![Header::new("mode", mode)],
        reply_to: reply_to.map(str::to_owned),
        ..msg(b"x")
    };
    let (kind, reason) = failure(&p.invoke("r", &with_mode("entries", None)).await.outcome);
    assert_eq!(kind, FailureKind::Trap);
    assert!(reason.contains("at most 256 metadata entries"), "{reason}");

    let kept = p.invoke("r", &with_mode("keep", Some("_INBOX.first"))).await;
    assert!(
        matches!(kept.outcome, Outcome::Ok { reply: None }),
        "{:?}",
        kept.outcome
    );
    let stale = p.invoke("r", &with_mode("stale-reply", Some("_INBOX.second"))).await;
    let (kind, reason) = failure(&stale.outcome);
    assert_eq!(kind, FailureKind::Retryable);
    assert_eq!(reason, "only the message being handled can be replied to");
}
