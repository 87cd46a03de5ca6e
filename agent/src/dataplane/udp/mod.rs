//! The `udp` backend: a userspace data plane on the same VXLAN wire as the kernel's, so
//! nodes on either backend talk to each other. The kernel routes each remote block into a
//! multi-queue TUN device (`mesh-tun`, offloads on); per queue a pair of worker threads
//! (`worker`) frames packets (`frame`) for the node the forwarding table (`table`) names
//! and moves them in batches (`gso`, UDP GSO/GRO). This loop keeps the device, its routes
//! (`plan`) and the table in line with the mesh, and restarts the workers if they stop.
//! Unlike the kernel backend, traffic stops while the agent is down: the device is the
//! agent's.

pub mod frame;
pub mod gso;
pub mod plan;
pub mod table;
mod worker;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;

use netlink_packet_route::route::{RouteProtocol, RouteScope};
use quinn_udp::{UdpSockRef, UdpSocketState};
use rtnetlink::RouteMessageBuilder;
use tokio::sync::watch;
use tracing::{info, warn};
use tun_rs::{DeviceBuilder, SyncDevice};

use super::vxlan::ROUTE_PROTOCOL;
use super::Desired;
use crate::api::metrics::Metrics;
use crate::netlink::{errno, Netlink, NetlinkError};
use plan::{Step, TunRoute};
use table::Table;
use worker::{Shared, Stats, Wire};

pub const DEVICE: &str = "mesh-tun";
/// Socket buffers: a GSO burst is 64 KiB and a queue may have many in flight.
const SOCKET_BUFFER: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct UdpConfig {
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub range: crate::ipam::block::Block,
    pub masquerade: bool,
    /// TUN queues (each with a tx and an rx thread).
    pub queues: usize,
    /// Our underlay address: the only destination the guard admits VXLAN to.
    pub local: std::net::Ipv4Addr,
}

/// The default number of queues: one per core, at most four.
pub fn default_queues() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

struct Forwarder {
    index: u32,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    published: Option<Table>,
}

impl Forwarder {
    fn broken(&self) -> bool {
        self.threads.iter().any(JoinHandle::is_finished)
    }

    fn stop(self) {
        self.shared.stop();
        for t in self.threads {
            let _ = t.join();
        }
        let s = &self.shared.stats;
        info!(
            device = DEVICE,
            tx_packets = Stats::get(&s.tx_packets),
            tx_sends = Stats::get(&s.tx_sends),
            rx_packets = Stats::get(&s.rx_packets),
            dropped_no_route = Stats::get(&s.dropped_no_route),
            dropped_foreign = Stats::get(&s.dropped_foreign),
            dropped_malformed = Stats::get(&s.dropped_malformed),
            errors = Stats::get(&s.errors),
            "userspace data plane stopped"
        );
    }
}

fn open_socket(port: u16) -> std::io::Result<(UdpSocket, UdpSocketState)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // One socket per queue on the same port; the kernel spreads flows across them.
    s.set_reuse_port(true)?;
    s.set_cloexec(true)?;
    // Root may exceed net.core.{r,w}mem_max; fall back to what the limits allow.
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&s, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&s, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    let sock: UdpSocket = s.into();
    // Turns on UDP GRO and makes the socket non-blocking.
    let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
    Ok((sock, state))
}

