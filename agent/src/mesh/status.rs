//! Turns the core's and the driver's state into the local API's JSON views.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_proto::api::{
    ConnectionsResponse, IpamSummary, NodeInfo, PeerLink, PeerView, ProtocolRange, StatusResponse,
};

use super::core::MeshCore;

/// Facts fixed at start-up that status pages show.
#[derive(Clone, Debug)]
pub struct StaticInfo {
    pub auth: String,
    pub listen: String,
    pub dataplane: String,
    pub ipam_range: String,
    pub protocol: (u16, u16),
}

pub fn peer_views(core: &MeshCore, now: Instant) -> Vec<PeerView> {
    let me = core.me();
    let name_of = |id| core.member(&id).map(|m| m.record.name.clone());
    core.members()
        .map(|m| {
            let r = &m.record;
            PeerView {
                name: r.name.clone(),
                id: r.id.to_string(),
                state: m.liveness.state.as_str().to_string(),
                incarnation: r.incarnation,
                version: r.version,
                addresses: r.addresses.iter().map(ToString::to_string).collect(),
                connections: r
                    .connections
                    .iter()
                    .map(|l| PeerLink {
                        peer: name_of(l.peer).unwrap_or_else(|| l.peer.to_string()),
                        peer_id: l.peer.to_string(),
                        direction: if l.outbound { "out" } else { "in" }.to_string(),
                        state: "established".to_string(),
                    })
                    .collect(),
                is_self: r.id == me,
                dataplanes: r.capabilities.dataplanes.clone(),
                state_age_seconds: now.saturating_duration_since(m.liveness_since).as_secs(),
            }
        })
        .collect()
}

pub fn summary(
    core: &MeshCore,
    info: &StaticInfo,
    conns: &ConnectionsResponse,
    ready: bool,
    uptime: Duration,
) -> StatusResponse {
    let own = core.own_record();
    let mut peer_states = BTreeMap::new();
    for m in core.members() {
        *peer_states
            .entry(m.liveness.state.as_str().to_string())
            .or_insert(0) += 1;
    }
    let mut connections = BTreeMap::new();
    for c in &conns.connections {
        // "retrying: why" counts as "retrying".
        let state = c.state.split(':').next().unwrap_or_default().to_string();
        *connections.entry(state).or_insert(0) += 1;
    }
    StatusResponse {
        node: NodeInfo {
            name: own.name.clone(),
            id: own.id.to_string(),
            incarnation: own.incarnation,
        },
        ready,
        peers: core.members().count(),
        peer_states,
        connections,
        ipam: IpamSummary {
            range: info.ipam_range.clone(),
            // IPAM arrives with its own issue; until then the agent hands out nothing.
            status: "not available: IPAM is not built into this agent yet".to_string(),
        },
        auth: info.auth.clone(),
        listen: info.listen.clone(),
        dataplane: info.dataplane.clone(),
        protocol: ProtocolRange {
            min: info.protocol.0,
            max: info.protocol.1,
        },
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: uptime.as_secs(),
        node_network: None,
        kube: None,
    }
}
