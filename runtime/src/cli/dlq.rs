//! `sluice dlq list|show|replay`: dead letters of a running daemon, through
//! its admin API.

use super::admin_client::AdminClient;
use crate::dlq::{Filter, QueueSummary, Summary};
use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    /// Admin API address of the daemon.
    #[arg(long, global = true, default_value = "127.0.0.1:9595", env = "SLUICE_ADMIN")]
    admin: String,
    /// The dead-letter queue (default: the only one).
    #[arg(long, short, global = true)]
    queue: Option<String>,
}

#[derive(clap::Subcommand)]
enum DlqCommand {
    /// Dead letters with their error kind; counts per kind.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with all its headers and its payload.
    Show { seq: u64 },
    /// Move dead letters back to the route they failed on (failure headers
    /// stripped, attempts reset).
    Replay {
        /// Sequence numbers (from `list`).
        seqs: Vec<u64>,
        /// Only those with this error kind (permanent, retryable, trap, timeout, memory).
        #[arg(long)]
        kind: Option<String>,
        /// Only those from this route.
        #[arg(long)]
        route: Option<String>,
        /// Every dead letter of the queue (with --kind/--route: every match).
        #[arg(long)]
        all: bool,
    },
}

fn choose_queue(client: &AdminClient, queue: Option<String>) -> anyhow::Result<String> {
    if let Some(q) = queue {
        return Ok(q);
    }
    let queues: Vec<QueueSummary> = client.get_json("/v1/dlq")?;
    let non_empty: Vec<&QueueSummary> = queues.iter().filter(|q| q.messages > 0).collect();
    if let [only] = non_empty.as_slice() {
        return Ok(only.queue.clone());
    }
    match queues.as_slice() {
        [one] => Ok(one.queue.clone()),
        [] => bail!("this daemon has no dead-letter queues"),
        many => bail!(
            "several dead-letter queues; pick one with --queue: {}",
            many.iter().map(|q| q.queue.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

pub fn run(args: DlqArgs) -> anyhow::Result<i32> {
    let client = AdminClient::new(&args.admin);
    match args.command {
        DlqCommand::List { limit, json } => {
            let queues: Vec<QueueSummary> = client.get_json("/v1/dlq")?;
            let wanted: Vec<&QueueSummary> = queues
                .iter()
                .filter(|q| args.queue.as_ref().is_none_or(|w| *w == q.queue))
                .collect();
            if json {
                let mut out = Vec::new();
                for q in &wanted {
                    let items: Vec<Summary> =
                        client.get_json(&format!("/v1/dlq/{}/messages?limit={limit}", q.queue))?;
                    out.push(serde_json::json!({ "queue": q.queue, "messages": q.messages, "by_kind": q.by_kind, "items": items }));
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            for q in wanted {
                let kinds: Vec<String> = q.by_kind.iter().map(|(k, n)| format!("{k}: {n}")).collect();
                println!("{} — {} dead letters ({})", q.queue, q.messages, kinds.join(", "));
                let items: Vec<Summary> = client.get_json(&format!("/v1/dlq/{}/messages?limit={limit}", q.queue))?;
                if !items.is_empty() {
                    println!(
                        "  {:>8}  {:<10} {:>8}  {:<12} {:<24} {:<25} ERROR",
                        "SEQ", "KIND", "ATTEMPTS", "ROUTE", "SUBJECT", "FAILED AT"
                    );
                }
                for s in items {
                    println!(
                        "  {:>8}  {:<10} {:>8}  {:<12} {:<24} {:<25} {}",
                        s.seq, s.kind, s.attempts, s.route, s.subject, s.failed_at, s.error
                    );
                }
            }
            Ok(0)
        }
        DlqCommand::Show { seq } => {
            let queue = choose_queue(&client, args.queue)?;
            let v: serde_json::Value = client.get_json(&format!("/v1/dlq/{queue}/messages/{seq}"))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        DlqCommand::Replay { seqs, kind, route, all } => {
            let queue = choose_queue(&client, args.queue)?;
            let filter = Filter { seqs, kind, route, all };
            if filter.is_empty() {
                bail!("say which dead letters to replay: sequence numbers, --kind, --route or --all");
            }
            let v: serde_json::Value = client
                .post_json(&format!("/v1/dlq/{queue}/replay"), &filter)
                .context("replay")?;
            println!("replayed {} dead letters from {queue}", v["replayed"]);
            Ok(0)
        }
    }
}
