//! The admin HTTP API: health, readiness, metrics, status, and the publish
//! endpoint of the embedded broker.

pub mod access;
mod status_page;

use crate::brokers::embedded::{EmbeddedBroker, PublishError};
use crate::engine::PluginSlot;
use crate::message::{Header, Outbound};
use crate::metrics::Metrics;
use crate::pipeline::{Route, RouteStatusView};
use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Request header carrying one message header as `Name=value` (repeatable).
pub const MESSAGE_HEADER: &str = "x-sluice-header";

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub broker: EmbeddedBroker,
    /// The running routes, in config order; replaced by a config reload.
    pub routes: ArcSwap<Vec<Arc<Route>>>,
    /// The plugins by name; replaced by a config reload.
    pub plugins: ArcSwap<BTreeMap<String, Arc<PluginSlot>>>,
    /// Set once plugins are loaded and sources started; cleared on shutdown.
    pub ready: AtomicBool,
    /// Dead-letter destinations `sluice dlq` can read, by name.
    pub dead_letters: ArcSwap<BTreeMap<String, crate::dlq::DeadLetters>>,
    /// Why the last reload of a plugin (by name) or of the config (`config`)
    /// was refused; cleared by the next one that succeeds.
    pub reload_errors: Mutex<BTreeMap<String, String>>,
    /// Who may use the API (token, hosts); fixed until restart.
    pub access: Arc<access::Access>,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, broker: EmbeddedBroker, access: access::Access) -> Self {
        Self {
            access: Arc::new(access),
            metrics,
            broker,
            routes: ArcSwap::from_pointee(Vec::new()),
            plugins: ArcSwap::from_pointee(BTreeMap::new()),
            ready: AtomicBool::new(false),
            dead_letters: ArcSwap::from_pointee(BTreeMap::new()),
            reload_errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records how a reload of `what` ended: `Some(reason)` if refused.
    pub fn reload_result(&self, what: &str, refused: Option<String>) {
        if let Ok(mut errors) = self.reload_errors.lock() {
            match refused {
                Some(reason) => errors.insert(what.to_owned(), reason),
                None => errors.remove(what),
            };
        }
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(status_page::render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/publish", post(publish_bulk))
        .route("/v1/publish/{subject}", post(publish))
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{name}/messages", get(queue_messages))
        .route("/v1/dlq", get(dlq_queues))
        .route("/v1/dlq/{queue}/messages", get(dlq_list))
        .route("/v1/dlq/{queue}/messages/{seq}", get(dlq_show))
        .route("/v1/dlq/{queue}/replay", post(dlq_replay))
        .layer(axum::middleware::from_fn_with_state(
            state.access.clone(),
            access::guard,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(access::MAX_BODY))
        .with_state(state)
}

/// Binds the listener now (so a taken port is reported at start-up) and
/// serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!("admin API stopped: {e}");
        }
    }))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting or stopping\n").into_response();
    }
    let routes = state.routes.load();
    let down: Vec<&str> = routes
        .iter()
        .filter(|r| !r.source.is_connected())
        .map(|r| r.name.as_str())
        .collect();
    let stalled: Vec<&str> = routes
        .iter()
        .filter(|r| r.liveness.stalled())
        .map(|r| r.name.as_str())
        .collect();
    let mut problems = Vec::new();
    if !down.is_empty() {
        problems.push(format!("sources not connected: {}", down.join(", ")));
    }
    if !stalled.is_empty() {
        problems.push(format!("routes with no running worker: {}", stalled.join(", ")));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
pub struct RouteView {
    pub name: String,
    pub source: String,
    pub plugin: String,
    pub plugin_hash: String,
    pub isolation: &'static str,
    pub concurrency: u32,
    pub dead_letter: String,
    #[serde(flatten)]
    pub counts: RouteStatusView,
}

#[derive(Serialize)]
pub struct PluginView {
    pub name: String,
    pub hash: String,
    pub path: String,
    pub isolation: &'static str,
    /// `rust`, `python`, `javascript` or `unknown`, from the binary.
    pub language: &'static str,
    pub world: &'static str,
    /// Why the last hot reload was refused (the version shown keeps serving).
    pub reload_error: Option<String>,
}

#[derive(Serialize)]
pub struct StatusView {
    pub ready: bool,
    pub version: &'static str,
    pub routes: Vec<RouteView>,
    pub plugins: Vec<PluginView>,
    /// Why the last config reload was refused (the running config stays).
    pub config_reload_error: Option<String>,
    pub queues: Vec<crate::brokers::embedded::QueueInfo>,
}

pub fn status_view(state: &AdminState) -> StatusView {
    let errors = state.reload_errors.lock().map(|e| e.clone()).unwrap_or_default();
    StatusView {
        ready: state.ready.load(Ordering::Relaxed),
        version: env!("CARGO_PKG_VERSION"),
        routes: state
            .routes
            .load()
            .iter()
            .map(|r| {
                let plugin = r.plugin.current();
                RouteView {
                    name: r.name.clone(),
                    source: r.source_description.clone(),
                    plugin: plugin.name().to_owned(),
                    plugin_hash: plugin.hash().to_owned(),
                    isolation: plugin.isolation().as_str(),
                    concurrency: r.concurrency,
                    dead_letter: format!("{} {}", r.dead_letter_broker, r.dead_letter_subject),
                    counts: r.status_view(),
                }
            })
            .collect(),
        plugins: state
            .plugins
            .load()
            .iter()
            .map(|(name, slot)| {
                let plugin = slot.current();
                PluginView {
                    name: name.clone(),
                    hash: plugin.hash().to_owned(),
                    path: plugin.path().display().to_string(),
                    isolation: plugin.isolation().as_str(),
                    language: plugin.language(),
                    world: plugin.world(),
                    reload_error: errors.get(name).cloned(),
                }
            })
            .collect(),
        config_reload_error: errors.get(CONFIG_RELOAD).cloned(),
        queues: state.broker.queues(),
    }
}

/// The key of config reloads in [`AdminState::reload_errors`].
pub const CONFIG_RELOAD: &str = "config";

async fn status(State(state): State<Arc<AdminState>>) -> Json<StatusView> {
    Json(status_view(&state))
}

/// Most messages one list request returns.
const MAX_LIST: usize = 10_000;

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Message headers from `X-Sluice-Header: Name=value` request headers.
fn message_headers(headers: &HeaderMap) -> Result<Vec<Header>, String> {
    headers
        .get_all(MESSAGE_HEADER)
        .iter()
        .map(|v| {
            let text = v.to_str().map_err(|_| format!("{MESSAGE_HEADER} is not text"))?;
            let (name, value) = text
                .split_once('=')
                .ok_or_else(|| format!("{MESSAGE_HEADER} {text:?} is not Name=value"))?;
            let name = name.trim();
            // Stored as given and later handed to any broker: the same
            // rules as a plugin's headers (reserved names allowed: an
            // operator may set `Nats-Msg-Id`).
            crate::headers::check_name(name).map_err(|e| e.to_string())?;
            crate::headers::check_value(name, value).map_err(|e| e.to_string())?;
            Ok(Header::new(name, value))
        })
        .collect()
}

async fn publish(
    State(state): State<Arc<AdminState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers = match message_headers(&headers) {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let outbound = Outbound {
        subject: subject.clone(),
        headers,
        payload: body.to_vec(),
    };
    match state.broker.publish(vec![outbound]).await {
        Ok(report) => Json(serde_json::json!({
            "subject": subject,
            "queues": report.queues,
            "duplicates": report.duplicates,
        }))
        .into_response(),
        Err(PublishError::Subject(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(PublishError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, crate::error::report(&e)),
    }
}

/// Most messages one bulk publish may carry (the body is bounded too).
pub const MAX_BULK_MESSAGES: usize = 10_000;

/// One line of a bulk publish: the shape the queue listings print, so a
/// listing can be published again.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkLine {
    subject: String,
    #[serde(default)]
    headers: Vec<Header>,
    #[serde(default, with = "crate::message::payload_text")]
    payload: Vec<u8>,
}

/// Parses an NDJSON body into messages, all or none: the first bad line is
/// named by its number. At most `limit` messages.
pub(crate) fn bulk_messages(body: &[u8], limit: usize) -> Result<Vec<Outbound>, String> {
    let mut messages = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if messages.len() == limit {
            return Err(format!("more than {limit} messages in one request"));
        }
        if line.len() >= access::MAX_BODY {
            return Err(format!(
                "line {n}: longer than a request may be ({} MiB)",
                access::MAX_BODY >> 20
            ));
        }
        let m: BulkLine = serde_json::from_slice(line).map_err(|e| format!("line {n}: {e}"))?;
        crate::subject::validate_subject(&m.subject).map_err(|e| format!("line {n}: {e}"))?;
        // The plugins' bounds (count, bytes, what a broker can carry);
        // reserved names are allowed: an operator may set `Nats-Msg-Id`.
        crate::headers::check_plugin_headers(&m.headers).map_err(|e| format!("line {n}: {e}"))?;
        messages.push(Outbound {
            subject: m.subject,
            headers: m.headers,
            payload: m.payload,
        });
    }
    if messages.is_empty() {
        return Err("no message: the body is one JSON object per line".into());
    }
    Ok(messages)
}

/// `POST /v1/publish` with NDJSON: every message in one durable commit, or
/// none when a line is malformed.
async fn publish_bulk(State(state): State<Arc<AdminState>>, body: Bytes) -> Response {
    let messages = match bulk_messages(&body, MAX_BULK_MESSAGES) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let count = messages.len();
    match state.broker.publish(messages).await {
        Ok(report) => Json(serde_json::json!({
            "messages": count,
            "duplicates": report.duplicates,
        }))
        .into_response(),
        Err(PublishError::Subject(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(PublishError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, crate::error::report(&e)),
    }
}

async fn queues(State(state): State<Arc<AdminState>>) -> Response {
    Json(state.broker.queues()).into_response()
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct StoredView {
    seq: u64,
    subject: String,
    headers: Vec<Header>,
    #[serde(with = "crate::message::payload_text")]
    payload: Vec<u8>,
    attempt: u32,
    published_ms: u64,
}

impl StoredView {
    fn new(seq: u64, s: crate::brokers::embedded::Stored) -> Self {
        Self {
            seq,
            subject: s.subject,
            headers: s.headers,
            payload: s.payload,
            attempt: s.attempt,
            published_ms: s.published_ms,
        }
    }
}

async fn queue_messages(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Query(limit): Query<Limit>,
) -> Response {
    let limit = limit.limit.unwrap_or(100).min(MAX_LIST);
    match state.broker.peek(&name, limit) {
        Ok(list) => Json(
            list.into_iter()
                .map(|(seq, s)| StoredView::new(seq, s))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, crate::error::report(&e)),
    }
}

/// The backend of dead-letter destination `queue`, or the 404 to answer.
fn dead_letters(state: &AdminState, queue: &str) -> Result<crate::dlq::DeadLetters, Box<Response>> {
    let all = state.dead_letters.load();
    all.get(queue).cloned().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "{queue} is not a dead-letter destination this daemon can read (they are: {})",
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ))
    })
}

fn dlq_error(e: crate::dlq::DlqError) -> Response {
    use crate::brokers::DeadLetterError;
    use crate::dlq::DlqError;
    match e {
        DlqError::NoFilter
        | DlqError::Replay(DeadLetterError::UnknownRoute { .. } | DeadLetterError::NoOrigin { .. }) => {
            error(StatusCode::BAD_REQUEST, crate::error::report(&e))
        }
        other => error(StatusCode::SERVICE_UNAVAILABLE, crate::error::report(&other)),
    }
}

async fn dlq_queues(State(state): State<Arc<AdminState>>) -> Response {
    let mut out = Vec::new();
    let all = state.dead_letters.load_full();
    for backend in all.values() {
        match backend.queue_summary().await {
            Ok(s) => out.push(s),
            Err(e) => return dlq_error(e),
        }
    }
    Json(out).into_response()
}

async fn dlq_list(
    State(state): State<Arc<AdminState>>,
    Path(queue): Path<String>,
    Query(limit): Query<Limit>,
) -> Response {
    let backend = match dead_letters(&state, &queue) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match backend.list(limit.limit.unwrap_or(1000).min(MAX_LIST)).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn dlq_show(State(state): State<Arc<AdminState>>, Path((queue, seq)): Path<(String, u64)>) -> Response {
    let backend = match dead_letters(&state, &queue) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match backend.get(seq).await {
        Ok(Some(m)) => Json(serde_json::json!({
            "seq": seq,
            "subject": m.subject,
            "headers": m.headers,
            "payload": serde_json::to_value(&m).ok().map(|v| v["payload"].clone()),
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no dead letter #{seq} in {queue}")),
        Err(e) => dlq_error(e),
    }
}

async fn dlq_replay(
    State(state): State<Arc<AdminState>>,
    Path(queue): Path<String>,
    Json(filter): Json<crate::dlq::Filter>,
) -> Response {
    let backend = match dead_letters(&state, &queue) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match backend.replay(&filter).await {
        Ok(n) => Json(serde_json::json!({ "replayed": n })).into_response(),
        Err(e) => dlq_error(e),
    }
}

pub(crate) async fn html(state: &AdminState) -> Html<String> {
    Html(status_page::html(&status_view(state)))
}
