//! The delivery pipeline on the embedded broker, through the real daemon:
//! retries, dead letters, idempotency, ordering, backpressure, buffered
//! publishes and replay.

use serde_json::Value;
use sluice_tests::daemon::Daemon;
use sluice_tests::{plugin, prefill, sluice_bin, Lcg};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn header(msg: &Value, name: &str) -> Option<String> {
    msg["headers"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["value"].as_str().map(str::to_owned))
}

fn base(extra: &str) -> String {
    format!(
        r#"
shutdown_grace = "10s"
{extra}
"#
    )
}

fn flaky_config(max_attempts: u32) -> String {
    base(&format!(
        r#"
[plugins.flaky]
path = "{}"
publish = ["flaky.>"]

[[routes]]
name = "flaky"
plugin = "flaky"
source = {{ subject = "flaky.in" }}
[routes.retry]
max_attempts = {max_attempts}
initial_backoff = "10ms"
max_backoff = "40ms"

[[brokers.embedded.queues]]
name = "done"
subjects = ["flaky.done"]
[[brokers.embedded.queues]]
name = "attempts"
subjects = ["flaky.attempt"]
"#,
        plugin("fixture_flaky").display()
    ))
}

#[test]
fn a_handler_failing_n_times_succeeds_on_attempt_n_plus_1_with_n_retries() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &flaky_config(5));
    d.publish("flaky.in", &[("fail-times", "3")], b"x");
    d.wait_for("success", Duration::from_secs(30), || d.queue("done").len() == 1);
    assert_eq!(
        d.metric("sluice_messages_total{route=\"flaky\",outcome=\"retry\"}"),
        3.0
    );
    assert_eq!(d.metric("sluice_messages_total{route=\"flaky\",outcome=\"ok\"}"), 1.0);
    // Each failed attempt published to flaky.attempt before failing; only the
    // successful attempt's publish is visible.
    let attempts = d.queue("attempts");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0]["payload"], "4");
}

#[test]
fn exhausted_retries_dead_letter_with_every_failure_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &flaky_config(3));
    d.publish(
        "flaky.in",
        &[("fail-times", "9"), ("x-trace", "abc")],
        b"payload \x01 bytes",
    );
    d.wait_for("the dead letter", Duration::from_secs(30), || {
        d.queue("dlq.flaky").len() == 1
    });
    let dl = &d.queue("dlq.flaky")[0];
    assert_eq!(dl["payload"], "payload \u{1} bytes");
    assert_eq!(header(dl, "x-trace").as_deref(), Some("abc"));
    assert_eq!(header(dl, "fail-times").as_deref(), Some("9"));
    assert_eq!(header(dl, "sluice-attempts").as_deref(), Some("3"));
    assert_eq!(header(dl, "sluice-error-kind").as_deref(), Some("retryable"));
    assert_eq!(header(dl, "sluice-route").as_deref(), Some("flaky"));
    assert!(header(dl, "sluice-error").unwrap().contains("attempt 3"));
    assert!(header(dl, "sluice-plugin").unwrap().starts_with("flaky@sha256:"));
    let origin = header(dl, "sluice-origin").unwrap();
    assert!(origin.starts_with("embedded://flaky.in?queue=flaky&seq="), "{origin}");
    assert!(header(dl, "sluice-failed-at").unwrap().ends_with('Z'));
    assert!(
        d.queue("attempts").is_empty(),
        "failed attempts' publishes must stay invisible"
    );
    assert_eq!(
        d.metric("sluice_messages_total{route=\"flaky\",outcome=\"retry\"}"),
        2.0
    );
    assert_eq!(
        d.metric("sluice_messages_total{route=\"flaky\",outcome=\"dead_letter\"}"),
        1.0
    );
}

