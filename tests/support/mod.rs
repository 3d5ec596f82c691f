//! Shared helpers for the integration tests: where the plugins and the
//! `sluice` binary are, and a daemon process handle.

pub mod daemon;
pub mod kafka;
pub mod nats;
pub mod rabbit;

use std::path::PathBuf;

/// A name no other test of this run or an earlier one uses: process id,
/// clock and a counter (two tests may start in the same millisecond).
pub fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "t{}x{}n{n}",
        std::process::id(),
        sluice::message::now_ms() % 100_000_000
    )
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The built `.wasm` of plugin crate `name` (`order_processor`, `fixture_spin`).
/// `cargo xtask test` builds them first.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/wasm32-wasip2/release"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds the plugins",
        path.display()
    );
    path
}

/// The `sluice` binary. `cargo xtask test` builds it first.
pub fn sluice_bin() -> PathBuf {
    let path = std::env::var_os("SLUICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/sluice"));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// A message to prefill: subject, headers, payload.
pub type Prefilled = (String, Vec<(String, String)>, Vec<u8>);

/// Puts `messages` (subject, headers, payload) straight into the embedded
/// broker file of a daemon's data directory before the daemon starts, as
/// publishes to a queue named `queue` bound to `pattern`.
pub fn prefill(data_dir: &std::path::Path, queue: &str, pattern: &str, messages: Vec<Prefilled>) {
    use sluice::brokers::embedded::EmbeddedBroker;
    use sluice::message::{Header, Outbound};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let broker =
        EmbeddedBroker::open(&data_dir.join("embedded.redb"), std::time::Duration::from_secs(60)).expect("open broker");
    broker.declare_queue(
        queue,
        vec![sluice::subject::SubjectPattern::parse(pattern).expect("pattern")],
        None,
    );
    let outbound: Vec<Outbound> = messages
        .into_iter()
        .map(|(subject, headers, payload)| Outbound {
            subject,
            headers: headers.into_iter().map(|(n, v)| Header::new(n, v)).collect(),
            payload,
        })
        .collect();
    rt.block_on(async {
        for chunk in outbound.chunks(1000) {
            broker.publish(chunk.to_vec()).await.expect("prefill publish");
        }
    });
    broker.close();
}

/// Records that `test` did not run its checks, and why: written past the
/// harness's capture, and listed by `cargo xtask test` after the summary
/// (a skipped test otherwise counts as passed).
pub fn skipped(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("\n{line}").as_bytes());
    if let Some(path) = std::env::var_os("SLUICE_SKIPPED_FILE") {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut f) = file {
            let _ = std::io::Write::write_all(&mut f, line.as_bytes());
        }
    }
}

/// A small deterministic generator for seeded test inputs (no test-only
/// dependency needed).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn draw(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// The value of one metric line (`name{labels}`) in a Prometheus text
/// exposition, `None` if the series is absent (a renamed series must fail a
/// check, not read as 0).
pub fn metric_in(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}
