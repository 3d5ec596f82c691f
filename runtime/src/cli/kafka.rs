//! `sluice kafka reset-offsets`: moves a stopped consumer group's committed
//! offsets, to re-drive a topic from a point (Kafka as the log of record).

use crate::brokers::kafka::admin::{reset_offsets, ResetTo};
use crate::brokers::kafka::KafkaConfig;
use anyhow::{bail, Context};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct KafkaArgs {
    #[command(subcommand)]
    command: KafkaCommand,
}

#[derive(clap::Subcommand)]
enum KafkaCommand {
    /// Set a consumer group's offsets on a topic (every partition). Stop the
    /// group's consumers first: a running member would overwrite them.
    ResetOffsets {
        /// Take `[brokers.kafka]` (servers, credentials) from this config.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Bootstrap servers, when there is no config.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        /// The first record still kept.
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// The end: skip everything not yet handled.
        #[arg(long, group = "to")]
        to_latest: bool,
        /// This offset in every partition.
        #[arg(long, group = "to")]
        to_offset: Option<i64>,
        /// The first record at or after this time (RFC 3339).
        #[arg(long, group = "to")]
        to_time: Option<String>,
    },
}

pub fn run(args: KafkaArgs) -> anyhow::Result<i32> {
    let KafkaCommand::ResetOffsets {
        config,
        brokers,
        group,
        topic,
        to_earliest,
        to_latest,
        to_offset,
        to_time,
    } = args.command;
    let kafka: KafkaConfig = match config {
        Some(path) => crate::config::load(&path)?
            .brokers
            .kafka
            .with_context(|| format!("{} has no [brokers.kafka]", path.display()))?,
        None => toml::from_str(&format!("brokers = {brokers:?}")).context("bootstrap servers")?,
    };
    let to = match (to_earliest, to_latest, to_offset, to_time) {
        (true, ..) => ResetTo::Earliest,
        (_, true, ..) => ResetTo::Latest,
        (_, _, Some(n), _) => ResetTo::Offset(n),
        (_, _, _, Some(t)) => {
            let at = humantime::parse_rfc3339_weak(&t).with_context(|| format!("--to-time {t:?}: not RFC 3339"))?;
            let ms = at
                .duration_since(std::time::UNIX_EPOCH)
                .context("--to-time before 1970")?
                .as_millis();
            ResetTo::Time(i64::try_from(ms).unwrap_or(i64::MAX))
        }
        _ => bail!("say where to: --to-earliest, --to-latest, --to-offset N or --to-time RFC3339"),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let moved = rt
        .block_on(reset_offsets(&kafka, &group, &topic, to))
        .map_err(|e| anyhow::anyhow!("resetting {group} on {topic}: {e}"))?;
    for (partition, offset) in moved {
        println!("{topic}/{partition}: {offset}");
    }
    Ok(0)
}
