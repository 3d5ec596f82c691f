//! Hot reload on the embedded broker: plugin swaps under load, broken
//! versions refused, config reloads applied whole or not at all, and a
//! graceful stop with messages in flight.

use serde_json::Value;
use sluice_tests::daemon::Daemon;
use sluice_tests::plugin;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MARKER: &[u8] = b"sluice-fixture-version:";

/// The stamp fixture with its version marker set to `version`.
fn stamp_version(version: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(plugin("fixture_stamp")).unwrap();
    let at: Vec<usize> = bytes
        .windows(MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == MARKER)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the marker appears once in the fixture");
    let digits = format!("{version:09}");
    let start = at[0] + MARKER.len();
    bytes[start..start + 9].copy_from_slice(digits.as_bytes());
    bytes
}

/// Puts a new plugin file in place the way a deploy does: written aside,
/// then renamed over the old one.
fn deploy(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("wasm.tmp");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn config(label: &str, extra: &str) -> String {
    format!(
        r#"
[plugins.stamp]
path = "plugins/stamp.wasm"
isolation = "reuse"
publish = ["stamped"]
config = {{ label = "{label}" }}

[[routes]]
name = "work"
plugin = "stamp"
source = {{ broker = "embedded", subject = "work" }}
concurrency = 1

[[brokers.embedded.queues]]
name = "stamped"
subjects = ["stamped"]
max_len = 1000000
{extra}"#
    )
}

fn start(dir: &Path, version: u32, label: &str) -> Daemon {
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::write(dir.join("plugins/stamp.wasm"), stamp_version(version)).unwrap();
    Daemon::start(dir, &config(label, ""))
}

fn header<'a>(m: &'a Value, name: &str) -> Option<&'a str> {
    m["headers"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["value"].as_str())
}

fn reloads(d: &Daemon, result: &str) -> f64 {
    d.metric(&format!(
        "sluice_plugin_reloads_total{{plugin=\"stamp\",result=\"{result}\"}}"
    ))
}

fn config_reloads(d: &Daemon, result: &str) -> f64 {
    d.metric(&format!("sluice_config_reloads_total{{result=\"{result}\"}}"))
}

/// The version and label of the last stamped message, after publishing one.
fn handled_by(d: &Daemon, subject: &str) -> (String, String) {
    let before = d.queue_len("stamped");
    d.publish(subject, &[], b"probe");
    d.wait_for("the probe handled", Duration::from_secs(20), || {
        d.queue_len("stamped") > before
    });
    let last = d.queue("stamped").pop().unwrap();
    (
        header(&last, "plugin-version").unwrap().to_owned(),
        header(&last, "plugin-label").unwrap().to_owned(),
    )
}

fn route_count(d: &Daemon, route: &str, what: &str) -> u64 {
    d.status()["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == route))
        .and_then(|r| r[what].as_u64())
        .unwrap_or_else(|| panic!("no route {route} with a count `{what}` in the status"))
}

#[test]
fn twenty_swaps_while_ten_thousand_messages_flow_each_handled_once_by_the_current_version() {
    const SWAPS: u32 = 20;
    const AT_LEAST: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(start(dir.path(), 0, "x"));
    let wasm = dir.path().join("plugins/stamp.wasm");

    // Publishes until the swaps are over and at least AT_LEAST were sent.
    let swapping = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (d, swapping) = (d.clone(), swapping.clone());
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while sent < AT_LEAST || swapping.load(Ordering::Relaxed) {
                d.publish("work", &[], sent.to_string().as_bytes());
                sent += 1;
            }
            sent
        })
    };
    for version in 1..=SWAPS {
        std::thread::sleep(Duration::from_millis(150));
        deploy(&wasm, &stamp_version(version));
        d.wait_for(&format!("swap {version}"), Duration::from_secs(30), || {
            reloads(&d, "ok") >= f64::from(version)
        });
    }
    // Some messages on the last version too.
    std::thread::sleep(Duration::from_millis(300));
    swapping.store(false, Ordering::Relaxed);
    let sent = publisher.join().unwrap();
    d.wait_for("every message handled", Duration::from_secs(180), || {
        route_count(&d, "work", "handled") >= sent as u64
    });

    assert_eq!(reloads(&d, "ok"), f64::from(SWAPS));
    assert_eq!(reloads(&d, "refused"), 0.0);
    assert_eq!(
        route_count(&d, "work", "handled"),
        sent as u64,
        "handled exactly once each"
    );
    assert_eq!(route_count(&d, "work", "retried"), 0);
    assert_eq!(route_count(&d, "work", "dead_lettered"), 0);

    // One worker: the queue order of the outputs is the handling order, so
    // the versions must never go back, and every message is there once.
    let stamped = d.queue("stamped");
    assert_eq!(stamped.len(), sent);
    let mut seen = BTreeSet::new();
    let mut versions = Vec::new();
    for m in &stamped {
        let payload = m["payload"].as_str().unwrap().to_owned();
        assert!(seen.insert(payload.clone()), "message {payload} handled twice");
        versions.push(header(m, "plugin-version").unwrap().parse::<u32>().unwrap());
    }
    assert_eq!(seen.len(), sent);
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "a message ran on an older version after a newer one took over"
    );
    let distinct: BTreeSet<u32> = versions.iter().copied().collect();
    assert_eq!(distinct, (0..=SWAPS).collect(), "every version handled messages");

    // The status and the version metric show the last version's hash.
    let hash = d.status()["plugins"][0]["hash"].as_str().unwrap().to_owned();
    assert_eq!(d.status()["routes"][0]["plugin_hash"], hash.as_str());
    assert_eq!(
        d.metric(&format!("sluice_plugin_info{{plugin=\"stamp\",hash=\"{hash}\"}}")),
        1.0
    );
    assert_eq!(
        d.metrics().matches("sluice_plugin_info{").count(),
        1,
        "old versions are not shown"
    );
}

