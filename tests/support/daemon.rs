//! A `sluice run` child process on a temporary data directory and a free
//! admin port, with helpers to talk to its admin API.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Option<Child>,
    pub admin: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    starts: u32,
    log_filter: String,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An HTTP client that reports error statuses as answers.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// Publishes to a daemon's admin API from another thread.
pub struct Probe {
    admin: String,
}

impl Probe {
    pub fn try_publish(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) -> Result<(), String> {
        publish_to(&self.admin, subject, headers, payload)
    }
}

fn publish_to(admin: &str, subject: &str, headers: &[(&str, &str)], payload: &[u8]) -> Result<(), String> {
    let mut req = agent()
        .post(format!("http://{admin}/v1/publish/{subject}"))
        .header("content-type", "application/octet-stream");
    for (k, v) in headers {
        req = req.header("x-sluice-header", format!("{k}={v}"));
    }
    let mut resp = req.send(payload).map_err(|e| e.to_string())?;
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if resp.status() == 200 {
        Ok(())
    } else {
        Err(format!("{}: {body}", resp.status()))
    }
}

impl Daemon {
    pub fn probe(admin: &str) -> Probe {
        Probe {
            admin: admin.to_owned(),
        }
    }

    /// Writes `config` into `dir` and starts the daemon on it, with its data
    /// in `dir/data` and its admin API on a free port: a config without
    /// `data_dir` gets both added; one with them uses the `{data}` and
    /// `{admin}` placeholders.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_with_log_filter(dir, config, "info,sluice::pipeline=error")
    }

    /// [`Daemon::start`] with `RUST_LOG` set to `filter`.
    pub fn start_with_log_filter(dir: &Path, config: &str, filter: &str) -> Self {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut d = Self {
            child: None,
            admin,
            dir: dir.to_owned(),
            config: dir.join("sluice.toml"),
            log: dir.join("sluice.log"),
            starts: 0,
            log_filter: filter.to_owned(),
        };
        d.write_config(config);
        d.restart();
        d
    }

    /// Writes `config` (as for [`Daemon::start`]) over the config file: a
    /// running daemon reloads it.
    pub fn write_config(&self, config: &str) {
        let data = self.dir.join("data").display().to_string();
        let text = if config.contains("data_dir") {
            config.replace("{admin}", &self.admin).replace("{data}", &data)
        } else {
            // Top-level key first, the [admin] table last: both stay valid
            // whatever the config's own layout.
            format!(
                "data_dir = \"{data}\"\n{config}\n[admin]\nlisten = \"{}\"\n",
                self.admin
            )
        };
        // Written aside and renamed over, as a deploy does: a reload never
        // reads a half-written file (which may be a valid, smaller config).
        let aside = self.config.with_extension("toml.tmp");
        std::fs::write(&aside, text).expect("write config");
        std::fs::rename(&aside, &self.config).expect("replace config");
    }

    /// Starts (again) on the same config and data; waits until ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(crate::sluice_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", &self.log_filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sluice");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("sluice exited during start-up ({status}):\n{}", self.log());
                }
            }
            if let Ok(mut r) = agent().get(format!("http://{}/readyz", self.admin)).call() {
                if r.status() == 200 {
                    let _ = r.body_mut().read_to_string();
                    return;
                }
            }
            assert!(
                started.elapsed() < timeout,
                "sluice not ready after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/readyz` answers 200 now.
    pub fn ready(&self) -> bool {
        agent()
            .get(format!("http://{}/readyz", self.admin))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }

    /// Publishes through the admin API; Err on any failure (daemon down).
    pub fn try_publish(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) -> Result<(), String> {
        publish_to(&self.admin, subject, headers, payload)
    }

    pub fn publish(&self, subject: &str, headers: &[(&str, &str)], payload: &[u8]) {
        self.try_publish(subject, headers, payload)
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}\n{}", self.log()));
    }

    fn get_json(&self, path: &str) -> Value {
        let mut resp = agent()
            .get(format!("http://{}{path}", self.admin))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = resp.body_mut().read_to_string().expect("body");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Value {
        self.get_json("/v1/status")
    }

    /// Messages held in an embedded queue, oldest first.
    /// A count of the `index`th route on the status API; a field that is
    /// not there fails the test (a renamed field must not read as 0).
    pub fn route_field(&self, index: usize, field: &str) -> u64 {
        let status = self.status();
        status["routes"][index][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no route {index} field `{field}` in the status: {status}"))
    }

    pub fn queue(&self, name: &str) -> Vec<Value> {
        match self.get_json(&format!("/v1/queues/{name}/messages?limit=100000")) {
            Value::Array(items) => items,
            other => panic!("unexpected queue listing {other}"),
        }
    }

    /// The length of an embedded queue. A queue the daemon does not list
    /// fails the test: a misnamed queue must not read as empty.
    pub fn queue_len(&self, name: &str) -> u64 {
        let all = self.get_json("/v1/queues");
        all.as_array()
            .and_then(|qs| qs.iter().find(|q| q["name"] == name))
            .and_then(|q| q["messages"].as_u64())
            .unwrap_or_else(|| panic!("no embedded queue `{name}` in {all}"))
    }

    pub fn metrics(&self) -> String {
        let mut resp = agent()
            .get(format!("http://{}/metrics", self.admin))
            .call()
            .expect("metrics");
        resp.body_mut().read_to_string().expect("metrics body")
    }

    /// The value of one metric line (`name{labels}`), `None` if the series
    /// is absent (a renamed series must fail a check, not read as 0).
    pub fn metric_present(&self, series: &str) -> Option<f64> {
        super::metric_in(&self.metrics(), series)
    }

    /// The process id of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running daemon, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The value of one metric line (`name{labels}`). A missing series
    /// fails the test: a renamed series must not read as 0.
    pub fn metric(&self, series: &str) -> f64 {
        self.metric_present(series)
            .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{}", self.metrics()))
    }

    /// Waits until `cond` holds, polling; panics with the log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let started = Instant::now();
        while !cond() {
            assert!(
                started.elapsed() < timeout,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` (`-TERM`, `-HUP`) and returns at once.
    pub fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
        }
    }

    /// SIGKILL: no chance to settle anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("running");
        child.wait().expect("wait for sluice")
    }
}

/// What Rust's panic hook writes: a panic in the daemon, caught or not.
const PANIC_MARK: &str = "' panicked at ";

impl Drop for Daemon {
    /// Stops the daemon; a test whose daemon panicked fails, whatever it
    /// asserted (no input may reach a panic).
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(PANIC_MARK)) {
                panic!("the daemon panicked: {line}\n{log}");
            }
        }
    }
}
