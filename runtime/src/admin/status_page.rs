//! A plain HTML status page: routes, plugins, counts, queues.

use super::{AdminState, StatusView};
use axum::extract::State;
use axum::response::Html;
use std::fmt::Write;
use std::sync::Arc;

pub async fn render(State(state): State<Arc<AdminState>>) -> Html<String> {
    super::html(&state).await
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn html(view: &StatusView) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>sluice</title>\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}code{font-size:12px}</style>\
         </head><body>",
    );
    let _ = write!(
        out,
        "<h1>sluice {}</h1><p>{}</p><h2>Routes</h2><table><tr><th>route</th><th>source</th><th>plugin</th>\
         <th>hash</th><th>isolation</th><th>in flight</th><th>handled</th><th>retried</th>\
         <th>dead-lettered</th><th>last error</th></tr>",
        esc(view.version),
        if view.ready { "ready" } else { "not ready" }
    );
    for r in &view.routes {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(&r.source),
            esc(&r.plugin),
            esc(r.plugin_hash.get(..12).unwrap_or(&r.plugin_hash)),
            r.isolation,
            r.counts.in_flight,
            r.counts.handled,
            r.counts.retried,
            r.counts.dead_lettered,
            esc(r.counts.last_error.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</table><h2>Plugins</h2>");
    if let Some(e) = &view.config_reload_error {
        let _ = write!(
            out,
            "<p><b>Config reload refused</b> (the running config stays): {}</p>",
            esc(e)
        );
    }
    out.push_str(
        "<table><tr><th>plugin</th><th>hash</th><th>language</th><th>isolation</th><th>file</th><th>last reload refused</th></tr>",
    );
    for p in &view.plugins {
        let _ = write!(
            out,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&p.name),
            esc(p.hash.get(..12).unwrap_or(&p.hash)),
            p.language,
            p.isolation,
            esc(&p.path),
            esc(p.reload_error.as_deref().unwrap_or("")),
        );
    }
    out.push_str("</table><h2>Embedded queues</h2><table><tr><th>queue</th><th>subjects</th><th>messages</th><th>in flight</th><th>delayed</th></tr>");
    for q in &view.queues {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&q.name),
            esc(&q.subjects.join(" ")),
            q.messages,
            q.in_flight,
            q.delayed
        );
    }
    out.push_str(
        "</table><p><a href=\"/metrics\">metrics</a> · <a href=\"/v1/status\">status JSON</a></p></body></html>",
    );
    out
}