#[test]
fn a_swap_with_four_workers_handles_each_message_once_and_new_messages_on_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let wasm = dir.path().join("plugins/stamp.wasm");
    std::fs::write(&wasm, stamp_version(1)).unwrap();
    let d = Arc::new(Daemon::start(
        dir.path(),
        &config("x", "").replace("concurrency = 1", "concurrency = 4"),
    ));
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (d, flowing) = (d.clone(), flowing.clone());
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while sent < 500 || flowing.load(Ordering::Relaxed) {
                d.publish("work", &[], format!("before-{sent}").as_bytes());
                sent += 1;
            }
            sent
        })
    };
    d.wait_for("messages flowing", Duration::from_secs(20), || {
        route_count(&d, "work", "handled") >= 100
    });
    deploy(&wasm, &stamp_version(2));
    d.wait_for("the swap", Duration::from_secs(30), || reloads(&d, "ok") >= 1.0);
    flowing.store(false, Ordering::Relaxed);
    let mut sent = publisher.join().unwrap();
    for i in 0..50 {
        d.publish("work", &[], format!("after-{i}").as_bytes());
    }
    sent += 50;
    d.wait_for("every message handled", Duration::from_secs(60), || {
        route_count(&d, "work", "handled") >= sent as u64
    });
    let stamped = d.queue("stamped");
    let mut seen = BTreeSet::new();
    let mut versions = BTreeSet::new();
    for m in &stamped {
        let payload = m["payload"].as_str().unwrap().to_owned();
        let version = header(m, "plugin-version").unwrap().to_owned();
        if payload.starts_with("after-") {
            assert_eq!(version, "000000002", "{payload} ran on the old version after the swap");
        }
        versions.insert(version);
        assert!(seen.insert(payload.clone()), "{payload} handled twice");
    }
    assert_eq!(seen.len(), sent, "every message handled");
    assert_eq!(
        versions,
        BTreeSet::from(["000000001".to_owned(), "000000002".to_owned()])
    );
    assert_eq!(route_count(&d, "work", "retried"), 0);
}

#[test]
fn a_broken_version_is_refused_with_the_reason_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), 1, "x");
    let wasm = dir.path().join("plugins/stamp.wasm");
    assert_eq!(handled_by(&d, "work").0, "000000001");
    let serving = d.status()["plugins"][0]["hash"].as_str().unwrap().to_owned();

    let valid = stamp_version(2);
    let broken: [(&[u8], &str); 3] = [
        (b"this is not wasm", "is not WebAssembly"),
        (b"\0asm\x01\0\0\0", "is a core WebAssembly module, not a component"),
        (&valid[..valid.len() / 2], "is not a valid component"),
    ];
    for (n, (bytes, reason)) in broken.iter().enumerate() {
        deploy(&wasm, bytes);
        d.wait_for("the refusal", Duration::from_secs(20), || {
            reloads(&d, "refused") >= (n + 1) as f64
        });
        let status = d.status();
        let error = status["plugins"][0]["reload_error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{error}");
        assert_eq!(status["plugins"][0]["hash"], serving.as_str());
        assert_eq!(handled_by(&d, "work").0, "000000001", "the old version keeps serving");
    }
    let log = d.log();
    assert_eq!(
        log.matches("new version refused, the running one keeps serving")
            .count(),
        3,
        "{log}"
    );

    deploy(&wasm, &valid);
    d.wait_for("the good version", Duration::from_secs(20), || reloads(&d, "ok") >= 1.0);
    assert_eq!(handled_by(&d, "work").0, "000000002");
    let status = d.status();
    assert_ne!(status["plugins"][0]["hash"], serving.as_str());
    assert!(status["plugins"][0]["reload_error"].is_null(), "{status}");
}

