//! RabbitMQ against a real server (`SLUICE_AMQP_URL`, default
//! guest@127.0.0.1:5672; `cargo xtask test` starts one when none is
//! listening). Every test declares its own exchanges and queues (except the
//! one running the shipped config, which owns that config's names).

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use sluice_tests::daemon::Daemon;
use sluice_tests::rabbit::{self, Got, Rabbit};
use sluice_tests::{plugin, sluice_bin, unique, workspace};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn order(id: &str, event: &str) -> Vec<u8> {
    serde_json::json!({ "order_id": id, "user_id": "u-1", "amount_cents": 4200, "event_type": event })
        .to_string()
        .into_bytes()
}

fn plugins_dir() -> String {
    plugin("noop").parent().unwrap().display().to_string()
}

/// Reads `queue` until `n` messages came or `timeout` passed.
async fn collect(rabbit: &Rabbit, queue: &str, n: usize, timeout: Duration) -> Vec<Got> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < n && started.elapsed() < timeout {
        let batch = rabbit.drain(queue).await;
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(batch);
    }
    got
}

fn route_count(d: &Daemon, what: &str) -> u64 {
    d.route_field(0, what)
}

#[test]
fn shipped_config_routes_order_events_through_the_topic_binding() {
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    // The shipped config's own names: start from nothing.
    rt.block_on(rabbit.delete(&["order-notifications", "enriched-orders", "dlq.orders"], &[]));

    let text = std::fs::read_to_string(workspace().join("config/rabbitmq.toml")).unwrap();
    let config = text
        .replace("${SLUICE_ADMIN:-127.0.0.1:9595}", "{admin}")
        .replace("${SLUICE_DATA_DIR:-../.sluice-rabbitmq}", "{data}")
        .replace("${SLUICE_PLUGIN_DIR:-../target/wasm32-wasip2/release}", &plugins_dir())
        .replace("${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}", &rabbit::url());
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let id = unique();

    let got = rt.block_on(async {
        // `user.login` first: had a binding let it into the queue, it
        // would be counted by the time the orders are settled.
        for (key, event) in [
            ("user.login", "login"),
            ("order.created", "created"),
            ("order.shipped", "shipped"),
            ("order.item.added", "item_added"),
        ] {
            let idem = format!("{id}-{event}");
            rabbit
                .publish("events", key, &[("Idempotency-Key", &idem)], &order(&id, event))
                .await;
        }
        collect(&rabbit, "enriched-orders", 3, Duration::from_secs(30)).await
    });
    let keys: BTreeSet<&str> = got.iter().map(|g| g.routing_key.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "enriched.orders.created",
            "enriched.orders.item_added",
            "enriched.orders.shipped"
        ]),
        "{}",
        d.log()
    );
    for g in &got {
        assert!(g.persistent, "sluice publishes persistent messages");
        assert!(g.text().contains(&id), "{}", g.text());
    }
    // `user.login` matched no binding: nothing else was handled.
    d.wait_for("the orders settled", Duration::from_secs(10), || {
        route_count(&d, "in_flight") == 0
    });
    assert_eq!(route_count(&d, "handled"), 3);
    assert_eq!(rt.block_on(rabbit.count("order-notifications")), 0);
    assert_eq!(rt.block_on(rabbit.count("dlq.orders")), 0);
}

/// A config with one exchange `ex`, a work queue `work` bound with `#`,
/// and the route `r` on it; `extra` adds to the route.
fn one_route(id: &str, plugin_table: &str, route_extra: &str) -> String {
    format!(
        r#"
[brokers.rabbitmq]
url = "{url}"
publish_exchange = "ex-{id}"

[[brokers.rabbitmq.exchanges]]
name = "ex-{id}"
kind = "topic"

[[brokers.rabbitmq.queues]]
name = "work-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "in.#" }}]

{plugin_table}

[[routes]]
name = "r"
plugin = "p"
dead_letter = {{ subject = "dlq-{id}" }}
{route_extra}
"#,
        url = rabbit::url()
    )
}

