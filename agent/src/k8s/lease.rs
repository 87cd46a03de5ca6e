//! Leader election over a coordination.k8s.io Lease: the single writer for the first IPAM
//! split and for reclaiming deleted Nodes' space.
//!
//! The rule is client-go's: a holder is alive while its record keeps changing; whoever
//! sees the record unchanged for a whole lease duration (by its *own* clock, so skew
//! between nodes does not matter) may take it, and the apiserver's resourceVersion check
//! lets exactly one taker win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

pub const LEASE_NAME: &str = "mesh-leader";
/// How long a silent holder keeps the Lease (client-go's default).
pub const LEASE_SECONDS: i32 = 15;
/// How often the holder renews and the others look.
pub const RETRY: Duration = Duration::from_secs(2);
/// Set once, on the Lease, by the node that makes the first split of the range: nobody
/// else ever splits, even after a leader change before the ring reached everyone.
pub const FIRST_SPLIT_ANNOTATION: &str = "mesh.dev/first-split-by";

/// What identifies one version of the holder's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renewed: Option<String>,
    pub duration: Duration,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renewed: spec.and_then(|s| s.renew_time.as_ref().map(|t| t.0.to_string())),
            duration: Duration::from_secs(
                spec.and_then(|s| s.lease_duration_seconds)
                    .unwrap_or(LEASE_SECONDS)
                    .clamp(1, 3600) as u64,
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: try to take it.
    Take,
    /// Someone else holds it and is alive.
    Follow(String),
}

/// Remembers when the record last changed, by this node's clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    pub fn decide(&mut self, me: &str, record: Record, now: Instant) -> Decision {
        let since = match &self.last {
            Some((r, at)) if *r == record => *at,
            _ => {
                self.last = Some((record.clone(), now));
                now
            }
        };
        match record.holder {
            None => Decision::Take,
            Some(h) if h == me => Decision::Renew,
            Some(_) if now.duration_since(since) >= record.duration => Decision::Take,
            Some(h) => Decision::Follow(h),
        }
    }
}

/// One round: read, then create / renew / take as decided. Returns the Lease as it is now
/// (after our write, if it won) — `Ok(None)` only if our write lost a race (409).
pub async fn round(
    api: &Api<Lease>,
    observer: &mut Observer,
    me: &str,
) -> Result<Option<Lease>, kube::Error> {
    let now = Timestamp::now();
    let Some(current) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.into()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return write(api.create(&PostParams::default(), &lease).await);
    };
    match observer.decide(me, Record::of(&current), Instant::now()) {
        Decision::Follow(_) => Ok(Some(current)),
        Decision::Renew => {
            let mut next = current;
            let spec = next.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            write(api.replace(LEASE_NAME, &PostParams::default(), &next).await)
        }
        Decision::Take => {
            let mut next = current;
            let spec = next.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some(me.into());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            write(api.replace(LEASE_NAME, &PostParams::default(), &next).await)
        }
    }
}

/// Records on the Lease (which we hold, as read in `lease`) that this node makes the
/// first split. `Ok(false)` if another writer got there first.
pub async fn claim_first_split(
    api: &Api<Lease>,
    lease: &Lease,
    me: &str,
) -> Result<bool, kube::Error> {
    if let Some(by) = first_split_by(lease) {
        return Ok(by == me);
    }
    let mut next = lease.clone();
    next.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(FIRST_SPLIT_ANNOTATION.into(), me.into());
    Ok(write(api.replace(LEASE_NAME, &PostParams::default(), &next).await)?.is_some())
}

/// The last reclaim the holder made, written (resourceVersion-checked) just before it.
pub const LAST_RECLAIM_ANNOTATION: &str = "mesh.dev/last-reclaim";