#[test]
fn a_config_reload_applies_settings_and_routes_or_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), 1, "one");
    assert_eq!(handled_by(&d, "work").1, "one");

    // Invalid: an unknown key. Nothing of it applies, not even the label.
    d.write_config(&config("two", "").replace("isolation = \"reuse\"", "isolation = \"reuse\"\ncolour = \"red\""));
    d.wait_for("the refusal", Duration::from_secs(20), || {
        config_reloads(&d, "refused") >= 1.0
    });
    let error = d.status()["config_reload_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("sluice.toml:") && error.contains("colour"), "{error}");
    assert_eq!(handled_by(&d, "work").1, "one");
    assert!(d.log().contains("config reload refused, the running config stays"));

    // Valid: a new label and a new route.
    let extra = r#"
[[routes]]
name = "extra"
plugin = "stamp"
source = { broker = "embedded", subject = "extra" }
"#;
    d.write_config(&config("two", extra));
    d.wait_for("the reload", Duration::from_secs(20), || {
        config_reloads(&d, "ok") >= 1.0
    });
    assert!(d.status()["config_reload_error"].is_null());
    assert_eq!(handled_by(&d, "work").1, "two", "plugin settings apply without restart");
    assert_eq!(handled_by(&d, "extra").1, "two", "the added route runs");
    let routes: Vec<String> = d.status()["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(routes, ["work", "extra"]);
    let work_handled = route_count(&d, "work", "handled");
    let extra_lag = || d.metric_present("sluice_route_lag{route=\"extra\"}");
    d.wait_for("the added route's lag series", Duration::from_secs(10), || {
        extra_lag().is_some()
    });

    // The route removed: stopped; its messages wait in its queue.
    d.write_config(&config("two", ""));
    d.wait_for("the second reload", Duration::from_secs(20), || {
        config_reloads(&d, "ok") >= 2.0
    });
    assert_eq!(d.status()["routes"].as_array().unwrap().len(), 1);
    d.publish("extra", &[], b"kept");
    // A message published after it, handled by the route still running:
    // the daemon has moved on, and the removed route's message still waits.
    d.publish("work", &[], b"after");
    d.wait_for("the later message handled", Duration::from_secs(20), || {
        route_count(&d, "work", "handled") > work_handled
    });
    assert_eq!(d.queue_len("extra"), 1, "the message waits for the route");
    assert_eq!(
        route_count(&d, "work", "handled"),
        work_handled + 1,
        "counts survive a reload"
    );
    assert!(d.log().contains("route extra stopped"), "{}", d.log());
    // A removed route's backlog series goes with it.
    d.wait_for("the removed route's lag series gone", Duration::from_secs(10), || {
        extra_lag().is_none()
    });
}

#[test]
fn sigterm_lets_messages_in_flight_finish_and_they_are_not_handled_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"shutdown_grace = "20s"

[plugins.record]
path = "{}"
publish = ["recorded"]
config = {{ wait_ms = "1500" }}

[[routes]]
name = "slow"
plugin = "record"
source = {{ broker = "embedded", subject = "slow" }}
concurrency = 4

[[brokers.embedded.queues]]
name = "recorded"
subjects = ["recorded"]
"#,
        plugin("fixture_record").display()
    );
    let mut d = Daemon::start(dir.path(), &cfg);
    for i in 0..8 {
        d.publish("slow", &[], format!("{i}").as_bytes());
    }
    d.wait_for("four in flight", Duration::from_secs(20), || {
        route_count(&d, "slow", "in_flight") == 4
    });
    let exit = d.terminate();
    assert!(exit.success(), "exit status {exit}:\n{}", d.log());
    assert!(d.log().contains("stopped"), "{}", d.log());

    // The four in flight finished before the exit; the restart handles the
    // other four only.
    d.restart();
    // A marker published after the restart: once it is recorded, anything
    // handled twice would have been recorded too.
    d.publish("slow", &[], b"marker");
    d.wait_for("all eight and the marker recorded", Duration::from_secs(30), || {
        d.queue("recorded").iter().any(|m| m["payload"] == "marker")
    });
    d.wait_for("nothing in flight", Duration::from_secs(30), || {
        route_count(&d, "slow", "in_flight") == 0
    });
    let payloads: Vec<String> = d
        .queue("recorded")
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    expected.push("marker".into());
    let mut sorted = payloads.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "each handled once");
    assert_eq!(
        d.metric("sluice_messages_total{route=\"slow\",outcome=\"ok\"}"),
        5.0,
        "nothing handled twice after the graceful stop"
    );
}