async fn start(nl: &Netlink, cfg: &UdpConfig, metrics: &Metrics) -> Result<Forwarder, String> {
    // A kernel VXLAN device left from a run with the other backend holds our UDP port.
    match nl.delete_link(super::vxlan::DEVICE).await {
        Ok(true) => info!(
            device = super::vxlan::DEVICE,
            "removed the kernel VXLAN device of an earlier run"
        ),
        Ok(false) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mtu = u16::try_from(cfg.mtu).map_err(|_| format!("MTU {} is too large", cfg.mtu))?;
    let first = DeviceBuilder::new()
        .name(DEVICE)
        .mtu(mtu)
        .with(|b| {
            b.offload(true);
            b.multi_queue(true);
        })
        .enable(true)
        .build_sync()
        .map_err(|e| {
            format!("cannot create the TUN device {DEVICE} (is /dev/net/tun there?): {e}")
        })?;
    if !first.tcp_gso() {
        warn!(
            device = DEVICE,
            "the kernel refused TUN offloads: the userspace data plane runs one packet at a time"
        );
    }
    let mut queues: Vec<SyncDevice> = vec![first];
    for _ in 1..cfg.queues.max(1) {
        match queues[0].try_clone() {
            Ok(q) => queues.push(q),
            Err(e) => {
                warn!(error = %e, "cannot open another TUN queue; running with fewer");
                break;
            }
        }
    }
    let shared = Arc::new(Shared::new(Stats::new(metrics)).map_err(|e| format!("eventfd: {e}"))?);
    let mut threads = Vec::new();
    for (q, dev) in queues.into_iter().enumerate() {
        dev.set_nonblocking(true)
            .map_err(|e| format!("TUN queue {q}: {e}"))?;
        let dev = Arc::new(dev);
        let (sock, state) = open_socket(cfg.port).map_err(|e| {
            format!(
                "cannot listen on UDP port {} for VXLAN (is another VXLAN endpoint using it?): {e}",
                cfg.port
            )
        })?;
        let (sock, state) = (Arc::new(sock), Arc::new(state));
        let wire = || Wire {
            vni: cfg.vni,
            mac: cfg.mac,
            mtu: cfg.mtu as usize,
        };
        for (dir, f) in [
            ("tx", worker::run_tx as fn(_, _, _, _, _)),
            ("rx", worker::run_rx as fn(_, _, _, _, _)),
        ] {
            let (dev, sock, state, shared, wire) = (
                dev.clone(),
                sock.clone(),
                state.clone(),
                shared.clone(),
                wire(),
            );
            let t = std::thread::Builder::new()
                .name(format!("mesh-udp-{dir}{q}"))
                .spawn(move || f(dev, sock, state, shared, wire))
                .map_err(|e| format!("cannot start a forwarder thread: {e}"))?;
            threads.push(t);
        }
    }
    let found = match nl.link_by_name(DEVICE).await {
        Ok(Some(l)) => Ok(l.index),
        Ok(None) => Err(format!("{DEVICE} vanished right after it was created")),
        Err(e) => Err(e.to_string()),
    };
    let index = match found {
        Ok(i) => i,
        Err(e) => {
            Forwarder {
                index: 0,
                shared,
                threads,
                published: None,
            }
            .stop();
            return Err(e);
        }
    };
    if let Err(e) = nl.quiet_ipv6(DEVICE, index).await {
        warn!(device = DEVICE, error = %e, "cannot keep IPv6 off the tunnel (harmless: stray packets counted as drops)");
    }
    info!(
        device = DEVICE,
        queues = threads.len() / 2,
        port = cfg.port,
        mtu = cfg.mtu,
        "userspace data plane started"
    );
    Ok(Forwarder {
        index,
        shared,
        threads,
        published: None,
    })
}

fn route_message(index: u32, r: &TunRoute) -> netlink_packet_route::route::RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst, r.prefix)
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if let Some(src) = r.src {
        b = b.pref_source(src);
    }
    b.build()
}

async fn reconcile(nl: &Netlink, index: u32, want: &Desired) -> Result<usize, NetlinkError> {
    if let Some(gw) = want.local_gateway {
        nl.set_only_address(index, gw, 32).await?;
    }
    let seen: Vec<TunRoute> = nl
        .routes_v4()
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(index) && r.protocol == ROUTE_PROTOCOL)
        .map(|r| TunRoute {
            dst: r.dst,
            prefix: r.prefix,
            src: r.prefsrc,
        })
        .collect();
    let steps = plan::plan(want, &seen);
    let h = nl.handle();
    let mut errors = Vec::new();
    for s in &steps {
        let outcome = match s {
            Step::Set(r) => {
                info!(route = %format!("{}/{}", r.dst, r.prefix), device = DEVICE, "installing a pod route");
                h.route()
                    .add(route_message(index, r))
                    .replace()
                    .execute()
                    .await
                    .map_err(NetlinkError::request(format!(
                        "route {}/{} dev {DEVICE}",
                        r.dst, r.prefix
                    )))
            }
            Step::Del(r) => {
                info!(route = %format!("{}/{}", r.dst, r.prefix), device = DEVICE, "removing a pod route");
                match h.route().del(route_message(index, r)).execute().await {
                    Err(e) if !matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
                        Err(NetlinkError::request("delete route")(e))
                    }
                    _ => Ok(()),
                }
            }
        };
        if let Err(e) = outcome {
            errors.push(e);
        }
    }
    crate::netlink::all_of(steps.len(), errors)
}

/// Keeps the forwarder running and its routes and table matching `desired` until
/// shutdown; publishes problems (or `None`) through `status`, counters through `metrics`
/// (`mesh_forwarder_*`).
pub async fn run(
    nl: Netlink,
    cfg: UdpConfig,
    mut desired: watch::Receiver<Desired>,
    status: watch::Sender<Option<String>>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut rounds = super::Rounds::new(
        DEVICE,
        cfg.range,
        cfg.masquerade,
        cfg.port,
        cfg.local,
        None,
        status,
    );
    let mut forwarder: Option<Forwarder> = None;
    loop {
        let want = desired.borrow_and_update().clone();
        let mut problem = None;
        if forwarder.as_ref().is_some_and(Forwarder::broken) {
            warn!(
                device = DEVICE,
                "a forwarder thread stopped; restarting the userspace data plane"
            );
            if let Some(f) = forwarder.take() {
                f.stop();
            }
        }
        if forwarder.is_none() {
            match start(&nl, &cfg, &metrics).await {
                Ok(f) => forwarder = Some(f),
                Err(e) => problem = Some(e),
            }
        }
        if let Some(f) = forwarder.as_mut() {
            let table = Table::new(&want);
            if f.published.as_ref() != Some(&table) {
                f.shared.publish(table.clone());
                f.published = Some(table);
            }
            if let Err(e) = reconcile(&nl, f.index, &want).await {
                problem = Some(e.to_string());
            }
        }
        rounds.finish(problem, &want).await;
        if !super::Rounds::next(&mut desired, &mut shutdown).await {
            break;
        }
    }
    if let Some(f) = forwarder.take() {
        f.stop();
    }
}
