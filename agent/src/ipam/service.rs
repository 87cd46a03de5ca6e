//! `IpamService`: the IPAM core with its store and its waiting API callers — the part of
//! the agent's driver that deals with IPAM. It persists every write the core asks for
//! before handing back the messages to send or answering a caller.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::api::{
    AllocationRequest, AllocationResponse, AllocationView, AttachmentRef, IpamLocalView,
    IpamOwnerView, IpamStatusResponse, PodRef, ReclaimResponse, RouteView,
};
use mesh_proto::ipam::{IpamMessage, NOBODY};
use mesh_proto::PeerId;
use tokio::sync::oneshot;

use super::allocations::{Allocation, AttachmentKey};
use super::core::{
    gateway_key, AllocateError, IpamConfig, IpamCore, IpamEvent, IpamInput, IpamOutput, PeerInfo,
    ReclaimMode, ReclaimStart,
};
use crate::api::metrics::{EventLabel, KindLabel, Metrics};
use crate::store::{Store, StoreError};

/// How long an allocation may wait for the first split or for space from a peer.
const ALLOCATION_WAIT: Duration = Duration::from_secs(10);

/// An API failure: HTTP status, machine code, message for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

pub type AllocationReply = oneshot::Sender<Result<(AllocationResponse, bool), ApiFailure>>;
pub type ReclaimReply = oneshot::Sender<Result<ReclaimResponse, ApiFailure>>;

struct WaitingReclaim {
    id: u64,
    peer: String,
    reply: ReclaimReply,
}

struct Waiting {
    request: AllocationRequest,
    deadline: Instant,
    reply: AllocationReply,
}

pub struct IpamService {
    core: IpamCore,
    store: Arc<Store>,
    range_text: String,
    mtu: u32,
    waiting: Vec<Waiting>,
    reclaims: Vec<WaitingReclaim>,
    topology_signature: u64,
    metrics: Arc<Metrics>,
}

/// One allocation attempt: the answer and whether it is new, or why not (yet).
type Attempt = Result<(AllocationResponse, bool), AllocateError>;

/// What the driver must send after a step.
pub type Sends = Vec<(PeerId, IpamMessage)>;

fn key_of(r: &AllocationRequest) -> AttachmentKey {
    AttachmentKey {
        network: r.network.clone(),
        container_id: r.container_id.clone(),
        ifname: r.ifname.clone(),
    }
}

fn view(a: &Allocation, prefix: u8) -> AllocationView {
    AllocationView {
        network: a.key.network.clone(),
        container_id: a.key.container_id.clone(),
        ifname: a.key.ifname.clone(),
        address: format!("{}/{prefix}", Ipv4Addr::from(a.addr)),
        pod: a
            .pod
            .clone()
            .map(|(namespace, name)| PodRef { namespace, name }),
    }
}

