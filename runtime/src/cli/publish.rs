//! `sluice publish`: messages to the embedded broker, through the admin API
//! of a running daemon: one, or a file of them (NDJSON).

use super::admin_client::AdminClient;
use super::{parse_pair, read_payload};
use crate::admin::MESSAGE_HEADER;
use anyhow::Context;

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["subject", "file"]))]
pub struct PublishArgs {
    /// Subject to publish to (`orders.created`).
    #[arg(requires = "payload")]
    subject: Option<String>,
    /// The payload: text, `@FILE`, or `@-` for stdin.
    payload: Option<String>,
    /// Publish every message of an NDJSON file (`-`: stdin), one
    /// `{"subject": .., "headers": [{"name": .., "value": ..}], "payload": ..}`
    /// per line (a payload may be `{"base64": ..}`), the shape the queue
    /// listings print. Sent in commits of up to 10,000 messages.
    #[arg(long, conflicts_with_all = ["subject", "payload", "headers"])]
    file: Option<String>,
    /// A message header, NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_pair)]
    headers: Vec<(String, String)>,
    /// Admin API address of the daemon.
    #[arg(long, default_value = "127.0.0.1:9595", env = "SLUICE_ADMIN")]
    admin: String,
}

/// Percent-encodes everything but unreserved URL characters.
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Bytes of NDJSON sent in one request: under the admin API's body bound.
const CHUNK_BYTES: usize = 3 << 20;

fn run_file(client: &AdminClient, file: &str) -> anyhow::Result<i32> {
    let body = read_payload(&format!("@{file}"))?;
    // Checked whole first, so a bad line is named by its number in the
    // file and nothing is sent.
    let count = crate::admin::bulk_messages(&body, usize::MAX)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?
        .len();
    let (mut sent, mut duplicates) = (0usize, 0u64);
    let mut chunk: Vec<u8> = Vec::new();
    let mut lines = 0;
    let mut flush = |chunk: &mut Vec<u8>, lines: &mut usize| -> anyhow::Result<()> {
        if *lines == 0 {
            return Ok(());
        }
        let answer: serde_json::Value = client
            .post(
                "/v1/publish",
                &[("content-type", "application/x-ndjson".to_owned())],
                chunk,
            )
            .with_context(|| format!("publish refused after {sent} of {count} messages"))?;
        sent += *lines;
        duplicates += answer["duplicates"].as_u64().unwrap_or(0);
        chunk.clear();
        *lines = 0;
        Ok(())
    };
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if lines == crate::admin::MAX_BULK_MESSAGES || chunk.len() + line.len() + 1 > CHUNK_BYTES {
            flush(&mut chunk, &mut lines)?;
        }
        chunk.extend_from_slice(line);
        chunk.push(b'\n');
        lines += 1;
    }
    flush(&mut chunk, &mut lines)?;
    println!("{}", serde_json::json!({ "messages": count, "duplicates": duplicates }));
    Ok(0)
}

pub fn run(args: PublishArgs) -> anyhow::Result<i32> {
    let client = AdminClient::new(&args.admin);
    if let Some(file) = &args.file {
        return run_file(&client, file);
    }
    let (Some(subject), Some(payload)) = (&args.subject, &args.payload) else {
        anyhow::bail!("give a subject and a payload, or --file");
    };
    let payload = read_payload(payload)?;
    let mut headers: Vec<(&str, String)> = args
        .headers
        .iter()
        .map(|(name, value)| (MESSAGE_HEADER, format!("{name}={value}")))
        .collect();
    headers.push(("content-type", "application/octet-stream".to_owned()));
    let answer: serde_json::Value = client
        .post(&format!("/v1/publish/{}", encode_path(subject)), &headers, &payload)
        .context("publish refused")?;
    println!("{answer}");
    Ok(0)
}
