//! Attacks: a hostile plugin (the `fixture_hostile` component, whose payload
//! names the attack), a careless producer, a network neighbour of the admin
//! port. For each: the attacking message gets a clear outcome, the route
//! keeps serving the next ordinary message, memory stays bounded, and the
//! daemon never panics (the daemon helper fails any test whose daemon log
//! shows a panic).

use serde_json::Value;
use sluice_tests::daemon::{agent, free_port, Daemon};
use sluice_tests::{plugin, sluice_bin};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The embedded route `hostile` on `hostile.in`, two workers, a short
/// deadline; what it publishes lands in queues `ok` and `out`.
fn embedded_config(isolation: &str) -> String {
    format!(
        r#"
[plugins.hostile]
path = "{}"
publish = [">"]
timeout = "500ms"
isolation = "{isolation}"

[[routes]]
name = "hostile"
plugin = "hostile"
source = {{ subject = "hostile.in" }}
concurrency = 2
dead_letter = {{ subject = "dlq.hostile" }}
[routes.retry]
max_attempts = 2
initial_backoff = "10ms"
max_backoff = "10ms"

[[brokers.embedded.queues]]
name = "ok"
subjects = ["hostile.ok"]

[[brokers.embedded.queues]]
name = "out"
subjects = ["hostile.out"]
"#,
        plugin("fixture_hostile").display()
    )
}

/// Runs `cmd` to its end; a command still running after `limit` is killed
/// and fails the test (a regression must fail, not hang).
fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn header<'a>(message: &'a Value, name: &str) -> Option<&'a str> {
    message["headers"]
        .as_array()?
        .iter()
        .find(|h| h["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h["value"].as_str())
}

/// Dead letters of queue `dlq.hostile` by their payload (the attack).
fn dead_letters(d: &Daemon) -> BTreeMap<String, Value> {
    d.queue("dlq.hostile")
        .into_iter()
        .map(|m| (m["payload"].as_str().unwrap_or_default().to_owned(), m))
        .collect()
}

#[test]
fn a_hostile_plugin_gets_a_clear_outcome_and_the_route_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &embedded_config("fresh"));
    // (attack, the kind it is dead-lettered with)
    let attacks = [
        ("bad-header-name", "invalid-publish"),
        ("crlf-value", "invalid-publish"),
        ("header-flood", "invalid-publish"),
        ("publish-server-api", "permanent"),
        ("publish-dead-letters", "permanent"),
        ("huge-error", "permanent"),
        ("panic", "trap"),
        ("sleep", "timeout"),
    ];
    for (attack, _) in attacks {
        d.publish("hostile.in", &[], attack.as_bytes());
    }
    // A forged dedup id is not an error: the host drops it and sets its own.
    d.publish("hostile.in", &[], b"forged-dedup-id");
    d.wait_for("every attack dead-lettered", Duration::from_secs(60), || {
        d.queue_len("dlq.hostile") >= attacks.len() as u64 && d.queue_len("out") >= 1
    });
    // The route still serves, promptly, with both workers.
    let started = Instant::now();
    for _ in 0..4 {
        d.publish("hostile.in", &[], b"ok");
    }
    // Four, and the one the forged-id message published on its way out.
    d.wait_for("ordinary messages after the attacks", Duration::from_secs(10), || {
        d.queue_len("ok") == 5
    });
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    let letters = dead_letters(&d);
    for (attack, kind) in attacks {
        let letter = letters
            .get(attack)
            .unwrap_or_else(|| panic!("no dead letter for {attack}: {letters:?}"));
        assert_eq!(header(letter, "sluice-error-kind"), Some(kind), "{attack}: {letter}");
        let error = header(letter, "sluice-error").unwrap_or_default();
        assert!(
            !error.is_empty() && error.len() <= 1100,
            "{attack}: {} bytes",
            error.len()
        );
    }
    assert!(header(&letters["bad-header-name"], "sluice-error")
        .unwrap()
        .contains("bad name"));
    assert!(header(&letters["publish-server-api"], "sluice-error")
        .unwrap()
        .contains("reserved"));
    assert!(!letters.contains_key("forged-dedup-id"));
    // Nothing a failed attack queued was sent; the forged id never left.
    let out = d.queue("out");
    assert_eq!(out.len(), 1, "{out:?}");
    let sent_id = header(&out[0], "Nats-Msg-Id").unwrap_or_default();
    assert!(sent_id.starts_with("hostile:"), "{sent_id}");
    assert_eq!(
        d.metric_present("sluice_plugin_output_cut_total{route=\"hostile\",what=\"reserved_headers\"}"),
        Some(1.0)
    );
    // The header flood (200 MiB of headers unbounded) was cut long before
    // it could cost memory.
    let rss = d.rss_kib().expect("rss");
    assert!(rss < 160 * 1024, "daemon RSS {rss} KiB");
    assert!(d.ready());
    let status = d.status();
    let last = status["routes"][0]["last_error"].as_str().unwrap_or_default();
    assert!(last.len() <= 1100, "{} bytes", last.len());
}

