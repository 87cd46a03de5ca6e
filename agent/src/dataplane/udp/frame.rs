//! VXLAN framing for the userspace backend, byte-for-byte what the kernel's VXLAN device
//! puts in (and expects in) the UDP payload (RFC 7348): an 8-byte VXLAN header with the
//! I flag and the VNI, then an Ethernet header (destination = the remote VTEP's MAC,
//! source = ours, EtherType IPv4), then the IP packet the TUN device gave us. Pure
//! functions over caller-owned buffers: no allocation per packet.

/// VXLAN header (8) + Ethernet header (14).
pub const OVERHEAD: usize = 22;
const VXLAN_FLAG_I: u8 = 0x08;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub vni: u32,
    pub local_mac: [u8; 6],
    pub remote_mac: [u8; 6],
}

/// Writes the 22 header bytes in front of an IP packet: `buf[..OVERHEAD]` is filled and
/// `buf[OVERHEAD..]` must already hold the packet (callers reserve the headroom when they
/// read from the TUN device, so nothing is copied).
pub fn write_header(buf: &mut [u8], ep: &Endpoints) -> Result<(), FrameError> {
    if buf.len() < OVERHEAD {
        return Err(FrameError::Short(buf.len()));
    }
    let vni = ep.vni.to_be_bytes();
    buf[..8].copy_from_slice(&[VXLAN_FLAG_I, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
    buf[8..14].copy_from_slice(&ep.remote_mac);
    buf[14..20].copy_from_slice(&ep.local_mac);
    buf[20..22].copy_from_slice(&ETHERTYPE_IPV4);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("datagram of {0} bytes is shorter than the VXLAN + Ethernet headers")]
    Short(usize),
    #[error("VXLAN I flag not set")]
    NoVni,
    #[error("VNI {0} is not ours")]
    OtherVni(u32),
    #[error("inner frame is for {0:02x?}, not our VTEP")]
    NotForUs([u8; 6]),
    #[error("inner EtherType {0:#06x} is not IPv4")]
    NotIpv4(u16),
}

/// Checks a received UDP payload and returns the offset of the inner IP packet (always
/// `OVERHEAD`) so the caller can hand `payload[OVERHEAD..]` to the TUN device in place.
/// Anything not addressed to us on our VNI is refused: it came from outside the mesh.
pub fn parse(payload: &[u8], vni: u32, local_mac: &[u8; 6]) -> Result<usize, FrameError> {
    if payload.len() < OVERHEAD + 20 {
        return Err(FrameError::Short(payload.len()));
    }
    if payload[0] & VXLAN_FLAG_I == 0 {
        return Err(FrameError::NoVni);
    }
    let got = u32::from_be_bytes([0, payload[4], payload[5], payload[6]]);
    if got != vni {
        return Err(FrameError::OtherVni(got));
    }
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&payload[8..14]);
    if &dst != local_mac {
        return Err(FrameError::NotForUs(dst));
    }
    let ethertype = u16::from_be_bytes([payload[20], payload[21]]);
    if ethertype != 0x0800 {
        return Err(FrameError::NotIpv4(ethertype));
    }
    Ok(OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EP: Endpoints = Endpoints {
        vni: 6783,
        local_mac: [0x0a, 0x76, 1, 2, 3, 4],
        remote_mac: [0x0a, 0x76, 5, 6, 7, 8],
    };

    /// The payload a Linux VXLAN device (vni 6783) sends for a 20-byte IP header, as
    /// `tcpdump -x` shows it after the outer UDP header.
    #[test]
    fn header_matches_the_kernels_bytes() {
        let mut buf = vec![0u8; OVERHEAD + 20];
        buf[OVERHEAD] = 0x45;
        write_header(&mut buf, &EP).unwrap();
        assert_eq!(
            &buf[..OVERHEAD],
            &[
                0x08, 0, 0, 0, 0x00, 0x1a, 0x7f, 0, // flags, VNI 6783 = 0x001a7f
                0x0a, 0x76, 5, 6, 7, 8, // inner dst = remote VTEP
                0x0a, 0x76, 1, 2, 3, 4, // inner src = us
                0x08, 0x00,
            ]
        );
    }

    #[test]
    fn what_one_end_writes_the_other_accepts() {
        let mut buf = vec![0u8; OVERHEAD + 40];
        write_header(&mut buf, &EP).unwrap();
        assert_eq!(parse(&buf, EP.vni, &EP.remote_mac), Ok(OVERHEAD));
        assert_eq!(
            parse(&buf, EP.vni, &EP.local_mac),
            Err(FrameError::NotForUs(EP.remote_mac))
        );
        assert_eq!(
            parse(&buf, 1, &EP.remote_mac),
            Err(FrameError::OtherVni(6783))
        );
    }

    #[test]
    fn short_and_foreign_payloads_are_refused() {
        assert!(matches!(
            parse(&[0u8; 10], 6783, &EP.local_mac),
            Err(FrameError::Short(10))
        ));
        let mut buf = vec![0u8; 64];
        write_header(&mut buf, &EP).unwrap();
        buf[0] = 0;
        assert_eq!(parse(&buf, 6783, &EP.remote_mac), Err(FrameError::NoVni));
        buf[0] = 0x08;
        buf[20] = 0x86;
        buf[21] = 0xdd;
        assert_eq!(
            parse(&buf, 6783, &EP.remote_mac),
            Err(FrameError::NotIpv4(0x86dd))
        );
        assert_eq!(write_header(&mut [0u8; 5], &EP), Err(FrameError::Short(5)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes, 6783, &EP.local_mac);
        }
    }
}
