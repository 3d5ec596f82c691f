//! End to end on the embedded broker: the real `sluice` binary, its admin
//! API, its data directory; crashes with SIGKILL.

use serde_json::Value;
use sluice_tests::daemon::Daemon;
use sluice_tests::plugin;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn orders_config(concurrency: u32) -> String {
    format!(
        r#"
shutdown_grace = "10s"
[[brokers.embedded.queues]]
name = "enriched"
subjects = ["enriched.>"]

[plugins.order-processor]
path = "{}"
publish = ["enriched.orders.>"]

[plugins.flaky]
path = "{}"
publish = ["flaky.>"]

[[routes]]
name = "orders"
plugin = "order-processor"
source = {{ subject = "orders.>" }}
concurrency = {concurrency}
dead_letter = {{ subject = "dlq.orders" }}

[[routes]]
name = "flaky"
plugin = "flaky"
source = {{ subject = "flaky.in" }}
dead_letter = {{ subject = "dlq.flaky" }}
[routes.retry]
max_attempts = 3
initial_backoff = "10ms"
max_backoff = "50ms"

[[brokers.embedded.queues]]
name = "flaky-done"
subjects = ["flaky.done"]
"#,
        plugin("order_processor").display(),
        plugin("fixture_flaky").display(),
    )
}

fn order(i: usize) -> Vec<u8> {
    serde_json::json!({
        "order_id": format!("o-{i}"),
        "user_id": format!("u-{}", i % 7),
        "amount_cents": i * 10,
        "event_type": if i.is_multiple_of(2) { "created" } else { "paid" },
    })
    .to_string()
    .into_bytes()
}

