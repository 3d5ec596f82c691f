//! Kafka against a real Kafka-protocol broker (tansu; `SLUICE_KAFKA_BROKERS`,
//! default 127.0.0.1:9092; `cargo xtask test` starts one when none is
//! listening). Every test uses its own topics and consumer group.

use sluice_tests::daemon::Daemon;
use sluice_tests::kafka::{self, brokers, committed, ends, produce, read, Input};
use sluice_tests::nats::url as nats_url;
use sluice_tests::{plugin, sluice_bin, unique};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One test at a time: tansu (a single SQLite writer) slows down so much
/// under several tests at once that its metadata calls time out.
static BROKER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    BROKER.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config with route `r` on `brokers`: the group notices a dead member
/// within seconds and commits come often, so the tests do not wait long.
/// Handler publishes may go to NATS (`publish_broker = "nats"`).
fn config(brokers: &str, id: &str, plugin_table: &str, route: &str) -> String {
    format!(
        r#"
[brokers.nats]
url = "{nats}"

[brokers.kafka]
brokers = "{brokers}"
commit_interval = "200ms"

[brokers.kafka.librdkafka]
"session.timeout.ms" = "30000"
"heartbeat.interval.ms" = "500"
"max.poll.interval.ms" = "30000"
# tansu answers a fetch only after this long, even when records are there.
"fetch.wait.max.ms" = "10"


{plugin_table}

[[routes]]
name = "r"
plugin = "p"
dead_letter = {{ subject = "dlq-{id}" }}
{route}
"#,
        nats = nats_url()
    )
}

fn record_plugin(to: &str, wait_ms: u32) -> String {
    format!(
        "[plugins.p]\npath = \"{}\"\nisolation = \"reuse\"\ntimeout = \"2s\"\npublish = [\"{to}\"]\nconfig = {{ to = \"{to}\", wait_ms = {wait_ms} }}",
        plugin("fixture_record").display()
    )
}

/// The `flaky` fixture as plugin `p`: fails the number of times in a
/// record's `fail-times` header, then publishes `flaky.done`.
fn flaky_plugin() -> String {
    format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"flaky.>\"]",
        plugin("fixture_flaky").display()
    )
}

fn route_count(d: &Daemon, what: &str) -> u64 {
    d.route_field(0, what)
}

fn keyed(key: &str, payload: String) -> Input {
    (None, Some(key.to_owned()), Vec::new(), payload)
}

#[test]
fn user_events_keep_per_key_order_across_eight_workers() {
    let _serial = serial();
    let id = unique();
    let (input, out) = (format!("in-{id}"), format!("out.{id}"));
    let rt = rt();
    let producer = kafka::producer(&brokers());
    // 200 users x 50 events, interleaved: usr-0 #0, usr-1 #0, ... usr-0 #1 ...
    let mut records = Vec::new();
    for seq in 0..50 {
        for user in 0..200 {
            records.push(keyed(&format!("usr-{user}"), format!("usr-{user}:{seq}")));
        }
    }
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 3).await;
        produce(&producer, &input, records).await;
    });
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}
ordering = "key"
concurrency = 8
publish_broker = "nats""#
    );
    let collected = kafka::Collected::subscribe(&rt, &out);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&brokers(), &id, &record_plugin(&out, 0), &route));
    d.wait_for("10,000 handled", Duration::from_secs(120), || collected.len() >= 10_000);
    let got = collected.all();
    assert_eq!(got.len(), 10_000, "{}", d.log());
    // Each publish is flushed before the next message of its key starts:
    // the order received is the handling order.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (payload, _) in &got {
        let (user, seq) = payload.split_once(':').unwrap();
        let seq: i64 = seq.parse().unwrap();
        let prev = last.insert(user.to_owned(), seq).unwrap_or(-1);
        assert_eq!(seq, prev + 1, "{user}: #{seq} handled after #{prev}");
    }
    assert_eq!(last.len(), 200);
    assert!(last.values().all(|s| *s == 49));
    d.wait_for("offsets committed to the end", Duration::from_secs(10), || {
        committed(&brokers(), &format!("g-{id}"), &input, 3) == ends(&brokers(), &input, 3)
    });
}