#[test]
fn a_log_flood_is_cut_and_cannot_forge_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_log_filter(dir.path(), &embedded_config("fresh"), "info");
    d.publish("hostile.in", &[], b"log-flood");
    d.wait_for("the message handled", Duration::from_secs(20), || {
        d.queue_len("ok") == 1
    });
    let dropped = d
        .metric_present("sluice_plugin_output_cut_total{route=\"hostile\",what=\"log_lines\"}")
        .expect("the cut counter");
    assert_eq!(dropped, 9_900.0);
    let log = d.log();
    let plugin_lines = log
        .lines()
        .filter(|l| l.contains("line ") && l.contains("sluice::plugin"))
        .count();
    assert_eq!(plugin_lines, 100, "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a plugin forged a log line"
    );
}

#[test]
fn stderr_in_reuse_mode_never_traps_and_never_leaks_into_another_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &embedded_config("reuse"));
    for _ in 0..40 {
        d.publish("hostile.in", &[], b"stderr");
    }
    d.wait_for("40 chatty messages handled", Duration::from_secs(30), || {
        d.queue_len("ok") == 40
    });
    assert_eq!(d.queue_len("dlq.hostile"), 0);
    // A trap after chatty messages reports its own panic only.
    d.publish("hostile.in", &[], b"panic");
    d.wait_for("the trap dead-lettered", Duration::from_secs(20), || {
        d.queue_len("dlq.hostile") == 1
    });
    let letter = &d.queue("dlq.hostile")[0];
    let error = header(letter, "sluice-error").unwrap_or_default();
    assert!(error.contains("attack: ppp"), "{error}");
    assert!(!error.contains("eee"), "another message's stderr: {error}");
}