#[test]
fn requests_get_replies_with_their_correlation_id_and_failures_get_an_error_reply() {
    let id = unique();
    let config = one_route(
        &id,
        &format!(
            "[plugins.p]\npath = \"{}\"\nisolation = \"reuse\"",
            plugin("pricing").display()
        ),
        r#"source = { broker = "rabbitmq", queue = "work-ID" }"#.replace("ID", &id).as_str(),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let replies = format!("replies-{id}");
    let got = rt.block_on(async {
        rabbit.declare_queue(&replies, FieldTable::default()).await;
        let ask = |cid: &str| {
            BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id(cid.into())
        };
        rabbit
            .publish_with(&format!("ex-{id}"), "in.price", ask("c-1"), b"widget")
            .await;
        rabbit
            .publish_with(&format!("ex-{id}"), "in.price", ask("c-2"), b"{\"no\": 1}")
            .await;
        collect(&rabbit, &replies, 2, Duration::from_secs(20)).await
    });
    assert_eq!(got.len(), 2, "{}", d.log());
    let ok = got.iter().find(|g| g.correlation_id.as_deref() == Some("c-1")).unwrap();
    assert_eq!(ok.text(), r#"{"price_cents":999}"#);
    let err = got.iter().find(|g| g.correlation_id.as_deref() == Some("c-2")).unwrap();
    assert!(err.header("sluice-error").unwrap().contains("product"), "{err:?}");
    assert_eq!(err.header("sluice-error-kind"), Some("permanent"));
    rt.block_on(rabbit.delete(
        &[&format!("work-{id}"), &format!("dlq-{id}"), &replies],
        &[&format!("ex-{id}")],
    ));
}

#[test]
fn retries_go_through_delay_queues_on_the_backoff_without_blocking_the_queue() {
    let id = unique();
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"flaky.>\"]",
        plugin("fixture_flaky").display()
    );
    // One worker: other messages get through only if the failing one does
    // not hold the queue.
    let route = format!(
        r#"source = {{ broker = "rabbitmq", queue = "work-{id}" }}
concurrency = 1
[routes.retry]
max_attempts = 5
initial_backoff = "1s"
multiplier = 2.0
jitter = "none""#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &one_route(&id, &plugin_table, &route));
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let seen = format!("seen-{id}");
    rt.block_on(async {
        rabbit.declare_queue(&seen, FieldTable::default()).await;
        rabbit.bind(&seen, &format!("ex-{id}"), "flaky.#").await;
        rabbit
            .publish(&format!("ex-{id}"), "in.flaky", &[("fail-times", "2")], b"slow")
            .await;
        for i in 0..20 {
            rabbit
                .publish(
                    &format!("ex-{id}"),
                    "in.ok",
                    &[("fail-times", "0")],
                    format!("ok-{i}").as_bytes(),
                )
                .await;
        }
    });
    // Times of each step, from the route's counters.
    let started = Instant::now();
    let (mut first_retry, mut second_retry, mut others_done, mut all_done) = (None, None, None, None);
    // What RabbitMQ holds while the message waits: evidence that the delay
    // is the broker's (a TTL queue), not a sleep inside sluice.
    let (mut held_first, mut held_second) = (None, None);
    while all_done.is_none() && started.elapsed() < Duration::from_secs(30) {
        let (retried, handled) = (route_count(&d, "retried"), route_count(&d, "handled"));
        let now = started.elapsed();
        if retried >= 1 && first_retry.is_none() {
            first_retry = Some(now);
            held_first = Some(rt.block_on(rabbit.count(&format!("work-{id}.retry.1000ms"))));
        }
        if retried >= 2 && second_retry.is_none() {
            second_retry = Some(now);
            held_second = Some(rt.block_on(rabbit.count(&format!("work-{id}.retry.2000ms"))));
        }
        if handled >= 20 && others_done.is_none() {
            others_done = Some(now);
        }
        if handled >= 21 {
            all_done = Some(now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first, second, others, done) = (
        first_retry.expect("a first retry"),
        second_retry.expect("a second retry"),
        others_done.expect("the other messages handled"),
        all_done.unwrap_or_else(|| panic!("not all handled:\n{}", d.log())),
    );
    assert!(
        others < second,
        "the 20 others waited for the retrying one: {others:?} vs {second:?}"
    );
    assert_eq!(held_first, Some(1), "the first retry waits in the 1 s delay queue");
    assert_eq!(held_second, Some(1), "the second retry waits in the 2 s delay queue");
    let gap1 = second - first;
    let gap2 = done - second;
    assert!(
        gap1 >= Duration::from_millis(900) && gap1 <= Duration::from_millis(1600),
        "first delay {gap1:?}, backoff says 1s"
    );
    assert!(
        gap2 >= Duration::from_millis(1900) && gap2 <= Duration::from_millis(2700),
        "second delay {gap2:?}, backoff says 2s"
    );
    let got = rt.block_on(collect(&rabbit, &seen, 42, Duration::from_secs(5)));
    let attempt_of_slow: Vec<String> = got
        .iter()
        .filter(|g| g.routing_key == "flaky.done" && g.text() == "slow")
        .map(|_| "done".to_owned())
        .collect();
    assert_eq!(attempt_of_slow.len(), 1, "the failing one succeeded once");
    assert!(
        got.iter().any(|g| g.routing_key == "flaky.attempt" && g.text() == "3"),
        "it succeeded on attempt 3: {:?}",
        got.iter()
            .map(|g| (g.routing_key.clone(), g.text()))
            .collect::<Vec<_>>()
    );
    assert_eq!(route_count(&d, "dead_lettered"), 0);
    rt.block_on(rabbit.delete(
        &[
            &format!("work-{id}"),
            &format!("dlq-{id}"),
            &seen,
            &format!("work-{id}.retry.1000ms"),
            &format!("work-{id}.retry.2000ms"),
        ],
        &[&format!("ex-{id}")],
    ));
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_each_effect_is_published_once_per_key() {
    const N: usize = 5_000;
    let id = unique();
    // The effects go to a JetStream stream, which stores each dedup id once
    // (RabbitMQ cannot drop a duplicate).
    let (out, effects) = (format!("out-{id}.recorded"), format!("EFFECTS-{id}"));
    let plugin_table = format!(
        "[brokers.nats]\nurl = \"{}\"\n{}\n[plugins.p]\npath = \"{}\"\nisolation = \"reuse\"\ntimeout = \"2s\"\npublish = [\"{out}\"]\nconfig = {{ to = \"{out}\", wait_ms = 1 }}",
        sluice_tests::nats::url(),
        sluice_tests::nats::stream_block(&effects, &out),
        plugin("fixture_record").display()
    );
    let route = format!(
        r#"source = {{ broker = "rabbitmq", queue = "work-{id}", prefetch = 32 }}
concurrency = 8
publish_broker = "nats"
[routes.idempotency]
key = "header:Idempotency-Key"
lease = "3s""#
    );
    let dir = tempfile::tempdir().unwrap();
    // Started once to declare the topology, then stopped: all N wait in the
    // queue, so the kill below lands mid-stream however fast sluice is.
    let mut d = Daemon::start(dir.path(), &one_route(&id, &plugin_table, &route));
    assert!(d.terminate().success());
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let collected = sluice_tests::nats::Collected::subscribe(&rt, &out);
    rt.block_on(async {
        for i in 0..N {
            let key = format!("k-{i}");
            rabbit
                .publish(
                    &format!("ex-{id}"),
                    "in.x",
                    &[("Idempotency-Key", &key)],
                    key.as_bytes(),
                )
                .await;
        }
    });
    d.restart();
    d.wait_for("some handled", Duration::from_secs(60), || {
        route_count(&d, "handled") >= 1000
    });
    d.kill();
    let handled_before = rt.block_on(sluice_tests::nats::stored(&effects));
    assert!(handled_before < N as u64, "killed too late to test anything");
    d.restart();
    // Until every key's effect reached the test's own subscriber (it may
    // lag the daemon's PubAcks under load).
    let distinct = || {
        collected
            .all()
            .into_iter()
            .map(|(p, _)| p)
            .collect::<BTreeSet<String>>()
            .len()
    };
    d.wait_for("every effect seen", Duration::from_secs(120), || {
        distinct() >= N && rt.block_on(rabbit.count(&format!("work-{id}"))) == 0 && route_count(&d, "in_flight") == 0
    });
    let all = collected.all();
    let keys: BTreeSet<&str> = all.iter().map(|(payload, _)| payload.as_str()).collect();
    assert_eq!(keys.len(), N, "every message handled:\n{}", d.log());
    // A publish confirmed just before the kill and not yet recorded as done
    // runs again, with the same dedup id: at most one per message in flight,
    // and the stream keeps each effect once.
    let ids: BTreeSet<&str> = all.iter().filter_map(|(_, id)| id.as_deref()).collect();
    assert_eq!(ids.len(), N, "one dedup id per effect");
    assert!(all.len() <= N + 32, "{} publishes for {N} messages", all.len());
    assert_eq!(
        rt.block_on(sluice_tests::nats::stored(&effects)),
        N as u64,
        "each effect stored once"
    );
    rt.block_on(sluice_tests::nats::delete_stream(&effects));
    rt.block_on(rabbit.delete(&[&format!("work-{id}"), &format!("dlq-{id}")], &[&format!("ex-{id}")]));
}

#[test]
fn poison_message_is_dead_lettered_with_its_history_and_can_be_replayed() {
    let id = unique();
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"enriched.>\"]",
        plugin("order_processor").display()
    );
    let route = format!(r#"source = {{ broker = "rabbitmq", queue = "work-{id}" }}"#);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &one_route(&id, &plugin_table, &route));
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let parking = format!("parking-{id}");
    let dlq = format!("dlq-{id}");
    let got = rt.block_on(async {
        // A queue whose own policy dead-letters into the work queue: the
        // message arrives with RabbitMQ's x-death history (one death).
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(10));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(format!("work-{id}").as_bytes())),
        );
        rabbit.declare_queue(&parking, args).await;
        rabbit.publish("", &parking, &[("trace", "t-1")], b"not json").await;
        collect(&rabbit, &dlq, 1, Duration::from_secs(20)).await
    });
    assert_eq!(got.len(), 1, "{}", d.log());
    let dead = &got[0];
    assert_eq!(dead.payload, b"not json");
    assert_eq!(dead.header("trace"), Some("t-1"), "original headers kept");
    assert!(dead.persistent);
    for h in [
        "sluice-error",
        "sluice-error-kind",
        "sluice-attempts",
        "sluice-route",
        "sluice-plugin",
        "sluice-origin",
        "sluice-failed-at",
    ] {
        assert!(dead.header(h).is_some_and(|v| !v.is_empty()), "{h} missing: {dead:?}");
    }
    assert_eq!(dead.header("sluice-error-kind"), Some("permanent"));
    assert_eq!(dead.header("sluice-attempts"), Some("2"), "x-death counted: {dead:?}");
    assert_eq!(dead.header("sluice-route"), Some("r"));
    assert!(
        dead.header("sluice-origin")
            .unwrap()
            .starts_with(&format!("rabbitmq://work-{id}?")),
        "{dead:?}"
    );
    assert_eq!(route_count(&d, "dead_lettered"), 1);

    // Back into the queue for `sluice dlq`, then replayed: it fails again
    // and comes back with the replay counted and the attempts reset.
    rt.block_on(
        rabbit.publish_with(
            "",
            &dlq,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(rabbit::table(
                    &dead
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect::<Vec<_>>(),
                )),
            &dead.payload,
        ),
    );
    let list = std::process::Command::new(sluice_bin())
        .args(["dlq", "list", "--admin", &d.admin])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{listed} {}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(listed.contains("permanent") && listed.contains(&dlq), "{listed}");
    let replay = std::process::Command::new(sluice_bin())
        .args(["dlq", "replay", "--all", "--admin", &d.admin])
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    d.wait_for("dead-lettered again", Duration::from_secs(20), || {
        route_count(&d, "dead_lettered") == 2
    });
    let again = rt.block_on(collect(&rabbit, &dlq, 1, Duration::from_secs(10)));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].header("sluice-replays"), Some("1"), "{:?}", again[0]);
    assert_eq!(again[0].header("sluice-attempts"), Some("1"));
    rt.block_on(rabbit.delete(&[&format!("work-{id}"), &dlq, &parking], &[&format!("ex-{id}")]));
}

