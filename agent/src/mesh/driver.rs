//! The async driver: wires `MeshCore` to the QUIC transport, timers, the store and the
//! local API. It owns the core and the connection book; everything reaches it through one
//! channel of events, so no lock guards mesh state.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::gossip::GossipMessage;
use mesh_proto::wire::{self, Frame};
use mesh_proto::{PeerId, PeerRecord};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::core::{Input, MeshCore, Output};
use super::links::{preferred_dialer, DialRole, Link, Links};
use super::status::StaticInfo;
use crate::api::metrics::{DirectionLabel, GossipLabel, Metrics};
use crate::ipam::core::IpamInput;
use crate::ipam::service::IpamService;
use crate::store::Store;
use crate::transport::admission::{Admission, AdmissionConfig, LogBudget};
use crate::transport::connection::{
    self, Direction, Local, TransportEvent, CLOSE_DUPLICATE, CLOSE_IDLE, CLOSE_REFUSED,
    CLOSE_SHUTDOWN,
};
pub use requests::{ApiRequest, Health};

/// Connection housekeeping period (dials, idle closes, gauges).
const MAINTENANCE: Duration = Duration::from_millis(500);
/// An outbound link that has been neither a neighbour nor a `--peers` target this long closes.
const IDLE_CLOSE: Duration = Duration::from_secs(30);
const SEND_QUEUE: usize = 256;

pub struct DriverConfig {
    /// `--peers` targets as `host:port`, resolved on every dial.
    pub persistent_peers: Vec<String>,
    pub max_connections: usize,
    pub protocol: (u16, u16),
    pub info: StaticInfo,
}

pub struct Driver {
    /// Which incoming handshakes are taken on (before authentication).
    admission: Admission,
    /// Bounds the warnings about failed inbound handshakes.
    inbound_log: LogBudget,
    health: watch::Sender<Health>,
    core: MeshCore,
    cfg: DriverConfig,
    store: Arc<Store>,
    endpoint: quinn::Endpoint,
    local: Local,
    own_tx: watch::Sender<PeerRecord>,
    events_tx: mpsc::Sender<TransportEvent>,
    events_rx: mpsc::Receiver<TransportEvent>,
    links: Links,
    /// Shared with accepting tasks so they can refuse before the handshake completes.
    link_count: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// Set when the agent cannot go on safely (the store refused a write).
    pub(super) fatal: Option<String>,
    pub(super) ipam: IpamService,
    /// The node bridge's side channel: the gateway goes out, its status comes back.
    pub(super) node_net: Option<NodeNetLink>,
    /// Dial targets from Kubernetes Node objects (`--kube`).
    pub(super) kube_targets: BTreeSet<String>,
    pub(super) kube_status: Option<watch::Receiver<mesh_proto::api::KubeStatus>>,
    /// What the data plane remembers across restarts and whether it may prune yet.
    pub(super) tunnel_memory: dataplane_glue::TunnelMemory,
}

/// How the driver and the node bridge task talk (absent with `--dataplane none`).
pub struct NodeNetLink {
    pub gateway: watch::Sender<Option<(std::net::Ipv4Addr, u8)>>,
    pub status: watch::Receiver<mesh_proto::api::NodeNetworkStatus>,
    /// The cross-node backend: what to program, and what went wrong doing it.
    pub tunnel: Option<TunnelLink>,
}

pub struct TunnelLink {
    pub desired: watch::Sender<crate::dataplane::Desired>,
    pub problem: watch::Receiver<Option<String>>,
}

impl Driver {
    pub fn new(
        core: MeshCore,
        cfg: DriverConfig,
        store: Arc<Store>,
        endpoint: quinn::Endpoint,
        metrics: Arc<Metrics>,
        ipam: IpamService,
    ) -> Driver {
        let (own_tx, own_rx) = watch::channel(core.own_record().clone());
        let (events_tx, events_rx) = mpsc::channel(4096);
        let link_count = Arc::new(AtomicUsize::new(0));
        let local = Local {
            record: own_rx,
            protocol: cfg.protocol,
            links: link_count.clone(),
            max_links: cfg.max_connections,
        };
        let mut links = Links::default();
        let now = Instant::now();
        let tunnel_memory = dataplane_glue::TunnelMemory::load(&store);
        for target in &cfg.persistent_peers {
            links.want(target.clone(), None, DialRole::Persistent, now);
        }
        let (health, _) = watch::channel(Health {
            beat: now,
            ready: false,
        });
        Driver {
            admission: Admission::new(AdmissionConfig::default(), now),
            inbound_log: LogBudget::new(Duration::from_secs(10)),
            health,
            core,
            cfg,
            store,
            endpoint,
            local,
            own_tx,
            events_tx,
            events_rx,
            links,
            link_count,
            metrics,
            started: now,
            fatal: None,
            ipam,
            node_net: None,
            kube_targets: BTreeSet::new(),
            kube_status: None,
            tunnel_memory,
        }
    }

