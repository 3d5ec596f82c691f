//! A small blocking client of the admin API, for the CLI.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    /// From `SLUICE_ADMIN_TOKEN`, sent as a bearer token.
    token: Option<String>,
}

/// The environment variable the CLI reads the admin token from.
pub const TOKEN_ENV: &str = "SLUICE_ADMIN_TOKEN";

impl AdminClient {
    pub fn new(admin: &str) -> Self {
        Self {
            base: format!("http://{admin}"),
            agent: ureq::Agent::config_builder().http_status_as_error(false).build().into(),
            token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
        }
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot reach the sluice admin API at {} (is `sluice run` running?)",
            self.base
        )
    }

    fn finish<T: DeserializeOwned>(&self, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Result<T> {
        let status = response.status();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(body);
            bail!("{status}: {}", message.trim());
        }
        serde_json::from_str(&body).with_context(|| format!("unexpected answer: {body}"))
    }

    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .authorized(self.agent.get(format!("{}{path}", self.base)))
            .call()
            .with_context(|| self.unreachable())?;
        self.finish(response)
    }

    pub fn post_json<T: DeserializeOwned, B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        let body = serde_json::to_vec(body)?;
        self.post(path, &[("content-type", "application/json".to_owned())], &body)
    }

    /// POSTs raw bytes with extra request headers; expects a JSON answer.
    pub fn post<T: DeserializeOwned>(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> anyhow::Result<T> {
        let mut request = self.authorized(self.agent.post(format!("{}{path}", self.base)));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send(body).with_context(|| self.unreachable())?;
        self.finish(response)
    }
}
