//! `sluice new plugin NAME [--lang rust|python|js]`: a plugin that builds
//! and passes its own tests as it is, with a config to run it under
//! `sluice dev`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct NewArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(Subcommand)]
enum What {
    /// A handler plugin: a Rust crate (wasm32-wasip2), or a Python or
    /// JavaScript folder built with the SDKs of the sluice checkout.
    Plugin {
        /// Plugin name: lowercase letters, digits and `-`.
        name: String,
        /// The language it is written in.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Lang,
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
    let What::Plugin { name, lang, dir, sdk } = args.what;
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
    if lang != Lang::Rust {
        return guest_folder(&dir, &name, lang);
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
    next_steps(
        &format!("plugin crate {}", dir.display()),
        &dir,
        &name,
        "cargo test",
        &format!("The component is target/wasm32-wasip2/release/{lib}.wasm."),
    );
    Ok(0)
}

/// Writes `files` (paths relative to `dir`), making their folders.
fn write_files(dir: &Path, files: Vec<(&str, String)>) -> anyhow::Result<()> {
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What to run next, for any language.
fn next_steps(created: &str, dir: &Path, name: &str, test: &str, last: &str) {
    println!("created {created}");
    println!();
    println!("  cd {}", dir.display());
    println!("  {test}   # the handler's own tests");
    println!("  sluice dev -c sluice.toml  # build, run, rebuild and swap on save");
    println!();
    println!("and, in another terminal, send it a message:");
    println!();
    println!("  sluice publish {name}.hello '{{\"id\":\"1\"}}'");
    println!();
    println!("{last}");
}

fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("name = \"sluice-sdk\""))
}

/// The `sdk` folder of the sluice checkout (see `dev::checkout`).
fn find_sdk() -> Option<PathBuf> {
    crate::daemon::dev::checkout()
        .map(|home| home.join("sdk"))
        .filter(|sdk| is_sdk(sdk))
}

fn write_crate(dir: &Path, name: &str, sdk: &Path) -> anyhow::Result<()> {
    let lib = name.replace('-', "_");
    let files = vec![
        ("Cargo.toml", cargo_toml(name, sdk)),
        ("src/lib.rs", lib_rs(name)),
        (
            "sluice.toml",
            sluice_toml(name, &format!("target/wasm32-wasip2/release/{lib}.wasm")),
        ),
        (".gitignore", "/target\n/.sluice\n".to_owned()),
    ];
    write_files(dir, files)
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

fn sluice_toml(name: &str, wasm: &str) -> String {
    format!(
        r#"# Runs {name} on sluice's embedded broker: `sluice dev -c sluice.toml`.
# Send it a message: sluice publish {name}.hello '{{"id":"1"}}'
# Read what it published: curl -s 127.0.0.1:9595/v1/queues/handled/messages

data_dir = ".sluice"

[plugins.{name}]
path = "{wasm}"
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

/// A Python or JavaScript plugin folder: the handler, its tests, a config.
fn guest_folder(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<i32> {
    let home =
        crate::daemon::dev::checkout().context("cannot find the sluice checkout (its sdk-python/ and sdk-js/)")?;
    let lib = name.replace('-', "_");
    let (files, test, build) = match lang {
        Lang::Python => (
            vec![
                ("app.py", python_app(name)),
                ("test_app.py", python_test(name)),
                (".gitignore", "__pycache__/\n/.sluice\n*.wasm\n".to_owned()),
            ],
            format!("PYTHONPATH={}:. python3 -m unittest", home.join("sdk-python").display()),
            "componentize-py (cargo xtask plugins installs it into the checkout's target/py)",
        ),
        _ => (
            vec![
                ("app.js", js_app(name)),
                ("app.test.js", js_test(name)),
                (".gitignore", "/.sluice\n*.wasm\n".to_owned()),
            ],
            format!("node {} .", home.join("sdk-js/test.mjs").display()),
            "node and the JS SDK's build tools (npm ci in the checkout's sdk-js/)",
        ),
    };
    let mut files = files;
    files.push(("sluice.toml", sluice_toml(name, &format!("{lib}.wasm"))));
    write_files(dir, files)?;
    next_steps(
        &format!("plugin {}", dir.display()),
        dir,
        name,
        &test,
        &format!("Building it needs {build}."),
    );
    Ok(0)
}

fn python_app(name: &str) -> String {
    format!(
        r#""""{name}: a sluice handler.

Called once per message. Returning acks it (and sends what was published);
raising sluice.Retryable has it retried with backoff; sluice.Permanent
sends it to the dead-letter destination; any other exception is retried.
Malformed JSON is permanent.
"""

import sluice_sdk as sluice
from sluice_sdk import WitWorld  # noqa: F401  (the component's export)


@sluice.handler
def handle(msg: sluice.Message) -> None:
    event = msg.json()
    event_id = event.get("id") if isinstance(event, dict) else None
    if not isinstance(event_id, str) or not event_id:
        raise sluice.Permanent("the event has no id")
    sluice.log.info(f"handling event {{event_id}}")
    sluice.publish_json("{name}.handled", {{"id": event_id}})
"#
    )
}

fn python_test(name: &str) -> String {
    format!(
        r#""""{name}'s tests, in plain Python (the SDK's test host)."""

import unittest

import app  # noqa: F401  (registers the handler)
from sluice_sdk import testing


class Handler(unittest.TestCase):
    def setUp(self):
        testing.reset()

    def test_an_event_is_handled_and_published(self):
        self.assertEqual(testing.handle(testing.message("{name}.hello", '{{"id":"e-1"}}')), ("ok", None))
        [out] = testing.published()
        self.assertEqual(out.subject, "{name}.handled")
        self.assertEqual(out.payload, b'{{"id":"e-1"}}')

    def test_malformed_json_is_permanent(self):
        kind, _ = testing.handle(testing.message("{name}.hello", "not json"))
        self.assertEqual(kind, "permanent")
        self.assertEqual(testing.published(), [])


if __name__ == "__main__":
    unittest.main()
"#
    )
}

fn js_app(name: &str) -> String {
    format!(
        r#"// {name}: a sluice handler.
//
// Called once per message. Returning acks it (and sends what was
// published); throwing sluice.Retryable has it retried with backoff;
// sluice.Permanent sends it to the dead-letter destination; any other
// exception is retried. Malformed JSON is permanent.

import * as sluice from "sluice-sdk";
export {{ handle }} from "sluice-sdk";

sluice.handler((msg) => {{
  const event = msg.json();
  if (typeof event?.id !== "string" || event.id === "") {{
    throw new sluice.Permanent("the event has no id");
  }}
  sluice.log.info(`handling event ${{event.id}}`);
  sluice.publishJson("{name}.handled", {{ id: event.id }});
}});
"#
    )
}

fn js_test(name: &str) -> String {
    format!(
        r#"// {name}'s tests, in Node with the SDK's test host.

import test from "node:test";
import assert from "node:assert/strict";
import * as testing from "sluice-sdk/testing";
import "./app.js";

test("an event is handled and published", () => {{
  testing.reset();
  assert.deepEqual(testing.handle(testing.message("{name}.hello", '{{"id":"e-1"}}')), ["ok", undefined]);
  const [out] = testing.published();
  assert.equal(out.subject, "{name}.handled");
  assert.equal(new TextDecoder().decode(out.payload), '{{"id":"e-1"}}');
}});

test("malformed JSON is permanent", () => {{
  testing.reset();
  assert.equal(testing.handle(testing.message("{name}.hello", "not json"))[0], "permanent");
  assert.deepEqual(testing.published(), []);
}});
"#
    )
}
