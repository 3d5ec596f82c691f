//! `sluice publish`: a message to the embedded broker, through the admin API
//! of a running daemon.

use super::{parse_pair, read_payload};
use crate::admin::MESSAGE_HEADER;
use anyhow::{bail, Context};

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
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn run(args: PublishArgs) -> anyhow::Result<i32> {
    let payload = read_payload(&args.payload)?;
    let url = format!(
        "http://{}/v1/publish/{}",
        args.admin,
        encode_path(&args.subject)
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.post(&url);
    for (name, value) in &args.headers {
        request = request.header(MESSAGE_HEADER, format!("{name}={value}"));
    }
    let mut response = request.send(&payload[..]).with_context(|| {
        format!(
            "cannot reach the sluice admin API at {} (is `sluice run` running?)",
            args.admin
        )
    })?;
    let status = response.status();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if !status.is_success() {
        bail!("publish refused ({status}): {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(0)
}
