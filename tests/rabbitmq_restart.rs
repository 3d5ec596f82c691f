//! RabbitMQ restarted under a consuming sluice (the node's application is
//! stopped and started with `rabbitmqctl`, which closes every connection).
//! In a test binary of its own: it disturbs every other RabbitMQ client.

use sluice_tests::daemon::Daemon;
use sluice_tests::plugin;
use sluice_tests::rabbit::{self, Rabbit};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) {
    let ctl = std::env::var("SLUICE_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let out = Command::new(&ctl)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{ctl} is needed to restart RabbitMQ: {e}"));
    assert!(
        out.status.success(),
        "{ctl} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ready(admin: &str) -> bool {
    std::net::TcpStream::connect(admin)
        .ok()
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"))
        })
        .unwrap_or(false)
}

#[test]
fn sluice_reconnects_after_a_rabbitmq_restart_and_loses_nothing() {
    const N: usize = 3_000;
    let id = sluice_tests::unique();
    let config = format!(
        r#"
[brokers.rabbitmq]
url = "{url}"
publish_exchange = "ex-{id}"

[[brokers.rabbitmq.exchanges]]
name = "ex-{id}"

[[brokers.rabbitmq.queues]]
name = "work-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "in.#" }}]

[[brokers.rabbitmq.queues]]
name = "out-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "out.#" }}]

[plugins.p]
path = "{plugin}"
isolation = "reuse"
publish = ["out.>"]
config = {{ to = "out.recorded", wait_ms = 2 }}

[[routes]]
name = "r"
plugin = "p"
source = {{ broker = "rabbitmq", queue = "work-{id}", prefetch = 16 }}
concurrency = 4
dead_letter = {{ subject = "dlq-{id}" }}

[routes.idempotency]
key = "header:Idempotency-Key"
"#,
        url = rabbit::url(),
        plugin = plugin("fixture_record").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rabbit = rt.block_on(Rabbit::connect());
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
    drop(rabbit);
    let handled = || d.route_field(0, "handled");
    // A message handled just before RabbitMQ went away whose ack was lost
    // comes back and is found done: settled as a duplicate, not handled.
    let settled = || handled() + d.metric("sluice_messages_total{route=\"r\",outcome=\"duplicate\"}") as u64;
    d.wait_for("some handled", Duration::from_secs(60), || handled() >= 300);

    rabbitmqctl(&["stop_app"]);
    let down_since = Instant::now();
    let mut seen_unready = false;
    while down_since.elapsed() < Duration::from_secs(3) {
        seen_unready |= !ready(&d.admin);
        std::thread::sleep(Duration::from_millis(100));
    }
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    assert!(seen_unready, "/readyz should say not ready while RabbitMQ is down");

    d.wait_for("all settled after the restart", Duration::from_secs(120), || {
        settled() >= N as u64
    });
    d.wait_for("ready again", Duration::from_secs(30), || ready(&d.admin));
    let rabbit = rt.block_on(Rabbit::connect());
    std::thread::sleep(Duration::from_millis(500));
    let got = rt.block_on(rabbit.drain(&format!("out-{id}")));
    let keys: BTreeSet<String> = got.iter().map(|g| g.text()).collect();
    assert_eq!(keys.len(), N, "every message handled once at least:\n{}", d.log());
    assert!(d.log().contains("RabbitMQ connected"), "{}", d.log());
    rt.block_on(rabbit.delete(
        &[&format!("work-{id}"), &format!("out-{id}"), &format!("dlq-{id}")],
        &[&format!("ex-{id}")],
    ));
}
