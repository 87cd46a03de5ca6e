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
    #[error("inner IPv4 header is malformed or longer than the frame")]
    BadIpv4,
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

/// The IPv4 packet inside a received payload, checked and cut to the length its header
/// declares (a sender may pad short Ethernet frames; the TUN device must get the packet
/// alone, or GRO would fold the padding into the data).
pub fn inner_packet<'a>(
    payload: &'a [u8],
    vni: u32,
    local_mac: &[u8; 6],
) -> Result<&'a [u8], FrameError> {
    let at = parse(payload, vni, local_mac)?;
    let ip = &payload[at..];
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || header < 20 || total < header || total > ip.len() {
        return Err(FrameError::BadIpv4);
    }
    Ok(&ip[..total])
}

/// Length of the virtio-net header a TUN device with IFF_VNET_HDR reads and writes.
pub const VIRTIO_HDR_LEN: usize = 10;
const VIRTIO_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_GSO_TCPV4: u8 = 1;
const VIRTIO_GSO_UDP_L4: u8 = 5;

/// The source address of an inner IPv4 packet (`None` if it is not one).
pub fn inner_source(ip: &[u8]) -> Option<std::net::Ipv4Addr> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    Some(std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]))
}

/// The virtio-net header that hands a TCP or UDP super-packet to the TUN device for the
/// kernel to segment into packets of at most `mtu` bytes (checksums left to it: the field
/// holds the pseudo-header sum, as the sender's kernel left it). A kernel VXLAN peer on
/// the same host (veth, no NIC between) delivers such unsegmented packets to our socket,
/// and the socket does not say the sender's segment size (only UDP_L4 GSO carries one).
pub fn super_packet_header(ip: &[u8], mtu: usize) -> Option<[u8; VIRTIO_HDR_LEN]> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let (gso_type, l4_header, csum_offset) = match ip[9] {
        6 if ip.len() >= header + 20 => (
            VIRTIO_GSO_TCPV4,
            usize::from(ip[header + 12] >> 4) * 4,
            16u16,
        ),
        17 if ip.len() >= header + 8 => (VIRTIO_GSO_UDP_L4, 8, 6u16),
        _ => return None,
    };
    let hdr_len = header + l4_header;
    if header < 20 || l4_header < 8 || hdr_len >= ip.len() || hdr_len >= mtu {
        return None;
    }
    let segment = u16::try_from(mtu - hdr_len).ok()?;
    let mut h = [0u8; VIRTIO_HDR_LEN];
    h[0] = VIRTIO_F_NEEDS_CSUM;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
    h[4..6].copy_from_slice(&segment.to_le_bytes());
    h[6..8].copy_from_slice(&(header as u16).to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    Some(h)
}

