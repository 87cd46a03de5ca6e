//! The userspace forwarder's hot loops. Per TUN queue two threads: `tx` reads from the TUN
//! device (offloads on: one read is a whole TCP super-packet, split by tun-rs into
//! segments with headroom for our 22 header bytes), frames each segment in place and sends
//! runs to the same node as one UDP GSO `sendmsg`; `rx` receives with `recvmmsg` + UDP GRO,
//! checks each datagram, and writes the inner packets to the TUN device through tun-rs's
//! GRO table (a run of TCP segments becomes one super-packet again). Every buffer is
//! allocated once per thread. Sockets and TUN queues are non-blocking; a thread blocks in
//! `poll` on its fd and on the stop eventfd only when there is nothing to do.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tracing::{debug, warn};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::frame::{self, Endpoints, OVERHEAD};
use super::gso::GsoBatch;
use super::table::Table;
use crate::api::metrics::{DirectionLabel, Metrics, ReasonLabel};

/// Counters the forwarder keeps: handles on the agent's Prometheus counters, resolved once
/// (a bump is one relaxed atomic add, no label lookup).
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_packets: Counter,
    pub tx_sends: Counter,
    pub tx_bytes: Counter,
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    pub dropped_no_route: Counter,
    pub dropped_not_ipv4: Counter,
    pub dropped_foreign: Counter,
    pub dropped_spoofed: Counter,
    pub dropped_malformed: Counter,
    pub errors: Counter,
}

impl Stats {
    pub fn new(m: &Metrics) -> Stats {
        let dir = |direction| {
            let l = DirectionLabel { direction };
            (
                m.forwarder_packets.get_or_create(&l).clone(),
                m.forwarder_bytes.get_or_create(&l).clone(),
            )
        };
        let dropped = |reason| {
            m.forwarder_dropped
                .get_or_create(&ReasonLabel { reason })
                .clone()
        };
        let ((tx_packets, tx_bytes), (rx_packets, rx_bytes)) = (dir("tx"), dir("rx"));
        Stats {
            tx_packets,
            tx_sends: m.forwarder_sends.clone(),
            tx_bytes,
            rx_packets,
            rx_bytes,
            dropped_no_route: dropped("no_route"),
            dropped_not_ipv4: dropped("not_ipv4"),
            dropped_foreign: dropped("foreign"),
            dropped_spoofed: dropped("spoofed_source"),
            dropped_malformed: dropped("malformed"),
            errors: m.forwarder_errors.clone(),
        }
    }

    fn add(c: &Counter, n: u64) {
        c.inc_by(n);
    }

    pub fn get(c: &Counter) -> u64 {
        c.get()
    }
}

/// What the workers share with the reconcile loop.
#[derive(Debug)]
pub struct Shared {
    table: RwLock<Arc<Table>>,
    generation: AtomicU64,
    pub stats: Stats,
    stop: OwnedFd,
}

