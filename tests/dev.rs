//! The plugin dev loop as a user meets it: `sluice new plugin` scaffolds a
//! crate whose own tests pass; `sluice dev` builds and runs it, rebuilds and
//! hot-swaps it on save, and keeps the running version when a save does not
//! compile. Runs real cargo builds (about a minute the first time).

use sluice_tests::daemon::{agent, free_port};
use sluice_tests::{sluice_bin, workspace};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(admin: &str, path: &str) -> String {
    agent()
        .get(format!("http://{admin}{path}"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

fn wait(what: &str, timeout: Duration, log: &Path, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn publish(admin: &str, payload: &str) {
    let resp = agent()
        .post(format!("http://{admin}/v1/publish/greeter.hello"))
        .header("content-type", "application/octet-stream")
        .send(payload.as_bytes())
        .expect("publish");
    assert_eq!(resp.status(), 200);
}

#[test]
fn new_plugin_passes_its_tests_and_dev_rebuilds_and_swaps_it_on_save() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("greeter");
    let out = Command::new(sluice_bin())
        .args(["new", "plugin", "greeter", "--dir"])
        .arg(&crate_dir)
        .arg("--sdk")
        .arg(workspace().join("sdk"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Its own tests pass as scaffolded.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let test = Command::new(&cargo)
        .arg("test")
        .current_dir(&crate_dir)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "cargo test of the scaffold failed:\n{}",
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(String::from_utf8_lossy(&test.stdout).contains("2 passed"));

    // Its config, on a free admin port.
    let admin = format!("127.0.0.1:{}", free_port());
    let config = crate_dir.join("sluice.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
    std::fs::write(&config, text).unwrap();

    let log = dir.path().join("dev.log");
    let _dev = Running(
        Command::new(sluice_bin())
            .args(["dev", "-c", "sluice.toml"])
            .current_dir(&crate_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait("the first build and start", Duration::from_secs(300), &log, || {
        get(&admin, "/readyz").starts_with("ready")
    });
    let handled = || get(&admin, "/v1/queues/handled/messages");
    publish(&admin, r#"{"id":"a"}"#);
    wait("the first message", Duration::from_secs(20), &log, || {
        handled().contains(r#"{\"id\":\"a\"}"#)
    });

    // Save a change: rebuilt, swapped, the next message runs the new code.
    let lib = crate_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    let changed = source.replace(
        r#"serde_json::json!({ "id": event.id })"#,
        r#"serde_json::json!({ "id": event.id, "v": 2 })"#,
    );
    assert_ne!(changed, source, "the scaffold publishes json!({{ \"id\": .. }})");
    std::fs::write(&lib, &changed).unwrap();
    let reloads = |result: &str| {
        get(&admin, "/metrics")
            .lines()
            .any(|l| l == format!("sluice_plugin_reloads_total{{plugin=\"greeter\",result=\"{result}\"}} 1"))
    };
    wait("the rebuilt version", Duration::from_secs(180), &log, || reloads("ok"));
    publish(&admin, r#"{"id":"b"}"#);
    wait("a message on the new version", Duration::from_secs(20), &log, || {
        handled().contains(r#"{\"id\":\"b\",\"v\":2}"#)
    });

    // Save something that does not compile: the error is shown, the
    // running version keeps serving.
    std::fs::write(&lib, format!("{changed}\nthis does not compile\n")).unwrap();
    wait("the failed build", Duration::from_secs(180), &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("plugin build failed")
    });
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("error"), "cargo's error is shown:\n{log_text}");
    publish(&admin, r#"{"id":"c"}"#);
    wait(
        "a message on the running version",
        Duration::from_secs(20),
        &log,
        || handled().contains(r#"{\"id\":\"c\",\"v\":2}"#),
    );
    assert!(reloads("ok"), "no other swap happened");
}

/// The same loop for a Python or JavaScript plugin folder.
fn guest_dev_loop(lang: &str, app: &str, from: &str, to: &str, own_tests: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let plugin_dir = dir.path().join("greeter");
    let out = Command::new(sluice_bin())
        .args(["new", "plugin", "greeter", "--lang", lang, "--dir"])
        .arg(&plugin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Its own tests pass as scaffolded, against the SDK's test host.
    let test = Command::new(own_tests[0])
        .args(&own_tests[1..])
        .current_dir(&plugin_dir)
        .env("PYTHONPATH", workspace().join("sdk-python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{lang}: the scaffold's tests failed:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );

    let admin = format!("127.0.0.1:{}", free_port());
    let config = plugin_dir.join("sluice.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("dev.log");
    let _dev = Running(
        Command::new(sluice_bin())
            .args(["dev", "-c", "sluice.toml"])
            .current_dir(&plugin_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait("the first build and start", Duration::from_secs(300), &log, || {
        get(&admin, "/readyz").starts_with("ready")
    });
    let handled = || get(&admin, "/v1/queues/handled/messages");
    publish(&admin, r#"{"id":"a"}"#);
    wait("the first message", Duration::from_secs(20), &log, || {
        handled().contains(r#"{\"id\":\"a\"}"#)
    });

    // A saved change: rebuilt, swapped, the next message runs it.
    let app = plugin_dir.join(app);
    let source = std::fs::read_to_string(&app).unwrap();
    let changed = source.replace(from, to);
    assert_ne!(changed, source, "{lang}: the scaffold publishes {from}");
    std::fs::write(&app, &changed).unwrap();
    let reloads = |result: &str| {
        get(&admin, "/metrics")
            .lines()
            .any(|l| l == format!("sluice_plugin_reloads_total{{plugin=\"greeter\",result=\"{result}\"}} 1"))
    };
    wait("the rebuilt version", Duration::from_secs(180), &log, || reloads("ok"));
    publish(&admin, r#"{"id":"b"}"#);
    wait("a message on the new version", Duration::from_secs(20), &log, || {
        handled().contains(r#"{\"id\":\"b\",\"v\":2}"#)
    });

    // A save that does not parse: the build fails, the running version serves.
    std::fs::write(&app, format!("{changed}\n)))) this does not parse\n")).unwrap();
    wait("the failed build", Duration::from_secs(180), &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("plugin build failed")
    });
    publish(&admin, r#"{"id":"c"}"#);
    wait(
        "a message on the running version",
        Duration::from_secs(20),
        &log,
        || handled().contains(r#"{\"id\":\"c\",\"v\":2}"#),
    );
    assert!(reloads("ok"), "{lang}: no other swap happened");
}

#[test]
fn python_and_javascript_plugins_are_scaffolded_tested_built_and_swapped_on_save() {
    guest_dev_loop(
        "python",
        "app.py",
        r#"{"id": event_id}"#,
        r#"{"id": event_id, "v": 2}"#,
        &["python3", "-m", "unittest"],
    );
    let test_runner = workspace().join("sdk-js/test.mjs");
    guest_dev_loop(
        "js",
        "app.js",
        "{ id: event.id }",
        "{ id: event.id, v: 2 }",
        &["node", test_runner.to_str().unwrap(), "."],
    );
}