fn enriched_order_ids(d: &Daemon) -> BTreeSet<String> {
    d.queue("enriched")
        .iter()
        .filter_map(|m| m["payload"].as_str())
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| v["order_id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn thousand_messages_survive_a_sigkill_half_way() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &orders_config(4));
    let admin = d.admin.clone();

    // The publisher keeps going through the crash: a publish that fails is
    // tried again until the restarted daemon takes it.
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let published = published.clone();
        let probe = Daemon::probe(&admin);
        std::thread::spawn(move || {
            for i in 0..N {
                let body = order(i);
                let subject = if i.is_multiple_of(2) {
                    "orders.created"
                } else {
                    "orders.paid"
                };
                let mut tries = 0;
                while let Err(e) = probe.try_publish(subject, &[], &body) {
                    tries += 1;
                    assert!(tries < 600, "publish {i} never succeeded: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                published.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    d.wait_for("half of the messages published", Duration::from_secs(60), || {
        published.load(Ordering::SeqCst) >= N / 2
    });
    d.kill();
    let published_at_crash = published.load(Ordering::SeqCst);
    d.restart();
    publisher.join().expect("publisher");

    d.wait_for("every order enriched", Duration::from_secs(120), || {
        enriched_order_ids(&d).len() == N
    });
    let ids = enriched_order_ids(&d);
    for i in 0..N {
        assert!(ids.contains(&format!("o-{i}")), "order o-{i} was lost");
    }
    d.wait_for("the orders queue to drain", Duration::from_secs(30), || {
        d.queue_len("orders") == 0
    });
    assert!(d.queue("dlq.orders").is_empty(), "nothing should be dead-lettered");
    assert!(
        published_at_crash < N,
        "the crash happened after all publishes; test proves nothing"
    );
}

#[test]
fn malformed_json_is_dead_lettered_after_one_attempt_with_failure_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &orders_config(1));
    d.publish("orders.created", &[("trace", "t-1")], b"{not json");
    d.wait_for("the dead letter", Duration::from_secs(30), || {
        !d.queue("dlq.orders").is_empty()
    });
    let dl = &d.queue("dlq.orders")[0];
    assert_eq!(dl["payload"], "{not json");
    let header = |name: &str| {
        dl["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .map(|h| h["value"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("header {name} missing in {dl}"))
    };
    assert_eq!(header("trace"), "t-1", "original headers are kept");
    assert_eq!(header("sluice-error-kind"), "permanent");
    assert_eq!(header("sluice-attempts"), "1");
    assert_eq!(header("sluice-route"), "orders");
    assert!(header("sluice-plugin").starts_with("order-processor@sha256:"));
    assert!(header("sluice-origin").contains("orders.created"));
    assert!(header("sluice-error").contains("JSON"));
    assert!(!header("sluice-failed-at").is_empty());
    assert_eq!(
        d.metric("sluice_messages_total{route=\"orders\",outcome=\"dead_letter\"}"),
        1.0
    );
}

/// Route `slow`: the record fixture waiting `wait_ms` per message, four at
/// a time, its publishes kept in the queue `recorded`.
fn slow_config(wait_ms: u32) -> String {
    format!(
        r#"
shutdown_grace = "10s"
[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
[plugins.slow]
path = "{}"
publish = ["recorded"]
config = {{ wait_ms = {wait_ms} }}
[[routes]]
name = "slow"
plugin = "slow"
source = {{ subject = "slow.in" }}
concurrency = 4
"#,
        plugin("fixture_record").display()
    )
}

#[test]
fn sigterm_lets_the_messages_in_flight_finish_and_settle_then_exits_zero() {
    const N: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &slow_config(500));
    for i in 0..N {
        d.publish("slow.in", &[], format!("m-{i}").as_bytes());
    }
    d.wait_for("four in flight", Duration::from_secs(10), || {
        d.route_field(0, "in_flight") == 4
    });
    let status = d.terminate();
    assert!(status.success(), "exit status {status}:\n{}", d.log());
    assert!(d.log().contains("stopped"), "{}", d.log());
    d.restart();
    d.wait_for("every message recorded", Duration::from_secs(30), || {
        d.queue("recorded").len() >= N && d.queue_len("slow") == 0
    });
    // The four in flight at SIGTERM finished and were acked before the
    // exit: none ran again after the restart.
    let recorded: Vec<String> = d
        .queue("recorded")
        .iter()
        .filter_map(|m| m["payload"].as_str().map(str::to_owned))
        .collect();
    let distinct: BTreeSet<&String> = recorded.iter().collect();
    assert_eq!(distinct.len(), N, "{recorded:?}");
    assert_eq!(recorded.len(), N, "a message ran twice: {recorded:?}");
}

#[test]
fn the_route_lag_and_age_gauges_rise_with_a_backlog_and_fall_to_zero_as_it_drains() {
    // 32 messages, 4 at a time, 1 s each: ~8 s of backlog, read every 5 s.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &slow_config(1_000));
    let published = std::time::Instant::now();
    for i in 0..32 {
        d.publish("slow.in", &[], format!("m-{i}").as_bytes());
    }
    let lag = || d.metric_present("sluice_route_lag{route=\"slow\"}");
    let oldest = || d.metric_present("sluice_route_oldest_unacked_seconds{route=\"slow\"}");
    d.wait_for("the gauge shows the backlog", Duration::from_secs(15), || {
        lag().is_some_and(|n| n >= 4.0)
    });
    // Every message was published at the start: the oldest one left is as
    // old as the backlog (read every 5 s, so at least a second old once
    // read again, and never older than the test).
    d.wait_for("the oldest message ages", Duration::from_secs(15), || {
        oldest().is_some_and(|age| age >= 1.0)
    });
    let age = oldest().expect("the age series");
    assert!(age <= published.elapsed().as_secs_f64() + 1.0, "{age} s");
    d.wait_for("the gauge drains to 0", Duration::from_secs(30), || lag() == Some(0.0));
    assert_eq!(oldest(), Some(0.0), "nothing held: no age");
    assert_eq!(d.queue_len("slow"), 0);
}

#[test]
fn a_second_signal_exits_at_once_and_the_unsettled_messages_are_redelivered() {
    const N: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    // Handlers that wait 3 s: a drain would take that long.
    let mut d = Daemon::start(dir.path(), &slow_config(3_000));
    for i in 0..N {
        d.publish("slow.in", &[], format!("m-{i}").as_bytes());
    }
    d.wait_for("four in flight", Duration::from_secs(10), || {
        d.route_field(0, "in_flight") == 4
    });
    let started = std::time::Instant::now();
    d.signal("-TERM");
    d.wait_for("the drain began", Duration::from_secs(5), || {
        d.log().contains("stopping: no new messages")
    });
    let status = d.terminate();
    assert_eq!(status.code(), Some(130), "{}", d.log());
    assert!(started.elapsed() < Duration::from_secs(3), "waited for the drain");
    assert!(d.log().contains("second signal"), "{}", d.log());
    d.restart();
    d.wait_for("every message recorded", Duration::from_secs(30), || {
        d.queue("recorded").len() >= N
    });
}

#[test]
fn status_json_and_page_reflect_ok_retry_and_dead_letter_counts() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[plugins.flaky]
path = "{}"
publish = ["flaky.>"]
[[routes]]
name = "flaky"
plugin = "flaky"
source = {{ subject = "flaky.in" }}
[routes.retry]
max_attempts = 2
initial_backoff = "10ms"
"#,
        plugin("fixture_flaky").display()
    );
    let d = Daemon::start(dir.path(), &config);
    d.publish("flaky.in", &[("fail-times", "0")], b"ok at once");
    d.publish("flaky.in", &[("fail-times", "1")], b"ok on attempt 2");
    d.publish("flaky.in", &[("fail-times", "9")], b"dead letter");
    d.wait_for("all settled", Duration::from_secs(30), || {
        let s = d.status();
        s["routes"][0]["handled"] == 2 && s["routes"][0]["dead_lettered"] == 1
    });
    let route = &d.status()["routes"][0];
    assert_eq!(route["name"], "flaky");
    assert_eq!(route["retried"], 2, "{route}");
    assert_eq!(route["in_flight"], 0);
    assert_eq!(route["source"], "embedded flaky.in");
    assert_eq!(route["plugin_hash"].as_str().unwrap().len(), 64);
    assert!(
        route["last_error"].as_str().unwrap().contains("failing attempt"),
        "{route}"
    );
    let page = ureq::get(format!("http://{}/", d.admin))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        page.contains("<td>flaky</td>") && page.contains("failing attempt"),
        "{page}"
    );
}