/// One's-complement sum of `data` as big-endian 16-bit words, unfolded.
fn ones_sum(data: &[u8], mut sum: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Finishes a TCP or UDP checksum that a sender left for offload. Between network
/// namespaces (veth) nothing ever computes it: a kernel VXLAN peer sends the inner packet
/// with the checksum field still holding only the pseudo-header sum, which the kernel
/// trusts but userspace sees as a bad checksum — and so would the TUN device we write it
/// to. Only a field equal to exactly that sum is touched; a complete or a corrupt checksum
/// is left as it is (the kernel drops the corrupt one). Returns whether it changed.
pub fn complete_partial_checksum(ip: &mut [u8]) -> bool {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return false;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let field = match ip[9] {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    if fragmented || header < 20 || ip.len() < header + field + 2 {
        return false;
    }
    let l4_len = ip.len() - header;
    let pseudo = ones_sum(&ip[12..20], u64::from(ip[9]) + l4_len as u64);
    let at = header + field;
    if u16::from_be_bytes([ip[at], ip[at + 1]]) != fold(pseudo) {
        return false;
    }
    let mut sum = !fold(ones_sum(&ip[header..], 0));
    if sum == 0 && ip[9] == 17 {
        sum = 0xffff; // UDP: 0 means "no checksum"
    }
    ip[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
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

    #[test]
    fn the_inner_packet_is_cut_to_its_ip_length() {
        let mut buf = vec![0u8; OVERHEAD + 60];
        write_header(&mut buf, &EP).unwrap();
        buf[OVERHEAD] = 0x45;
        buf[OVERHEAD + 3] = 28; // total length 28: 32 bytes of Ethernet padding follow
        let inner = inner_packet(&buf, EP.vni, &EP.remote_mac).unwrap();
        assert_eq!(inner.len(), 28);
        buf[OVERHEAD + 2] = 1; // 284 bytes declared, 60 present
        assert_eq!(
            inner_packet(&buf, EP.vni, &EP.remote_mac),
            Err(FrameError::BadIpv4)
        );
        buf[OVERHEAD + 2] = 0;
        buf[OVERHEAD] = 0x65;
        assert_eq!(
            inner_packet(&buf, EP.vni, &EP.remote_mac),
            Err(FrameError::BadIpv4)
        );
    }

    /// Checks a TCP/UDP checksum the way a receiver does: the sum over pseudo-header and
    /// segment folds to 0xffff.
    fn valid(ip: &[u8]) -> bool {
        let header = usize::from(ip[0] & 0x0f) * 4;
        let l4 = (ip.len() - header) as u64;
        let pseudo = ones_sum(&ip[12..20], u64::from(ip[9]) + l4);
        fold(ones_sum(&ip[header..], pseudo)) == 0xffff
    }

    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 32, 0, 2, 10, 40, 1, 3]);
        p.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
        p.extend_from_slice(&[((8 + payload.len()) >> 8) as u8, (8 + payload.len()) as u8]);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// What the kernel leaves in an offloaded packet: the folded pseudo-header sum.
    fn offloaded(mut p: Vec<u8>, field: usize) -> Vec<u8> {
        let l4 = (p.len() - 20) as u64;
        let pseudo = fold(ones_sum(&p[12..20], u64::from(p[9]) + l4));
        p[20 + field..22 + field].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    #[test]
    fn a_partial_udp_checksum_is_completed_and_then_valid() {
        for len in [0, 1, 7, 100, 1401] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut p = offloaded(udp_packet(&payload), 6);
            assert!(!valid(&p));
            assert!(complete_partial_checksum(&mut p), "len {len}");
            assert!(valid(&p), "len {len}");
            assert!(
                !complete_partial_checksum(&mut p),
                "a complete checksum is left alone"
            );
        }
    }

    #[test]
    fn a_partial_tcp_checksum_is_completed() {
        let mut p = udp_packet(&[0u8; 40]);
        p[9] = 6;
        let mut p = offloaded(p, 16);
        assert!(complete_partial_checksum(&mut p));
        assert!(valid(&p));
    }

    #[test]
    fn corrupt_fragmented_and_other_protocols_are_not_touched() {
        let mut p = udp_packet(b"hello");
        p[26] = 0x12;
        p[27] = 0x34;
        let before = p.clone();
        assert!(!complete_partial_checksum(&mut p));
        assert_eq!(p, before);
        let mut f = offloaded(udp_packet(b"hello"), 6);
        f[6] = 0x20; // more fragments
        assert!(!complete_partial_checksum(&mut f));
        let mut icmp = udp_packet(b"hello");
        icmp[9] = 1;
        assert!(!complete_partial_checksum(&mut icmp));
        assert!(!complete_partial_checksum(&mut [0x45, 0, 0]));
    }

    #[test]
    fn super_packet_headers_describe_tcp_and_udp_segmentation() {
        let mut tcp = udp_packet(&[0u8; 3000]);
        tcp[9] = 6;
        tcp[32] = 0x80; // data offset 8 words: a 32-byte TCP header with options
        let h = super_packet_header(&tcp, 1450).unwrap();
        assert_eq!(
            h,
            [1, 1, 52, 0, 0x76, 0x05, 20, 0, 16, 0],
            "1450 - 52 = 1398"
        );
        let h = super_packet_header(&udp_packet(&[0u8; 3000]), 1450).unwrap();
        assert_eq!(
            h,
            [1, 5, 28, 0, 0x8e, 0x05, 20, 0, 6, 0],
            "1450 - 28 = 1422"
        );
        assert_eq!(super_packet_header(&tcp, 52), None, "no room for data");
        let mut icmp = udp_packet(&[0u8; 3000]);
        icmp[9] = 1;
        assert_eq!(super_packet_header(&icmp, 1400), None);
        assert_eq!(super_packet_header(&[0x45; 30], 1400), None);
        assert_eq!(
            super_packet_header(&udp_packet(&[]), 1400),
            None,
            "no payload"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes, 6783, &EP.local_mac);
            let _ = inner_packet(&bytes, 6783, &EP.local_mac);
            let mut b = bytes.clone();
            let _ = complete_partial_checksum(&mut b);
            let _ = super_packet_header(&bytes, 1450);
        }
    }
}