#[test]
fn a_failing_record_retries_in_place_while_other_partitions_flow_and_commits_wait_for_it() {
    let _serial = serial();
    let id = unique();
    let input = format!("in-{id}");
    let rt = rt();
    let producer = kafka::producer(&brokers());
    let mut records = Vec::new();
    for p in 0..3 {
        for i in 0..5 {
            let fail = if p == 0 && i == 0 { "2" } else { "0" };
            records.push((
                Some(p),
                None,
                vec![("fail-times".to_owned(), fail.to_owned())],
                format!("p{p}-{i}"),
            ));
        }
    }
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 3).await;
        produce(&producer, &input, records).await;
    });
    let plugin_table = flaky_plugin();
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}
concurrency = 3
[routes.retry]
initial_backoff = "1s"
multiplier = 2.0
jitter = "none""#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&brokers(), &id, &plugin_table, &route));
    let group = format!("g-{id}");
    let started = Instant::now();
    let mut others_done_while_p0_waits = false;
    loop {
        // Commits first: a commit past the failing record must come after
        // its success, which the counts read afterwards then show. Partition
        // 0 is handled in order, so none of it is done before that record:
        // 10 handled = only partitions 1 and 2.
        let c = committed(&brokers(), &group, &input, 3);
        let retried = route_count(&d, "retried");
        let handled = route_count(&d, "handled");
        if handled <= 10 {
            assert!(c[0] <= 0, "partition 0 committed past its failing record: {c:?}");
        }
        if c[1] == 5 && c[2] == 5 && c[0] <= 0 && retried < 2 {
            others_done_while_p0_waits = true;
        }
        if c == [5, 5, 5] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stuck at {c:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(others_done_while_p0_waits, "partitions 1 and 2 waited for partition 0");
    assert_eq!(route_count(&d, "retried"), 2);
    assert_eq!(route_count(&d, "handled"), 15);
    assert_eq!(route_count(&d, "dead_lettered"), 0);
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_commits_never_skip() {
    let _serial = serial();
    const N: usize = 5_000;
    let id = unique();
    let (input, out) = (format!("in-{id}"), format!("out.{id}"));
    let rt = rt();
    let producer = kafka::producer(&brokers());
    let records = (0..N)
        .map(|i| {
            let k = format!("k-{i}");
            (
                None,
                Some(k.clone()),
                vec![("Idempotency-Key".to_owned(), k.clone())],
                k,
            )
        })
        .collect();
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 3).await;
        produce(&producer, &input, records).await;
    });
    // Static membership: the restarted instance takes its partitions back
    // at once instead of waiting for the dead member's session to end.
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}", instance_id = "i-{id}" }}
concurrency = 3
publish_broker = "nats"
[routes.idempotency]
key = "header:Idempotency-Key"
lease = "3s""#
    );
    let collected = kafka::Collected::subscribe(&rt, &out);
    // The effects land in a stream, which stores each dedup id once.
    let effects = format!("EFFECTS-{id}");
    let plugin_and_stream = format!(
        "{}\n{}",
        record_plugin(&out, 1),
        sluice_tests::nats::stream_block(&effects, &out)
    );
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(&brokers(), &id, &plugin_and_stream, &route));
    d.wait_for("some handled", Duration::from_secs(60), || {
        route_count(&d, "handled") >= 1000
    });
    d.kill();
    let before = committed(&brokers(), &format!("g-{id}"), &input, 3);
    assert!(before.iter().sum::<i64>() < N as i64, "killed too late: {before:?}");
    d.restart();
    d.wait_for("offsets committed to the end", Duration::from_secs(120), || {
        committed(&brokers(), &format!("g-{id}"), &input, 3) == ends(&brokers(), &input, 3)
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = collected.all();
    let keys: BTreeSet<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(keys.len(), N, "every record handled:\n{}", d.log());
    // A publish sent just before the kill and not yet recorded as done runs
    // again, with the same dedup id: the stream keeps each effect once.
    let ids: BTreeSet<&str> = got.iter().filter_map(|(_, id)| id.as_deref()).collect();
    assert_eq!(ids.len(), N);
    assert!(got.len() <= N + 3, "{} publishes for {N} records", got.len());
    assert_eq!(
        rt.block_on(sluice_tests::nats::stored(&effects)),
        N as u64,
        "each effect stored once"
    );
    rt.block_on(sluice_tests::nats::delete_stream(&effects));
}

#[test]
fn two_instances_share_a_group_and_one_takes_over_when_the_other_stops() {
    let _serial = serial();
    const N: usize = 3_000;
    let id = unique();
    let (input, out) = (format!("in-{id}"), format!("out.{id}"));
    let rt = rt();
    let producer = kafka::producer(&brokers());
    let records = (0..N).map(|i| keyed(&format!("k-{i}"), format!("k-{i}"))).collect();
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 3).await;
        produce(&producer, &input, records).await;
    });
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}
concurrency = 3
publish_broker = "nats""#
    );
    let collected = kafka::Collected::subscribe(&rt, &out);
    let text = config(&brokers(), &id, &record_plugin(&out, 2), &route);
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let d1 = Daemon::start(dir1.path(), &text);
    let mut d2 = Daemon::start(dir2.path(), &text);
    d2.wait_for("the second instance at work", Duration::from_secs(60), || {
        route_count(&d2, "handled") >= 100
    });
    let status = d2.terminate();
    assert!(status.success(), "graceful stop: {status}");
    d1.wait_for("the first instance finishing", Duration::from_secs(120), || {
        committed(&brokers(), &format!("g-{id}"), &input, 3) == ends(&brokers(), &input, 3)
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = collected.all();
    let keys: BTreeSet<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(keys.len(), N, "nothing lost:\n{}\n{}", d1.log(), d2.log());
    assert!(route_count(&d1, "handled") > 0);
}

#[test]
fn a_poison_record_goes_to_the_dlq_topic_with_its_key_and_can_be_replayed() {
    let _serial = serial();
    let id = unique();
    let input = format!("in-{id}");
    let dlq = format!("dlq-{id}");
    let rt = rt();
    let producer = kafka::producer(&brokers());
    let good = r#"{"order_id":"o-1","user_id":"u-1","amount_cents":1,"event_type":"created"}"#;
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 1).await;
        produce(
            &producer,
            &input,
            vec![
                (
                    None,
                    Some("k-1".into()),
                    vec![("trace".into(), "t-1".into())],
                    "not json".into(),
                ),
                keyed("k-2", good.to_owned()),
            ],
        )
        .await;
    });
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"enriched.>\"]",
        plugin("order_processor").display()
    );
    let route = format!(r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}"#);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&brokers(), &id, &plugin_table, &route));
    let dead = read(&brokers(), &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{}", d.log());
    let r = &dead[0];
    assert_eq!(r.key.as_deref(), Some("k-1"));
    assert_eq!(r.payload, "not json");
    assert_eq!(r.header("trace"), Some("t-1"));
    for h in [
        "sluice-error",
        "sluice-error-kind",
        "sluice-attempts",
        "sluice-route",
        "sluice-plugin",
        "sluice-origin",
        "sluice-failed-at",
    ] {
        assert!(r.header(h).is_some_and(|v| !v.is_empty()), "{h} missing: {r:?}");
    }
    assert_eq!(
        r.header("sluice-origin"),
        Some(format!("kafka://{input}?partition=0&offset=0").as_str())
    );
    d.wait_for("offsets past both records", Duration::from_secs(20), || {
        committed(&brokers(), &format!("g-{id}"), &input, 1) == vec![2]
    });

    let list = std::process::Command::new(sluice_bin())
        .args(["dlq", "list", "--admin", &d.admin])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success() && listed.contains("permanent"), "{listed}");
    let replay = std::process::Command::new(sluice_bin())
        .args(["dlq", "replay", "--all", "--admin", &d.admin])
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let dead = read(&brokers(), &dlq, 2, Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "replayed, failed again, dead-lettered again");
    assert_eq!(dead[1].key.as_deref(), Some("k-1"), "the key went around");
    assert_eq!(dead[1].header("sluice-replays"), Some("1"));
}

