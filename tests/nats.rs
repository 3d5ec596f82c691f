//! NATS and JetStream against a real nats-server (`SLUICE_NATS_URL`, default
//! 127.0.0.1:4222; `cargo xtask test` starts one when none is listening).
//! Every test uses its own streams and subjects, so runs do not collide.

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::Value;
use sluice_tests::daemon::Daemon;
use sluice_tests::nats::url as nats_url;
use sluice_tests::{plugin, unique, workspace};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client() -> async_nats::Client {
    async_nats::connect(nats_url()).await.unwrap_or_else(|e| {
        panic!(
            "nats-server at {} is needed (cargo xtask test starts one): {e}",
            nats_url()
        )
    })
}

fn order(id: &str, event: &str) -> Vec<u8> {
    serde_json::json!({ "order_id": id, "user_id": "u-1", "amount_cents": 4200, "event_type": event })
        .to_string()
        .into_bytes()
}

/// The shipped config/nats.toml, with the admin address, data directory
/// and plugin folder of the test.
fn shipped_nats_config() -> String {
    let text = std::fs::read_to_string(workspace().join("config/nats.toml")).unwrap();
    let plugins = plugin("noop").parent().unwrap().display().to_string();
    text.replace("${SLUICE_ADMIN:-127.0.0.1:9595}", "{admin}")
        .replace("${SLUICE_DATA_DIR:-../.sluice-nats}", "{data}")
        .replace("${SLUICE_PLUGIN_DIR:-../target/wasm32-wasip2/release}", &plugins)
        .replace("${NATS_URL:-nats://127.0.0.1:4222}", &nats_url())
}

#[test]
fn shipped_config_handles_order_events_from_jetstream_and_answers_pricing_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &shipped_nats_config());
    let id = unique();
    rt().block_on(async {
        let nats = client().await;
        let mut enriched = nats.subscribe("enriched.orders.>").await.unwrap();
        nats.flush().await.unwrap();
        let js = jetstream::new(nats.clone());
        for (subject, event) in [("orders.created", "created"), ("orders.paid", "paid")] {
            js.publish(subject, order(&format!("{id}-{event}"), event).into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, enriched.next())
                .await
                .expect("enriched events")
                .unwrap();
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["order_id"].as_str().unwrap_or("").starts_with(&id) {
                assert_eq!(
                    m.subject.as_str(),
                    format!("enriched.orders.{}", v["event_type"].as_str().unwrap())
                );
                assert_eq!(v["amount"], "42.00");
                seen.insert(v["order_id"].as_str().unwrap().to_owned());
            }
        }
        for (product, price) in [("widget", 999), ("gadget", 2499), ("other", 100)] {
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                nats.request("pricing.calculate", product.as_bytes().to_vec().into()),
            )
            .await
            .expect("a reply in time")
            .unwrap();
            let v: Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(v, serde_json::json!({ "price_cents": price }), "{product}");
        }
    });
    drop(d);
}

fn core_trap_config(subject: &str) -> String {
    format!(
        r#"
[brokers.nats]
url = "{url}"

[plugins.trap]
path = "{wasm}"

[[routes]]
name = "failing"
plugin = "trap"
source = {{ broker = "nats", subject = "{subject}" }}
dead_letter = {{ broker = "nats", subject = "{subject}.dlq" }}
"#,
        url = nats_url(),
        wasm = plugin("fixture_trap").display(),
    )
}