impl IpamService {
    pub fn new(
        cfg: IpamConfig,
        me: PeerId,
        name: &str,
        store: Arc<Store>,
        mtu: u32,
        metrics: Arc<Metrics>,
        now: Instant,
    ) -> Result<IpamService, StoreError> {
        let range_text = cfg.range.to_string();
        let restored = store.load_ipam(&range_text)?;
        let core =
            IpamCore::new(cfg, me, name, restored, now).map_err(|e| StoreError::Refused {
                path: store.path().to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(IpamService {
            core,
            store,
            range_text,
            mtu,
            waiting: Vec::new(),
            reclaims: Vec::new(),
            topology_signature: 0,
            metrics,
        })
    }

    pub fn core(&self) -> &IpamCore {
        &self.core
    }

    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.core.poll_timeout();
        if let Some(d) = self.waiting.iter().map(|w| w.deadline).min() {
            t = t.min(d);
        }
        t
    }

    /// Persists the writes, returns the sends and whether space or a ring arrived.
    fn carry_out(&mut self, outputs: Vec<IpamOutput>) -> Result<(Sends, bool), StoreError> {
        let mut writes = Vec::new();
        let mut sends = Vec::new();
        let mut progress = false;
        let mut answers = Vec::new();
        for o in outputs {
            match o {
                IpamOutput::Persist(w) => writes.push(w),
                IpamOutput::Send { to, msg } => sends.push((to, msg)),
                IpamOutput::Event(e) => {
                    progress |= matches!(
                        e,
                        IpamEvent::Split { .. }
                            | IpamEvent::SpaceGranted { .. }
                            | IpamEvent::SpaceDenied { .. }
                            | IpamEvent::SpaceRequestTimedOut { .. }
                            | IpamEvent::Reclaimed { .. }
                    );
                    answers.push(e.clone());
                    self.metrics
                        .ipam_events
                        .get_or_create(&EventLabel {
                            event: event_name(&e),
                        })
                        .inc();
                    log_event(&self.core, e);
                }
            }
        }
        // One transaction, committed before any message of this step leaves.
        crate::store::off_the_workers(|| self.store.apply_ipam(&self.range_text, &writes))?;
        // Reclaim callers hear of the outcome only once it is on disk.
        for e in &answers {
            self.answer_reclaim(e);
        }
        Ok((sends, progress))
    }

    pub fn handle(&mut self, now: Instant, input: IpamInput) -> Result<Sends, StoreError> {
        let out = self.core.handle(now, input);
        let (mut sends, progress) = self.carry_out(out)?;
        if progress || self.waiting.iter().any(|w| now >= w.deadline) {
            sends.extend(self.retry_waiting(now)?);
        }
        Ok(sends)
    }

    /// Feeds the mesh's view to IPAM when it changed.
    pub fn topology(
        &mut self,
        now: Instant,
        peers: Vec<PeerInfo>,
        neighbours: Vec<PeerId>,
    ) -> Result<Sends, StoreError> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for v in peers
            .iter()
            .map(|p| p.id.0 ^ u64::from(p.up))
            .chain(neighbours.iter().map(|n| n.0.rotate_left(1)))
        {
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
        if h == self.topology_signature {
            return Ok(Vec::new());
        }
        self.topology_signature = h;
        self.handle(now, IpamInput::Topology { peers, neighbours })
    }

    /// This node's gateway (the bridge address) with the range prefix, once it has space.
    pub fn gateway(&self) -> Option<(Ipv4Addr, u8)> {
        let prefix = self.core.ring().range().prefix;
        self.core.gateway().map(|g| (Ipv4Addr::from(g), prefix))
    }

    fn response(&self, a: &Allocation) -> AllocationResponse {
        let prefix = self.core.ring().range().prefix;
        let gateway = self
            .core
            .gateway()
            .map(Ipv4Addr::from)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
            .to_string();
        AllocationResponse {
            address: format!("{}/{prefix}", Ipv4Addr::from(a.addr)),
            routes: vec![RouteView {
                dst: "0.0.0.0/0".into(),
                gw: gateway.clone(),
            }],
            gateway,
            mtu: self.mtu,
        }
    }

    /// Tries one allocation, persisting what it wrote.
    fn try_allocate(
        &mut self,
        now: Instant,
        request: &AllocationRequest,
    ) -> Result<(Attempt, Sends), StoreError> {
        let key = key_of(request);
        let existed = self.core.allocations().get(&key).is_some();
        let pod = request.pod.clone().map(|p| (p.namespace, p.name));
        let (result, out) = self.core.allocate(now, key, pod, request.netns.clone());
        let (sends, _) = self.carry_out(out)?;
        Ok((result.map(|a| (self.response(&a), !existed)), sends))
    }

    /// Allocates for an API caller: answers at once when possible (after the store commit),
    /// else parks the caller until space arrives or the wait runs out.
    pub fn allocate(
        &mut self,
        now: Instant,
        request: AllocationRequest,
        reply: AllocationReply,
    ) -> Result<Sends, StoreError> {
        if request.container_id.is_empty()
            || request.ifname.is_empty()
            || request.container_id.contains('\0')
            || request.ifname.contains('\0')
        {
            let _ = reply.send(Err(ApiFailure {
                status: 400,
                code: "bad_request",
                message: "container_id and ifname must be non-empty".into(),
            }));
            return Ok(Vec::new());
        }
        let (result, sends) = self.try_allocate(now, &request)?;
        match result {
            Ok(ok) => {
                let _ = reply.send(Ok(ok));
            }
            Err(AllocateError::Exhausted(range)) => {
                let _ = reply.send(Err(exhausted(range.to_string())));
            }
            Err(AllocateError::NotReady(_) | AllocateError::Waiting(_)) => {
                self.waiting.push(Waiting {
                    request,
                    deadline: now + ALLOCATION_WAIT,
                    reply,
                });
            }
        }
        Ok(sends)
    }

    fn retry_waiting(&mut self, now: Instant) -> Result<Sends, StoreError> {
        let mut sends = Vec::new();
        for w in std::mem::take(&mut self.waiting) {
            let (result, more) = self.try_allocate(now, &w.request)?;
            sends.extend(more);
            match result {
                Ok(ok) => {
                    let _ = w.reply.send(Ok(ok));
                }
                Err(AllocateError::Exhausted(range)) => {
                    let _ = w.reply.send(Err(exhausted(range.to_string())));
                }
                Err(e) if now >= w.deadline => {
                    let _ = w.reply.send(Err(ApiFailure {
                        status: 503,
                        code: "ipam_not_ready",
                        message: e.to_string(),
                    }));
                }
                Err(_) => self.waiting.push(w),
            }
        }
        Ok(sends)
    }

    /// `meshctl rmpeer NAME`: answered at once when this node is the coordinator or the
    /// request is refused, else when the coordinator answers.
    pub fn reclaim(
        &mut self,
        now: Instant,
        name: String,
        mode: ReclaimMode,
        reply: ReclaimReply,
    ) -> Result<Sends, StoreError> {
        let (result, out) = self.core.reclaim(now, &name, mode);
        // Commit first: the operator is told only what is on disk.
        let (sends, _) = self.carry_out(out)?;
        match result {
            Ok(ReclaimStart::Done { addresses }) => {
                let message = format!("{addresses} addresses of {name} now belong to this node");
                let _ = reply.send(Ok(ReclaimResponse {
                    peer: name,
                    message,
                }));
            }
            Ok(ReclaimStart::Asked { id, .. }) => self.reclaims.push(WaitingReclaim {
                id,
                peer: name,
                reply,
            }),
            Err(reason) => {
                let _ = reply.send(Err(ApiFailure {
                    status: 409,
                    code: "reclaim_refused",
                    message: reason,
                }));
            }
        }
        Ok(sends)
    }

    /// The elected first split (Kubernetes Lease holder): committed to the store before
    /// the new ring is sent anywhere. The inner result says whether it happened and why not.
    pub fn split_elected(
        &mut self,
        now: Instant,
    ) -> Result<(Sends, Result<u64, String>), StoreError> {
        let (result, out) = self.core.split_elected(now);
        let (sends, _) = self.carry_out(out)?;
        Ok((sends, result))
    }

    fn answer_reclaim(&mut self, e: &IpamEvent) {
        let (id, outcome) = match e {
            IpamEvent::Reclaimed { id, .. } if *id != 0 => (*id, Ok(())),
            IpamEvent::ReclaimRefused { id, reason } => (*id, Err(reason.clone())),
            _ => return,
        };
        let Some(pos) = self.reclaims.iter().position(|w| w.id == id) else {
            return;
        };
        let w = self.reclaims.remove(pos);
        let answer = match outcome {
            Ok(()) => Ok(ReclaimResponse {
                message: format!("the address space of {} now belongs to this node", w.peer),
                peer: w.peer,
            }),
            Err(reason) => Err(ApiFailure {
                status: 409,
                code: "reclaim_refused",
                message: reason,
            }),
        };
        let _ = w.reply.send(answer);
    }

    pub fn release(&mut self, key: AttachmentKey) -> Result<(), StoreError> {
        let (_, out) = self.core.release(&key);
        self.carry_out(out).map(|_| ())
    }

    pub fn list(&self) -> Vec<AllocationView> {
        let prefix = self.core.ring().range().prefix;
        let gw = gateway_key();
        self.core
            .allocations()
            .iter()
            .filter(|a| a.key != gw)
            .map(|a| view(a, prefix))
            .collect()
    }

    /// Releases every allocation of `network` not in `valid` (the gateway is kept).
    pub fn gc(
        &mut self,
        network: &str,
        valid: Vec<AttachmentRef>,
    ) -> Result<Vec<AllocationView>, StoreError> {
        let valid: BTreeSet<(String, String)> = valid
            .into_iter()
            .map(|r| (r.container_id, r.ifname))
            .collect();
        let gw = gateway_key();
        let stale: Vec<Allocation> = self
            .core
            .allocations()
            .stale_in(network, &valid)
            .into_iter()
            .filter(|a| a.key != gw)
            .collect();
        let prefix = self.core.ring().range().prefix;
        let mut released = Vec::new();
        for a in stale {
            self.release(a.key.clone())?;
            released.push(view(&a, prefix));
        }
        Ok(released)
    }

    /// Refreshes the IPAM gauges (called on the driver's maintenance tick).
    pub fn update_gauges(&self) {
        let owned: u64 = self
            .core
            .ring()
            .blocks_of(self.core.me())
            .iter()
            .map(|b| b.size())
            .sum();
        let free = self.core.free();
        let m = &self.metrics;
        m.ipam_addresses
            .get_or_create(&KindLabel { kind: "owned" })
            .set(owned as i64);
        m.ipam_addresses
            .get_or_create(&KindLabel { kind: "free" })
            .set(free as i64);
        m.ipam_addresses
            .get_or_create(&KindLabel { kind: "used" })
            .set(self.core.allocations().len() as i64);
        m.ipam_pending_requests
            .set(self.core.pending_requests() as i64);
        m.ipam_unreachable_share
            .set(self.status().unreachable_share);
    }

    pub fn status(&self) -> IpamStatusResponse {
        let ring = self.core.ring();
        let total = ring.range().size() as f64;
        let mut owners: Vec<IpamOwnerView> = ring
            .shares()
            .into_iter()
            .filter(|(p, _)| *p != NOBODY)
            .map(|(p, n)| IpamOwnerView {
                peer: p.to_string(),
                name: self.core.name_of(p),
                addresses: n,
                share: n as f64 / total,
                reachable: self.core.is_up(p),
            })
            .collect();
        owners.sort_by(|a, b| b.addresses.cmp(&a.addresses).then(a.name.cmp(&b.name)));
        let unreachable_share = owners
            .iter()
            .filter(|o| !o.reachable)
            .map(|o| o.share)
            .sum();
        let local_blocks = self.local_blocks();
        IpamStatusResponse {
            range: self.range_text.clone(),
            status: self.core.status(),
            owners,
            local: IpamLocalView {
                blocks: local_blocks,
                allocated: self.list().len(),
                free: self.core.free(),
                gateway: self.core.gateway().map(|g| Ipv4Addr::from(g).to_string()),
            },
            unreachable_share,
            refused_peers: self
                .core
                .incompatible_peers()
                .into_iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect(),
        }
    }

    fn local_blocks(&self) -> Vec<String> {
        self.core
            .ring()
            .blocks_of(self.core.me())
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

fn event_name(e: &IpamEvent) -> &'static str {
    match e {
        IpamEvent::Split { .. } => "split",
        IpamEvent::SpaceGranted { .. } => "space_granted",
        IpamEvent::SpaceDenied { .. } => "space_denied",
        IpamEvent::SpaceRequested { .. } => "space_requested",
        IpamEvent::SpaceRequestTimedOut { .. } => "space_request_timed_out",
        IpamEvent::Conflict { .. } => "conflict",
        IpamEvent::Incompatible { .. } => "refused_peer",
        IpamEvent::BadEntry { .. } => "bad_entry",
        IpamEvent::Reclaimed { .. } => "reclaimed",
        IpamEvent::ReclaimRefused { .. } => "reclaim_refused",
    }
}

fn exhausted(range: String) -> ApiFailure {
    ApiFailure {
        status: 507,
        code: "range_exhausted",
        message: format!(
            "no free address in {range}: this node's blocks are full and no reachable peer has space to give; \
             free addresses (delete pods) or use a larger --ipalloc-range"
        ),
    }
}

fn log_event(core: &IpamCore, e: IpamEvent) {
    match e {
        IpamEvent::Split { members } => {
            tracing::info!(members, "address range split for the first time")
        }
        IpamEvent::SpaceGranted { from, block } => {
            tracing::info!(peer = %from, name = %core.name_of(from), block = %block, "received address space")
        }
        IpamEvent::SpaceDenied { from } => {
            tracing::info!(peer = %from, "peer had no address space to give")
        }
        IpamEvent::SpaceRequested { to } => {
            tracing::info!(peer = %to, "asking a peer for address space")
        }
        IpamEvent::Conflict {
            block,
            kept,
            dropped,
        } => tracing::warn!(
            block = %block, kept = %kept, dropped = %dropped,
            "two owners claimed one block; kept the lower peer id (connections stay up)"
        ),
        IpamEvent::Incompatible { peer, reason } => {
            tracing::warn!(peer = %peer, reason = %reason, "ignoring a peer's IPAM state")
        }
        IpamEvent::BadEntry { peer, reason } => {
            tracing::warn!(peer = %peer, reason = %reason, "rejected a ring entry")
        }
        IpamEvent::SpaceRequestTimedOut { to } => {
            tracing::info!(peer = %to, "a space request went unanswered; trying another peer")
        }
        IpamEvent::Reclaimed { dead, to, .. } => tracing::info!(
            dead = %dead, name = %core.name_of(dead), to = %to, "reclaimed a dead peer's address space"
        ),
        IpamEvent::ReclaimRefused { reason, .. } => {
            tracing::warn!(reason = %reason, "reclaim refused")
        }
    }
}

impl IpamCore {
    pub fn me(&self) -> PeerId {
        self.me
    }
}

/// The first-split setting from `--ipalloc-init`: `consensus=N` or `seed=NAME,NAME`.
pub fn parse_init(
    text: Option<&str>,
    default_consensus: usize,
) -> Result<super::core::InitMode, String> {
    use super::core::InitMode;
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(InitMode::Consensus(default_consensus.max(1)));
    };
    if let Some(n) = text.strip_prefix("consensus=") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("--ipalloc-init {text:?}: consensus=N needs a number"))?;
        if n == 0 {
            return Err(
                "--ipalloc-init consensus=0: N is the number of initial peers, at least 1".into(),
            );
        }
        return Ok(InitMode::Consensus(n));
    }
    if text == "consensus" {
        return Ok(InitMode::Consensus(default_consensus.max(1)));
    }
    if let Some(names) = text.strip_prefix("seed=") {
        let names: Vec<String> = names
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            return Err("--ipalloc-init seed= needs at least one node name".into());
        }
        return Ok(InitMode::Seed(names));
    }
    Err(format!(
        "--ipalloc-init {text:?}: use consensus=N or seed=NAME,NAME"
    ))
}