#[test]
fn reset_offsets_re_drives_a_topic_from_the_start_or_an_offset() {
    let _serial = serial();
    let id = unique();
    let (input, out) = (format!("in-{id}"), format!("out-{id}"));
    let rt = rt();
    let producer = kafka::producer(&brokers());
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 1).await;
        produce(&producer, &input, (0..5).map(|i| keyed("k", format!("r{i}"))).collect()).await;
    });
    let route = format!(r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}"#);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &config(&brokers(), &id, &record_plugin(&out, 0), &route));
    d.wait_for("committed", Duration::from_secs(30), || {
        committed(&brokers(), &format!("g-{id}"), &input, 1) == vec![5]
    });
    assert!(d.terminate().success());
    let reset = |to: &[&str]| {
        let out = std::process::Command::new(sluice_bin())
            .args(["kafka", "reset-offsets", "--config"])
            .arg(&d.config)
            .args(["--group", &format!("g-{id}"), "--topic", &input])
            .args(to)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(reset(&["--to-offset", "3"]).trim(), format!("{input}/0: 3"));
    assert_eq!(committed(&brokers(), &format!("g-{id}"), &input, 1), vec![3]);
    assert_eq!(reset(&["--to-earliest"]).trim(), format!("{input}/0: 0"));
    d.restart();
    let got = read(&brokers(), &out, 10, Duration::from_secs(30));
    let payloads: Vec<&str> = got.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(payloads, ["r0", "r1", "r2", "r3", "r4", "r0", "r1", "r2", "r3", "r4"]);
}

