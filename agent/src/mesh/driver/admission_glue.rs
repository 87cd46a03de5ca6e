//! The driver's side of the pre-authentication limits (`transport::admission`): what
//! happens to each incoming QUIC handshake before anyone is authenticated.

use std::time::Instant;

use super::Driver;
use crate::api::metrics::ReasonLabel;
use crate::transport::admission::Verdict;
use crate::transport::connection;

impl Driver {
    /// Pre-authentication limits (`transport::admission`): take the handshake on, answer
    /// with a Retry, or drop it without a word.
    pub(super) fn on_incoming(&mut self, incoming: quinn::Incoming) {
        let addr = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        match self.admission.judge(Instant::now(), addr.ip(), validated) {
            Verdict::Accept => {
                tokio::spawn(connection::accept(
                    incoming,
                    self.local.clone(),
                    self.events_tx.clone(),
                ));
            }
            Verdict::Retry => {
                self.metrics
                    .handshakes_turned_away
                    .get_or_create(&ReasonLabel { reason: "retry" })
                    .inc();
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
            }
            Verdict::Ignore(why) => {
                self.metrics
                    .handshakes_turned_away
                    .get_or_create(&ReasonLabel { reason: why.name() })
                    .inc();
                incoming.ignore();
            }
        }
    }
}