#[test]
fn a_failing_request_handler_answers_with_an_error_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let subject = format!("svc.{}", unique());
    let d = Daemon::start(dir.path(), &core_trap_config(&subject));
    rt().block_on(async {
        let nats = client().await;
        let mut dlq = nats.subscribe(format!("{subject}.dlq")).await.unwrap();
        nats.flush().await.unwrap();
        let started = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(10), nats.request(subject.clone(), "trap".into()))
            .await
            .expect("an answer, not a timeout")
            .unwrap_or_else(|e| panic!("no answer ({e}):\n{}", d.log()));
        assert!(started.elapsed() < Duration::from_secs(5));
        let headers = reply.headers.expect("error headers");
        assert!(headers
            .get("sluice-error")
            .unwrap()
            .as_str()
            .contains("fixture asked to trap"));
        assert_eq!(headers.get("sluice-error-kind").unwrap().as_str(), "trap");
        let dead = tokio::time::timeout(Duration::from_secs(10), dlq.next())
            .await
            .expect("a dead letter")
            .unwrap();
        assert_eq!(&dead.payload[..], b"trap");
    });
    drop(d);
}

struct Streams {
    js: jetstream::Context,
    names: Vec<String>,
}

impl Streams {
    async fn count(&self, name: &str) -> u64 {
        let mut s = self.js.get_stream(name).await.unwrap();
        s.info().await.unwrap().state.messages
    }

    async fn delete(&self) {
        for n in &self.names {
            let _ = self.js.delete_stream(n).await;
        }
    }
}

#[test]
fn jetstream_5000_messages_survive_a_sigkill_with_each_effect_exactly_once() {
    const N: usize = 5000;
    let id = unique();
    let (input, output) = (format!("IN_{id}"), format!("OUT_{id}"));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{input}"
subjects = ["{id}.in.>", "{id}.dlq"]
[[brokers.nats.streams]]
name = "{output}"
subjects = ["{id}.out"]
duplicate_window = "10m"

[plugins.record]
path = "{wasm}"
isolation = "reuse"
publish = ["{id}.out"]
[plugins.record.config]
to = "{id}.out"

[[routes]]
name = "bulk"
plugin = "record"
source = {{ broker = "jetstream", stream = "{input}", subject = "{id}.in.>", ack_wait = "5s" }}
dead_letter = {{ subject = "{id}.dlq" }}
concurrency = 8
[routes.idempotency]
key = "header:Idempotency-Key"
"#,
        url = nats_url(),
        wasm = plugin("fixture_record").display(),
    );
    let rt = rt();
    let streams = rt.block_on(async {
        let js = jetstream::new(client().await);
        Streams {
            js,
            names: vec![input.clone(), output.clone()],
        }
    });
    let mut d = Daemon::start(dir.path(), &config);
    rt.block_on(async {
        let nats = client().await;
        let js = jetstream::new(nats);
        // Acks awaited in chunks: the client bounds unacknowledged publishes.
        let mut acks = Vec::with_capacity(500);
        for i in 0..N {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Idempotency-Key", format!("k-{i}").as_str());
            acks.push(
                js.publish_with_headers(format!("{id}.in.{}", i % 10), headers, i.to_string().into())
                    .await
                    .unwrap(),
            );
            if acks.len() == 500 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    });
    d.wait_for("some handled", Duration::from_secs(60), || {
        rt.block_on(streams.count(&output)) >= (N / 5) as u64
    });
    d.kill();
    let at_crash = rt.block_on(streams.count(&output));
    d.restart();
    d.wait_for("every message handled", Duration::from_secs(180), || {
        rt.block_on(streams.count(&output)) >= N as u64
    });
    // Let redeliveries of in-flight messages settle, then count again.
    std::thread::sleep(Duration::from_secs(6));
    let total = rt.block_on(streams.count(&output));
    let payloads: BTreeSet<String> = rt.block_on(async {
        let stream = streams.js.get_stream(&output).await.unwrap();
        let mut out = BTreeSet::new();
        for seq in 1..=total {
            let m = stream.get_raw_message(seq).await.unwrap();
            out.insert(String::from_utf8(m.payload.to_vec()).unwrap());
        }
        out
    });
    rt.block_on(streams.delete());
    assert!(
        at_crash < N as u64,
        "the crash came after everything was handled; the test proves nothing"
    );
    assert_eq!(total, N as u64, "each effect exactly once (dedup by Nats-Msg-Id)");
    assert_eq!(payloads.len(), N, "none lost");
}

