//! Batch handlers on the embedded broker, through the real daemon: each
//! message of a batch is settled by its own outcome, a failed item's
//! publishes never show, a trap of the whole batch costs only its culprit,
//! key order holds across batches and retries, and a plugin built for the
//! first contract (sluice:plugin@0.1.0) runs unchanged.

use serde_json::Value;
use sluice_tests::daemon::Daemon;
use sluice_tests::{plugin, prefill, Lcg, Prefilled};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

fn header(msg: &Value, name: &str) -> Option<String> {
    msg["headers"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["value"].as_str().map(str::to_owned))
}

/// Route `b` on subject `b.in` through the batch fixture; `route` adds
/// keys to the route table.
fn config(route: &str) -> String {
    config_with("fixture_batch", route)
}

/// As [`config`], with the batch fixture built from another language.
fn config_with(fixture: &str, route: &str) -> String {
    format!(
        r#"
shutdown_grace = "10s"

[plugins.batch]
path = "{}"
publish = ["batched"]

[[routes]]
name = "b"
plugin = "batch"
source = {{ subject = "b.in" }}
{route}
[routes.retry]
max_attempts = 3
initial_backoff = "10ms"
max_backoff = "40ms"

[[brokers.embedded.queues]]
name = "batched"
subjects = ["batched"]
"#,
        plugin(fixture).display()
    )
}

fn message(payload: &str, headers: &[(&str, &str)]) -> Prefilled {
    (
        "b.in".to_owned(),
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        payload.as_bytes().to_vec(),
    )
}

/// The `batched` messages by payload; each payload must appear once.
fn handled_once(d: &Daemon) -> BTreeMap<String, Value> {
    let mut by_payload = BTreeMap::new();
    for m in d.queue("batched") {
        let payload = m["payload"].as_str().expect("text payload").to_owned();
        assert!(
            by_payload.insert(payload.clone(), m).is_none(),
            "{payload} published twice"
        );
    }
    by_payload
}

#[test]
fn a_partly_failed_batch_settles_each_message_by_its_own_outcome() {
    partly_failed_batch("fixture_batch");
}

/// The same batch through the Python and JavaScript SDKs' batch handlers
/// (one `handle-batch` call per batch, publishes attributed per message).
#[test]
fn a_partly_failed_batch_settles_each_message_by_its_own_outcome_in_python_and_javascript() {
    std::thread::scope(|s| {
        for fixture in ["batch_py", "batch_js"] {
            s.spawn(move || partly_failed_batch(fixture));
        }
    });
}

