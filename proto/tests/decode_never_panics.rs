//! Property tests: decoding arbitrary or mutated bytes returns an error or a value, never a panic,
//! and every value round-trips.

use mesh_proto::gossip::{DigestEntry, GossipMessage, Liveness, LivenessClaim, MemberUpdate};
use mesh_proto::peer::{Capabilities, LinkSummary, PeerId, PeerRecord};
use mesh_proto::wire::{self, Frame, Hello, HelloReply, RefuseReason};
use proptest::prelude::*;

fn liveness() -> impl Strategy<Value = LivenessClaim> {
    (0u8..4, any::<u64>()).prop_map(|(s, incarnation)| LivenessClaim {
        state: [
            Liveness::Alive,
            Liveness::Suspect,
            Liveness::Dead,
            Liveness::Left,
        ][s as usize],
        incarnation,
    })
}

fn record() -> impl Strategy<Value = PeerRecord> {
    (
        any::<u64>(),
        "[a-z0-9-]{0,20}",
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec((any::<[u8; 4]>(), any::<u16>()), 0..3),
        prop::option::of(any::<[u8; 6]>()),
        prop::collection::vec((any::<u64>(), any::<bool>()), 0..5),
    )
        .prop_map(
            |(id, name, incarnation, version, addrs, mac, links)| PeerRecord {
                id: PeerId(id),
                name,
                incarnation,
                version,
                addresses: addrs
                    .into_iter()
                    .map(|(ip, port)| (ip, port).into())
                    .collect(),
                capabilities: Capabilities {
                    dataplanes: vec!["vxlan".into()],
                    vtep_mac: mac,
                    vxlan_port: Some(8472),
                    authenticated: true,
                },
                connections: links
                    .into_iter()
                    .map(|(p, outbound)| LinkSummary {
                        peer: PeerId(p),
                        outbound,
                    })
                    .collect(),
            },
        )
}

fn updates() -> impl Strategy<Value = Vec<MemberUpdate>> {
    let update =
        (record(), liveness()).prop_map(|(record, liveness)| MemberUpdate { record, liveness });
    prop::collection::vec(update, 0..4)
}

fn message() -> impl Strategy<Value = GossipMessage> {
    prop_oneof![
        (any::<u64>(), updates()).prop_map(|(seq, updates)| GossipMessage::Ping { seq, updates }),
        (any::<u64>(), updates()).prop_map(|(seq, updates)| GossipMessage::Ack { seq, updates }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, t)| GossipMessage::PingReq {
            seq,
            target: PeerId(t)
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, t)| GossipMessage::IndirectAck {
            seq,
            target: PeerId(t)
        }),
        updates().prop_map(|updates| GossipMessage::Updates { updates }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(hash, members)| GossipMessage::DigestSummary { hash, members }),
        prop::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), liveness()), 0..8)
            .prop_map(|e| GossipMessage::Digest {
                entries: e
                    .into_iter()
                    .map(|(id, incarnation, version, liveness)| DigestEntry {
                        id: PeerId(id),
                        incarnation,
                        version,
                        liveness
                    })
                    .collect(),
            }),
        prop::collection::vec(any::<u64>(), 0..8).prop_map(|ids| GossipMessage::Pull {
            ids: ids.into_iter().map(PeerId).collect()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode_body::<Frame>(&bytes);
        let _ = wire::decode_body::<HelloReply>(&bytes);
        let _ = wire::decode_hello(&bytes);
        if bytes.len() >= 4 {
            let _ = wire::frame_len(bytes[..4].try_into().unwrap());
        }
    }

    #[test]
    fn frames_round_trip(msg in message()) {
        let frame = wire::encode_frame(&Frame::Gossip(msg.clone())).unwrap();
        let len = wire::frame_len(frame[..4].try_into().unwrap()).unwrap();
        prop_assert_eq!(len, frame.len() - 4);
        let back: Frame = wire::decode_body(&frame[4..]).unwrap();
        prop_assert_eq!(back, Frame::Gossip(msg));
    }

    #[test]
    fn mutated_frames_never_panic(
        msg in message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut body = postcard::to_allocvec(&Frame::Gossip(msg)).unwrap();
        for (i, b) in flips {
            let at = i.index(body.len());
            body[at] ^= b;
        }
        let _ = wire::decode_body::<Frame>(&body);
        let cut_at = cut.index(body.len() + 1);
        let _ = wire::decode_body::<Frame>(&body[..cut_at]);
        let _ = wire::decode_hello(&body[..cut_at]);
    }

    #[test]
    fn handshake_round_trips(rec in record(), min in any::<u16>(), max in any::<u16>()) {
        let hello = Hello { magic: wire::MAGIC, min_version: min, max_version: max, record: rec.clone() };
        let frame = wire::encode_frame(&hello).unwrap();
        let (head, full) = wire::decode_hello(&frame[4..]).unwrap();
        prop_assert_eq!((head.min_version, head.max_version), (min, max));
        prop_assert_eq!(full.unwrap(), hello);
        let replies = [
            HelloReply::Welcome { version: min, record: rec },
            HelloReply::Refuse { reason: RefuseReason::ProtocolVersion { ours: (1, 1), theirs: (min, max) } },
        ];
        for reply in replies {
            let frame = wire::encode_frame(&reply).unwrap();
            prop_assert_eq!(wire::decode_body::<HelloReply>(&frame[4..]).unwrap(), reply);
        }
    }
}
