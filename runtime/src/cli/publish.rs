//! `sluice publish`: a message to the embedded broker, through the admin API
//! of a running daemon.

use super::admin_client::AdminClient;
use super::{parse_pair, read_payload};
use crate::admin::MESSAGE_HEADER;
use anyhow::Context;

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Subject to publish to (`orders.created`).
    subject: String,
    /// The payload: text, `@FILE`, or `@-` for stdin.
    payload: String,
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

pub fn run(args: PublishArgs) -> anyhow::Result<i32> {
    let payload = read_payload(&args.payload)?;
    let mut headers: Vec<(&str, String)> = args
        .headers
        .iter()
        .map(|(name, value)| (MESSAGE_HEADER, format!("{name}={value}")))
        .collect();
    headers.push(("content-type", "application/octet-stream".to_owned()));
    let answer: serde_json::Value = AdminClient::new(&args.admin)
        .post(
            &format!("/v1/publish/{}", encode_path(&args.subject)),
            &headers,
            &payload,
        )
        .context("publish refused")?;
    println!("{answer}");
    Ok(0)
}