#[test]
fn a_traceparent_goes_out_as_a_child_on_publishes_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_log_filter(dir.path(), &orders_config(1), "info,sluice::pipeline=debug");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    d.publish("orders.created", &[("traceparent", &parent)], &order(7));
    d.publish("orders.created", &[("traceparent", &parent)], b"{bad");
    d.wait_for("the publish and the dead letter", Duration::from_secs(30), || {
        d.queue("enriched").len() == 1 && d.queue("dlq.orders").len() == 1
    });
    for m in [&d.queue("enriched")[0], &d.queue("dlq.orders")[0]] {
        let tps: Vec<&str> = m["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["name"] == "traceparent")
            .filter_map(|h| h["value"].as_str())
            .collect();
        assert_eq!(tps.len(), 1, "one traceparent: {m}");
        let tp = tps[0];
        assert!(tp.starts_with(&format!("00-{trace}-")), "same trace: {tp}");
        assert!(tp.ends_with("-01"), "same flags: {tp}");
        assert_ne!(tp, parent, "a child span, not the parent: {tp}");
        // The handler span is that parent, and a child of the incoming one.
        let span_id = tp.split('-').nth(2).unwrap();
        let log = d.log();
        let line = log
            .lines()
            .find(|l| l.contains(&format!("span_id={span_id}")) && l.contains("settled"))
            .unwrap_or_else(|| panic!("no handler span {span_id} in the log:\n{log}"));
        assert!(line.contains(&format!("trace_id={trace}")), "{line}");
        assert!(line.contains("parent_span_id=00f067aa0ba902b7"), "{line}");
    }
}

/// A stand-in OpenTelemetry collector: accepts OTLP/HTTP posts and keeps
/// their JSON bodies.
fn collector() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            let mut path = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if path.is_empty() {
                    path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            if path == "/v1/traces" {
                if let Ok(v) = serde_json::from_slice(&body) {
                    kept.lock().unwrap().push(v);
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
        }
    });
    (endpoint, bodies)
}

