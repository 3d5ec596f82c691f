//! The `sluice` command line.

mod admin_client;
mod dlq;
mod invoke;
mod kafka;
mod new_plugin;
mod publish;

use crate::config;
use crate::daemon::RunOptions;
use crate::telemetry::{self, LogFormat};

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Human => Self::Human,
            LogFormatArg::Json => Self::Json,
        }
    }
}
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Runs sandboxed WebAssembly handlers for broker messages"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Human, env = "SLUICE_LOG_FORMAT")]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon. Changed plugin files and config are hot-reloaded.
    Run {
        #[arg(long, short, default_value = "config/sluice.toml", env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Do not watch the config and plugin files.
        #[arg(long, env = "SLUICE_NO_WATCH")]
        no_watch: bool,
    },
    /// Run the daemon for plugin development: builds each plugin's crate,
    /// then rebuilds and hot-swaps it whenever its sources change.
    Dev {
        #[arg(long, short, default_value = "config/sluice.toml", env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Ask a running daemon whether it is ready (`/readyz`) or, with
    /// `--live`, alive (`/healthz`); exit 0 if so. For container
    /// healthchecks.
    Health {
        /// Admin API address (`0.0.0.0:PORT` is asked on 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:9595", env = "SLUICE_ADMIN")]
        admin: String,
        /// Liveness instead of readiness.
        #[arg(long)]
        live: bool,
    },
    /// Scaffold something new: `sluice new plugin NAME`.
    New(new_plugin::NewArgs),
    /// Validate the config and load every plugin, then exit.
    Check {
        #[arg(long, short, default_value = "config/sluice.toml", env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Run a handler once on a message, without a broker; prints the outcome,
    /// its publishes and its reply as JSON.
    Invoke(invoke::InvokeArgs),
    /// Publish a message to the embedded broker of a running daemon.
    Publish(publish::PublishArgs),
    /// List, inspect and replay dead letters of a running daemon.
    Dlq(dlq::DlqArgs),
    /// Kafka chores: `reset-offsets` of a stopped consumer group.
    Kafka(kafka::KafkaArgs),
}

/// Runs the command line; returns the process exit code.
pub fn main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format.into());
    match cli.command {
        Command::Run { config, no_watch } => {
            let config = config::load(&config)?;
            let options = RunOptions {
                watch: !no_watch,
                rebuild: false,
            };
            runtime()?.block_on(crate::daemon::run(config, options))?;
            Ok(0)
        }
        Command::Dev { config: path } => runtime()?.block_on(async {
            // Built before the config is checked: the .wasm files it names
            // may not exist yet.
            crate::daemon::dev::build_all(&config::load_unbuilt(&path)?).await;
            let config = config::load(&path)?;
            let options = RunOptions {
                watch: true,
                rebuild: true,
            };
            crate::daemon::run(config, options).await?;
            Ok(0)
        }),
        Command::New(args) => new_plugin::run(args),
        Command::Health { admin, live } => health(&admin, live),
        Command::Check { config } => {
            let config = config::load(&config)?;
            let engine = crate::daemon::build_engine(&config)?;
            let plugins = runtime()?.block_on(crate::daemon::load_plugins(&engine, &config, None))?;
            println!(
                "{}: ok ({} routes, {} plugins)",
                config.file.display(),
                config.routes.len(),
                plugins.len()
            );
            Ok(0)
        }
        Command::Invoke(args) => runtime()?.block_on(invoke::run(args)),
        Command::Publish(args) => publish::run(args),
        Command::Dlq(args) => dlq::run(args),
        Command::Kafka(args) => kafka::run(args),
    }
}

fn health(admin: &str, live: bool) -> anyhow::Result<i32> {
    let admin = admin.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:");
    let path = if live { "/healthz" } else { "/readyz" };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(3)))
        .build()
        .into();
    match agent.get(format!("http://{admin}{path}")).call() {
        Ok(mut response) => {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            print!("{body}");
            Ok(if response.status() == 200 { 0 } else { 1 })
        }
        Err(e) => {
            println!("cannot reach the admin API at {admin}: {e}");
            Ok(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `K=V` pairs of `--header` and friends.
pub(crate) fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

/// `@FILE` reads a file; anything else is the text itself.
pub(crate) fn read_payload(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading the payload from stdin")?;
            Ok(buf)
        }
        Some(path) => std::fs::read(path).with_context(|| format!("reading the payload from {path}")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}
