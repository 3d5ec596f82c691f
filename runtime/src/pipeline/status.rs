//! What the status page and `/readyz` show of a route: the same counters
//! as `/metrics` (read, never kept twice), the last error, and whether its
//! workers run.

use crate::metrics::MessageOutcome;
use crate::metrics::RouteMetrics;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The last error of a route; carried over when a reload rebuilds it (the
/// counters carry over in the metrics registry).
#[derive(Default)]
pub struct RouteStatus {
    last_error: Mutex<Option<String>>,
}

impl RouteStatus {
    pub(super) fn set_error(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(crate::engine::bounded(error));
        }
    }

    pub fn view(&self, series: &RouteMetrics) -> RouteStatusView {
        RouteStatusView {
            handled: series.counter(MessageOutcome::Ok).get(),
            retried: series.counter(MessageOutcome::Retry).get(),
            dead_lettered: series.counter(MessageOutcome::DeadLetter).get(),
            in_flight: u64::try_from(series.in_flight.get()).unwrap_or(0),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStatusView {
    pub handled: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub last_error: Option<String>,
}

/// Whether a route's workers run: a route that should serve and has no
/// worker left cannot (`/readyz` says so).
#[derive(Default)]
pub struct Liveness {
    workers: AtomicU64,
    spawned: AtomicBool,
    stopping: AtomicBool,
}

impl Liveness {
    /// Spawned, not being stopped, and no worker task left.
    pub fn stalled(&self) -> bool {
        self.spawned.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
            && self.workers.load(Ordering::Relaxed) == 0
    }

    /// The route is being stopped on purpose (shutdown, reload).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub(super) fn spawned(&self) {
        self.spawned.store(true, Ordering::Relaxed);
    }
}

/// Counts one worker task for as long as it lives, however it ends.
pub(super) struct WorkerAlive(Arc<Liveness>);

impl WorkerAlive {
    /// Taken before the task is spawned, so the count is right the moment
    /// the route's `spawn` returns.
    pub(super) fn new(liveness: &Arc<Liveness>) -> Self {
        liveness.workers.fetch_add(1, Ordering::Relaxed);
        Self(liveness.clone())
    }
}

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Ordering::Relaxed);
    }
}
