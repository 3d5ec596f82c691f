//! `sluice invoke`: one message through a plugin, no broker.

use super::{parse_pair, read_payload};
use crate::config::Isolation;
use crate::engine::{Engine, EngineSettings, Outcome, PluginSpec};
use crate::message::{now_ms, Header, Message};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct InvokeArgs {
    /// The plugin component (`.wasm`).
    plugin: PathBuf,
    /// Subject the message arrived on.
    #[arg(long, default_value = "invoke")]
    subject: String,
    /// A message header, NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_pair)]
    headers: Vec<(String, String)>,
    /// The payload: text, `@FILE`, or `@-` for stdin.
    #[arg(long, short, default_value = "")]
    payload: String,
    /// A plugin setting, NAME=VALUE (repeatable), as `[plugins.X.config]`.
    #[arg(long = "config", value_parser = parse_pair)]
    settings: Vec<(String, String)>,
    /// Delivery attempt reported to the handler.
    #[arg(long, default_value_t = 1)]
    attempt: u32,
    /// Reply subject (request/reply handlers).
    #[arg(long)]
    reply_to: Option<String>,
    /// Message key.
    #[arg(long)]
    key: Option<String>,
    /// Deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Memory cap in MiB.
    #[arg(long, default_value_t = 64)]
    max_memory_mb: u64,
    /// Route name reported to the handler.
    #[arg(long, default_value = "invoke")]
    route: String,
    /// Keep the compiled component in this folder and reuse it next time
    /// (a Python or JavaScript plugin takes seconds to compile).
    #[arg(long, value_name = "DIR")]
    cache: Option<std::path::PathBuf>,
}

pub async fn run(args: InvokeArgs) -> anyhow::Result<i32> {
    if let Some(dir) = &args.cache {
        // The cache trusts only a folder of this user's that no one else
        // can write to: a new one is made private; an existing one is used
        // as it is (the engine compiles without the cache if it is not
        // private, and says so).
        if !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let engine = Engine::new(EngineSettings {
        max_instances: 4,
        cache_dir: args.cache.clone(),
        ..Default::default()
    })?;
    let name = args
        .plugin
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let mut spec = PluginSpec::new(&name, &args.plugin);
    spec.isolation = Isolation::Fresh;
    spec.timeout = args.timeout;
    spec.memory_cap_bytes = args
        .max_memory_mb
        .checked_mul(1 << 20)
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(usize::MAX);
    // A dry run: every subject may be published to; nothing is sent.
    spec.publish_allow = vec![">".into()];
    spec.settings = args.settings.into_iter().collect();
    let plugin = engine.load(spec)?;

    let message = Message {
        id: "invoke-1".into(),
        subject: args.subject,
        key: args.key,
        headers: args.headers.into_iter().map(|(n, v)| Header::new(n, v)).collect(),
        payload: read_payload(&args.payload)?,
        attempt: args.attempt.max(1),
        timestamp_ms: now_ms(),
        reply_to: args.reply_to,
    };
    let invocation = plugin.invoke(&args.route, &message).await;
    let ok = matches!(invocation.outcome, Outcome::Ok { .. });
    let mut json = serde_json::to_value(&invocation).context("encoding the result")?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "plugin".into(),
            serde_json::json!({
                "name": plugin.name(),
                "sha256": plugin.hash(),
                "language": plugin.language(),
                "world": plugin.world(),
            }),
        );
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(if ok { 0 } else { 1 })
}