impl Shared {
    pub fn new(stats: Stats) -> io::Result<Shared> {
        let stop = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(io::Error::from)?;
        Ok(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            generation: AtomicU64::new(0),
            stats,
            stop: stop.into(),
        })
    }

    /// Swaps in a new table; workers pick it up at their next batch.
    pub fn publish(&self, table: Table) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        *t = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn snapshot(&self) -> (u64, Arc<Table>) {
        let generation = self.generation.load(Ordering::Acquire);
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        (generation, t.clone())
    }

    /// Wakes every worker for good: the eventfd stays readable.
    pub fn stop(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.stop, &one);
    }

    fn stopping(&self) -> bool {
        let mut fds = [PollFd::new(self.stop.as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

/// The table a worker uses, refreshed when the reconcile loop published a new one.
struct View {
    generation: u64,
    table: Arc<Table>,
}

impl View {
    fn new(shared: &Shared) -> View {
        let (generation, table) = shared.snapshot();
        View { generation, table }
    }

    fn refresh(&mut self, shared: &Shared) {
        if shared.generation.load(Ordering::Acquire) != self.generation {
            *self = View::new(shared);
        }
    }
}

/// Blocks until `fd` is ready for `events` or the stop eventfd fires; true means stop.
fn wait(fd: BorrowedFd<'_>, events: PollFlags, shared: &Shared) -> bool {
    let mut fds = [
        PollFd::new(fd, events),
        PollFd::new(shared.stop.as_fd(), PollFlags::POLLIN),
    ];
    loop {
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
    fds[1].revents().is_some_and(|r| !r.is_empty())
}

/// Logs at most one line a minute per worker about errors, which can come in floods.
struct Complaints {
    last: Option<Instant>,
    what: &'static str,
}

impl Complaints {
    fn new(what: &'static str) -> Complaints {
        Complaints { last: None, what }
    }

    fn note(&mut self, stats: &Stats, e: &dyn std::fmt::Display) {
        Stats::add(&stats.errors, 1);
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            warn!(worker = self.what, error = %e, "userspace data plane error (repeats are counted, not logged, for a minute)");
            self.last = Some(Instant::now());
        }
    }
}

pub struct Wire {
    pub vni: u32,
    pub mac: [u8; 6],
    pub mtu: usize,
}

/// TUN -> UDP for one queue, until stopped or the device goes away.
pub fn run_tx(
    dev: Arc<SyncDevice>,
    sock: Arc<UdpSocket>,
    state: Arc<UdpSocketState>,
    shared: Arc<Shared>,
    wire: Wire,
) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; OVERHEAD + wire.mtu.max(1280)])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut batch = GsoBatch::default();
    let mut view = View::new(&shared);
    let mut complaints = Complaints::new("tun->udp");
    let stats = &shared.stats;
    loop {
        match dev.recv_multiple(&mut original, &mut bufs, &mut sizes, OVERHEAD) {
            Ok(n) => {
                view.refresh(&shared);
                for (buf, &len) in bufs.iter_mut().zip(&sizes).take(n) {
                    let frame = &mut buf[..OVERHEAD + len];
                    let packet = &frame[OVERHEAD..];
                    if len < 20 || packet[0] >> 4 != 4 {
                        Stats::add(&stats.dropped_not_ipv4, 1);
                        continue;
                    }
                    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                    let Some(to) = view.table.lookup(dst) else {
                        Stats::add(&stats.dropped_no_route, 1);
                        continue;
                    };
                    let ep = Endpoints {
                        vni: wire.vni,
                        local_mac: wire.mac,
                        remote_mac: to.mac,
                    };
                    if frame::write_header(frame, &ep).is_err() {
                        continue;
                    }
                    let segments = state.max_gso_segments();
                    if !batch.push(to.addr, frame, segments) {
                        if send(&sock, &state, &mut batch, &shared, &mut complaints) {
                            return;
                        }
                        batch.push(to.addr, frame, segments);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing more to read: send what is gathered, then sleep.
                if send(&sock, &state, &mut batch, &shared, &mut complaints)
                    || wait(dev.as_fd(), PollFlags::POLLIN, &shared)
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                warn!(error = %e, "the TUN device is gone; the tx worker stops");
                return;
            }
            Err(e) => complaints.note(stats, &e),
        }
    }
}

/// Sends the gathered batch (if any); true means the worker must stop.
fn send(
    sock: &UdpSocket,
    state: &UdpSocketState,
    batch: &mut GsoBatch,
    shared: &Shared,
    complaints: &mut Complaints,
) -> bool {
    let Some((destination, contents, segment_size)) = batch.pending() else {
        return false;
    };
    let t = Transmit {
        destination,
        ecn: None,
        contents,
        segment_size,
        src_ip: None,
    };
    loop {
        match state.try_send(UdpSockRef::from(sock), &t) {
            Ok(()) => {
                Stats::add(&shared.stats.tx_sends, 1);
                Stats::add(&shared.stats.tx_packets, batch.count() as u64);
                Stats::add(&shared.stats.tx_bytes, contents.len() as u64);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait(sock.as_fd(), PollFlags::POLLOUT, shared) {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                complaints.note(&shared.stats, &e);
                break;
            }
        }
    }
    batch.clear();
    false
}

/// UDP -> TUN for one queue's socket, until stopped.
pub fn run_rx(
    dev: Arc<SyncDevice>,
    sock: Arc<UdpSocket>,
    state: Arc<UdpSocketState>,
    shared: Arc<Shared>,
    wire: Wire,
) {
    // The largest UDP payload plus room, so a super-packet is never truncated.
    const SLOT: usize = 65_536 + 512;
    let mut storage = vec![0u8; quinn_udp::BATCH_SIZE * SLOT];
    let mut iovs: Vec<IoSliceMut<'_>> = storage.chunks_mut(SLOT).map(IoSliceMut::new).collect();
    let mut meta = vec![RecvMeta::default(); iovs.len()];
    // Each slot can grow into a whole super-packet: tun-rs coalesces a run of segments
    // into the first one's buffer and refuses (silently: one write per packet) when its
    // capacity is short. Capacity is reserved, not touched, until GRO uses it.
    let mut out: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(2 * VIRTIO_NET_HDR_LEN + 65_535))
        .collect();
    let mut used = 0usize;
    let mut scratch: Vec<u8> = Vec::with_capacity(frame::VIRTIO_HDR_LEN + SLOT);
    let mut gro = GROTable::default();
    let mut view = View::new(&shared);
    let mut complaints = Complaints::new("udp->tun");
    let stats = &shared.stats;
    loop {
        match state.recv(UdpSockRef::from(&*sock), &mut iovs, &mut meta) {
            Ok(n) => {
                view.refresh(&shared);
                for (m, iov) in meta.iter().zip(iovs.iter()).take(n) {
                    let data = &iov[..m.len.min(iov.len())];
                    let stride = m.stride.max(1);
                    if !view.table.accepts_from(&m.addr) {
                        Stats::add(&stats.dropped_foreign, data.len().div_ceil(stride) as u64);
                        continue;
                    }
                    // A kernel VXLAN peer on the same host hands us its unsegmented
                    // super-packet as one datagram (no NIC split it): the kernel behind
                    // our TUN device segments it instead.
                    if data.len() > OVERHEAD + wire.mtu {
                        if let Ok(p) = frame::inner_packet(data, wire.vni, &wire.mac) {
                            if p.len() + OVERHEAD == data.len() {
                                if !view.table.source_allowed(&m.addr, frame::inner_source(p)) {
                                    Stats::add(&stats.dropped_spoofed, 1);
                                    continue;
                                }
                                write_tun(
                                    &dev,
                                    &mut gro,
                                    &mut out,
                                    &mut used,
                                    stats,
                                    &mut complaints,
                                );
                                write_super_packet(
                                    &dev,
                                    &mut scratch,
                                    p,
                                    wire.mtu,
                                    stats,
                                    &mut complaints,
                                );
                                continue;
                            }
                        }
                    }
                    for datagram in data.chunks(stride) {
                        let packet = match frame::inner_packet(datagram, wire.vni, &wire.mac) {
                            Ok(p) => p,
                            Err(e) => {
                                debug!(from = %m.addr, error = %e, "dropping a datagram");
                                Stats::add(&stats.dropped_malformed, 1);
                                continue;
                            }
                        };
                        // The inner source must be the sending node's (one of its blocks,
                        // or its own address): the same rule the kernel backend's guard
                        // applies after decapsulation.
                        if !view
                            .table
                            .source_allowed(&m.addr, frame::inner_source(packet))
                        {
                            Stats::add(&stats.dropped_spoofed, 1);
                            continue;
                        }
                        let slot = &mut out[used];
                        slot.clear();
                        slot.resize(VIRTIO_NET_HDR_LEN, 0);
                        slot.extend_from_slice(packet);
                        frame::complete_partial_checksum(&mut slot[VIRTIO_NET_HDR_LEN..]);
                        used += 1;
                        Stats::add(&stats.rx_bytes, packet.len() as u64);
                        if used == out.len() {
                            write_tun(&dev, &mut gro, &mut out, &mut used, stats, &mut complaints);
                        }
                    }
                }
                write_tun(&dev, &mut gro, &mut out, &mut used, stats, &mut complaints);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait(sock.as_fd(), PollFlags::POLLIN, &shared) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ICMP errors for earlier sends surface here; they mean nothing for receiving.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            Err(e) => {
                complaints.note(stats, &e);
                if shared.stopping() {
                    return;
                }
            }
        }
    }
}

fn write_super_packet(
    dev: &SyncDevice,
    scratch: &mut Vec<u8>,
    packet: &[u8],
    mtu: usize,
    stats: &Stats,
    complaints: &mut Complaints,
) {
    let Some(header) = frame::super_packet_header(packet, mtu) else {
        Stats::add(&stats.dropped_malformed, 1);
        return;
    };
    scratch.clear();
    scratch.extend_from_slice(&header);
    scratch.extend_from_slice(packet);
    // Counted as the packets the kernel will cut it into, like every other rx packet.
    let hdr_len = usize::from(u16::from_le_bytes([header[2], header[3]]));
    let segment = usize::from(u16::from_le_bytes([header[4], header[5]])).max(1);
    Stats::add(
        &stats.rx_packets,
        (packet.len() - hdr_len).div_ceil(segment) as u64,
    );
    Stats::add(&stats.rx_bytes, packet.len() as u64);
    if let Err(e) = dev.send(scratch) {
        complaints.note(stats, &e);
    }
}

fn write_tun(
    dev: &SyncDevice,
    gro: &mut GROTable,
    out: &mut [Vec<u8>],
    used: &mut usize,
    stats: &Stats,
    complaints: &mut Complaints,
) {
    if *used == 0 {
        return;
    }
    Stats::add(&stats.rx_packets, *used as u64);
    if let Err(e) = dev.send_multiple(gro, &mut out[..*used], VIRTIO_NET_HDR_LEN) {
        complaints.note(stats, &e);
    }
    *used = 0;
}
