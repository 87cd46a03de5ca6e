//! The driver's book of control connections: established links (one per peer), dial
//! targets with their jittered exponential backoff, and recent inbound failures.
//!
//! Owns no task and no policy about *whom* to connect to (the core's neighbour set and
//! `--peers` decide); it knows *how*: when to retry, which duplicate wins, what to show.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_proto::api::ConnectionView;
use mesh_proto::PeerId;
use rand::Rng;
use tokio::sync::mpsc;

use crate::transport::connection::Direction;

const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Inbound failures stay visible this long.
const INBOUND_FAILURE_TTL: Duration = Duration::from_secs(300);
const MAX_INBOUND_FAILURES: usize = 64;
/// Messages held for a peer while its connection is being dialed.
const MAX_PENDING: usize = 32;

pub struct Link {
    pub id: u64,
    pub name: String,
    /// The peer's incarnation when the link was made: a restarted peer's new link wins.
    pub incarnation: u64,
    pub addr: SocketAddr,
    pub direction: Direction,
    pub conn: quinn::Connection,
    pub tx: mpsc::Sender<Vec<u8>>,
    pub since: Instant,
    /// Since when an outbound link has been neither a neighbour nor a `--peers` target.
    pub unneeded_since: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DialRole {
    /// Dialed only to deliver a message; forgotten when no longer needed.
    OnDemand,
    /// One of the core's chosen neighbours.
    Neighbour,
    /// From `--peers`: always kept.
    Persistent,
}

pub struct Dial {
    pub role: DialRole,
    pub peer: Option<PeerId>,
    pub in_flight: bool,
    pub attempts: u32,
    pub next_try: Instant,
    pub last_error: Option<String>,
    pub since: Instant,
}

/// A link that dies sooner than this after being made counts as a failed attempt, so a
/// peer that accepts and then drops us is retried with growing backoff, not every second.
const SHORT_LIVED: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Links {
    pub links: BTreeMap<PeerId, Link>,
    /// Dial targets by their text: `host:port` from `--peers` (resolved on every attempt)
    /// or a peer's advertised `ip:port`.
    pub dials: BTreeMap<String, Dial>,
    pub pending: BTreeMap<PeerId, Vec<Vec<u8>>>,
    pub inbound_failures: BTreeMap<SocketAddr, (String, Instant)>,
    next_id: u64,
}

/// Which of two connections between the same pair survives: the one dialed by the lower
/// peer id. Both ends compute the same answer, so exactly one connection remains.
pub fn preferred_dialer(me: PeerId, peer: PeerId) -> PeerId {
    me.min(peer)
}

pub fn backoff(attempts: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempts.min(5));
    let capped = exp.min(BACKOFF_MAX);
    // Jitter in [0.5, 1.5) so peers that failed together do not retry together.
    capped.mul_f64(rand::rng().random_range(0.5..1.5))
}

impl Links {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Makes sure `target` is dialed with at least `role`.
    pub fn want(&mut self, target: String, peer: Option<PeerId>, role: DialRole, now: Instant) {
        let d = self.dials.entry(target).or_insert(Dial {
            role,
            peer,
            in_flight: false,
            attempts: 0,
            next_try: now,
            last_error: None,
            since: now,
        });
        d.role = d.role.max(role);
        if d.peer.is_none() {
            d.peer = peer;
        }
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.links.contains_key(peer)
    }

    /// Queues a frame for a peer whose connection is not up yet. False when full.
    pub fn hold(&mut self, peer: PeerId, frame: Vec<u8>) -> bool {
        let q = self.pending.entry(peer).or_default();
        if q.len() >= MAX_PENDING {
            return false;
        }
        q.push(frame);
        true
    }

    pub fn dial_failed(&mut self, target: &str, reason: String, now: Instant) -> Option<PeerId> {
        let d = self.dials.get_mut(target)?;
        d.in_flight = false;
        d.attempts = d.attempts.saturating_add(1);
        d.next_try = now + backoff(d.attempts);
        if d.last_error.as_deref() != Some(reason.as_str()) {
            d.since = now;
        }
        d.last_error = Some(reason);
        let peer = d.peer;
        if let Some(p) = peer {
            self.pending.remove(&p);
        }
        peer
    }

    pub fn dial_succeeded(&mut self, target: &str, peer: PeerId, now: Instant) {
        if let Some(d) = self.dials.get_mut(target) {
            d.in_flight = false;
            d.attempts = 0;
            d.peer = Some(peer);
            d.last_error = None;
            d.since = now;
        }
    }

