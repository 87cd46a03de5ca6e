//! Gratuitous ARP for a newly attached pod address, so a node or pod that cached the MAC
//! of the address's previous holder learns the new one at once (as the reference `bridge`
//! plugin does). The kernel's own `arp_notify` announcement fires as the link comes up,
//! which can be before the bridge has enabled the host end's port — then nobody hears it.
//! So the plugin waits until the host end is operationally up and announces again.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_agent::netlink::{netns, Netlink, NetlinkError};

/// How long ADD waits for the bridge port to come up before announcing anyway.
const PORT_WAIT: Duration = Duration::from_millis(500);

/// An ARP request for `ip` from `ip` (RFC 5227's announcement), broadcast.
fn announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero; target protocol address is our own.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends `frame` out of interface `index` of the calling thread's network namespace.
fn send_raw(index: u32, frame: &[u8]) -> std::io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned by `fd` below and closed on drop.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value to fill in.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `frame` and `to` outlive the call, and the lengths given are theirs.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits (bounded) until the host end `host_name` is operationally up, then announces
/// `ip` from the pod end (`pod_index`, `mac`) inside `pod_netns`, twice 10 ms apart.
pub async fn announce(
    host: &Netlink,
    host_name: &str,
    pod_netns: &Path,
    pod_index: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let started = Instant::now();
    while started.elapsed() < PORT_WAIT {
        match host.link_by_name(host_name).await? {
            Some(l) if l.oper_up => break,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let frame = announcement(mac, ip);
    let shown = pod_netns.display().to_string();
    netns::run_in(pod_netns, move || -> std::io::Result<()> {
        send_raw(pod_index, &frame)?;
        std::thread::sleep(Duration::from_millis(10));
        send_raw(pod_index, &frame)
    })?
    .map_err(|source| NetlinkError::Netns {
        path: shown,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_an_arp_request_for_our_own_address() {
        let f = announcement([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 32, 0, 5));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(
            &f[20..22],
            &[0, 1],
            "a request (Linux updates caches from both)"
        );
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&f[28..32], &[10, 32, 0, 5]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(
            &f[38..42],
            &[10, 32, 0, 5],
            "sender and target are the same address"
        );
    }
}