fn idempotent_config(store: &str, record_wasm: &Path, sleep_ms: u64, lease: &str) -> String {
    base(&format!(
        r#"
[plugins.record]
path = "{}"
timeout = "3s"
publish = ["recorded"]
[plugins.record.config]
sleep_ms = "{sleep_ms}"

[[routes]]
name = "orders"
plugin = "record"
source = {{ subject = "orders.>" }}
concurrency = 2
[routes.idempotency]
key = "header:Idempotency-Key"
store = "{store}"
lease = "{lease}"

[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
"#,
        record_wasm.display()
    ))
}

#[test]
fn a_duplicate_key_runs_the_handler_once_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &idempotent_config("file", &plugin("fixture_record"), 0, "30s"),
    );
    d.publish("orders.created", &[("Idempotency-Key", "k-1")], b"first");
    d.publish("orders.created", &[("Idempotency-Key", "k-1")], b"second");
    d.wait_for("both settled", Duration::from_secs(30), || {
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"ok\"}")
            + d.metric("sluice_messages_total{route=\"orders\",outcome=\"duplicate\"}")
            == 2.0
    });
    assert_eq!(
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"duplicate\"}"),
        1.0
    );
    assert!(d.terminate().success());
    d.restart();
    d.publish("orders.created", &[("Idempotency-Key", "k-1")], b"third");
    d.publish("orders.created", &[("Idempotency-Key", "k-2")], b"other key");
    d.wait_for("settled after restart", Duration::from_secs(30), || {
        d.queue_len("orders") == 0 && d.queue("recorded").len() == 2
    });
    assert_eq!(
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"duplicate\"}"),
        1.0
    );
    let payloads: Vec<Value> = d.queue("recorded").iter().map(|m| m["payload"].clone()).collect();
    assert_eq!(payloads, [Value::from("first"), Value::from("other key")]);
}

/// A store shared by replicas keeps a crashed worker's lease: the
/// redelivered copy waits for it to run out.
#[test]
fn a_key_whose_worker_crashed_is_handled_after_its_lease_expires_in_a_shared_store() {
    let dir = tempfile::tempdir().unwrap();
    let redis = std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = format!(
        "{}\n[stores]\nredis_url = \"{redis}\"\n",
        idempotent_config("redis", &plugin("fixture_record"), 1500, "8s")
    );
    // Redis outlives the test: a key of this run only.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let key = format!("k-crash-{}-{nanos}", std::process::id());
    let mut d = Daemon::start(dir.path(), &config);
    d.publish("orders.created", &[("Idempotency-Key", &key)], b"slow");
    d.wait_for("the handler to start", Duration::from_secs(30), || {
        d.metric("sluice_in_flight{route=\"orders\"}") == 1.0
    });
    let claimed = Instant::now();
    d.kill();
    d.restart();
    d.wait_for("the message after the lease", Duration::from_secs(60), || {
        d.queue("recorded").len() == 1
    });
    // The redelivered copy found the dead worker's lease and waited for it.
    assert!(
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"retry\"}") >= 1.0,
        "{}",
        d.metrics()
    );
    assert!(
        claimed.elapsed() >= Duration::from_secs(6),
        "handled before the lease ran out: {:?}",
        claimed.elapsed()
    );
    d.wait_for("the copy settled", Duration::from_secs(10), || {
        d.queue_len("orders") == 0 && d.route_field(0, "in_flight") == 0
    });
    assert_eq!(d.queue("recorded").len(), 1);
}

/// The file store belongs to one process and keeps leases in memory: a
/// crash takes the lease with it, and the redelivered copy runs at once.
#[test]
fn a_key_whose_worker_crashed_runs_again_at_once_with_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &idempotent_config("file", &plugin("fixture_record"), 1500, "60s"),
    );
    d.publish("orders.created", &[("Idempotency-Key", "k-crash")], b"slow");
    d.wait_for("the handler to start", Duration::from_secs(30), || {
        d.metric("sluice_in_flight{route=\"orders\"}") == 1.0
    });
    d.kill();
    d.restart();
    d.wait_for("the message handled", Duration::from_secs(30), || {
        d.queue("recorded").len() == 1 && d.queue_len("orders") == 0 && d.route_field(0, "in_flight") == 0
    });
    // Never told to wait for the dead worker's lease.
    assert_eq!(
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"retry\"}"),
        0.0,
        "{}",
        d.metrics()
    );
    assert_eq!(d.metric("sluice_messages_total{route=\"orders\",outcome=\"ok\"}"), 1.0);
    // And done now: a copy is a duplicate.
    d.publish("orders.created", &[("Idempotency-Key", "k-crash")], b"copy");
    d.wait_for("the copy counted", Duration::from_secs(30), || {
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"duplicate\"}") == 1.0
    });
    assert_eq!(d.queue("recorded").len(), 1);
}