#[test]
fn a_plugin_mounted_through_a_swapped_symlink_is_reloaded_too() {
    // The layout of a Kubernetes ConfigMap volume: stamp.wasm -> ..data/
    // stamp.wasm, ..data -> a versioned folder, swapped by a rename.
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(plugins.join("v1")).unwrap();
    std::fs::write(plugins.join("v1/stamp.wasm"), stamp_version(1)).unwrap();
    std::os::unix::fs::symlink("v1", plugins.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/stamp.wasm", plugins.join("stamp.wasm")).unwrap();
    let d = Daemon::start(dir.path(), &config("x", ""));
    assert_eq!(handled_by(&d, "work").0, "000000001");

    std::fs::create_dir_all(plugins.join("v2")).unwrap();
    std::fs::write(plugins.join("v2/stamp.wasm"), stamp_version(2)).unwrap();
    std::os::unix::fs::symlink("v2", plugins.join("..data_tmp")).unwrap();
    std::fs::rename(plugins.join("..data_tmp"), plugins.join("..data")).unwrap();
    d.wait_for("the swap", Duration::from_secs(20), || reloads(&d, "ok") >= 1.0);
    assert_eq!(handled_by(&d, "work").0, "000000002");
    assert_eq!(reloads(&d, "refused"), 0.0);
}

/// `wasm` with a custom section appended: the same code under another hash,
/// as a rebuild gives.
fn rebuilt(wasm: &[u8], version: u8) -> Vec<u8> {
    let name = b"sluice-test-version";
    let body_len = 1 + name.len() + 1;
    assert!(body_len < 128, "one-byte LEB128 lengths");
    let mut out = wasm.to_vec();
    out.extend([0u8, body_len as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.push(version);
    out
}

#[test]
fn a_python_plugin_swapped_under_load_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let wasm = dir.path().join("plugins/orders.wasm");
    let original = std::fs::read(plugin("order_processor_py")).unwrap();
    std::fs::write(&wasm, &original).unwrap();
    let config = r#"
[plugins.orders]
path = "plugins/orders.wasm"
isolation = "reuse"
publish = ["enriched.orders.>"]
[[routes]]
name = "orders"
plugin = "orders"
source = { subject = "orders.>" }
concurrency = 2
dead_letter = { subject = "dlq.orders" }
[[brokers.embedded.queues]]
name = "enriched"
subjects = ["enriched.>"]
"#;
    let d = Arc::new(Daemon::start(dir.path(), config));
    let order = |i: usize| format!(r#"{{"order_id":"o-{i}","user_id":"u","amount_cents":{i},"event_type":"created"}}"#);
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (d, flowing) = (d.clone(), flowing.clone());
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while sent < 200 || flowing.load(Ordering::Relaxed) {
                d.publish("orders.created", &[], order(sent).as_bytes());
                sent += 1;
            }
            sent
        })
    };
    d.wait_for("messages flowing", Duration::from_secs(30), || {
        route_count(&d, "orders", "handled") >= 50
    });
    let first = d.status()["plugins"][0]["hash"].as_str().unwrap().to_owned();
    deploy(&wasm, &rebuilt(&original, 2));
    d.wait_for("the swap", Duration::from_secs(120), || {
        d.metric("sluice_plugin_reloads_total{plugin=\"orders\",result=\"ok\"}") >= 1.0
    });
    flowing.store(false, Ordering::Relaxed);
    let sent = publisher.join().unwrap();
    d.wait_for("every order handled", Duration::from_secs(60), || {
        route_count(&d, "orders", "handled") >= sent as u64
    });
    let ids: Vec<String> = d
        .queue("enriched")
        .iter()
        .map(|m| {
            let body: Value = serde_json::from_str(m["payload"].as_str().unwrap()).unwrap();
            body["order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), sent, "every order enriched");
    assert_eq!(ids.len(), sent, "an order was handled twice");
    assert_eq!(route_count(&d, "orders", "dead_lettered"), 0);
    let status = d.status();
    let hash = status["plugins"][0]["hash"].as_str().unwrap();
    assert_ne!(hash, first, "the new version serves");
    assert_eq!(status["routes"][0]["plugin_hash"], hash);
    assert_eq!(status["plugins"][0]["language"], "python");
}
