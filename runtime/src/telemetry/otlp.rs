//! Export of message spans to an OpenTelemetry collector over OTLP/HTTP
//! (JSON encoding), when `[telemetry] otlp_endpoint` is set. Spans are
//! queued without blocking the message path (dropped and counted when the
//! queue is full) and posted in batches by one thread.
//!
//! The span ids are the ones sluice puts in the `traceparent` it sends, so
//! the collector shows each handling under the span of the message that
//! caused it and above the spans of what it published.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Spans waiting to be sent at most; beyond, new ones are dropped.
const QUEUE: usize = 10_000;
/// Spans per request at most.
const BATCH: usize = 512;
/// A span waits this long at most before it is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// One finished handling.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace sluice started itself.
    pub parent_span_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub route: String,
    pub subject: String,
    pub message_id: String,
    pub attempt: u32,
    /// `ok`, `retry`, `dead_letter`, ...
    pub outcome: &'static str,
}

struct Exporter {
    tx: SyncSender<SpanRecord>,
    dropped: AtomicU64,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Starts exporting to `endpoint` (`http://host:4318`). Once per process.
pub fn start(endpoint: &str, service_name: &str) {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let (tx, rx) = sync_channel(QUEUE);
    let service = service_name.to_owned();
    let thread_url = url.clone();
    let spawned = std::thread::Builder::new()
        .name("sluice-otlp".into())
        .spawn(move || send_loop(&rx, &thread_url, &service));
    match spawned {
        Ok(_) => {
            let _ = EXPORTER.set(Exporter {
                tx,
                dropped: AtomicU64::new(0),
            });
            tracing::info!(endpoint = %url, "exporting message spans over OTLP/HTTP");
        }
        Err(e) => tracing::error!("cannot start the OTLP exporter: {e}"),
    }
}

/// True when spans are exported: then every message gets a span, a trace
/// being started for messages that carry none.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Queues a finished span; never waits.
pub fn export(span: SpanRecord) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    if let Err(TrySendError::Full(_)) = exporter.tx.try_send(span) {
        let n = exporter.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!("OTLP export is behind: {n} spans dropped so far");
        }
    }
}

fn send_loop(rx: &Receiver<SpanRecord>, url: &str, service: &str) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut last_error: Option<Instant> = None;
    loop {
        let mut batch = Vec::new();
        let deadline = Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let body = encode(&batch, service).to_string();
        let result = agent
            .post(url)
            .header("content-type", "application/json")
            .send(body.as_bytes());
        let failure = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the collector answered {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        // One warning a minute at most while the collector is away.
        if let Some(why) = failure {
            if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!("OTLP export to {url} failed, {} spans lost: {why}", batch.len());
                last_error = Some(Instant::now());
            }
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string()
}

fn attribute(key: &str, value: Value) -> Value {
    json!({ "key": key, "value": value })
}

/// The OTLP/JSON request body (`ExportTraceServiceRequest`) of `spans`.
pub fn encode(spans: &[SpanRecord], service: &str) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let failed = matches!(s.outcome, "retry" | "dead_letter");
            json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "parentSpanId": s.parent_span_id,
                "name": format!("{} process", s.route),
                // SPAN_KIND_CONSUMER
                "kind": 5,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": [
                    attribute("messaging.destination.name", json!({ "stringValue": s.subject })),
                    attribute("messaging.message.id", json!({ "stringValue": s.message_id })),
                    attribute("sluice.route", json!({ "stringValue": s.route })),
                    attribute("sluice.attempt", json!({ "intValue": s.attempt.to_string() })),
                    attribute("sluice.outcome", json!({ "stringValue": s.outcome })),
                ],
                // STATUS_CODE_OK / STATUS_CODE_ERROR
                "status": { "code": if failed { 2 } else { 1 } },
            })
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [attribute("service.name", json!({ "stringValue": service }))] },
            "scopeSpans": [{ "scope": { "name": "sluice", "version": env!("CARGO_PKG_VERSION") }, "spans": spans }],
        }]
    })
}