    /// The heartbeat the probes read (see `Health`).
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Connects the node bridge task: it learns the gateway from IPAM through this.
    pub fn with_node_network(mut self, link: NodeNetLink) -> Driver {
        link.gateway.send_replace(self.ipam.gateway());
        self.node_net = Some(link);
        self
    }

    /// Runs until `shutdown` fires, then leaves the mesh politely. Returns an error when the
    /// agent had to stop because it could not keep a promise (a failed store write).
    pub async fn run(
        mut self,
        mut api: mpsc::Receiver<ApiRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let endpoint = self.endpoint.clone();
        let mut maintenance = tokio::time::interval(MAINTENANCE);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.core.poll_timeout().min(self.ipam.poll_timeout());
            let wake = tokio::time::Instant::from_std(next);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => self.on_wake(),
                Some(ev) = self.events_rx.recv() => self.on_transport(ev),
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => self.on_incoming(incoming),
                    None => break,
                },
                Some(req) = api.recv() => self.on_api(req),
                _ = maintenance.tick() => self.maintain(),
                _ = shutdown.changed() => break,
            }
            if self.fatal.is_some() {
                break;
            }
        }
        self.leave().await;
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn leave(&mut self) {
        if self.fatal.is_none() {
            info!("leaving the mesh");
            self.feed(Input::Leave);
            // Let the departure notices reach the wire before the connections close.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        for link in self.links.links.values() {
            link.conn
                .close(CLOSE_SHUTDOWN.into(), b"agent shutting down");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Feeds the core one input and carries out what it asks for.
    fn feed(&mut self, input: Input) {
        let now = Instant::now();
        let before = self.core.own_record().content_key();
        let outputs = self.core.handle(now, input);
        for out in outputs {
            if self.fatal.is_some() {
                // Nothing after a failed durable write may leave this node.
                break;
            }
            match out {
                Output::Send { to, msg } => self.send(to, msg, now),
                Output::SetNeighbours(set) => self.set_neighbours(&set, now),
                Output::PersistIncarnation(inc) => {
                    if let Err(e) =
                        crate::store::off_the_workers(|| self.store.raise_incarnation(inc))
                    {
                        tracing::error!(error = %e, "cannot store the new incarnation; stopping rather than announcing it");
                        self.fatal = Some(format!("cannot store incarnation {inc}: {e}"));
                    }
                }
                Output::Event(e) => self.on_event(e),
            }
        }
        if self.fatal.is_none() && self.core.own_record().content_key() != before {
            self.own_tx.send_replace(self.core.own_record().clone());
        }
        self.sync_topology(now);
    }

    fn send(&mut self, to: PeerId, msg: GossipMessage, now: Instant) {
        let kind = msg.kind();
        self.send_frame(to, &Frame::Gossip(msg), kind, now);
    }

    /// Sends one frame to a peer, dialing it on demand; best effort.
    pub(super) fn send_frame(
        &mut self,
        to: PeerId,
        frame: &Frame,
        kind: &'static str,
        now: Instant,
    ) {
        let frame = match wire::encode_frame(frame) {
            Ok(f) => f,
            Err(e) => {
                warn!(peer = %to, error = %e, "cannot encode a message");
                return;
            }
        };
        let bytes = frame.len() as u64;
        let sent = if let Some(link) = self.links.links.get_mut(&to) {
            link.tx.try_send(frame).is_ok()
        } else if let Some(addr) = self.address_of(&to) {
            self.links
                .want(addr.to_string(), Some(to), DialRole::OnDemand, now);
            self.dial_due(now);
            self.links.hold(to, frame)
        } else {
            false
        };
        if sent {
            self.metrics
                .gossip_messages
                .get_or_create(&GossipLabel {
                    direction: "out",
                    kind,
                })
                .inc();
            self.metrics
                .gossip_bytes
                .get_or_create(&DirectionLabel { direction: "out" })
                .inc_by(bytes);
        } else {
            self.metrics.gossip_dropped.inc();
        }
    }

    fn address_of(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.core
            .member(peer)
            .and_then(|m| m.record.addresses.first().copied())
    }

    fn set_neighbours(&mut self, set: &BTreeSet<PeerId>, now: Instant) {
        debug!(neighbours = set.len(), "neighbour set changed");
        for peer in set {
            if let Some(addr) = self.address_of(peer) {
                self.links
                    .want(addr.to_string(), Some(*peer), DialRole::Neighbour, now);
            }
        }
        // Neighbour dials that are no longer wanted drop back to on-demand.
        for d in self.links.dials.values_mut() {
            if d.role == DialRole::Neighbour && !d.peer.is_some_and(|p| set.contains(&p)) {
                d.role = DialRole::OnDemand;
            }
        }
        self.dial_due(now);
    }

    fn on_transport(&mut self, ev: TransportEvent) {
        let now = Instant::now();
        match ev {
            TransportEvent::Established(est) => self.on_established(*est, now),
            TransportEvent::DialFailed { target, reason } => {
                let first = self
                    .links
                    .dials
                    .get(&target)
                    .is_some_and(|d| d.last_error.as_deref() != Some(reason.as_str()));
                let role = self.links.dials.get(&target).map(|d| d.role);
                self.links.dial_failed(&target, reason.clone(), now);
                self.metrics
                    .connection_failures
                    .get_or_create(&DirectionLabel { direction: "out" })
                    .inc();
                if first && role != Some(DialRole::OnDemand) {
                    warn!(target = %target, reason = %reason, "cannot connect");
                } else {
                    debug!(target = %target, reason = %reason, "cannot connect");
                }
            }
            TransportEvent::InboundFailed { addr, reason } => {
                self.admission.finished(addr.ip());
                let repeated = self
                    .links
                    .inbound_failures
                    .get(&addr)
                    .is_some_and(|(r, _)| *r == reason);
                // New source addresses cost an attacker nothing: warnings are bounded.
                match (repeated, self.inbound_log.allow(now)) {
                    (false, Some(held_back)) => warn!(
                        address = %addr,
                        reason = %reason,
                        held_back,
                        "refused an inbound connection (at most one such line per 10 s; held_back = lines skipped since the last)"
                    ),
                    _ => debug!(address = %addr, reason = %reason, "refused an inbound connection"),
                }
                self.metrics
                    .connection_failures
                    .get_or_create(&DirectionLabel { direction: "in" })
                    .inc();
                self.links.inbound_failed(addr, reason, now);
            }
            TransportEvent::Frame {
                conn_id,
                peer,
                frame,
                bytes,
            } => {
                if self.links.links.get(&peer).is_none_or(|l| l.id != conn_id) {
                    return;
                }
                match frame {
                    Frame::Gossip(msg) => {
                        let kind = msg.kind();
                        self.metrics
                            .gossip_messages
                            .get_or_create(&GossipLabel {
                                direction: "in",
                                kind,
                            })
                            .inc();
                        self.metrics
                            .gossip_bytes
                            .get_or_create(&DirectionLabel { direction: "in" })
                            .inc_by(bytes as u64);
                        self.feed(Input::Message { from: peer, msg });
                    }
                    Frame::Ipam(msg) => {
                        self.metrics
                            .gossip_bytes
                            .get_or_create(&DirectionLabel { direction: "in" })
                            .inc_by(bytes as u64);
                        self.ipam_step(IpamInput::Message { from: peer, msg });
                    }
                }
            }
            TransportEvent::Closed {
                conn_id,
                peer,
                reason,
            } => {
                if self.links.links.get(&peer).is_some_and(|l| l.id == conn_id) {
                    let mut lived = Duration::ZERO;
                    if let Some(link) = self.links.links.remove(&peer) {
                        info!(peer = %peer, name = %link.name, address = %link.addr, reason = %reason, "connection lost");
                        lived = now.duration_since(link.since);
                    }
                    self.link_count
                        .store(self.links.links.len(), Ordering::Relaxed);
                    self.links.link_lost(peer, &reason, lived, now);
                    self.feed(Input::PeerDisconnected { peer });
                }
            }
        }
    }

    fn on_established(&mut self, est: connection::Established, now: Instant) {
        if est.direction == Direction::In {
            self.admission.finished(est.addr.ip());
        }
        let me = self.core.me();
        let peer = est.peer.id;
        let dialer = if est.direction == Direction::Out {
            me
        } else {
            peer
        };
        if let Some(target) = &est.target {
            self.links.dial_succeeded(target, peer, now);
        } else {
            self.links.inbound_failures.remove(&est.addr);
        }
        if let Some(existing) = self.links.links.get(&peer) {
            let existing_dialer = if existing.direction == Direction::Out {
                me
            } else {
                peer
            };
            // A restarted peer's new link replaces the dead one of its earlier life; between
            // links of the same life, the one dialed by the lower id wins on both ends.
            let keep_new = est.peer.incarnation > existing.incarnation
                || (est.peer.incarnation == existing.incarnation
                    && dialer == preferred_dialer(me, peer)
                    && existing_dialer != dialer);
            if !keep_new {
                debug!(peer = %peer, "closing a duplicate connection");
                est.conn
                    .close(CLOSE_DUPLICATE.into(), b"duplicate connection");
                return;
            }
            existing
                .conn
                .close(CLOSE_DUPLICATE.into(), b"duplicate connection");
            self.links.links.remove(&peer);
        } else if est.direction == Direction::In
            && self.links.links.len() >= self.cfg.max_connections
        {
            let reason = format!("too many connections (limit {})", self.cfg.max_connections);
            est.conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            self.links.inbound_failed(est.addr, reason, now);
            return;
        }
        let id = self.links.next_id();
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let record = est.peer.clone();
        let outbound = est.direction == Direction::Out;
        info!(peer = %peer, name = %record.name, address = %est.addr, direction = est.direction.as_str(), version = est.version, "connection established");
        let link = Link {
            id,
            name: record.name.clone(),
            incarnation: record.incarnation,
            addr: est.addr,
            direction: est.direction,
            conn: est.conn.clone(),
            tx: tx.clone(),
            since: now,
            unneeded_since: None,
        };
        connection::run(id, est, self.events_tx.clone(), rx);
        self.links.links.insert(peer, link);
        self.link_count
            .store(self.links.links.len(), Ordering::Relaxed);
        for frame in self.links.pending.remove(&peer).unwrap_or_default() {
            let _ = tx.try_send(frame);
        }
        self.feed(Input::PeerConnected { record, outbound });
    }

    /// Starts every dial whose time has come.
    pub(super) fn dial_due(&mut self, now: Instant) {
        let mut start = Vec::new();
        for (target, d) in self.links.dials.iter_mut() {
            let connected = d.peer.is_some_and(|p| self.links.links.contains_key(&p));
            // An on-demand target is dialed only while something waits to be delivered.
            let wanted = d.role != DialRole::OnDemand
                || d.peer.is_some_and(|p| self.links.pending.contains_key(&p));
            if connected || !wanted || d.in_flight || now < d.next_try {
                continue;
            }
            d.in_flight = true;
            start.push(target.clone());
        }
        for target in start {
            tokio::spawn(connection::dial(
                self.endpoint.clone(),
                target,
                self.local.clone(),
                self.events_tx.clone(),
            ));
        }
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        self.health.send_replace(Health {
            beat: now,
            ready: self.is_ready(),
        });
        if let Some(line) = self.admission.report(now) {
            warn!(turned_away = %line, in_flight = self.admission.in_flight(), "pre-authentication limits turned incoming handshakes away (at most one such line per 10 s)");
        }
        self.publish_dataplane();
        self.dial_due(now);
        // Forget on-demand targets that are idle and not needed.
        let links = &self.links.links;
        let pending = &self.links.pending;
        self.links.dials.retain(|_, d| {
            d.role != DialRole::OnDemand
                || d.in_flight
                || d.peer
                    .is_some_and(|p| links.contains_key(&p) || pending.contains_key(&p))
                || now < d.next_try
        });
        // Close outbound links nobody needs any more (the peer's own choices keep theirs).
        let neighbours = self.core.neighbours().clone();
        let persistent: BTreeSet<PeerId> = self
            .links
            .dials
            .values()
            .filter(|d| d.role == DialRole::Persistent)
            .filter_map(|d| d.peer)
            .collect();
        let mut idle = Vec::new();
        for (p, l) in self.links.links.iter_mut() {
            let needed =
                l.direction == Direction::In || neighbours.contains(p) || persistent.contains(p);
            if needed {
                l.unneeded_since = None;
                continue;
            }
            let since = *l.unneeded_since.get_or_insert(now);
            if now.duration_since(since) > IDLE_CLOSE {
                idle.push(*p);
            }
        }
        for peer in idle {
            if let Some(link) = self.links.links.remove(&peer) {
                debug!(peer = %peer, "closing an idle link to a non-neighbour");
                link.conn.close(CLOSE_IDLE.into(), b"idle: not a neighbour");
                self.links
                    .dials
                    .retain(|_, d| d.role != DialRole::OnDemand || d.peer != Some(peer));
                self.feed(Input::PeerDisconnected { peer });
            }
        }
        self.link_count
            .store(self.links.links.len(), Ordering::Relaxed);
        self.links.expire(now);
        self.update_gauges(now);
    }

    fn on_api(&mut self, req: ApiRequest) {
        match req {
            ApiRequest::Report(reply) => {
                let _ = reply.send(self.report(Instant::now()));
            }
            ApiRequest::SetKubeTargets(targets) => self.set_kube_targets(targets),
            other => self.on_ipam_api(other),
        }
    }
}

mod admission_glue;
mod dataplane_glue;
mod ipam_glue;
mod kube_glue;
mod reporting;
mod requests;
