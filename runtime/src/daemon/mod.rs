//! The daemon: assembles brokers, plugins and routes from a config, serves
//! the admin API, applies hot reloads, and stops gracefully.

mod assemble;
pub mod dev;
mod supervisor;
pub mod watch;

pub use assemble::*;
pub use supervisor::Supervisor;

use crate::admin;
use crate::config::Config;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How `sluice run` / `sluice dev` behave beyond the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Watch the config and plugin files and reload them on change.
    pub watch: bool,
    /// Also rebuild plugin crates on source changes (`sluice dev`).
    pub rebuild: bool,
}

/// Runs the daemon until SIGTERM or SIGINT; then stops fetching, lets
/// in-flight messages finish within the grace period, and returns. A second
/// signal ends the process at once.
pub async fn run(config: Config, options: RunOptions) -> Result<(), DaemonError> {
    // Installed first: a signal during start-up is not lost.
    let mut signals = Signals::new();
    if let Some(id) = &config.instance_id {
        crate::message::set_instance_id(id);
    }
    if let Some(endpoint) = config.telemetry.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        crate::telemetry::otlp::start(endpoint, &config.telemetry.service_name);
    }
    let mut supervisor = Supervisor::open(config).await?;
    let state = supervisor.state();
    let listen = supervisor.config().admin.listen;
    let admin_stop = CancellationToken::new();
    let admin = admin::serve(listen, state.clone(), admin_stop.clone())
        .await
        .map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;

    let (mut watcher, mut changes) = if options.watch {
        match watch::FileWatcher::new() {
            Ok((w, rx)) => (Some(w), Some(rx)),
            Err(e) => {
                tracing::warn!("hot reload is off: {}", crate::error::Report(&e));
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    watch_files(&mut watcher, &supervisor);
    let rebuilder = options.rebuild.then(|| dev::spawn_rebuilder(supervisor.config()));

    supervisor.start_routes();
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(admin = %listen, watch = options.watch, instance = crate::message::instance_id(), "sluice is running");

    loop {
        tokio::select! {
            _ = signals.recv() => break,
            Some(paths) = next_change(&mut changes) => {
                supervisor.changed(&paths).await;
                // A reload may name new plugin files.
                watch_files(&mut watcher, &supervisor);
            }
        }
    }

    tracing::info!(grace = ?supervisor.config().shutdown_grace, "stopping: no new messages; waiting for in-flight ones");
    state.ready.store(false, Ordering::Relaxed);
    tokio::spawn(async move {
        signals.recv().await;
        tracing::warn!("second signal: exiting now; unsettled messages will be redelivered");
        std::process::exit(130);
    });
    if let Some(r) = rebuilder {
        r.abort();
    }
    drop(watcher);
    supervisor.shutdown().await;
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    tracing::info!("stopped");
    Ok(())
}

fn watch_files(watcher: &mut Option<watch::FileWatcher>, supervisor: &Supervisor) {
    if let Some(w) = watcher {
        for file in supervisor.watched_files() {
            if let Err(e) = w.watch_file(&file) {
                tracing::warn!("{}; changes to it will not be reloaded", crate::error::Report(&e));
            }
        }
    }
}

async fn next_change(
    changes: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Vec<std::path::PathBuf>>>,
) -> Option<Vec<std::path::PathBuf>> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// SIGTERM and SIGINT, listened to from start-up on.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn recv(&mut self) {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