fn partly_failed_batch(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let messages = (0..10)
        .map(|i| match i {
            3 | 7 => message(&i.to_string(), &[("fail", "retryable-once")]),
            5 => message(&i.to_string(), &[("fail", "permanent")]),
            _ => message(&i.to_string(), &[]),
        })
        .collect();
    prefill(&dir.path().join("data"), "b", "b.in", messages);
    let d = Daemon::start(
        dir.path(),
        &config_with(fixture, r#"batch = { max_messages = 10, max_wait = "300ms" }"#),
    );
    assert_eq!(
        d.status()["plugins"][0]["world"],
        "sluice:plugin/batch-handler@0.1.1",
        "{fixture}"
    );
    d.wait_for("9 handled and 1 dead letter", Duration::from_secs(30), || {
        d.queue_len("batched") >= 9 && d.queue_len("dlq.b") == 1
    });
    let handled = handled_once(&d);
    let payloads: Vec<&str> = handled.keys().map(String::as_str).collect();
    assert_eq!(payloads, ["0", "1", "2", "3", "4", "6", "7", "8", "9"]);
    for (payload, m) in &handled {
        let retried = payload == "3" || payload == "7";
        let attempt = header(m, "attempt").unwrap();
        assert_eq!(attempt, if retried { "2" } else { "1" }, "{m}");
        if !retried {
            // All ten came in one batch; the successes were not re-run.
            assert_eq!(header(m, "batch-size").as_deref(), Some("10"), "{m}");
        }
    }
    let dl = &d.queue("dlq.b")[0];
    assert_eq!(dl["payload"], "5");
    assert_eq!(header(dl, "sluice-error-kind").as_deref(), Some("permanent"));
    let series = |outcome: &str| d.metric(&format!("sluice_messages_total{{route=\"b\",outcome=\"{outcome}\"}}"));
    assert_eq!(series("ok"), 9.0);
    assert_eq!(series("retry"), 2.0);
    assert_eq!(series("dead_letter"), 1.0);
    assert!(d.metric("sluice_batch_size_count{route=\"b\"}") >= 2.0);
    assert!(d.metric("sluice_batch_size_sum{route=\"b\"}") >= 12.0);
    // Nothing left behind: every message settled.
    d.wait_for("the input drained", Duration::from_secs(10), || d.queue_len("b") == 0);
}

#[test]
fn a_trap_of_the_whole_batch_fails_only_its_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let messages = (0..5)
        .map(|i| match i {
            2 => message(&i.to_string(), &[("fail", "trap")]),
            _ => message(&i.to_string(), &[]),
        })
        .collect();
    prefill(&dir.path().join("data"), "b", "b.in", messages);
    let d = Daemon::start(
        dir.path(),
        &config(r#"batch = { max_messages = 5, max_wait = "300ms" }"#),
    );
    d.wait_for("4 handled and 1 dead letter", Duration::from_secs(30), || {
        d.queue_len("batched") >= 4 && d.queue_len("dlq.b") == 1
    });
    let handled = handled_once(&d);
    let payloads: Vec<&str> = handled.keys().map(String::as_str).collect();
    assert_eq!(payloads, ["0", "1", "3", "4"]);
    for m in handled.values() {
        // Run again alone, as the same attempt, after the batch trapped.
        assert_eq!(header(m, "attempt").as_deref(), Some("1"), "{m}");
        assert_eq!(header(m, "batch-size").as_deref(), Some("1"), "{m}");
    }
    let dl = &d.queue("dlq.b")[0];
    assert_eq!(dl["payload"], "2");
    assert_eq!(header(dl, "sluice-error-kind").as_deref(), Some("trap"));
    assert_eq!(header(dl, "sluice-attempts").as_deref(), Some("3"));
    assert!(header(dl, "sluice-error")
        .unwrap()
        .contains("trapping the batch on purpose"));
    // The batch's trap counts once per message; the culprit then trapped
    // alone on attempts 1, 2 and 3.
    assert_eq!(
        d.metric("sluice_handler_failures_total{route=\"b\",kind=\"trap\"}"),
        8.0
    );
    assert_eq!(d.metric("sluice_messages_total{route=\"b\",outcome=\"ok\"}"), 4.0);
    assert_eq!(
        d.metric("sluice_messages_total{route=\"b\",outcome=\"dead_letter\"}"),
        1.0
    );
    // Retries: five for the batch's trap, then the culprit's attempts 2 and 3.
    assert_eq!(d.metric("sluice_messages_total{route=\"b\",outcome=\"retry\"}"), 7.0);
}

#[test]
fn key_order_holds_across_batches_when_items_fail_and_are_retried() {
    const MESSAGES: usize = 10_000;
    const KEYS: u64 = 100;
    for seed in [0x5eed_u64, 0xba7c4] {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Lcg(seed);
        let mut next_seq = vec![0u64; KEYS as usize];
        let mut failing = 0;
        let messages: Vec<Prefilled> = (0..MESSAGES)
            .map(|_| {
                let key = rng.draw() % KEYS;
                let seq = next_seq[key as usize];
                next_seq[key as usize] += 1;
                let mut headers = vec![("k".to_owned(), format!("key-{key}"))];
                if rng.draw().is_multiple_of(16) {
                    headers.push(("fail".to_owned(), "retryable-once".to_owned()));
                    failing += 1;
                }
                ("b.in".to_owned(), headers, format!("{key}:{seq}").into_bytes())
            })
            .collect();
        prefill(&dir.path().join("data"), "b", "b.in", messages);
        let d = Daemon::start(
            dir.path(),
            &config(
                r#"ordering = "key"
key = "header:k"
concurrency = 4
batch = { max_messages = 64, max_wait = "5ms" }"#,
            ),
        );
        d.wait_for("all handled", Duration::from_secs(240), || {
            d.queue_len("batched") as usize >= MESSAGES
        });
        // The order of `batched` is the order the handler's successes were
        // made visible: per key, each sequence number once, in order.
        let mut last: HashMap<String, i64> = HashMap::new();
        let mut retried = 0;
        for m in d.queue("batched") {
            let text = m["payload"].as_str().unwrap().to_owned();
            let (key, seq) = text.split_once(':').unwrap();
            let seq: i64 = seq.parse().unwrap();
            let prev = last.insert(key.to_owned(), seq).unwrap_or(-1);
            assert_eq!(
                seq,
                prev + 1,
                "seed {seed:#x}, key {key}: {seq} made visible after {prev}"
            );
            if header(&m, "attempt").as_deref() != Some("1") {
                retried += 1;
            }
        }
        assert_eq!(last.len(), KEYS as usize);
        assert_eq!(d.queue_len("batched") as usize, MESSAGES, "nothing published twice");
        // The failing ones ran again, and so did the later items of their
        // keys held back behind them.
        assert!(retried >= failing, "{retried} retried, {failing} failing");
        assert_eq!(
            d.metric("sluice_messages_total{route=\"b\",outcome=\"ok\"}"),
            MESSAGES as f64
        );
        assert!(d.metric("sluice_batch_size_count{route=\"b\"}") < MESSAGES as f64 / 4.0);
    }
}

#[test]
fn a_plugin_built_for_the_first_contract_runs_unchanged_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    prefill(
        &dir.path().join("data"),
        "old",
        "old.in",
        (0..3)
            .map(|i| ("old.in".to_owned(), Vec::new(), vec![b'a' + i]))
            .collect(),
    );
    let config = format!(
        r#"
[plugins.old]
path = "{}"
publish = ["v010.out"]

[[routes]]
name = "old"
plugin = "old"
source = {{ subject = "old.in" }}
batch = {{ max_messages = 3, max_wait = "300ms" }}

[[brokers.embedded.queues]]
name = "out"
subjects = ["v010.out"]
"#,
        plugin("fixture_v010").display()
    );
    let d = Daemon::start(dir.path(), &config);
    d.wait_for("3 handled", Duration::from_secs(30), || d.queue_len("out") == 3);
    let mut payloads: Vec<String> = d
        .queue("out")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["v010:a", "v010:b", "v010:c"]);
    assert_eq!(d.status()["plugins"][0]["world"], "sluice:plugin/handler@0.1.0");
}