#[test]
fn with_retry_topics_a_failing_record_waits_in_them_while_the_records_after_it_flow() {
    let _serial = serial();
    let id = unique();
    let input = format!("in-{id}");
    let rt = rt();
    let done = kafka::Collected::subscribe(&rt, "flaky.done");
    let producer = kafka::producer(&brokers());
    let mut records = vec![(
        Some(0),
        Some("k-slow".to_owned()),
        vec![("fail-times".to_owned(), "2".to_owned())],
        format!("{id}-slow"),
    )];
    for i in 0..10 {
        records.push((
            Some(0),
            None,
            vec![("fail-times".to_owned(), "0".to_owned())],
            format!("{id}-{i}"),
        ));
    }
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 1).await;
        produce(&producer, &input, records).await;
    });
    let plugin_table = flaky_plugin();
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}", retry_topics = true }}
ordering = "none"
concurrency = 2
publish_broker = "nats"
[routes.retry]
max_attempts = 4
initial_backoff = "1s"
multiplier = 2.0
jitter = "none""#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&brokers(), &id, &plugin_table, &route));
    let group = format!("g-{id}");
    let mine = || -> Vec<String> {
        done.all()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.starts_with(&id))
            .collect()
    };

    // The ten after it are handled and the input's offset commits past the
    // failing record while it waits in the retry topics.
    d.wait_for("the others handled and committed", Duration::from_secs(30), || {
        mine().len() >= 10 && committed(&brokers(), &group, &input, 1) == [11]
    });
    let others_done = Instant::now();
    assert!(
        !mine().contains(&format!("{id}-slow")),
        "the failing record is not done yet"
    );
    d.wait_for("the failing record handled", Duration::from_secs(30), || {
        mine().contains(&format!("{id}-slow"))
    });
    // Its two retries waited 1 s and 2 s (the first may have started before
    // the others were done).
    assert!(
        others_done.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        others_done.elapsed()
    );
    assert_eq!(mine().len(), 11, "each handled once: {:?}", mine());
    assert_eq!(route_count(&d, "handled"), 11);
    assert_eq!(route_count(&d, "retried"), 2);

    // It went through `<topic>.retry.1` and `.retry.2`, keeping its key.
    for (level, attempt) in [(1, "2"), (2, "3")] {
        let retried = read(
            &brokers(),
            &format!("{input}.retry.{level}"),
            1,
            Duration::from_secs(20),
        );
        assert_eq!(retried.len(), 1, "retry topic {level}");
        let r = &retried[0];
        assert_eq!(r.key.as_deref(), Some("k-slow"));
        assert_eq!(r.header("sluice-retry-attempt"), Some(attempt));
        assert_eq!(r.header("sluice-retry-topic"), Some(input.as_str()));
        assert!(r.header("sluice-retry-not-before").is_some());
        assert_eq!(
            r.header("sluice-retry-origin"),
            Some(format!("kafka://{input}?partition=0&offset=0").as_str())
        );
    }
    d.wait_for("the retry topics committed", Duration::from_secs(20), || {
        committed(&brokers(), &group, &format!("{input}.retry.1"), 1) == [1]
            && committed(&brokers(), &group, &format!("{input}.retry.2"), 1) == [1]
    });
}