#[test]
fn an_exchange_declared_differently_is_a_clear_start_up_error() {
    let id = unique();
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let exchange = format!("ex-{id}");
    rt.block_on(async {
        rabbit
            .channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n{}",
        dir.path().join("data").display(),
        sluice_tests::daemon::free_port(),
        one_route(
            &id,
            &format!("[plugins.p]\npath = \"{}\"", plugin("noop").display()),
            &format!(r#"source = {{ broker = "rabbitmq", queue = "work-{id}" }}"#)
        )
    );
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(sluice_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(&format!("exchange `{exchange}`")) && stderr.contains("already exists with other settings"),
        "{stderr}"
    );
    assert!(stderr.contains("'topic'") && stderr.contains("'direct'"), "{stderr}");
    rt.block_on(rabbit.delete(&[], &[&exchange]));
}

#[test]
fn in_process_retries_hold_the_message_and_use_no_delay_queue() {
    let id = unique();
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"flaky.>\"]",
        plugin("fixture_flaky").display()
    );
    let route = format!(
        r#"source = {{ broker = "rabbitmq", queue = "work-{id}", retry_via = "in_process" }}
[routes.retry]
initial_backoff = "100ms"
jitter = "none""#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &one_route(&id, &plugin_table, &route));
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let seen = format!("seen-{id}");
    let got = rt.block_on(async {
        rabbit.declare_queue(&seen, FieldTable::default()).await;
        rabbit.bind(&seen, &format!("ex-{id}"), "flaky.#").await;
        rabbit
            .publish(&format!("ex-{id}"), "in.flaky", &[("fail-times", "2")], b"slow")
            .await;
        collect(&rabbit, &seen, 2, Duration::from_secs(20)).await
    });
    let texts: BTreeSet<(String, String)> = got.iter().map(|g| (g.routing_key.clone(), g.text())).collect();
    assert_eq!(
        texts,
        BTreeSet::from([
            ("flaky.attempt".to_owned(), "3".to_owned()),
            ("flaky.done".to_owned(), "slow".to_owned())
        ]),
        "{}",
        d.log()
    );
    assert_eq!(route_count(&d, "retried"), 2);
    // No delay queue was declared: checking for one fails.
    let delay_queue = rt.block_on(async {
        let ch = rabbit.connection.create_channel().await.unwrap();
        ch.queue_declare(
            format!("work-{id}.retry.100ms").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    });
    assert!(delay_queue.is_err(), "a delay queue exists");
    rt.block_on(rabbit.delete(
        &[&format!("work-{id}"), &format!("dlq-{id}"), &seen],
        &[&format!("ex-{id}")],
    ));
}

/// Consumers on `queue` now (a passive declare reports them).
async fn consumers(rabbit: &Rabbit, queue: &str) -> u32 {
    let ch = rabbit.connection.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    q.consumer_count()
}

#[test]
fn a_config_reload_restarts_or_removes_a_route_and_hands_back_what_it_had_prefetched() {
    const N: u64 = 30;
    let id = unique();
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\nisolation = \"reuse\"\npublish = [\"recorded.>\"]\nconfig = {{ to = \"recorded.x\", wait_ms = 150 }}\n\n# Handler publishes are mandatory: something must receive them.\n[[brokers.rabbitmq.queues]]\nname = \"recorded-{id}\"\nbindings = [{{ exchange = \"ex-{id}\", routing_key = \"recorded.#\" }}]",
        plugin("fixture_record").display()
    );
    let route = |concurrency: u32| {
        format!(
            "source = {{ broker = \"rabbitmq\", queue = \"work-{id}\", prefetch = 10 }}\nconcurrency = {concurrency}"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &one_route(&id, &plugin_table, &route(1)));
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let work = format!("work-{id}");
    rt.block_on(async {
        for i in 0..N {
            rabbit
                .publish(&format!("ex-{id}"), "in.x", &[], i.to_string().as_bytes())
                .await;
        }
    });
    d.wait_for("a few handled", Duration::from_secs(20), || {
        route_count(&d, "handled") >= 2
    });
    let reloads = |result: &str| d.metric(&format!("sluice_config_reloads_total{{result=\"{result}\"}}"));

    // Restarted with two workers: one consumer again, nothing stuck.
    d.write_config(&one_route(&id, &plugin_table, &route(2)));
    d.wait_for("the reload", Duration::from_secs(20), || reloads("ok") >= 1.0);
    assert!(d.log().contains("route r restarted"), "{}", d.log());
    // The new route subscribes as its workers start: waited for, not raced.
    d.wait_for(
        "one consumer: the old one gone, the new one there",
        Duration::from_secs(10),
        || rt.block_on(consumers(&rabbit, &work)) == 1,
    );
    d.wait_for("some more handled", Duration::from_secs(20), || {
        route_count(&d, "handled") >= 8
    });

    // Removed: no consumer; what it had prefetched is ready again, not
    // held unacked.
    let without_route = one_route(&id, &plugin_table, "")
        .split("[[routes]]")
        .next()
        .unwrap()
        .to_owned();
    d.write_config(&without_route);
    d.wait_for("the second reload", Duration::from_secs(20), || reloads("ok") >= 2.0);
    assert_eq!(rt.block_on(consumers(&rabbit, &work)), 0);
    // The route is gone from the status; its series stays in the metrics.
    let handled = d.metric("sluice_messages_total{route=\"r\",outcome=\"ok\"}") as u64;
    d.wait_for("the rest ready in the queue", Duration::from_secs(10), || {
        u64::from(rt.block_on(rabbit.count(&work))) == N - handled
    });
    rt.block_on(rabbit.delete(
        &[&work, &format!("dlq-{id}"), &format!("recorded-{id}")],
        &[&format!("ex-{id}")],
    ));
}
