//! Which incoming QUIC handshakes the agent takes on, before anyone is authenticated.
//!
//! Every accepted handshake costs the node a key exchange and a signature, and anyone who
//! can reach the port can start one from any (spoofed) address. So, pure and sans-IO:
//!
//! - at most `max_in_flight` handshakes at once, and `per_source` from one address;
//! - a token bucket (`rate` per second, `burst`) on handshakes started;
//! - under load (more than `retry_above` in flight, or the bucket empty) a client whose
//!   address is not validated yet gets a stateless QUIC Retry: a spoofed source never
//!   answers it, a real peer retries one round trip later;
//! - whatever is turned away is dropped silently (`Ignore`: no packet back, nothing to
//!   amplify) and counted; the counts are logged at most once per `log_every`.
//!
//! Members of the mesh redial with backoff, so a refused dial of a real peer is retried.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    pub max_in_flight: usize,
    pub per_source: usize,
    pub retry_above: usize,
    pub rate: f64,
    pub burst: f64,
    pub log_every: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_in_flight: 64,
            per_source: 4,
            retry_above: 8,
            rate: 50.0,
            burst: 100.0,
            log_every: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// `max_in_flight` handshakes are already running.
    Full,
    /// This address already has `per_source` handshakes running.
    SourceBusy,
    /// The token bucket is empty and the client's address is validated.
    RateLimited,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Full => "too_many_handshakes",
            Refusal::SourceBusy => "source_busy",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Answer with a stateless Retry (address validation) and forget the attempt.
    Retry,
    Ignore(Refusal),
}

#[derive(Debug)]
pub struct Admission {
    cfg: AdmissionConfig,
    in_flight: usize,
    by_source: HashMap<IpAddr, usize>,
    tokens: f64,
    refilled: Instant,
    /// Turned away since the last log line, by reason; Retry answers counted apart.
    refused: BTreeMap<Refusal, u64>,
    retried: u64,
    last_log: Option<Instant>,
}

impl Admission {
    pub fn new(cfg: AdmissionConfig, now: Instant) -> Admission {
        Admission {
            tokens: cfg.burst,
            cfg,
            in_flight: 0,
            by_source: HashMap::new(),
            refilled: now,
            refused: BTreeMap::new(),
            retried: 0,
            last_log: None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.cfg.rate).min(self.cfg.burst);
        self.refilled = now;
    }

    /// Decides on one incoming handshake from `source` (`validated`: QUIC has already
    /// proven the client owns the address, e.g. it answered a Retry).
    pub fn judge(&mut self, now: Instant, source: IpAddr, validated: bool) -> Verdict {
        self.refill(now);
        let verdict = if self.in_flight >= self.cfg.max_in_flight {
            Verdict::Ignore(Refusal::Full)
        } else if self.by_source.get(&source).copied().unwrap_or(0) >= self.cfg.per_source {
            Verdict::Ignore(Refusal::SourceBusy)
        } else if !validated && (self.in_flight >= self.cfg.retry_above || self.tokens < 1.0) {
            Verdict::Retry
        } else if self.tokens < 1.0 {
            Verdict::Ignore(Refusal::RateLimited)
        } else {
            self.tokens -= 1.0;
            self.in_flight += 1;
            *self.by_source.entry(source).or_default() += 1;
            Verdict::Accept
        };
        match verdict {
            Verdict::Ignore(r) => *self.refused.entry(r).or_default() += 1,
            Verdict::Retry => self.retried += 1,
            Verdict::Accept => {}
        }
        verdict
    }

    /// An accepted handshake from `source` is over (established or failed).
    pub fn finished(&mut self, source: IpAddr) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// A line about what was turned away since the last one, at most once per
    /// `log_every` (a flood is one line per period, not one per packet).
    pub fn report(&mut self, now: Instant) -> Option<String> {
        if self.refused.is_empty() && self.retried == 0 {
            return None;
        }
        if self
            .last_log
            .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.log_every)
        {
            return None;
        }
        self.last_log = Some(now);
        let mut parts: Vec<String> = self
            .refused
            .iter()
            .map(|(r, n)| format!("{n} {}", r.name()))
            .collect();
        if self.retried > 0 {
            parts.push(format!("{} answered with a Retry", self.retried));
        }
        self.refused.clear();
        self.retried = 0;
        Some(parts.join(", "))
    }

    /// What was turned away since the last report, for metrics.
    pub fn pending_counts(&self) -> (u64, u64) {
        (self.refused.values().sum(), self.retried)
    }
}