#[test]
fn in_batches_commits_never_pass_a_failed_record_and_sigkill_mid_batch_loses_nothing() {
    let _serial = serial();
    const N: usize = 1_000;
    const POISON: usize = 400;
    let id = unique();
    let (input, out) = (format!("in-{id}"), format!("out.{id}"));
    let rt = rt();
    let producer = kafka::producer(&brokers());
    let records = (0..N)
        .map(|i| {
            let fail = if i == POISON { "retryable" } else { "no" };
            (
                Some(0),
                None,
                vec![("fail".to_owned(), fail.to_owned())],
                format!("r-{i}"),
            )
        })
        .collect();
    rt.block_on(async {
        kafka::create_topic(&brokers(), &input, 1).await;
        produce(&producer, &input, records).await;
    });
    let plugin_table = format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\"{out}\"]\nconfig = {{ to = \"{out}\" }}",
        plugin("fixture_batch").display()
    );
    // Batches of 64 in partition order; the poison record fails in place
    // (holding back the records after it) until its attempts run out.
    let route = format!(
        r#"source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}", instance_id = "i-{id}" }}
publish_broker = "nats"
batch = {{ max_messages = 64, max_wait = "20ms" }}
[routes.retry]
max_attempts = 4
initial_backoff = "1s"
multiplier = 2.0
jitter = "none""#
    );
    let collected = kafka::Collected::subscribe(&rt, &out);
    let dir = tempfile::tempdir().unwrap();
    let group = format!("g-{id}");
    let mut d = Daemon::start(dir.path(), &config(&brokers(), &id, &plugin_table, &route));
    d.wait_for("the records before the poison handled", Duration::from_secs(60), || {
        route_count(&d, "handled") >= POISON as u64
    });
    // The poison's batch is stuck in its retries: commits reach it, never
    // pass it.
    d.wait_for("commits up to the poison record", Duration::from_secs(30), || {
        committed(&brokers(), &group, &input, 1)[0] == POISON as i64
    });
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(committed(&brokers(), &group, &input, 1)[0], POISON as i64);
    assert_eq!(
        route_count(&d, "handled"),
        POISON as u64,
        "records after the poison were acked"
    );
    d.kill();
    d.restart();
    d.wait_for("offsets committed to the end", Duration::from_secs(120), || {
        committed(&brokers(), &group, &input, 1) == ends(&brokers(), &input, 1)
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = collected.all();
    let payloads: BTreeSet<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        payloads.len(),
        N - 1,
        "every record but the poison handled:\n{}",
        d.log()
    );
    assert!(
        !payloads.contains(format!("r-{POISON}").as_str()),
        "the poison's publish leaked"
    );
    let dead = read(&brokers(), &format!("dlq-{id}"), 1, Duration::from_secs(20));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, format!("r-{POISON}"));
}