/// Every exported span, flattened.
fn spans(bodies: &std::sync::Mutex<Vec<Value>>) -> Vec<Value> {
    let mut out = Vec::new();
    for body in bodies.lock().unwrap().iter() {
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            assert_eq!(rs["resource"]["attributes"][0]["value"]["stringValue"], "sluice-test");
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    out
}

fn traceparent_of(m: &Value) -> String {
    m["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "traceparent")
        .and_then(|h| h["value"].as_str())
        .unwrap_or_else(|| panic!("no traceparent on {m}"))
        .to_owned()
}

#[test]
fn message_spans_are_exported_over_otlp_as_children_of_the_incoming_trace() {
    let (endpoint, bodies) = collector();
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"sluice-test\"\n",
        orders_config(1)
    );
    let d = Daemon::start(dir.path(), &cfg);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    d.publish(
        "orders.created",
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
        &order(1),
    );
    d.publish("orders.created", &[], &order(2));
    d.wait_for("two spans exported", Duration::from_secs(20), || {
        spans(&bodies).len() >= 2
    });
    d.wait_for("two enriched events", Duration::from_secs(20), || {
        d.queue("enriched").len() == 2
    });

    let enriched = d.queue("enriched");
    let all = spans(&bodies);
    for (m, incoming_parent) in [(&enriched[0], Some("00f067aa0ba902b7")), (&enriched[1], None)] {
        let tp = traceparent_of(m);
        let parts: Vec<&str> = tp.split('-').collect();
        let span = all
            .iter()
            .find(|s| s["spanId"] == parts[2])
            .unwrap_or_else(|| panic!("the publish's parent {tp} is an exported span: {all:?}"));
        assert_eq!(span["traceId"], parts[1]);
        assert_eq!(span["name"], "orders process");
        assert_eq!(span["status"]["code"], 1);
        let outcome = span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "sluice.outcome")
            .map(|a| a["value"]["stringValue"].clone());
        assert_eq!(outcome, Some(Value::from("ok")));
        match incoming_parent {
            // A child of the incoming span, in its trace.
            Some(parent) => {
                assert_eq!(parts[1], trace);
                assert_eq!(span["parentSpanId"], parent);
            }
            // No traceparent came in: a trace of its own starts here.
            None => {
                assert_ne!(parts[1], trace);
                assert_eq!(span["parentSpanId"], "");
            }
        }
    }
}

#[test]
fn python_and_javascript_plugins_are_retried_dead_lettered_and_their_failed_attempts_publish_nothing() {
    for fixture in ["flaky_py", "flaky_js"] {
        retried_dead_lettered_and_failed_attempts_publish_nothing(fixture);
    }
}

fn retried_dead_lettered_and_failed_attempts_publish_nothing(fixture: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[brokers.embedded.queues]]
name = "flaky"
subjects = ["flaky.>"]
[plugins.flaky]
path = "{}"
publish = ["flaky.>"]
[[routes]]
name = "work"
plugin = "flaky"
source = {{ subject = "work" }}
dead_letter = {{ subject = "dlq.work" }}
[routes.retry]
max_attempts = 3
initial_backoff = "10ms"
"#,
        plugin(fixture).display()
    );
    let d = Daemon::start(dir.path(), &config);
    d.publish("work", &[("fail-times", "0")], b"at once");
    d.publish("work", &[("fail-times", "1")], b"on attempt 2");
    d.publish("work", &[("permanent", "bad input")], b"poison");
    d.wait_for("all settled", Duration::from_secs(60), || {
        d.route_field(0, "handled") == 2 && d.route_field(0, "dead_lettered") == 1
    });
    assert_eq!(
        d.route_field(0, "retried"),
        1,
        "{fixture}: the uncaught exception was retried"
    );
    let published = d.queue("flaky");
    let on = |subject: &str| -> BTreeSet<String> {
        published
            .iter()
            .filter(|m| m["subject"] == subject)
            .map(|m| m["payload"].as_str().unwrap().to_owned())
            .collect()
    };
    // Only the successful attempts' publishes: attempt 1 of the second
    // message and the poison's attempt were dropped.
    assert_eq!(published.len(), 4, "{fixture}: {published:?}");
    assert_eq!(on("flaky.attempt"), BTreeSet::from(["1".to_owned(), "2".to_owned()]));
    assert_eq!(
        on("flaky.done"),
        BTreeSet::from(["at once".to_owned(), "on attempt 2".to_owned()])
    );
    let dead = d.queue("dlq.work");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["payload"], "poison");
    let header = |name: &str| {
        dead[0]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["value"].as_str())
            .map(str::to_owned)
    };
    assert_eq!(header("sluice-error-kind").as_deref(), Some("permanent"));
    assert_eq!(header("sluice-error").as_deref(), Some("bad input"));
}

