//! Failures on a broker's own threads and timers — a background offset
//! commit, an in-progress keepalive, a lost connection — which no message's
//! settle sees. Each is logged and counted here, in one place, as
//! `sluice_broker_errors_total{broker,op}` (the same series the pipeline
//! counts its settle failures in).

use crate::error::Report;
use std::error::Error;

/// Something failed; `e` and its causes are logged.
pub(crate) fn failed(broker: &'static str, op: &'static str, e: &(dyn Error + 'static), consequence: &str) {
    tracing::warn!(broker, op, "{}{consequence}", Report(e));
    count(broker, op);
}

/// A connection was lost (the client reconnects by itself).
pub(crate) fn disconnected(broker: &'static str) {
    tracing::warn!(broker, "connection lost; reconnecting");
    count(broker, "connection");
}

fn count(broker: &'static str, op: &'static str) {
    crate::metrics::broker_errors()
        .get_or_create(&crate::metrics::BrokerErrorLabel {
            broker: broker.to_owned(),
            op: op.to_owned(),
        })
        .inc();
}
