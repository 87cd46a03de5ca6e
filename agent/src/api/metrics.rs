//! Prometheus metrics (prometheus-client), served on `--metrics-addr` (loopback by default).
//!
//! Counters are bumped by the driver as things happen; gauges are refreshed from the
//! driver's state on every maintenance tick, so a scrape never waits on the driver.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GossipLabel {
    pub direction: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub connections: Family<StateLabel, Gauge>,
    pub peers: Family<StateLabel, Gauge>,
    pub gossip_messages: Family<GossipLabel, Counter>,
    pub gossip_bytes: Family<DirectionLabel, Counter>,
    pub gossip_dropped: Counter,
    pub detector_events: Family<EventLabel, Counter>,
    pub connection_failures: Family<DirectionLabel, Counter>,
    pub handshakes_turned_away: Family<ReasonLabel, Counter>,
    pub ipam_addresses: Family<KindLabel, Gauge>,
    pub ipam_unreachable_share: Gauge<f64, AtomicU64>,
    pub ipam_pending_requests: Gauge,
    pub ipam_events: Family<EventLabel, Counter>,
    pub forwarder_packets: Family<DirectionLabel, Counter>,
    pub forwarder_bytes: Family<DirectionLabel, Counter>,
    pub forwarder_sends: Counter,
    pub forwarder_dropped: Family<ReasonLabel, Counter>,
    pub forwarder_errors: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("mesh");
        let connections = Family::<StateLabel, Gauge>::default();
        registry.register(
            "connections",
            "Control connections by state",
            connections.clone(),
        );
        let peers = Family::<StateLabel, Gauge>::default();
        registry.register(
            "peers",
            "Known peers by liveness state, this node included",
            peers.clone(),
        );
        let gossip_messages = Family::<GossipLabel, Counter>::default();
        registry.register(
            "gossip_messages",
            "Topology gossip messages by direction and kind",
            gossip_messages.clone(),
        );
        let gossip_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "gossip_bytes",
            "Topology gossip bytes on the wire by direction",
            gossip_bytes.clone(),
        );
        let gossip_dropped = Counter::default();
        registry.register(
            "gossip_dropped",
            "Gossip messages dropped because a peer's send queue was full or no connection came up",
            gossip_dropped.clone(),
        );
        let detector_events = Family::<EventLabel, Counter>::default();
        registry.register(
            "failure_detector_events",
            "Failure detector events: probe_failed, indirect_probe, suspect, dead, alive, left, refuted",
            detector_events.clone(),
        );
        let connection_failures = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "connection_failures",
            "Failed dials (out) and refused or failed inbound connections (in)",
            connection_failures.clone(),
        );
        let handshakes_turned_away = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "handshakes_turned_away",
            "Incoming QUIC handshakes not taken on before authentication: retry (answered with a QUIC Retry), too_many_handshakes, source_busy, rate_limited",
            handshakes_turned_away.clone(),
        );
        let ipam_addresses = Family::<KindLabel, Gauge>::default();
        registry.register(
            "ipam_addresses",
            "Addresses of this node: owned, used (pods and gateway), free",
            ipam_addresses.clone(),
        );
        let ipam_unreachable_share = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "ipam_unreachable_share",
            "Share of the range owned by peers this node cannot reach",
            ipam_unreachable_share.clone(),
        );
        let ipam_pending_requests = Gauge::default();
        registry.register(
            "ipam_pending_requests",
            "Space requests this node is waiting on",
            ipam_pending_requests.clone(),
        );
        let ipam_events = Family::<EventLabel, Counter>::default();
        registry.register(
            "ipam_events",
            "IPAM events: split, space_requested, space_granted, space_denied, reclaimed, reclaim_refused, conflict, refused_peer, bad_entry",
            ipam_events.clone(),
        );
        let forwarder_packets = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "forwarder_packets",
            "udp backend: pod packets sent to (tx) and received from (rx) other nodes",
            forwarder_packets.clone(),
        );
        let forwarder_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "forwarder_bytes",
            "udp backend: pod packet bytes (inner IP) by direction",
            forwarder_bytes.clone(),
        );
        let forwarder_sends = Counter::default();
        registry.register(
            "forwarder_sends",
            "udp backend: sendmsg calls (each carries a UDP GSO run of datagrams)",
            forwarder_sends.clone(),
        );
        let forwarder_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "forwarder_dropped",
            "udp backend: packets dropped: no_route, not_ipv4, foreign (not from a mesh node), spoofed_source (inner source not the sending node's), malformed",
            forwarder_dropped.clone(),
        );
        let forwarder_errors = Counter::default();
        registry.register(
            "forwarder_errors",
            "udp backend: failed socket or TUN operations",
            forwarder_errors.clone(),
        );
        Arc::new(Metrics {
            forwarder_packets,
            forwarder_bytes,
            forwarder_sends,
            forwarder_dropped,
            forwarder_errors,
            ipam_addresses,
            ipam_unreachable_share,
            ipam_pending_requests,
            ipam_events,
            registry,
            connections,
            peers,
            gossip_messages,
            gossip_bytes,
            gossip_dropped,
            detector_events,
            connection_failures,
            handshakes_turned_away,
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
