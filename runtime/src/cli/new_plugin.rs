//! `sluice new plugin NAME`: a plugin crate that builds and passes its own
//! test as it is, with a config to run it under `sluice dev`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct NewArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// A handler plugin crate (Rust, wasm32-wasip2).
    Plugin {
        /// Crate name: lowercase letters, digits and `-`.
        name: String,
        /// Folder to create the crate in (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The sluice SDK crate folder (default: the `sdk` folder of the
        /// sluice checkout around the current folder or this program).
        #[arg(long, env = "SLUICE_SDK")]
        sdk: Option<PathBuf>,
    },
}

pub fn run(args: NewArgs) -> anyhow::Result<i32> {
    let What::Plugin { name, dir, sdk } = args.what;
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!("`{name}` is not a crate name: use lowercase letters, digits and `-`, starting with a letter");
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
    if dir.exists() {
        bail!("{} already exists; choose another name or --dir", dir.display());
    }
    let sdk = match sdk {
        Some(s) => s,
        None => find_sdk().context("cannot find the sluice SDK; pass --sdk <folder of the sluice-sdk crate>")?,
    };
    let sdk = std::fs::canonicalize(&sdk).with_context(|| format!("SDK folder {}", sdk.display()))?;
    if !is_sdk(&sdk) {
        bail!("{} is not the sluice-sdk crate", sdk.display());
    }
    write_crate(&dir, &name, &sdk)?;
    let lib = name.replace('-', "_");
    println!("created plugin crate {}", dir.display());
    println!();
    println!("  cd {}", dir.display());
    println!("  cargo test                 # the handler's own tests");
    println!("  sluice dev -c sluice.toml  # build, run, rebuild and swap on save");
    println!();
    println!("and, in another terminal, send it a message:");
    println!();
    println!("  sluice publish {name}.hello '{{\"id\":\"1\"}}'");
    println!();
    println!("The component is target/wasm32-wasip2/release/{lib}.wasm.");
    Ok(0)
}

fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("name = \"sluice-sdk\""))
}

/// The `sdk` folder of a sluice checkout above the current folder or above
/// this executable (`target/debug/sluice`).
fn find_sdk() -> Option<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    starts
        .iter()
        .flat_map(|s| s.ancestors())
        .map(|a| a.join("sdk"))
        .find(|sdk| is_sdk(sdk))
}

fn write_crate(dir: &Path, name: &str, sdk: &Path) -> anyhow::Result<()> {
    let lib = name.replace('-', "_");
    let files = [
        ("Cargo.toml", cargo_toml(name, sdk)),
        ("src/lib.rs", lib_rs(name)),
        ("sluice.toml", sluice_toml(name, &lib)),
        (".gitignore", "/target\n/.sluice\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    let sdk = sdk.display().to_string().replace('\\', "/");
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
sluice-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[profile.release]
strip = "debuginfo"

# A workspace of its own, so the crate builds wherever it is put.
[workspace]
"#
    )
}

fn lib_rs(name: &str) -> String {
    format!(
        r##"//! {name}: a sluice handler.
//!
//! `cargo build --target wasm32-wasip2 --release` builds the component;
//! `cargo test` runs the tests below on this machine, without a host.

use serde::Deserialize;
use sluice_sdk::{{handler, Error, Message}};

handler!(handle);

#[derive(Deserialize)]
struct Event {{
    id: String,
}}

/// Called once per message. `Ok` acks it (and sends what was published);
/// `Error::retryable` has it retried with backoff; `Error::permanent` sends
/// it to the dead-letter destination. Malformed JSON is a permanent error.
fn handle(msg: Message) -> Result<(), Error> {{
    let event: Event = msg.json()?;
    if event.id.is_empty() {{
        return Err(Error::permanent("the event has an empty id"));
    }}
    sluice_sdk::log::info(format!("handling event {{}}", event.id));
    sluice_sdk::publish_json("{name}.handled", &serde_json::json!({{ "id": event.id }}))?;
    Ok(())
}}

#[cfg(test)]
mod tests {{
    use super::*;
    use sluice_sdk::testing;

    #[test]
    fn an_event_is_handled_and_published() {{
        testing::reset();
        handle(Message::new("{name}.hello", r#"{{"id":"e-1"}}"#)).unwrap();
        let published = testing::published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].subject, "{name}.handled");
        assert_eq!(published[0].payload, br#"{{"id":"e-1"}}"#);
    }}

    #[test]
    fn malformed_json_is_a_permanent_error() {{
        testing::reset();
        let err = handle(Message::new("{name}.hello", "not json")).unwrap_err();
        assert!(matches!(err, Error::Permanent(_)), "{{err:?}}");
        assert!(testing::published().is_empty());
    }}
}}
"##
    )
}

fn sluice_toml(name: &str, lib: &str) -> String {
    format!(
        r#"# Runs {name} on sluice's embedded broker: `sluice dev -c sluice.toml`.
# Send it a message: sluice publish {name}.hello '{{"id":"1"}}'
# Read what it published: curl -s 127.0.0.1:9595/v1/queues/handled/messages

data_dir = ".sluice"

[plugins.{name}]
path = "target/wasm32-wasip2/release/{lib}.wasm"
source = "."
isolation = "reuse"
timeout = "2s"
publish = ["{name}.handled"]

[[routes]]
name = "{name}"
plugin = "{name}"
source = {{ broker = "embedded", subject = "{name}.hello" }}
dead_letter = {{ subject = "dlq.{name}" }}

[[brokers.embedded.queues]]
name = "handled"
subjects = ["{name}.handled"]
max_len = 10000
"#
    )
}