/// Plain `wasi:messaging` and `wasmcloud:messaging` components on the
/// embedded pipeline: a send reaches the queue only when the handler returns
/// Ok; an error is retried then dead-lettered by default, dead-lettered at
/// once with `handler_error = "permanent"`.
#[test]
fn wasi_and_wasmcloud_messaging_components_are_handled_retried_and_dead_lettered_by_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[brokers.embedded.queues]]
name = "out"
subjects = ["wm.out"]
[plugins.wm]
path = "{wasm}"
publish = ["wm.out"]
[plugins.wm-strict]
path = "{wasm}"
publish = ["wm.out"]
handler_error = "permanent"
[[routes]]
name = "wm"
plugin = "wm"
source = {{ subject = "wm.in" }}
dead_letter = {{ subject = "dlq.wm" }}
[routes.retry]
max_attempts = 3
initial_backoff = "10ms"
[[routes]]
name = "strict"
plugin = "wm-strict"
source = {{ subject = "wm.strict" }}
dead_letter = {{ subject = "dlq.strict" }}

[[brokers.embedded.queues]]
name = "wc-out"
subjects = ["wc.out"]
[plugins.wc]
path = "{wasmcloud}"
publish = ["wc.out"]
[[routes]]
name = "wc"
plugin = "wc"
source = {{ subject = "wc.in" }}
dead_letter = {{ subject = "dlq.wc" }}
[routes.retry]
max_attempts = 2
initial_backoff = "10ms"
"#,
        wasm = plugin("fixture_messaging").display(),
        wasmcloud = plugin("fixture_wasmcloud").display(),
    );
    let d = Daemon::start(dir.path(), &config);
    d.publish("wm.in", &[("content-type", "application/json")], b"one");
    d.publish("wm.in", &[("mode", "fail")], b"bad");
    d.publish("wm.strict", &[("mode", "fail")], b"bad at once");
    d.publish("wc.in", &[], b"two");
    d.publish("wc.in", &[], b"fail");
    d.wait_for("all settled", Duration::from_secs(60), || {
        d.route_field(0, "handled") == 1
            && d.route_field(0, "dead_lettered") == 1
            && d.route_field(1, "dead_lettered") == 1
            && d.route_field(2, "handled") == 1
            && d.route_field(2, "dead_lettered") == 1
    });
    assert_eq!(
        d.route_field(0, "retried"),
        2,
        "the error was retried up to max_attempts"
    );
    assert_eq!(d.route_field(1, "retried"), 0, "handler_error = permanent: no retry");
    let out = d.queue("out");
    assert_eq!(out.len(), 1, "only the successful handle's send is delivered: {out:?}");
    assert_eq!(out[0]["payload"], "handled:one");
    let out = d.queue("wc-out");
    assert_eq!(
        out.len(),
        1,
        "only the successful handler's publish is delivered: {out:?}"
    );
    assert_eq!(out[0]["payload"], "handled:two");
    for (queue, payload, attempts) in [
        ("dlq.wm", "bad", "3"),
        ("dlq.strict", "bad at once", "1"),
        ("dlq.wc", "fail", "2"),
    ] {
        let dead = d.queue(queue);
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0]["payload"], payload);
        let header = |name: &str| {
            dead[0]["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["name"] == name)
                .and_then(|h| h["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(header("sluice-error").as_deref(), Some("asked to fail"));
        assert_eq!(header("sluice-attempts").as_deref(), Some(attempts));
    }
}