#[test]
fn publishes_are_visible_exactly_once_when_a_message_is_handled_again() {
    // An in-memory gate forgets across restarts, so the same message runs
    // twice; its publishes carry the same dedup id and the broker keeps one.
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        dir.path(),
        &idempotent_config("memory", &plugin("fixture_record"), 0, "30s"),
    );
    d.publish("orders.created", &[("Idempotency-Key", "k-9")], b"effect");
    d.wait_for("handled", Duration::from_secs(30), || d.queue("recorded").len() == 1);
    assert!(d.terminate().success());
    d.restart();
    d.publish("orders.created", &[("Idempotency-Key", "k-9")], b"effect");
    d.wait_for("handled again", Duration::from_secs(30), || {
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"ok\"}") == 1.0
    });
    assert_eq!(d.queue("recorded").len(), 1, "the rerun's publish must be deduplicated");
    assert_eq!(
        header(&d.queue("recorded")[0], "Nats-Msg-Id").as_deref(),
        Some("orders:k-9:0")
    );
}

#[test]
fn key_ordering_keeps_each_keys_sequence_while_keys_run_in_parallel() {
    const MESSAGES: usize = 10_000;
    const KEYS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Lcg(0x5eed);
    let mut next_seq = vec![0u64; KEYS as usize];
    let messages: Vec<_> = (0..MESSAGES)
        .map(|_| {
            let key = rng.draw() % KEYS;
            let seq = next_seq[key as usize];
            next_seq[key as usize] += 1;
            let mut headers = vec![("k".to_owned(), format!("key-{key}"))];
            // Uneven handling times, so lanes race each other.
            if rng.draw().is_multiple_of(50) {
                headers.push(("sleep-ms".to_owned(), "2".to_owned()));
            }
            ("seq.in".to_owned(), headers, format!("{key}:{seq}").into_bytes())
        })
        .collect();
    prefill(&dir.path().join("data"), "ordered", "seq.in", messages);
    let config = base(&format!(
        r#"
[plugins.record]
path = "{}"
publish = ["recorded"]
isolation = "reuse"

[[routes]]
name = "ordered"
plugin = "record"
source = {{ subject = "seq.in" }}
ordering = "key"
key = "header:k"
concurrency = 8

[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
"#,
        plugin("fixture_record").display()
    ));
    let d = Daemon::start(dir.path(), &config);
    d.wait_for("all recorded", Duration::from_secs(240), || {
        d.queue_len("recorded") as usize == MESSAGES
    });
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in d.queue("recorded") {
        let text = m["payload"].as_str().unwrap().to_owned();
        let (key, seq) = text.split_once(':').unwrap();
        let seq: i64 = seq.parse().unwrap();
        let prev = last.insert(key.to_owned(), seq).unwrap_or(-1);
        assert_eq!(seq, prev + 1, "key {key}: {seq} handled after {prev}");
    }
    assert_eq!(last.len(), KEYS as usize);
}

#[test]
fn a_slow_handler_applies_backpressure_with_100k_queued() {
    const QUEUED: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let messages = (0..QUEUED)
        .map(|i| ("slow.in".to_owned(), Vec::new(), i.to_string().into_bytes()))
        .collect();
    prefill(&dir.path().join("data"), "slow", "slow.in", messages);
    let config = base(&format!(
        r#"
[plugins.record]
path = "{}"
publish = ["recorded"]
[plugins.record.config]
sleep_ms = "20"

[[routes]]
name = "slow"
plugin = "record"
source = {{ subject = "slow.in" }}
concurrency = 4

[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
"#,
        plugin("fixture_record").display()
    ));
    let d = Daemon::start(dir.path(), &config);
    let rss_at_start = d.rss_kib().expect("the daemon's RSS");
    let mut max_rss = rss_at_start;
    let mut max_gauge = 0.0f64;
    let mut max_taken = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        max_gauge = max_gauge.max(d.metric("sluice_in_flight{route=\"slow\"}"));
        max_rss = max_rss.max(d.rss_kib().expect("the daemon's RSS"));
        let queues: Value = {
            let status = d.status();
            status["queues"].clone()
        };
        if let Some(q) = queues.as_array().and_then(|qs| qs.iter().find(|q| q["name"] == "slow")) {
            max_taken = max_taken.max(q["in_flight"].as_u64().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.queue_len("recorded") > 0, "nothing handled:\n{}", d.log());
    // At most `concurrency` being handled, plus acks still waiting for
    // their commit after their worker moved on (bounded per route).
    const BOUND: f64 = 4.0 + 256.0;
    assert!(max_gauge <= BOUND, "in-flight gauge reached {max_gauge}");
    assert!(max_gauge >= 1.0, "the in-flight gauge never showed the handling");
    // 100,000 messages taken into memory would show as tens of MiB.
    let grown_mib = (max_rss - rss_at_start) / 1024;
    assert!(grown_mib < 32, "the daemon grew by {grown_mib} MiB with 100k queued");
    assert!(
        max_taken as f64 <= BOUND,
        "{max_taken} messages taken from the queue at once"
    );
    assert!(
        d.queue_len("slow") as usize > QUEUED - 1000,
        "the queue is not being drained in bulk"
    );
}

#[test]
fn dead_letters_are_replayed_and_handled_once_the_plugin_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("handler.wasm");
    std::fs::copy(plugin("fixture_trap"), &wasm).unwrap();
    let config = base(&format!(
        r#"
[plugins.handler]
path = "{}"
publish = ["recorded"]

[[routes]]
name = "fixable"
plugin = "handler"
source = {{ subject = "fix.>" }}
dead_letter = {{ subject = "dlq.fixable" }}
[routes.retry]
max_attempts = 2
initial_backoff = "10ms"

[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
"#,
        wasm.display()
    ));
    let mut d = Daemon::start(dir.path(), &config);
    for i in 0..3 {
        d.publish(&format!("fix.item{i}"), &[("n", &i.to_string())], b"trap");
    }
    d.wait_for("three dead letters", Duration::from_secs(30), || {
        d.queue("dlq.fixable").len() == 3
    });
    let admin = d.admin.clone();
    let dlq = |args: &[&str]| {
        let out = Command::new(sluice_bin())
            .arg("dlq")
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = dlq(&["list"]);
    assert!(listing.contains("dlq.fixable — 3 dead letters (trap: 3)"), "{listing}");
    assert!(listing.contains("fixture asked to trap"), "{listing}");

    // The fix: a handler that works, swapped in while the daemon is down.
    assert!(d.terminate().success());
    std::fs::copy(plugin("fixture_record"), &wasm).unwrap();
    d.restart();
    let replayed = dlq(&["replay", "--all"]);
    assert!(replayed.contains("replayed 3"), "{replayed}");
    d.wait_for("the replayed messages handled", Duration::from_secs(30), || {
        d.queue("recorded").len() == 3
    });
    assert!(d.queue("dlq.fixable").is_empty());
    for m in d.queue("recorded") {
        assert_eq!(m["payload"], "trap");
        assert!(header(&m, "n").is_some(), "original headers kept: {m}");
        assert!(header(&m, "sluice-error").is_none(), "failure headers stripped: {m}");
        // The handler saw `sluice-replays: 1` (a plugin cannot forward the
        // host's headers, but the replay count is in its dedup id).
        let id = header(&m, "Nats-Msg-Id").unwrap_or_default();
        assert!(id.contains(":r1:"), "{id}");
    }
    assert_eq!(d.metric("sluice_messages_total{route=\"fixable\",outcome=\"ok\"}"), 3.0);
}
