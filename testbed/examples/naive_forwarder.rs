//! The baseline the `udp` backend is measured against: a deliberately naive userspace
//! UDP-over-TUN forwarder, the way Flannel's old `udp` backend and Weave's sleeve worked.
//! One thread polls the TUN fd and a UDP socket; every IP packet read from the TUN device
//! goes out as one datagram to the single peer (one `read` + one `sendto`), every datagram
//! received is written to the TUN device (one `recvfrom` + one `write`). No batching, no
//! offloads, no VXLAN header (plain IP in UDP, so it may use MTU 1472), default socket
//! buffers. Semantics follow `../shared/bench/bl_udptun.c`, which gave ~2.8 Gbit/s here.
//!
//!   naive_forwarder <tun-name> <local-port> <peer-ip> <peer-port>
//!
//! The caller sets the device's address, MTU, state and routes with `ip`.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const BATCH: usize = 64;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> Result<OwnedFd> {
    if name.len() >= 16 {
        bail!("interface name {name} is too long");
    }
    // SAFETY: plain open(2) of a path literal; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(fd)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        bail!("usage: naive_forwarder <tun-name> <local-port> <peer-ip> <peer-port>");
    }
    let tun = open_tun(&args[1])?;
    let port: u16 = args[2].parse().context("local port")?;
    let peer = SocketAddrV4::new(
        args[3].parse::<Ipv4Addr>().context("peer ip")?,
        args[4].parse().context("peer port")?,
    );
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    sock.set_nonblocking(true)?;
    nix::fcntl::fcntl(
        &tun,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let mut fds = [
            PollFd::new(tun.as_fd(), PollFlags::POLLIN),
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        for _ in 0..BATCH {
            match nix::unistd::read(&tun, &mut buf) {
                Ok(n) => {
                    let _ = sock.send_to(&buf[..n], peer);
                }
                Err(_) => break,
            }
        }
        for _ in 0..BATCH {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let _ = nix::unistd::write(&tun, &buf[..n]);
                }
                Err(_) => break,
            }
        }
    }
}