/// At most one log line per period; what falls in between is counted and reported with
/// the next line (a flood of failed handshakes from new addresses is one line per period).
#[derive(Debug)]
pub struct LogBudget {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(every: Duration) -> LogBudget {
        LogBudget {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, mentioning the `n` lines suppressed since the last one.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 168, 9, n])
    }

    fn small() -> AdmissionConfig {
        AdmissionConfig {
            max_in_flight: 4,
            per_source: 2,
            retry_above: 2,
            rate: 10.0,
            burst: 3.0,
            log_every: Duration::from_secs(10),
        }
    }

    #[test]
    fn under_load_unvalidated_clients_get_a_retry_and_validated_ones_a_slot() {
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        assert_eq!(a.judge(t0, ip(1), false), Verdict::Accept);
        assert_eq!(a.judge(t0, ip(2), false), Verdict::Accept);
        // Two in flight: above `retry_above`, a new address must prove itself first.
        assert_eq!(a.judge(t0, ip(3), false), Verdict::Retry);
        assert_eq!(a.judge(t0, ip(3), true), Verdict::Accept);
        assert_eq!(a.in_flight(), 3);
    }

    #[test]
    fn the_caps_hold_and_slots_come_back_when_handshakes_end() {
        let t0 = Instant::now();
        let mut cfg = small();
        cfg.burst = 100.0;
        let mut a = Admission::new(cfg, t0);
        assert_eq!(a.judge(t0, ip(1), true), Verdict::Accept);
        assert_eq!(a.judge(t0, ip(1), true), Verdict::Accept);
        assert_eq!(
            a.judge(t0, ip(1), true),
            Verdict::Ignore(Refusal::SourceBusy)
        );
        assert_eq!(a.judge(t0, ip(2), true), Verdict::Accept);
        assert_eq!(a.judge(t0, ip(3), true), Verdict::Accept);
        assert_eq!(a.judge(t0, ip(4), true), Verdict::Ignore(Refusal::Full));
        a.finished(ip(1));
        assert_eq!(a.judge(t0, ip(4), true), Verdict::Accept);
    }

    #[test]
    fn the_bucket_limits_the_rate_and_refills() {
        let t0 = Instant::now();
        let mut cfg = small();
        cfg.max_in_flight = 100;
        cfg.retry_above = 100;
        cfg.per_source = 100;
        let mut a = Admission::new(cfg, t0);
        for _ in 0..3 {
            assert_eq!(a.judge(t0, ip(1), true), Verdict::Accept);
            a.finished(ip(1));
        }
        assert_eq!(
            a.judge(t0, ip(1), true),
            Verdict::Ignore(Refusal::RateLimited)
        );
        assert_eq!(a.judge(t0, ip(1), false), Verdict::Retry);
        // 10 per second: one more after 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(a.judge(t1, ip(1), true), Verdict::Accept);
    }

    #[test]
    fn the_log_budget_counts_what_it_holds_back() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(Duration::from_secs(10));
        assert_eq!(b.allow(t0), Some(0));
        assert_eq!(b.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(b.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(b.allow(t0 + Duration::from_secs(10)), Some(2));
    }

    #[test]
    fn refusals_are_reported_once_per_period() {
        let t0 = Instant::now();
        let mut cfg = small();
        cfg.burst = 100.0;
        let mut a = Admission::new(cfg, t0);
        for n in 0..10 {
            a.judge(t0, ip(n), true);
        }
        let line = a.report(t0).expect("a line");
        assert!(line.contains("too_many_handshakes"), "{line}");
        a.judge(t0, ip(50), true);
        assert_eq!(a.report(t0 + Duration::from_secs(1)), None);
        assert!(a.report(t0 + Duration::from_secs(11)).is_some());
        assert_eq!(a.report(t0 + Duration::from_secs(30)), None, "nothing new");
    }
}