#[test]
fn jetstream_retries_are_naks_whose_delays_follow_the_backoff() {
    let id = unique();
    let stream = format!("RETRY_{id}");
    let probe = format!("{id}.probe");
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{stream}"
subjects = ["{id}.work", "{id}.dlq"]

[plugins.flaky]
path = "{wasm}"
publish = ["flaky.>"]
request = ["{probe}"]
[plugins.flaky.config]
fail_times = "2"
probe = "{probe}"

[[routes]]
name = "retrying"
plugin = "flaky"
source = {{ broker = "jetstream", stream = "{stream}", subject = "{id}.work" }}
dead_letter = {{ subject = "{id}.dlq" }}
[routes.retry]
max_attempts = 5
initial_backoff = "400ms"
multiplier = 2.0
jitter = "none"
"#,
        url = nats_url(),
        wasm = plugin("fixture_flaky").display(),
    );
    let d = Daemon::start(dir.path(), &config);
    let times = rt().block_on(async {
        let nats = client().await;
        let mut probes = nats.subscribe(probe.clone()).await.unwrap();
        nats.flush().await.unwrap();
        let js = jetstream::new(nats.clone());
        js.publish(format!("{id}.work"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let mut times = Vec::new();
        while times.len() < 3 {
            let m = tokio::time::timeout(Duration::from_secs(20), probes.next())
                .await
                .expect("attempt")
                .unwrap();
            times.push((String::from_utf8_lossy(&m.payload).into_owned(), Instant::now()));
            if let Some(reply) = m.reply {
                nats.publish(reply, "ok".into()).await.unwrap();
            }
        }
        times
    });
    let attempts: Vec<&str> = times.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(attempts, ["1", "2", "3"], "the delivery count is message.attempt");
    let gap1 = times[1].1 - times[0].1;
    let gap2 = times[2].1 - times[1].1;
    assert!(
        gap1 >= Duration::from_millis(380) && gap1 < Duration::from_millis(1400),
        "first nak delay {gap1:?}, want ~400 ms"
    );
    assert!(
        gap2 >= Duration::from_millis(780) && gap2 < Duration::from_millis(1800),
        "second nak delay {gap2:?}, want ~800 ms"
    );
    d.wait_for("success on delivery 3", Duration::from_secs(10), || {
        d.metric("sluice_messages_total{route=\"retrying\",outcome=\"ok\"}") == 1.0
    });
    assert_eq!(
        d.metric("sluice_messages_total{route=\"retrying\",outcome=\"retry\"}"),
        2.0
    );
    // The broker's side: it delivered the message three times (naks, not
    // retries inside sluice) and holds nothing unacked.
    rt().block_on(async {
        let js = jetstream::new(client().await);
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_stream(&stream)
            .await
            .unwrap()
            .get_consumer("retrying")
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!(info.delivered.consumer_sequence, 3, "deliveries by JetStream");
        assert_eq!(info.num_ack_pending, 0);
        let _ = js.delete_stream(&stream).await;
    });
}

#[test]
fn a_poison_message_is_dead_lettered_with_its_headers_then_termed_not_redelivered() {
    let id = unique();
    let (stream, dlq_stream) = (format!("POISON_{id}"), format!("POISON_DLQ_{id}"));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{stream}"
subjects = ["{id}.orders.>"]
[[brokers.nats.streams]]
name = "{dlq_stream}"
subjects = ["{id}.dlq"]

[plugins.orders]
path = "{wasm}"
publish = ["enriched.orders.>"]

[[routes]]
name = "poison"
plugin = "orders"
source = {{ broker = "jetstream", stream = "{stream}", subject = "{id}.orders.>", ack_wait = "1s" }}
dead_letter = {{ subject = "{id}.dlq" }}
"#,
        url = nats_url(),
        wasm = plugin("order_processor").display(),
    );
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let js = rt.block_on(async { jetstream::new(client().await) });
    rt.block_on(async {
        let mut h = async_nats::HeaderMap::new();
        h.insert("x-trace", "t-9");
        js.publish_with_headers(format!("{id}.orders.created"), h, "{oops".into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    d.wait_for("the dead letter", Duration::from_secs(30), || {
        rt.block_on(async {
            js.get_stream(&dlq_stream)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .messages
        }) == 1
    });
    let dead = rt.block_on(async {
        js.get_stream(&dlq_stream)
            .await
            .unwrap()
            .get_raw_message(1)
            .await
            .unwrap()
    });
    assert_eq!(&dead.payload[..], b"{oops");
    let h = &dead.headers;
    let get = |name: &str| {
        h.get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(get("x-trace"), "t-9");
    assert_eq!(get("sluice-error-kind"), "permanent");
    assert_eq!(get("sluice-attempts"), "1");
    assert_eq!(get("sluice-route"), "poison");
    assert!(get("sluice-plugin").starts_with("orders@sha256:"));
    assert!(get("sluice-origin").starts_with(&format!("jetstream://{stream}/{id}.orders.created?seq=1")));
    assert!(get("sluice-error").contains("JSON"));
    assert!(!get("sluice-failed-at").is_empty());
    // Termed: nothing is redelivered after ack_wait.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.metric("sluice_handler_duration_seconds_count{route=\"poison\"}"), 1.0);
    rt.block_on(async {
        let _ = js.delete_stream(&stream).await;
        let _ = js.delete_stream(&dlq_stream).await;
    });
}

/// A nats-server of the test's own, so it can be stopped and started.
struct OwnServer {
    child: Option<std::process::Child>,
    port: u16,
    store: std::path::PathBuf,
}

impl OwnServer {
    fn start(port: u16, store: &std::path::Path) -> Self {
        let mut s = Self {
            child: None,
            port,
            store: store.to_owned(),
        };
        s.restart();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH (cargo xtask test installs it)");
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn sluice_reconnects_after_a_nats_server_restart_and_loses_nothing() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = OwnServer::start(sluice_tests::daemon::free_port(), &dir.path().join("nats"));
    let url = server.url();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "WORK"
subjects = ["work.>", "dlq.work"]
[[brokers.nats.streams]]
name = "DONE"
subjects = ["done"]

[plugins.record]
path = "{wasm}"
publish = ["done"]
[plugins.record.config]
to = "done"
wait_ms = "1"

[[routes]]
name = "work"
plugin = "record"
source = {{ broker = "jetstream", stream = "WORK", subject = "work.>", ack_wait = "2s" }}
concurrency = 4
[routes.idempotency]
key = "id"
store = "memory"
"#,
        wasm = plugin("fixture_record").display(),
    );
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let count = |rt: &tokio::runtime::Runtime| -> Option<u64> {
        rt.block_on(async {
            let c = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url.as_str()))
                .await
                .ok()?
                .ok()?;
            let mut s = jetstream::new(c).get_stream("DONE").await.ok()?;
            Some(s.info().await.ok()?.state.messages)
        })
    };
    rt.block_on(async {
        let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
        for i in 0..N {
            js.publish(format!("work.{}", i % 7), i.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    d.wait_for("some handled", Duration::from_secs(60), || {
        count(&rt).unwrap_or(0) >= 200
    });
    let before = count(&rt).unwrap_or(0);
    server.kill();
    assert!(
        before < N as u64,
        "the restart came after everything was handled; the test proves nothing"
    );
    d.wait_for("readyz to report the lost connection", Duration::from_secs(20), || {
        ureq::get(format!("http://{}/readyz", d.admin)).call().is_err()
    });
    std::thread::sleep(Duration::from_secs(1));
    server.restart();
    d.wait_for("readyz again", Duration::from_secs(30), || {
        ureq::get(format!("http://{}/readyz", d.admin)).call().is_ok()
    });
    d.wait_for("every message handled", Duration::from_secs(120), || {
        count(&rt).unwrap_or(0) >= N as u64
    });
    let payloads: BTreeSet<String> = rt.block_on(async {
        let stream = jetstream::new(async_nats::connect(url.as_str()).await.unwrap())
            .get_stream("DONE")
            .await
            .unwrap();
        let mut out = BTreeSet::new();
        let total = stream.cached_info().state.messages;
        for seq in 1..=total {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.insert(String::from_utf8(m.payload.to_vec()).unwrap());
            }
        }
        out
    });
    assert_eq!(payloads.len(), N, "none lost");
}

#[test]
fn jetstream_dead_letters_are_listed_and_replayed_once_the_plugin_is_fixed() {
    let id = unique();
    let (work, dead, out) = (format!("W_{id}"), format!("D_{id}"), format!("O_{id}"));
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("handler.wasm");
    std::fs::copy(plugin("fixture_trap"), &wasm).unwrap();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{work}"
subjects = ["{id}.work.>"]
[[brokers.nats.streams]]
name = "{dead}"
subjects = ["{id}.dlq"]
[[brokers.nats.streams]]
name = "{out}"
subjects = ["{id}.out"]

[plugins.handler]
path = "{wasm}"
publish = ["{id}.out"]
[plugins.handler.config]
to = "{id}.out"

[[routes]]
name = "fixable"
plugin = "handler"
source = {{ broker = "jetstream", stream = "{work}", subject = "{id}.work.>" }}
dead_letter = {{ subject = "{id}.dlq" }}
[routes.on_failure]
trap = "dead_letter"
"#,
        url = nats_url(),
        wasm = wasm.display(),
    );
    let mut d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let js = rt.block_on(async { jetstream::new(client().await) });
    let count =
        |name: &str| rt.block_on(async { js.get_stream(name).await.unwrap().info().await.unwrap().state.messages });
    rt.block_on(async {
        for i in 0..2 {
            js.publish(format!("{id}.work.{i}"), "trap".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    d.wait_for("two dead letters", Duration::from_secs(30), || count(&dead) == 2);
    let dlq = |admin: &str, args: &[&str]| {
        let out = std::process::Command::new(sluice_tests::sluice_bin())
            .arg("dlq")
            .args(args)
            .args(["--admin", admin, "--queue", &format!("{id}.dlq")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = dlq(&d.admin, &["list"]);
    assert!(listing.contains("2 dead letters (trap: 2)"), "{listing}");
    assert!(
        listing.contains(&format!("{id}.work.0")),
        "origin subject shown: {listing}"
    );

    assert!(d.terminate().success());
    std::fs::copy(plugin("fixture_record"), &wasm).unwrap();
    d.restart();
    let replayed = dlq(&d.admin, &["replay", "--all"]);
    assert!(replayed.contains("replayed 2"), "{replayed}");
    d.wait_for("the replayed messages handled", Duration::from_secs(30), || {
        count(&out) == 2
    });
    assert_eq!(count(&dead), 0, "replayed dead letters are removed");
    rt.block_on(async {
        for s in [&work, &dead, &out] {
            let _ = js.delete_stream(s).await;
        }
    });
}

#[test]
fn an_existing_stream_with_other_settings_is_refused_with_the_difference() {
    let id = unique();
    let stream = format!("CLASH_{id}");
    let rt = rt();
    let js = rt.block_on(async { jetstream::new(client().await) });
    rt.block_on(async {
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{id}.a")],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"data\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[brokers.nats]\nurl = \"{}\"\n[[brokers.nats.streams]]\nname = \"{stream}\"\nsubjects = [\"{id}.b\"]\n",
            sluice_tests::daemon::free_port(),
            nats_url()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    rt.block_on(async {
        let _ = js.delete_stream(&stream).await;
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("JetStream stream `{stream}`")), "{err}");
    assert!(err.contains("subjects is") && err.contains(&format!("{id}.b")), "{err}");
}

#[test]
fn a_handler_running_past_ack_wait_is_kept_alive_by_in_progress_acks_not_redelivered() {
    let id = unique();
    let stream = format!("LONG_{id}");
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{stream}"
subjects = ["{id}.long", "{id}.done", "{id}.dlq"]
[plugins.p]
path = "{wasm}"
publish = ["{id}.done"]
config = {{ to = "{id}.done", wait_ms = 2500 }}
[[routes]]
name = "long"
plugin = "p"
concurrency = 2
source = {{ broker = "jetstream", stream = "{stream}", subject = "{id}.long", ack_wait = "1s" }}
dead_letter = {{ subject = "{id}.dlq" }}
"#,
        url = nats_url(),
        wasm = plugin("fixture_record").display(),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let js = rt.block_on(async { jetstream::new(client().await) });
    rt.block_on(async {
        js.publish(format!("{id}.long"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap()
    });
    d.wait_for("handled", Duration::from_secs(15), || {
        d.metric("sluice_messages_total{route=\"long\",outcome=\"ok\"}") == 1.0
    });
    rt.block_on(async {
        let mut s = js.get_stream(&stream).await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer = s.get_consumer("long").await.unwrap();
        let info = consumer.info().await.unwrap();
        // Without the keepalive JetStream would have redelivered it after
        // 1 s to the second worker, while the first still ran.
        assert_eq!(info.delivered.consumer_sequence, 1, "delivered once");
        assert_eq!(info.num_redelivered, 0);
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(s.info().await.unwrap().state.messages, 2, "one input, one effect");
        let _ = js.delete_stream(&stream).await;
    });
}

#[test]
fn a_queue_group_splits_a_wildcard_subject_between_two_instances_each_message_once() {
    const N: usize = 200;
    let id = unique();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[plugins.p]
path = "{wasm}"
isolation = "reuse"
publish = ["{id}.out"]
config = {{ to = "{id}.out" }}
[[routes]]
name = "paid"
plugin = "p"
source = {{ broker = "nats", subject = "{id}.orders.*.paid", queue_group = "g-{id}" }}
"#,
        url = nats_url(),
        wasm = plugin("fixture_record").display(),
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &config);
    let b = Daemon::start(dir_b.path(), &config);
    let rt = rt();
    let out = sluice_tests::nats::Collected::subscribe(&rt, &format!("{id}.out"));
    rt.block_on(async {
        let nats = client().await;
        // Subjects the pattern does not match, sent first: had either
        // instance received them, they would be recorded before the last
        // matching one.
        for other in [
            "orders.1.created",
            "orders.1.paid.late",
            "orders.paid",
            "x.orders.1.paid",
        ] {
            nats.publish(format!("{id}.{other}"), "no".into()).await.unwrap();
        }
        for i in 0..N {
            nats.publish(format!("{id}.orders.{i}.paid"), format!("m-{i}").into())
                .await
                .unwrap();
        }
        nats.flush().await.unwrap();
    });
    a.wait_for("every message recorded", Duration::from_secs(30), || out.len() >= N);
    let handled = |d: &Daemon| d.route_field(0, "handled");
    a.wait_for("both counted", Duration::from_secs(10), || {
        handled(&a) + handled(&b) == N as u64
    });
    let got = out.all();
    let distinct: BTreeSet<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(distinct.len(), N, "{got:?}");
    assert_eq!(got.len(), N, "a message was handled by both instances");
    assert!(!distinct.contains("no"), "a subject outside the pattern was handled");
    assert!(handled(&a) > 0 && handled(&b) > 0, "one instance got everything");
}

/// The same plain `wasi:messaging` component on NATS: a JetStream route
/// (send stored only after success, `error` retried then dead-lettered), a
/// core route answering a request with the component's `reply`, and the
/// component's own `request` answered by a NATS service.
#[test]
fn a_wasi_messaging_component_runs_unchanged_on_jetstream_and_core_nats() {
    let id = unique();
    let (stream, out, dlq) = (format!("WM_{id}"), format!("WM_OUT_{id}"), format!("WM_DLQ_{id}"));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{stream}"
subjects = ["{id}.wm.in"]
[[brokers.nats.streams]]
name = "{out}"
subjects = ["{id}.out"]
[[brokers.nats.streams]]
name = "{dlq}"
subjects = ["{id}.dlq"]

[plugins.wm]
path = "{wasm}"
publish = ["{id}.out"]
request = ["{id}.service"]

[[routes]]
name = "js"
plugin = "wm"
source = {{ broker = "jetstream", stream = "{stream}", subject = "{id}.wm.in" }}
dead_letter = {{ subject = "{id}.dlq" }}
[routes.retry]
max_attempts = 2
initial_backoff = "10ms"

[[routes]]
name = "core"
plugin = "wm"
source = {{ broker = "nats", subject = "{id}.wm.ask" }}
"#,
        url = nats_url(),
        wasm = plugin("fixture_messaging").display(),
    );
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let nc = rt.block_on(client());
    let js = rt.block_on(async { jetstream::new(nc.clone()) });
    let out_topic = format!("{id}.out");
    let headers = |pairs: &[(&str, &str)]| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("out", out_topic.as_str());
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    };
    // The service the component asks.
    let mut service = rt.block_on(nc.subscribe(format!("{id}.service"))).unwrap();
    let responder = nc.clone();
    rt.spawn(async move {
        while let Some(m) = service.next().await {
            if let Some(reply) = m.reply {
                let answer = [b"answer:".as_slice(), &m.payload].concat();
                let _ = responder.publish(reply, answer.into()).await;
            }
        }
    });
    let service_topic = format!("{id}.service");
    let asks = [("mode", "request"), ("service", service_topic.as_str())];
    rt.block_on(async {
        for (pairs, payload) in [(&[][..], "one"), (&[("mode", "fail")][..], "bad"), (&asks[..], "two")] {
            js.publish_with_headers(format!("{id}.wm.in"), headers(pairs), payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let answer = rt
        .block_on(nc.request_with_headers(format!("{id}.wm.ask"), headers(&[]), "q".into()))
        .unwrap();
    assert_eq!(&answer.payload[..], b"reply:q");

    d.wait_for("the dead letter and three sends", Duration::from_secs(30), || {
        rt.block_on(async {
            (
                sluice_tests::nats::stored(&dlq).await,
                sluice_tests::nats::stored(&out).await,
            )
        }) == (1, 3)
    });
    let stored = |name: &str, n: u64| {
        rt.block_on(async { js.get_stream(name).await.unwrap().get_raw_message(n).await.unwrap() })
    };
    let payloads: BTreeSet<String> = (1..=3)
        .map(|n| String::from_utf8_lossy(&stored(&out, n).payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        BTreeSet::from(["handled:one".into(), "handled:q".into(), "answer:two".into()]),
        "no send of the failed attempts is stored"
    );
    let first = stored(&out, 1);
    assert_eq!(
        first.headers.get("content-type").map(|v| v.as_str()),
        Some("text/plain")
    );
    let dead = stored(&dlq, 1);
    assert_eq!(&dead.payload[..], b"bad");
    assert_eq!(
        dead.headers.get("sluice-error").map(|v| v.as_str()),
        Some("asked to fail")
    );
    assert_eq!(dead.headers.get("sluice-attempts").map(|v| v.as_str()), Some("2"));
    rt.block_on(async {
        for s in [&stream, &out, &dlq] {
            let _ = js.delete_stream(s).await;
        }
    });
}
