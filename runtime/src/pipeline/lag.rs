//! The route's backlog at its broker, as a gauge an autoscaler can follow
//! (`sluice_route_lag`), and the partitions this replica holds
//! (`sluice_route_partitions`, Kafka): asked every few seconds while the
//! route runs, removed when it stops (a stale figure would scale a deleted
//! route).

use super::Route;
use crate::metrics::RouteLabel;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the broker is asked.
const EVERY: Duration = Duration::from_secs(5);
/// A broker that does not answer by then leaves the last figure standing.
const ASK_TIMEOUT: Duration = Duration::from_secs(4);

impl Route {
    pub(super) async fn report_lag(self: Arc<Self>, shutdown: CancellationToken) {
        let label = RouteLabel {
            route: self.name.clone(),
        };
        loop {
            if let Some(n) = self.source.partitions() {
                self.metrics
                    .route_partitions
                    .get_or_create(&label)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let asked = tokio::select! {
                asked = tokio::time::timeout(ASK_TIMEOUT, self.source.backlog()) => asked,
                _ = shutdown.cancelled() => break,
            };
            match asked {
                Ok(Some(n)) => {
                    self.metrics
                        .route_lag
                        .get_or_create(&label)
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                // The broker keeps no backlog: no series.
                Ok(None) => {}
                Err(_) => tracing::debug!(route = %self.name, "the broker did not tell the backlog in time"),
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.metrics.route_lag.remove(&label);
        self.metrics.route_partitions.remove(&label);
    }
}
