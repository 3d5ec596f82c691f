//! The services the test suite talks to over real sockets: each is left
//! alone when something already listens on its port, else installed (Debian
//! packages, when run as root) and started on 127.0.0.1.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

fn listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs Debian packages when a program is missing.
fn apt_install(program: &str, package: &str) -> Result<()> {
    if have(program) {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!("`{program}` is missing: install the `{package}` package (or start the service yourself)");
    }
    eprintln!("xtask: installing {package}");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .status()?
        .success()
        || (Command::new("apt-get").args(["update", "-qq"]).status()?.success()
            && Command::new("apt-get")
                .args(["install", "-y", "-qq", package])
                .status()?
                .success());
    if !ok {
        bail!("apt-get could not install {package}");
    }
    Ok(())
}

/// What builds and tests the Python and JavaScript plugins: Python 3 with
/// its venv module, Node.js and npm (Debian splits them into packages).
pub fn ensure_guest_tools() -> Result<()> {
    apt_install("python3", "python3")?;
    let has_venv = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_venv {
        if !is_root() || !have("apt-get") {
            bail!("Python's venv module is missing: install the `python3-venv` package");
        }
        eprintln!("xtask: installing python3-venv");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", "python3-venv"])
            .status()?
            .success();
        if !ok {
            bail!("apt-get could not install python3-venv");
        }
    }
    apt_install("node", "nodejs")?;
    apt_install("npm", "npm")
}

fn wait_for(port: u16, what: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    while !listening(port) {
        if started.elapsed() > timeout {
            bail!("{what} did not start listening on 127.0.0.1:{port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Redis, for the shared idempotency store.
pub fn ensure_redis() -> Result<()> {
    if std::env::var_os("SLUICE_REDIS_URL").is_some() || listening(6379) {
        return Ok(());
    }
    apt_install("redis-server", "redis-server")?;
    eprintln!("xtask: starting redis-server on 127.0.0.1:6379");
    let status = Command::new("redis-server")
        .args([
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
        ])
        .status()
        .context("starting redis-server")?;
    if !status.success() {
        bail!("redis-server failed to start ({status})");
    }
    wait_for(6379, "redis-server", Duration::from_secs(20))
}

/// nats-server with JetStream, for the NATS tests.
pub fn ensure_nats(root: &std::path::Path) -> Result<()> {
    if std::env::var_os("SLUICE_NATS_URL").is_some() || listening(4222) {
        return Ok(());
    }
    apt_install("nats-server", "nats-server")?;
    let dir = root.join("target/test-services/nats");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("nats-server.log"))?;
    eprintln!("xtask: starting nats-server with JetStream on 127.0.0.1:4222");
    Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", "4222", "-js", "-sd"])
        .arg(dir.join("store"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting nats-server")?;
    wait_for(4222, "nats-server", Duration::from_secs(20))
}

/// RabbitMQ, for the RabbitMQ tests: Debian's package, started the way the
/// package's own service starts it, so `rabbitmqctl` (which the restart
/// test uses) talks to it.
pub fn ensure_rabbitmq() -> Result<()> {
    if std::env::var_os("SLUICE_AMQP_URL").is_some() || listening(5672) {
        return Ok(());
    }
    apt_install("rabbitmq-server", "rabbitmq-server")?;
    if !listening(5672) {
        eprintln!("xtask: starting rabbitmq-server on 127.0.0.1:5672 (takes 10-20 s)");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .status()
            .context("starting rabbitmq-server")?;
        if !status.success() {
            bail!("rabbitmq-server failed to start ({status})");
        }
    }
    let status = Command::new("rabbitmqctl")
        .args(["--timeout", "120", "await_startup"])
        .status()
        .context("waiting for rabbitmq-server")?;
    if !status.success() {
        bail!("rabbitmq-server did not finish starting ({status})");
    }
    wait_for(5672, "rabbitmq-server", Duration::from_secs(60))
}

/// The `tansu` binary: `$SLUICE_TANSU`, else on `PATH`, else built once
/// into `target/test-services/tansu-bin` (about 30 minutes on 2 cores).
fn tansu_binary(root: &std::path::Path) -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_TANSU") {
        let p = std::path::PathBuf::from(p);
        let p = if p.is_relative() { root.join(p) } else { p };
        if p.is_file() {
            return Ok(p);
        }
        eprintln!("xtask: SLUICE_TANSU={} is not a file; looking elsewhere", p.display());
    }
    if have("tansu") {
        return Ok("tansu".into());
    }
    let cache = root.join("target/test-services/tansu-bin");
    let built = cache.join("bin/tansu");
    if !built.is_file() {
        eprintln!("xtask: building the tansu Kafka broker (once; ~30 min on 2 cores)");
        let status = Command::new("cargo")
            .args(["install", "tansu@0.6.0", "--locked", "--features", "libsql", "--root"])
            .arg(&cache)
            .status()
            .context("cargo install tansu")?;
        if !status.success() {
            bail!("building tansu failed ({status})");
        }
    }
    Ok(built)
}

/// A Kafka-protocol broker (tansu with SQLite storage) on 127.0.0.1:9092.
/// Returns the tansu binary: the broker-restart test runs one of its own.
pub fn ensure_kafka(root: &std::path::Path) -> Result<std::path::PathBuf> {
    let tansu = tansu_binary(root)?;
    if std::env::var_os("SLUICE_KAFKA_BROKERS").is_some() || listening(9092) {
        return Ok(tansu);
    }
    let dir = root.join("target/test-services/tansu");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("tansu.log"))?;
    eprintln!("xtask: starting tansu (Kafka protocol) on 127.0.0.1:9092");
    // The SQLite path is taken relative to the working directory.
    Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            "tcp://127.0.0.1:9092",
            "--advertised-listener-url",
            "tcp://127.0.0.1:9092",
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(&dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    wait_for(9092, "tansu", Duration::from_secs(20))?;
    Ok(tansu)
}
