//! What the container image relies on, tested without a container engine
//! (none runs on the test machines): the daemon as a non-root user (uid
//! 10001, as in the Dockerfile) on a read-only root file system, writing
//! only to its data directory. A private mount namespace makes `/`
//! read-only for the daemon alone; that needs root, which the test command
//! runs as (CI does).

use sluice_tests::daemon::{agent, free_port};
use sluice_tests::{plugin, sluice_bin};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UID: u32 = 10001;

fn get(admin: &str, path: &str) -> Option<(u16, String)> {
    let mut resp = agent().get(format!("http://{admin}{path}")).call().ok()?;
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Some((resp.status().as_u16(), body))
}

#[test]
fn runs_as_a_non_root_user_on_a_read_only_root_writing_only_its_data_directory() {
    if effective_uid() != 0 {
        sluice_tests::skipped(
            "container::runs_as_a_non_root_user_on_a_read_only_root_writing_only_its_data_directory",
            "needs root (a mount namespace for the read-only root)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Copies the non-root user can reach (the checkout may not be).
    let bin = root.join("sluice");
    std::fs::copy(sluice_bin(), &bin).unwrap();
    std::fs::copy(plugin("fixture_stamp"), root.join("stamp.wasm")).unwrap();
    let data = root.join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(UID), Some(UID)).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"data_dir = "{}"
[admin]
listen = "{admin}"

[plugins.stamp]
path = "stamp.wasm"
publish = ["stamped"]

[[routes]]
name = "work"
plugin = "stamp"
source = {{ broker = "embedded", subject = "work" }}

[[brokers.embedded.queues]]
name = "stamped"
subjects = ["stamped"]
"#,
        data.display()
    );
    std::fs::write(root.join("sluice.toml"), config).unwrap();
    let log = std::fs::File::create(root.join("sluice.log")).unwrap();

    let script = format!(
        "mount --bind {data} {data} && mount -o remount,bind,ro / && \
         exec setpriv --reuid={UID} --regid={UID} --clear-groups {bin} run -c {config}",
        data = data.display(),
        bin = bin.display(),
        config = root.join("sluice.toml").display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs");
    let read_log = || std::fs::read_to_string(root.join("sluice.log")).unwrap_or_default();

    let started = Instant::now();
    while get(&admin, "/readyz").map(|(s, _)| s) != Some(200) {
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("sluice exited ({exit}):\n{}", read_log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The process is the unprivileged user.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == UID.to_string()),
        "{uid_line}"
    );

    // It handles messages: the embedded broker and the compiled-plugin
    // cache live in the data directory, the only writable place.
    let mut resp = agent()
        .post(format!("http://{admin}/v1/publish/work"))
        .header("content-type", "application/octet-stream")
        .send(&b"hello"[..])
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.body_mut().read_to_string().unwrap_or_default()
    );
    let started = Instant::now();
    loop {
        let (_, body) = get(&admin, "/v1/queues/stamped/messages").unwrap();
        if body.contains("aGVsbG8") || body.contains("hello") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not handled:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(data.join("embedded.redb").is_file());
    assert!(
        data.join("cache").is_dir(),
        "the compiled-plugin cache is in the data directory"
    );
    for entry in std::fs::read_dir(root).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            ["sluice", "stamp.wasm", "data", "sluice.toml", "sluice.log"].contains(&name.as_str()),
            "wrote {name} outside its data directory"
        );
    }

    // And stops cleanly on SIGTERM.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit}:\n{}", read_log());
    assert!(!read_log().contains("ERROR"), "{}", read_log());
}

/// The effective uid of this process, from /proc.
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .unwrap_or(u32::MAX)
}
