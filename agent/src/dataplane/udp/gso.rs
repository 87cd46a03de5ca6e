//! Grouping outgoing VXLAN datagrams into UDP GSO batches: one `sendmsg` with
//! `UDP_SEGMENT` carries a run of datagrams to the same node that all have the same size,
//! except that the last may be shorter (the kernel splits the buffer every `segment`
//! bytes). A TCP super-packet from the TUN device splits into exactly such a run. The
//! buffer is reused; nothing is allocated per packet.

use std::net::SocketAddr;

/// The most a single UDP GSO send may carry (IPv4: 65,535 − 20 − 8). Above it the kernel
/// answers EMSGSIZE, which quinn-udp would report as success, so nothing would be sent.
pub const MAX_GSO_BYTES: usize = 65_507;

#[derive(Debug)]
pub struct GsoBatch {
    buf: Vec<u8>,
    dest: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run: nothing more may join.
    closed: bool,
}

impl Default for GsoBatch {
    fn default() -> Self {
        GsoBatch {
            buf: Vec::with_capacity(MAX_GSO_BYTES),
            dest: None,
            segment: 0,
            count: 0,
            closed: false,
        }
    }
}

impl GsoBatch {
    /// Appends `datagram` for `dest` if it can join the current run; returns false (and
    /// changes nothing) when the caller must flush first.
    pub fn push(&mut self, dest: SocketAddr, datagram: &[u8], max_segments: usize) -> bool {
        if self.count == 0 {
            self.dest = Some(dest);
            self.segment = datagram.len();
            self.closed = false;
        } else if self.dest != Some(dest)
            || self.closed
            || datagram.len() > self.segment
            || self.count >= max_segments.max(1)
            || self.buf.len() + datagram.len() > MAX_GSO_BYTES
        {
            return false;
        }
        if datagram.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// What to send: destination, the bytes, and the segment size when there is more than
    /// one datagram.
    pub fn pending(&self) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        let dest = self.dest.filter(|_| self.count > 0)?;
        Some((dest, &self.buf, (self.count > 1).then_some(self.segment)))
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.dest = None;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> SocketAddr {
        "192.168.1.2:8472".parse().unwrap()
    }
    fn b() -> SocketAddr {
        "192.168.1.3:8472".parse().unwrap()
    }

    #[test]
    fn equal_segments_then_one_shorter_form_one_send() {
        let mut g = GsoBatch::default();
        assert!(g.push(a(), &[1; 1472], 64));
        assert!(g.push(a(), &[2; 1472], 64));
        assert!(g.push(a(), &[3; 100], 64));
        assert!(
            !g.push(a(), &[4; 100], 64),
            "nothing may follow the short one"
        );
        let (dest, bytes, seg) = g.pending().unwrap();
        assert_eq!((dest, bytes.len(), seg), (a(), 1472 * 2 + 100, Some(1472)));
        assert_eq!(bytes[1472], 2);
    }

    #[test]
    fn a_new_destination_or_a_larger_datagram_needs_a_flush() {
        let mut g = GsoBatch::default();
        assert!(g.push(a(), &[0; 500], 64));
        assert!(!g.push(b(), &[0; 500], 64));
        assert!(!g.push(a(), &[0; 501], 64));
        g.clear();
        assert!(g.is_empty() && g.pending().is_none());
        assert!(g.push(b(), &[0; 501], 64));
        assert_eq!(
            g.pending().unwrap().2,
            None,
            "a single datagram needs no GSO"
        );
    }

    #[test]
    fn stays_under_the_kernel_limits() {
        let mut g = GsoBatch::default();
        let mut n = 0;
        while g.push(a(), &[0; 1472], 64) {
            n += 1;
        }
        assert_eq!(n, MAX_GSO_BYTES / 1472);
        assert!(g.pending().unwrap().1.len() <= MAX_GSO_BYTES);

        let mut g = GsoBatch::default();
        let mut n = 0;
        while g.push(a(), &[0; 100], 8) {
            n += 1;
        }
        assert_eq!(n, 8, "the socket's segment limit holds");
        let mut g = GsoBatch::default();
        assert!(g.push(a(), &[0; 100], 0) && !g.push(a(), &[0; 100], 0));
    }
}
