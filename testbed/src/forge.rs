//! Crafted overlay traffic for the attack tests: VXLAN datagrams carrying an inner UDP
//! packet with whatever source the attacker likes, sent from a namespace either through
//! a plain UDP socket (the outer source is the sender's own address) or through a raw
//! socket with a spoofed outer source. Frames are built by hand here on purpose: no real
//! sender would make them.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::probe::enter;
use anyhow::{anyhow, bail, Context, Result};

/// The VNI mesh uses on the wire.
pub const VNI: u32 = 6783;

/// The VTEP MAC of a node, from its peer id as `meshctl status` prints it
/// (`e64b:5663:219a:9a45`): 0a:76 and the id's last four bytes.
pub fn vtep_mac(peer_id: &str) -> Result<[u8; 6]> {
    let hex: String = peer_id.chars().filter(|c| *c != ':').collect();
    let id = u64::from_str_radix(&hex, 16).with_context(|| format!("peer id {peer_id}"))?;
    let b = id.to_be_bytes();
    Ok([0x0a, 0x76, b[4], b[5], b[6], b[7]])
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 + UDP (UDP checksum 0: allowed for IPv4) around `payload`.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A VXLAN payload (header + Ethernet frame) carrying `inner` (an IPv4 packet).
pub fn vxlan(vni: u32, dst_mac: [u8; 6], src_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// Sends `payload` to `to`:`port` from namespace `netns` through a plain UDP socket
/// (three times, 30 ms apart: the first may wait on ARP).
pub fn send_udp(netns: &str, to: Ipv4Addr, port: u16, payload: Vec<u8>) -> Result<()> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<()> {
        enter(&netns)?;
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..3 {
            sock.send_to(&payload, (to, port))?;
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("sender panicked"))?
}

/// Sends a whole IPv4 `packet` (its own header, any source) from namespace `netns`
/// through a raw socket, three times 30 ms apart.
pub fn send_raw_ipv4(netns: &str, packet: Vec<u8>) -> Result<()> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<()> {
        enter(&netns)?;
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if raw < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_in is plain old data; zeroed is valid.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from(dst).to_be();
        for _ in 0..3 {
            // SAFETY: `packet` and `to` outlive the call; the lengths are theirs.
            let sent = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if sent < 0 {
                bail!("raw sendto: {}", std::io::Error::last_os_error());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("raw sender panicked"))?
}

/// What a listener received: (source, payload) of each datagram.
pub type Datagrams = Vec<(Ipv4Addr, Vec<u8>)>;

/// Listens on UDP `port` in `netns` for `window`; the receiver yields every datagram's
/// (source, payload) once the window is over.
pub fn udp_collect(netns: &str, port: u16, window: Duration) -> Result<mpsc::Receiver<Datagrams>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (out_tx, out_rx) = mpsc::channel();
    let netns = netns.to_string();
    std::thread::spawn(move || {
        let run = || -> Result<Datagrams> {
            enter(&netns)?;
            let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = ready_tx.send(());
            let started = Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while started.elapsed() < window {
                if let Ok((n, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                    got.push((*from.ip(), buf[..n].to_vec()));
                }
            }
            Ok(got)
        };
        let _ = out_tx.send(run().unwrap_or_default());
    });
    ready_rx
        .recv_timeout(Duration::from_secs(3))
        .map_err(|_| anyhow!("listener in {port} did not start"))?;
    Ok(out_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_well_formed() {
        let p = ipv4_udp(
            Ipv4Addr::new(10, 32, 0, 5),
            Ipv4Addr::new(10, 40, 0, 6),
            1000,
            9999,
            b"hi",
        );
        assert_eq!(p.len(), 30);
        assert_eq!(checksum(&p[..20]), 0, "a valid header sums to zero");
        let v = vxlan(VNI, [1; 6], [2; 6], &p);
        assert_eq!(&v[4..7], &[0x00, 0x1a, 0x7f], "VNI 6783");
        assert_eq!(v.len(), 8 + 14 + 30);
        assert_eq!(
            vtep_mac("e64b:5663:219a:9a45").unwrap(),
            [0x0a, 0x76, 0x21, 0x9a, 0x9a, 0x45]
        );
    }
}
