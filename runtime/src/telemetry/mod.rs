//! Logging: human-readable by default, JSON on request; `RUST_LOG` filters.
//! Optional export of message spans to an OpenTelemetry collector.

pub mod otlp;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

const DEFAULT_FILTER: &str = "info,cranelift_codegen=warn,wasmtime=warn";

/// Installs the global subscriber; writes to stderr so stdout stays for
/// command output (`sluice invoke` prints JSON there).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    // Already installed (tests): keep the first.
    let _ = result;
}