/// Fences a reclaim: records on the Lease, as read in `lease` (which must show us as the
/// holder), that `me` reclaims `peer` now, renewing it in the same write (so nobody can
/// take it for a whole duration from here). `Ok(None)` if anyone wrote the Lease since —
/// perhaps a new holder — in which case the caller must not reclaim.
pub async fn record_reclaim(
    api: &Api<Lease>,
    lease: &Lease,
    me: &str,
    peer: &str,
) -> Result<Option<Lease>, kube::Error> {
    if holder(lease) != Some(me) {
        return Ok(None);
    }
    let mut next = lease.clone();
    next.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            LAST_RECLAIM_ANNOTATION.into(),
            format!("{peer} by {me} at {}", Timestamp::now()),
        );
    let spec = next.spec.get_or_insert_with(Default::default);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    write(api.replace(LEASE_NAME, &PostParams::default(), &next).await)
}

/// Gives the Lease up if `me` holds it (an empty holder and a 1 s duration, as client-go
/// does), so the next round of any other agent takes it. `Ok(false)` if we did not hold it
/// or someone wrote first.
pub async fn release(api: &Api<Lease>, me: &str) -> Result<bool, kube::Error> {
    let Some(current) = api.get_opt(LEASE_NAME).await? else {
        return Ok(false);
    };
    if holder(&current) != Some(me) {
        return Ok(false);
    }
    let mut next = current;
    let spec = next.spec.get_or_insert_with(Default::default);
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    Ok(write(api.replace(LEASE_NAME, &PostParams::default(), &next).await)?.is_some())
}

pub fn first_split_by(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FIRST_SPLIT_ANNOTATION))
        .map(String::as_str)
}

pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// A 409 (someone else wrote in between) is a lost race, not an error.
fn write(result: Result<Lease, kube::Error>) -> Result<Option<Lease>, kube::Error> {
    match result {
        Ok(l) => Ok(Some(l)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, renewed: &str) -> Record {
        Record {
            holder: holder.map(String::from),
            renewed: Some(renewed.into()),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_free_lease_is_taken_and_our_own_is_renewed() {
        let mut o = Observer::default();
        let t = Instant::now();
        assert_eq!(o.decide("a", record(None, "1"), t), Decision::Take);
        assert_eq!(o.decide("a", record(Some("a"), "2"), t), Decision::Renew);
    }

    #[test]
    fn a_live_holder_is_followed_and_a_silent_one_is_replaced_after_the_duration() {
        let mut o = Observer::default();
        let t = Instant::now();
        let b = |r: &str| record(Some("b"), r);
        assert_eq!(o.decide("a", b("1"), t), Decision::Follow("b".into()));
        // Renewals keep it alive, however long in total.
        for i in 1..20u64 {
            let at = t + Duration::from_secs(2 * i);
            assert_eq!(
                o.decide("a", b(&i.to_string()), at),
                Decision::Follow("b".into())
            );
        }
        let last = t + Duration::from_secs(38);
        // Silent for less than the duration: still followed.
        assert_eq!(
            o.decide("a", b("19"), last + Duration::from_secs(14)),
            Decision::Follow("b".into())
        );
        assert_eq!(
            o.decide("a", b("19"), last + Duration::from_secs(15)),
            Decision::Take
        );
    }

    #[test]
    fn expiry_is_judged_by_our_clock_not_the_holders_timestamps() {
        // The holder's renewTime may be far in the past (skewed clock); what counts is that
        // it changes.
        let mut o = Observer::default();
        let t = Instant::now();
        assert_eq!(
            o.decide("a", record(Some("b"), "1970-01-01T00:00:00Z"), t),
            Decision::Follow("b".into())
        );
        assert_eq!(
            o.decide(
                "a",
                record(Some("b"), "1970-01-01T00:00:02Z"),
                t + Duration::from_secs(20)
            ),
            Decision::Follow("b".into())
        );
    }

    #[test]
    fn record_reads_defaults_from_a_sparse_lease() {
        let r = Record::of(&Lease::default());
        assert_eq!(r.holder, None);
        assert_eq!(r.duration, Duration::from_secs(15));
        let l = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(-5),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = Record::of(&l);
        assert_eq!(r.holder, None, "an empty holder is no holder");
        assert_eq!(
            r.duration,
            Duration::from_secs(1),
            "a nonsense duration is clamped"
        );
    }
}
