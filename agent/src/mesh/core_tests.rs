//! Unit tests of `MeshCore` edge cases that the simulator reaches only by chance.

use std::time::{Duration, Instant};

use mesh_proto::gossip::{GossipMessage, Liveness, LivenessClaim, MemberUpdate};
use mesh_proto::peer::Capabilities;
use mesh_proto::{PeerId, PeerRecord};

use super::{CoreConfig, Input, MeshCore, MeshEvent, Output};

fn record(id: u64, name: &str, incarnation: u64) -> PeerRecord {
    PeerRecord {
        id: PeerId(id),
        name: name.into(),
        incarnation,
        version: 0,
        addresses: vec![],
        capabilities: Capabilities::default(),
        connections: vec![],
    }
}

fn update(rec: PeerRecord, state: Liveness, incarnation: u64) -> Input {
    let msg = GossipMessage::Updates {
        updates: vec![MemberUpdate {
            record: rec,
            liveness: LivenessClaim { state, incarnation },
        }],
    };
    Input::Message {
        from: PeerId(99),
        msg,
    }
}

#[test]
fn a_suspicion_that_moves_to_a_newer_incarnation_still_ends_in_dead() {
    let t0 = Instant::now();
    let mut core = MeshCore::new(CoreConfig::default(), record(1, "me", 1), t0);
    core.handle(t0, update(record(2, "b", 3), Liveness::Alive, 3));
    core.handle(t0, update(record(2, "b", 3), Liveness::Suspect, 3));
    // The peer refuted elsewhere and was suspected again at its new incarnation.
    core.handle(
        t0 + Duration::from_secs(1),
        update(record(2, "b", 4), Liveness::Suspect, 4),
    );
    let mut now = t0;
    while now < t0 + Duration::from_secs(30) {
        now += Duration::from_millis(100);
        core.handle(now, Input::Timer);
    }
    let m = core.member(&PeerId(2)).unwrap();
    assert_eq!(
        (m.liveness.state, m.liveness.incarnation),
        (Liveness::Dead, 4)
    );
}

#[test]
fn a_record_with_our_id_but_another_name_is_reported_not_refuted() {
    let t0 = Instant::now();
    let mut core = MeshCore::new(CoreConfig::default(), record(1, "me", 1), t0);
    let out = core.handle(t0, update(record(1, "clone", 5), Liveness::Alive, 5));
    assert!(out.iter().any(
        |o| matches!(o, Output::Event(MeshEvent::IdCollision { name, .. }) if name == "clone")
    ));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::PersistIncarnation(_))));
    assert_eq!(core.own_record().incarnation, 1);
}

#[test]
fn refutation_is_persisted_before_it_is_announced_and_absurd_claims_are_ignored() {
    let t0 = Instant::now();
    let mut core = MeshCore::new(CoreConfig::default(), record(1, "me", 1), t0);
    let out = core.handle(t0, update(record(1, "me", 1), Liveness::Dead, 7));
    let persist = out
        .iter()
        .position(|o| matches!(o, Output::PersistIncarnation(8)));
    let first_send = out.iter().position(|o| matches!(o, Output::Send { .. }));
    assert!(persist.is_some());
    assert!(first_send.is_none_or(|s| persist.unwrap() < s));
    assert_eq!(core.own_record().incarnation, 8);
    let out = core.handle(t0, update(record(1, "me", 1), Liveness::Dead, u64::MAX));
    assert!(!out
        .iter()
        .any(|o| matches!(o, Output::PersistIncarnation(_))));
    assert_eq!(core.own_record().incarnation, 8);
}
