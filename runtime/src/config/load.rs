//! Reading, interpolating, parsing and validating a config file.

use super::interpolate::interpolate;
use super::locate::KeyLines;
use super::{Config, GateStore, RouteConfig};
use crate::de::{dotted, split_nested};
use crate::subject::{is_plain_name, validate_subject, SubjectPattern, PLAIN_NAME};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// A config problem, located: `file:line: key: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", .0)]
    Invalid(Located),
}

/// An error with the file, line and key it concerns.
#[derive(Debug)]
pub struct Located {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.message)
        }
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path, PluginFiles::MustExist)
}

/// Reads and validates the config at `path` except that plugin files may
/// be missing: `sluice dev` builds them.
pub fn load_unbuilt(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path, PluginFiles::MayBeMissing)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PluginFiles {
    MustExist,
    MayBeMissing,
}

/// Parses config text as if read from `path` (relative paths resolve against
/// its folder).
pub fn parse_str(raw: &str, path: &Path) -> Result<Config, ConfigError> {
    parse(raw, path, PluginFiles::MustExist)
}

fn parse(raw: &str, path: &Path, plugin_files: PluginFiles) -> Result<Config, ConfigError> {
    let invalid = |line: Option<usize>, key: &str, message: String| {
        ConfigError::Invalid(Located {
            file: path.to_owned(),
            line,
            key: key.to_owned(),
            message,
        })
    };
    let text = interpolate(raw, |name| std::env::var(name).ok()).map_err(|e| invalid(Some(e.line), "", e.message))?;
    let lines = KeyLines::scan(&text);

    let deserializer = toml::de::Deserializer::parse(&text)
        .map_err(|e| invalid(e.span().map(|s| line_at(&text, s.start)), "", e.message().to_owned()))?;
    let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = dotted(e.path());
        let inner = e.into_inner();
        // A broker's own settings were deserialized apart: their error
        // carries the key below the value, and the line is found by key.
        if let Some((below, message)) = split_nested(inner.message()) {
            let key = if below.is_empty() {
                key
            } else {
                format!("{key}.{below}")
            };
            let line = lines
                .line_of(&segments(&key))
                .or_else(|| inner.span().map(|s| line_at(&text, s.start)));
            return invalid(line, &key, message.to_owned());
        }
        let line = inner
            .span()
            .map(|s| line_at(&text, s.start))
            .or_else(|| lines.line_of(&segments(&key)));
        invalid(line, &key, inner.message().to_owned())
    })?;

    let base = path.parent().unwrap_or(Path::new("."));
    config.file = path.to_owned();
    config.data_dir = base.join(&config.data_dir);
    for plugin in config.plugins.values_mut() {
        plugin.path = base.join(&plugin.path);
        if let Some(source) = &mut plugin.source {
            *source = base.join(&*source);
        }
    }

    validate(&config, plugin_files).map_err(|(key, message)| invalid(lines.line_of(&segments(&key)), &key, message))?;
    Ok(config)
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn segments(key: &str) -> Vec<String> {
    key.split('.').map(str::to_owned).collect()
}

type Problem = (String, String);