#[test]
fn copies_of_one_key_in_an_ordered_batch_run_once_without_waiting_for_their_own_lease() {
    let dir = tempfile::tempdir().unwrap();
    let messages = ["a", "a", "b", "a", "c"]
        .iter()
        .enumerate()
        .map(|(i, id)| message(&format!("{id}{i}"), &[("id", id), ("k", "one-key")]))
        .collect();
    prefill(&dir.path().join("data"), "b", "b.in", messages);
    // A batch that waited on a lease its own batch holds would stall until
    // the lease (20 s) ran out, then run the copies again.
    let text = config(
        r#"ordering = "key"
key = "header:k"
batch = { max_messages = 5, max_wait = "300ms" }
[routes.idempotency]
key = "header:id"
store = "memory"
lease = "20s""#,
    )
    .replace("publish = [\"batched\"]", "publish = [\"batched\"]\ntimeout = \"1s\"");
    let d = Daemon::start(dir.path(), &text);
    d.wait_for("every message settled", Duration::from_secs(8), || {
        d.metric_present("sluice_messages_total{route=\"b\",outcome=\"duplicate\"}") == Some(2.0)
            && d.metric_present("sluice_messages_total{route=\"b\",outcome=\"ok\"}") == Some(3.0)
    });
    let payloads: Vec<String> = d
        .queue("batched")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(payloads, ["a0", "b2", "c4"]);
}
