//! The Kafka broker going away under a consuming sluice and coming back.
//! The test runs a tansu broker of its own (`SLUICE_TANSU_BIN`, set by
//! `cargo xtask test`) that advertises the address of a TCP proxy in front
//! of it; the outage cuts every connection at the proxy and refuses new
//! ones for a while, so every client (sluice, and this test's) sees the
//! broker down and then back. (A real restart of tansu 0.6 on its SQLite
//! file leaves it resetting every connection for good, which would test
//! tansu, not sluice.)

use sluice_tests::daemon::{free_port, Daemon};
use sluice_tests::kafka::{self, produce, read, try_committed, try_ends};
use sluice_tests::plugin;
use std::collections::BTreeSet;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn start_tansu(dir: &Path, port: u16, advertised: u16) -> Child {
    let bin = std::env::var("SLUICE_TANSU_BIN").expect("SLUICE_TANSU_BIN: the tansu binary (cargo xtask test sets it)");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tansu.log"))
        .unwrap();
    let child = Command::new(bin)
        .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
        .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{advertised}")])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tansu");
    let started = std::time::Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "tansu did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// Forwards a port to the broker; `cut` drops every connection and refuses
/// new ones until `restore`.
struct Proxy {
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(port: u16, target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("proxy port");
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, o) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                if let Ok(mut o) = o.lock() {
                    o.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                }
                pipe(client, s2);
                pipe(server, c2);
            }
        });
        Self { down, open }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

#[test]
fn sluice_recovers_when_the_broker_goes_away_and_comes_back_and_loses_nothing() {
    const N: usize = 3_000;
    let broker_dir = tempfile::tempdir().unwrap();
    let (port, proxy_port) = (free_port(), free_port());
    let brokers = format!("127.0.0.1:{proxy_port}");
    let mut tansu = start_tansu(broker_dir.path(), port, proxy_port);
    let proxy = Proxy::start(proxy_port, port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let producer = kafka::producer(&brokers);
    rt.block_on(async {
        kafka::create_topic(&brokers, "in", 3).await;
        let records = (0..N)
            .map(|i| (None, Some(format!("k-{i}")), Vec::new(), format!("k-{i}")))
            .collect();
        produce(&producer, "in", records).await;
    });
    drop(producer);
    let config = format!(
        r#"
[brokers.kafka]
brokers = "{brokers}"
commit_interval = "200ms"

[plugins.p]
path = "{plugin}"
isolation = "reuse"
publish = ["out"]
config = {{ to = "out", wait_ms = 2 }}

[[routes]]
name = "r"
plugin = "p"
source = {{ broker = "kafka", topics = ["in"], group = "g" }}
concurrency = 3
"#,
        plugin = plugin("fixture_record").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let handled = || d.status()["routes"][0]["handled"].as_u64().unwrap_or(0);
    d.wait_for("some handled", Duration::from_secs(60), || handled() >= 300);
    proxy.cut();
    d.wait_for("not ready while the broker is away", Duration::from_secs(60), || {
        !d.ready()
    });
    std::thread::sleep(Duration::from_secs(3));
    proxy.restore();
    d.wait_for("ready again", Duration::from_secs(60), || d.ready());
    // Right after the outage the broker may refuse a call or two.
    d.wait_for("all committed after the outage", Duration::from_secs(180), || {
        match (try_committed(&brokers, "g", "in", 3), try_ends(&brokers, "in", 3)) {
            (Ok(c), Ok(e)) => c == e,
            _ => false,
        }
    });
    let got = read(&brokers, "out", N + 500, Duration::from_secs(20));
    let keys: BTreeSet<&str> = got.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(keys.len(), N, "every record handled:\n{}", d.log());
    stop(&mut tansu);
}