fn validate(config: &Config, plugin_files: PluginFiles) -> Result<(), Problem> {
    if config.engine.max_instances == 0 {
        return Err(("engine.max_instances".into(), "must be at least 1".into()));
    }
    let admin = &config.admin;
    if !admin.listen.ip().is_loopback() && admin.token().is_none() && !admin.insecure {
        return Err((
            "admin.listen".into(),
            format!(
                "{} is reachable from other hosts, and without `[admin] token` anyone who reaches it can publish and replay; set `token = \"${{SLUICE_ADMIN_TOKEN}}\"`, listen on 127.0.0.1, or set `insecure = true`",
                admin.listen
            ),
        ));
    }
    if admin.token().is_some_and(|t| t.len() < 16) {
        return Err(("admin.token".into(), "must be at least 16 characters".into()));
    }
    for (name, plugin) in &config.plugins {
        let key = |k: &str| format!("plugins.{name}.{k}");
        if plugin_files == PluginFiles::MustExist && !plugin.path.is_file() {
            return Err((
                key("path"),
                format!(
                    "plugin file {} does not exist (build the plugins first?)",
                    plugin.path.display()
                ),
            ));
        }
        if plugin.max_memory_mb == 0 || plugin.max_memory_mb > 4096 {
            return Err((key("max_memory_mb"), "must be between 1 and 4096".into()));
        }
        if plugin.timeout.is_zero() {
            return Err((key("timeout"), "must be more than 0".into()));
        }
        for (list, patterns) in [("publish", &plugin.publish), ("request", &plugin.request)] {
            for (i, p) in patterns.iter().enumerate() {
                SubjectPattern::parse(p).map_err(|e| (format!("{}.{i}", key(list)), e.to_string()))?;
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        let key = |k: &str| format!("routes.{i}.{k}");
        if !is_plain_name(&route.name) {
            return Err((key("name"), PLAIN_NAME.into()));
        }
        if !names.insert(route.name.as_str()) {
            return Err((key("name"), format!("route `{}` is defined twice", route.name)));
        }
        if !config.plugins.contains_key(&route.plugin) {
            let known: Vec<&str> = config.plugins.keys().map(String::as_str).collect();
            return Err((
                key("plugin"),
                format!("no plugin `{}` is defined (known: {})", route.plugin, known.join(", ")),
            ));
        }
        validate_route(route, &key)?;
        validate_source(config, route, &key)?;
        if let Some(idem) = &route.idempotency {
            let timeout = config.plugins.get(&route.plugin).map(|p| p.timeout).unwrap_or_default();
            // A batch's deadline is the timeout times its size, capped.
            let timeout = match &route.batch {
                Some(b) => timeout
                    .saturating_mul(b.max_messages)
                    .min(crate::engine::MAX_BATCH_TIMEOUT.max(timeout)),
                None => timeout,
            };
            if idem.lease <= timeout {
                return Err((
                    key("idempotency.lease"),
                    format!("must be longer than the plugin's timeout ({timeout:?}, per batch with `batch`), or a slow handler would lose its lease"),
                ));
            }
            if idem.store == GateStore::Redis && config.stores.redis_url.is_none() {
                return Err((key("idempotency.store"), "\"redis\" needs `[stores] redis_url`".into()));
            }
            if idem.store == GateStore::NatsKv && config.brokers.nats.is_none() {
                return Err((key("idempotency.store"), "\"nats-kv\" needs `[brokers.nats]`".into()));
            }
        }
    }
    if let Some(id) = &config.instance_id {
        if !crate::message::valid_instance_id(id) {
            return Err((
                "instance_id".into(),
                "must be 1-128 letters, digits, `.`, `_` or `-`".into(),
            ));
        }
    }
    if let Some(bucket) = &config.stores.nats_kv_bucket {
        let valid = !bucket.is_empty()
            && bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err((
                "stores.nats_kv_bucket".into(),
                "must be letters, digits, `_` and `-` (a JetStream key-value bucket name)".into(),
            ));
        }
    }
    // Every worker may hold an instance at once (and reuse keeps them warm):
    // more workers than pool slots would fail healthy messages as traps.
    let workers: u64 = config.routes.iter().map(|r| u64::from(r.concurrency)).sum();
    if workers > u64::from(config.engine.max_instances) {
        return Err((
            "engine.max_instances".into(),
            format!(
                "is {}, below the {workers} workers the routes' `concurrency` adds up to: raise it or lower concurrency",
                config.engine.max_instances
            ),
        ));
    }
    config.brokers.validate(&names)?;
    Ok(())
}

fn validate_source(config: &Config, route: &RouteConfig, key: &dyn Fn(&str) -> String) -> Result<(), Problem> {
    let uses = route.broker_use();
    for kind in [uses.source.kind(), uses.dead_letter.broker, uses.publish_broker] {
        if let (false, Some(table)) = (config.brokers.has(kind), kind.connection_table()) {
            return Err((key("source.broker"), format!("needs a `[brokers.{table}]` table")));
        }
    }
    route
        .source
        .validate(&uses.context)
        .map_err(|(below, message)| (key(&below), message))?;
    if uses.dead_letter.exchange.is_some() && !uses.dead_letter.broker.has_exchanges() {
        return Err((
            key("dead_letter.exchange"),
            format!("does not apply to dead letters on {}", uses.dead_letter.broker.as_str()),
        ));
    }
    Ok(())
}

fn validate_route(route: &RouteConfig, key: &dyn Fn(&str) -> String) -> Result<(), Problem> {
    validate_subject(&route.dead_letter_subject()).map_err(|e| (key("dead_letter.subject"), e.to_string()))?;
    // Dead letters the route itself consumes would fail again, forever.
    let same_subjects = route.dead_letter_broker().shares_subjects_with(route.source.kind());
    if let (true, Some(subject)) = (same_subjects, route.source.subject()) {
        if let Ok(p) = SubjectPattern::parse(subject) {
            if p.matches(&route.dead_letter_subject()) {
                return Err((
                    key("dead_letter.subject"),
                    format!(
                        "`{}` is matched by the route's own source `{subject}`: dead letters would be handled again, in a loop",
                        route.dead_letter_subject(),
                    ),
                ));
            }
        }
    }
    if route.concurrency == 0 || route.concurrency > 10_000 {
        return Err((key("concurrency"), "must be between 1 and 10000".into()));
    }
    if let Some(batch) = &route.batch {
        if batch.max_messages == 0 || batch.max_messages > 10_000 {
            return Err((key("batch.max_messages"), "must be between 1 and 10000".into()));
        }
        if batch.max_wait > std::time::Duration::from_secs(10) {
            return Err((
                key("batch.max_wait"),
                "must be at most 10s (messages wait this long before their batch starts)".into(),
            ));
        }
        if batch.max_bytes == 0 {
            return Err((key("batch.max_bytes"), "must be at least 1".into()));
        }
    }
    let retry = &route.retry;
    if retry.max_attempts == 0 {
        return Err((key("retry.max_attempts"), "must be at least 1".into()));
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return Err((key("retry.multiplier"), "must be a number >= 1".into()));
    }
    if retry.initial_backoff > retry.max_backoff {
        return Err((key("retry.initial_backoff"), "is larger than retry.max_backoff".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_str(text, Path::new("conf/test.toml")).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("data_dir = \"x\"\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 3\n");
        assert!(e.starts_with("conf/test.toml:4:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err("[engine]\nmax_instances = \"many\"\n");
        assert!(e.starts_with("conf/test.toml:2:"), "{e}");
        assert!(e.contains("engine.max_instances"), "{e}");
    }

    #[test]
    fn missing_plugin_file_names_path_key() {
        let e = err("[plugins.p]\n# the file\npath = \"nope.wasm\"\n");
        assert!(e.starts_with("conf/test.toml:3: key `plugins.p.path`"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn empty_config_is_valid() {
        let c = parse_str("", Path::new("x/c.toml")).unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.data_dir, Path::new("x/.sluice"));
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    fn err(route: &str) -> String {
        let text = format!(
            "[plugins.p]\npath = \"p.wasm\"\ntimeout = \"1s\"\n\n[[routes]]\nname = \"r\"\nplugin = \"p\"\nsource = {{ subject = \"in\" }}\n{route}\n"
        );
        parse(&text, Path::new("conf/b.toml"), PluginFiles::MayBeMissing)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_bad_batch_setting_names_its_line_and_key() {
        let e = err("batch = { max_messages = 0 }");
        assert!(e.starts_with("conf/b.toml:9: key `routes.0.batch.max_messages`"), "{e}");
        let e = err("batch = { max_wait = \"1m\" }");
        assert!(
            e.contains("routes.0.batch.max_wait") && e.contains("at most 10s"),
            "{e}"
        );
        let e = err("batch = { max_messages = 8, size = 3 }");
        assert!(e.contains("size"), "{e}");
    }

    #[test]
    fn the_lease_must_outlast_a_batch_deadline() {
        let e = err("batch = { max_messages = 64 }\n[routes.idempotency]\nkey = \"id\"\nlease = \"30s\"");
        assert!(
            e.contains("routes.0.idempotency.lease") && e.contains("per batch"),
            "{e}"
        );
    }
    #[test]
    fn shared_stores_and_replica_names_are_checked() {
        let e = err("[routes.idempotency]\nkey = \"id\"\nstore = \"nats-kv\"");
        assert!(
            e.contains("routes.0.idempotency.store") && e.contains("[brokers.nats]"),
            "{e}"
        );
        let e = err("[routes.idempotency]\nkey = \"id\"\nstore = \"nats-kv\"\n[brokers.nats]\nurl = \"nats://x\"\n[stores]\nnats_kv_bucket = \"a.b\"");
        assert!(e.contains("stores.nats_kv_bucket"), "{e}");
        let text = "instance_id = \"pod 1\"\n";
        let e = parse(text, Path::new("conf/b.toml"), PluginFiles::MayBeMissing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("instance_id"), "{e}");
    }
}
