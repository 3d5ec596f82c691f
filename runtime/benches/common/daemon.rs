//! The sluice daemon as a user runs it: the release binary on a shipped
//! config (or a variant of it), in its own data dir and admin port.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `sluice run`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    /// Its admin API's address.
    pub admin: String,
    child: Child,
    dir: tempfile::TempDir,
}

/// A shipped config file (`config/NAME`).
pub fn shipped_config(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `config` with `from` replaced by `to`; panics if `from` is not there, so
/// a change to the shipped file cannot silently turn a variant into the
/// original.
pub fn edited(config: &str, from: &str, to: &str) -> String {
    assert!(config.contains(from), "the shipped config no longer has {from:?}");
    config.replacen(from, to, 1)
}

impl Daemon {
    /// Starts `sluice run` on `config` (written to a temporary folder, which
    /// is also its data dir), with `env` on top of the bench's environment.
    pub fn start(config: &str, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, config).expect("write config");
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["run", "--config"])
            .arg(&file)
            .env("SLUICE_DATA_DIR", dir.path().join("data"))
            .env("SLUICE_ADMIN", admin.to_string())
            .env("SLUICE_PLUGIN_DIR", super::plugin_file(""))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start sluice");
        Self {
            admin: admin.to_string(),
            child,
            dir,
        }
    }

    /// Panics with the daemon's log if it has exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("sluice exited ({status}):\n{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The value of `series{route="ROUTE"}` in `/metrics`, if present.
    pub fn metric(&self, series: &str, route: &str) -> Option<f64> {
        let text = ureq::get(&format!("http://{}/metrics", self.admin))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let prefix = format!("{series}{{route=\"{route}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }

    /// The mean of `sluice_batch_size` on `route`, from `/metrics`.
    pub fn mean_batch(&self, route: &str) -> Option<f64> {
        Some(self.metric("sluice_batch_size_sum", route)? / self.metric("sluice_batch_size_count", route)?)
    }

    /// Waits until `/readyz` answers 200 (panics with the log after 60 s).
    pub async fn ready(&mut self) {
        let started = std::time::Instant::now();
        while ureq::get(&format!("http://{}/readyz", self.admin)).call().is_err() {
            self.check_alive();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
