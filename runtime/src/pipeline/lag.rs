//! The route's backlog at its broker, as a gauge an autoscaler can follow
//! (`sluice_route_lag`), the age of its oldest unsettled message where the
//! broker tells (`sluice_route_oldest_unacked_seconds`), and the partitions
//! this replica holds
//! (`sluice_route_partitions`, Kafka): asked every few seconds while the
//! route runs, removed when it stops (a stale figure would scale a deleted
//! route).

use super::Route;
use crate::brokers::Backlog;
use crate::metrics::RouteLabel;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the broker is asked.
const EVERY: Duration = Duration::from_secs(5);
/// A broker that does not answer by then has missed one reading.
const ASK_TIMEOUT: Duration = Duration::from_secs(4);
/// Readings missed in a row before the figures are removed: an old figure
/// would scale on what is no longer true, an absent one says "unknown".
const MISSES_KEPT: u32 = 2;

impl Route {
    pub(super) async fn report_lag(self: Arc<Self>, shutdown: CancellationToken) {
        let label = RouteLabel {
            route: self.name.clone(),
        };
        let reporter = self.metrics.report_backlog(&self.name);
        // A rebuilt route's old figures are not this source's (it may not
        // tell a backlog at all): read afresh below.
        self.metrics.route_lag.remove(&label);
        self.metrics.route_oldest_unacked.remove(&label);
        self.metrics.route_partitions.remove(&label);
        let mut missed = 0u32;
        // A source that never told keeps no backlog (core NATS): no series.
        let mut told = false;
        loop {
            if let Some(n) = self.source.partitions() {
                self.metrics
                    .route_partitions
                    .get_or_create(&label)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let asked = tokio::select! {
                asked = tokio::time::timeout(ASK_TIMEOUT, self.source.backlog()) => asked.ok().flatten(),
                _ = shutdown.cancelled() => break,
            };
            match asked {
                Some(backlog) => {
                    missed = 0;
                    told = true;
                    self.show_backlog(&label, backlog);
                }
                None if told => {
                    missed += 1;
                    tracing::debug!(route = %self.name, missed, "the broker did not tell the backlog");
                    if missed > MISSES_KEPT {
                        self.metrics.route_lag.remove(&label);
                        self.metrics.route_oldest_unacked.remove(&label);
                    }
                }
                None => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // A route rebuilt by a reload reports on from its new task (the
        // old one is cancelled first, but nothing orders its last poll).
        if self.metrics.stop_reporting_backlog(&self.name, reporter) {
            self.metrics.route_lag.remove(&label);
            self.metrics.route_oldest_unacked.remove(&label);
            self.metrics.route_partitions.remove(&label);
        }
    }

    fn show_backlog(&self, label: &RouteLabel, backlog: Backlog) {
        self.metrics
            .route_lag
            .get_or_create(label)
            .set(i64::try_from(backlog.messages).unwrap_or(i64::MAX));
        let age = match backlog.oldest_ms {
            _ if backlog.messages == 0 => Some(0.0),
            // A timestamp ahead of this clock (skew, or a producer's own
            // Kafka timestamp) reads as new, not negative.
            Some(at) => Some(now_ms().saturating_sub(at) as f64 / 1000.0),
            None => None,
        };
        match age {
            Some(seconds) => {
                self.metrics.route_oldest_unacked.get_or_create(label).set(seconds);
            }
            None => {
                self.metrics.route_oldest_unacked.remove(label);
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