#[test]
fn invoke_stops_a_sleeping_plugin_at_its_deadline() {
    let started = Instant::now();
    let out = Command::new(sluice_bin())
        .args([
            "invoke",
            plugin("fixture_hostile").to_str().unwrap(),
            "--payload",
            "sleep",
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(json["kind"], "timeout", "{json}");
    assert!(!out.status.success());
}

#[test]
fn a_poison_message_with_a_producer_dedup_id_reaches_the_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[plugins.orders]
path = "{}"
publish = ["enriched.>"]

[[routes]]
name = "orders"
plugin = "orders"
source = {{ subject = "orders.>" }}
dead_letter = {{ subject = "dlq.orders" }}
"#,
        plugin("order_processor").display()
    );
    let d = Daemon::start(dir.path(), &config);
    d.publish("orders.created", &[("Nats-Msg-Id", "abc")], b"not json");
    d.wait_for("the dead letter", Duration::from_secs(20), || {
        d.queue_len("dlq.orders") == 1
    });
    let letter = &d.queue("dlq.orders")[0];
    assert_eq!(header(letter, "sluice-original-msg-id"), Some("abc"));
    assert_ne!(header(letter, "Nats-Msg-Id"), Some("abc"));
    assert_eq!(header(letter, "sluice-error-kind"), Some("permanent"));
    // `sluice dlq list` shows it.
    let out = Command::new(sluice_bin())
        .args(["dlq", "--admin", &d.admin, "--queue", "dlq.orders", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("permanent"),
        "{listed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config whose admin API is on all interfaces, with `extra` in [admin].
fn open_admin(dir: &std::path::Path, port: u16, extra: &str) -> std::path::PathBuf {
    let config = dir.join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[admin]\nlisten = \"0.0.0.0:{port}\"\n{extra}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_public_admin_address_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = open_admin(dir.path(), free_port(), "");
    let out = output_within(
        Command::new(sluice_bin()).args(["run", "--config"]).arg(&config),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.listen") && err.contains("token"), "{err}");
}

#[test]
fn with_a_token_the_admin_api_refuses_strangers_and_forged_hosts() {
    const TOKEN: &str = "s3cret-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = open_admin(dir.path(), port, "token = \"${TEST_ADMIN_TOKEN}\"");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(sluice_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("TEST_ADMIN_TOKEN", TOKEN)
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !agent()
        .get(format!("{base}/readyz"))
        .call()
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(started.elapsed() < Duration::from_secs(30), "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let publish = |auth: Option<&str>, host: Option<&str>, content_type: &str| {
        let mut req = agent()
            .post(format!("{base}/v1/publish/x.y"))
            .header("content-type", content_type);
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.send(&b"m"[..]).unwrap().status().as_u16()
    };
    assert_eq!(publish(None, None, "application/octet-stream"), 401);
    assert_eq!(publish(Some("wrong-token-0123456789"), None, "application/json"), 401);
    // A no-cors browser POST (text/plain, no credentials) is refused for
    // want of the token; the loopback test below shows the content-type rule.
    assert_eq!(publish(None, None, "text/plain"), 401);
    assert_eq!(
        publish(Some(TOKEN), Some(&format!("rebound.example:{port}")), "text/plain"),
        421
    );
    assert_eq!(publish(Some(TOKEN), None, "text/plain"), 200);
    let replay = agent()
        .post(format!("{base}/v1/dlq/dlq.x/replay"))
        .header("content-type", "application/json")
        .send(&b"{\"all\": true}"[..])
        .unwrap();
    assert_eq!(replay.status(), 401);
    let status = agent().get(format!("{base}/v1/status")).call().unwrap();
    assert_eq!(status.status(), 401);
    // Probes and metrics stay open; an oversized body is refused.
    assert_eq!(agent().get(format!("{base}/healthz")).call().unwrap().status(), 200);
    assert_eq!(agent().get(format!("{base}/metrics")).call().unwrap().status(), 200);
    let big = agent()
        .post(format!("{base}/v1/publish/x.y"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/octet-stream")
        .send(&vec![b'x'; 5 << 20][..])
        .unwrap();
    assert_eq!(big.status(), 413);
    // The CLI reads the token from SLUICE_ADMIN_TOKEN.
    let admin = format!("127.0.0.1:{port}");
    let cli = |token: &str| {
        Command::new(sluice_bin())
            .args(["publish", "x.y", "hello", "--admin", &admin])
            .env("SLUICE_ADMIN_TOKEN", token)
            .output()
            .unwrap()
    };
    assert!(cli(TOKEN).status.success());
    assert!(!cli("").status.success());
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(!log.contains(TOKEN), "the token was logged");
}

#[test]
fn without_a_token_the_loopback_admin_api_refuses_browser_style_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &embedded_config("fresh"));
    let base = format!("http://{}", d.admin);
    let post = |content_type: Option<&str>, origin: Option<&str>, host: Option<&str>| {
        let mut req = agent().post(format!("{base}/v1/publish/hostile.in"));
        if let Some(c) = content_type {
            req = req.header("content-type", c);
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.send(&b"ok"[..]).unwrap().status().as_u16()
    };
    assert_eq!(post(Some("text/plain"), None, None), 415);
    assert_eq!(post(None, None, None), 415);
    assert_eq!(post(Some("application/x-www-form-urlencoded"), None, None), 415);
    assert_eq!(post(Some("application/json"), Some("http://evil.example"), None), 403);
    let port = d.admin.rsplit(':').next().unwrap();
    assert_eq!(
        post(Some("application/json"), None, Some(&format!("evil.example:{port}"))),
        421
    );
    assert_eq!(post(Some("application/octet-stream"), None, None), 200);
    d.wait_for("the accepted publish handled", Duration::from_secs(10), || {
        d.queue_len("ok") == 1
    });
}

#[test]
fn durations_too_large_for_the_clock_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins.p]\npath = \"{}\"\ntimeout = \"500000000years\"\n",
            plugin("fixture_hostile").display()
        ),
    )
    .unwrap();
    let out = Command::new(sluice_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("plugins.p.timeout"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A bulk publish is all or nothing: a malformed line, a bad header, a bad
/// subject or too many lines is refused with its line number and nothing is
/// stored; a good file goes in whole (its duplicates dropped), through the
/// API and through `sluice publish --file`.
#[test]
fn a_bulk_publish_is_stored_whole_or_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        dir.path(),
        "[[brokers.embedded.queues]]\nname = \"bulk\"\nsubjects = [\"bulk.>\"]\n",
    );
    let post = |body: &str| {
        let mut r = agent()
            .post(format!("http://{}/v1/publish", d.admin))
            .header("content-type", "application/x-ndjson")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap())
    };
    let good = r#"{"subject":"bulk.a","payload":"one"}"#;
    for (body, line) in [
        (format!("{good}\n{{\"subject\":\"bulk.b\",\"payload\":"), "line 2"),
        (
            format!("{good}\n\n{{\"subject\":\"bulk.b\",\"headers\":[{{\"name\":\"bad name\",\"value\":\"x\"}}]}}"),
            "line 3",
        ),
        (format!("{good}\n{{\"subject\":\"bulk..b\"}}"), "line 2"),
        (format!("{good}\n{{\"subject\":\"bulk.b\",\"extra\":1}}"), "line 2"),
        (format!("{good}\n").repeat(10_001), "more than 10000 messages"),
        (
            format!(
                "{good}\n{{\"subject\":\"bulk.b\",\"headers\":[{}]}}",
                vec![r#"{"name":"h","value":"v"}"#; 300].join(",")
            ),
            "line 2: more than 256 headers",
        ),
        ("\n \n".to_owned(), "no message"),
    ] {
        let (status, answer) = post(&body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(line), "{line}: {answer}");
    }
    assert!(d.queue("bulk").is_empty(), "a refused bulk publish stores nothing");

    let file = dir.path().join("messages.ndjson");
    let lines = [
        r#"{"subject":"bulk.a","payload":"one","headers":[{"name":"Nats-Msg-Id","value":"m-1"}]}"#,
        r#"{"subject":"bulk.b","payload":{"base64":"//4="}}"#,
        r#"{"subject":"bulk.a","payload":"one again","headers":[{"name":"Nats-Msg-Id","value":"m-1"}]}"#,
    ];
    std::fs::write(&file, lines.join("\r\n")).unwrap();
    let out = Command::new(sluice_bin())
        .args(["publish", "--admin", &d.admin, "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer, serde_json::json!({ "messages": 3, "duplicates": 1 }));
    let stored = d.queue("bulk");
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["payload"], "one");
    assert_eq!(stored[1]["payload"], serde_json::json!({ "base64": "//4=" }));

    // A file larger than one request goes in several commits.
    std::fs::write(
        &file,
        format!("{}\n", r#"{"subject":"bulk.c","payload":"x"}"#).repeat(10_001),
    )
    .unwrap();
    let out = Command::new(sluice_bin())
        .args(["publish", "--admin", &d.admin, "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.queue_len("bulk"), 10_003);

    // The CLI names the line in the file and sends nothing.
    std::fs::write(&file, format!("{}\nnot json\n", lines[1])).unwrap();
    let out = Command::new(sluice_bin())
        .args(["publish", "--admin", &d.admin, "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.queue_len("bulk"), 10_003);
}