    /// A link went down: its dial target (if any) retries after a pause that grows when
    /// links keep dying young.
    pub fn link_lost(&mut self, peer: PeerId, reason: &str, lived: Duration, now: Instant) {
        for d in self.dials.values_mut().filter(|d| d.peer == Some(peer)) {
            d.attempts = if lived < SHORT_LIVED {
                d.attempts.saturating_add(1).max(1)
            } else {
                1
            };
            d.next_try = now + backoff(d.attempts - 1);
            d.last_error = Some(reason.to_string());
            d.since = now;
        }
    }

    pub fn inbound_failed(&mut self, addr: SocketAddr, reason: String, now: Instant) {
        self.inbound_failures.insert(addr, (reason, now));
        if self.inbound_failures.len() > MAX_INBOUND_FAILURES {
            if let Some(oldest) = self
                .inbound_failures
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a)
            {
                self.inbound_failures.remove(&oldest);
            }
        }
    }

    pub fn expire(&mut self, now: Instant) {
        self.inbound_failures
            .retain(|_, (_, t)| now.duration_since(*t) < INBOUND_FAILURE_TTL);
    }

    /// Rows for `meshctl status connections`: established links, dial targets that are
    /// not connected (pending or retrying, with why), and recent inbound failures.
    pub fn views(
        &self,
        names: impl Fn(&PeerId) -> Option<String>,
        dataplane: impl Fn(Option<&PeerId>) -> String,
        now: Instant,
    ) -> Vec<ConnectionView> {
        let mut rows = Vec::new();
        for (peer, l) in &self.links {
            rows.push(ConnectionView {
                peer: l.name.clone(),
                peer_id: peer.to_string(),
                address: l.addr.to_string(),
                direction: l.direction.as_str().into(),
                state: "established".into(),
                reason: String::new(),
                dataplane: dataplane(Some(peer)),
                since_seconds: now.duration_since(l.since).as_secs(),
            });
        }
        for (target, d) in &self.dials {
            if d.role == DialRole::OnDemand || d.peer.is_some_and(|p| self.links.contains_key(&p)) {
                continue;
            }
            let (state, reason) = match &d.last_error {
                None => ("pending".to_string(), String::new()),
                Some(e) => (format!("retrying: {e}"), e.clone()),
            };
            rows.push(ConnectionView {
                peer: d.peer.and_then(|p| names(&p)).unwrap_or_default(),
                peer_id: d.peer.map(|p| p.to_string()).unwrap_or_default(),
                address: target.clone(),
                direction: "out".into(),
                state,
                reason,
                dataplane: dataplane(d.peer.as_ref()),
                since_seconds: now.duration_since(d.since).as_secs(),
            });
        }
        for (addr, (reason, at)) in &self.inbound_failures {
            rows.push(ConnectionView {
                peer: String::new(),
                peer_id: String::new(),
                address: addr.to_string(),
                direction: "in".into(),
                state: format!("failed: {reason}"),
                reason: reason.clone(),
                dataplane: dataplane(None),
                since_seconds: now.duration_since(*at).as_secs(),
            });
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempts in 0..20 {
            let b = backoff(attempts);
            assert!(b <= BACKOFF_MAX.mul_f64(1.5));
            assert!(b >= BACKOFF_BASE.mul_f64(0.5));
        }
        let early: Duration = (0..50).map(|_| backoff(1)).sum();
        let late: Duration = (0..50).map(|_| backoff(4)).sum();
        assert!(late > early * 4);
    }

    #[test]
    fn tie_break_is_symmetric() {
        assert_eq!(
            preferred_dialer(PeerId(3), PeerId(9)),
            preferred_dialer(PeerId(9), PeerId(3))
        );
    }

    #[test]
    fn failed_dial_shows_as_retrying_with_reason() {
        let mut l = Links::default();
        let now = Instant::now();
        let target = "127.0.0.1:1".to_string();
        l.want(target.clone(), None, DialRole::Persistent, now);
        l.dial_failed(
            &target,
            "authentication failed: bad certificate".into(),
            now,
        );
        let rows = l.views(|_| None, |_| "none".to_string(), now);
        assert_eq!(rows.len(), 1);
        assert!(rows[0].state.starts_with("retrying: authentication failed"));
        assert!(l.dials[&target].next_try > now);
    }
}
