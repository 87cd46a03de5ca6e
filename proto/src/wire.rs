//! Framing and version handshake on a control connection.
//!
//! A control connection is one QUIC bidirectional stream opened by the dialer. Each side
//! writes length-delimited frames: a 4-byte big-endian length, then a postcard body.
//! The first frame each way is the handshake ([`Hello`], then [`HelloReply`]); every later
//! frame is a [`Frame`].
//!
//! Compatibility rule: the handshake's leading fields (`magic`, `min_version`,
//! `max_version`) never change shape, so any two versions can at least agree to disagree
//! with a readable reason. Everything after the handshake may change with the protocol version.

use serde::{Deserialize, Serialize};

use crate::gossip::GossipMessage;
use crate::peer::PeerRecord;

/// The protocol versions this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
pub const PROTOCOL_MAX: u16 = 1;
/// First bytes of every `Hello`; rejects a stray client speaking something else.
pub const MAGIC: [u8; 4] = *b"MESH";
/// ALPN for QUIC; a peer without it fails the TLS handshake.
pub const ALPN: &[u8] = b"mesh/1";
/// The largest frame we accept. A 1,000-peer full state is about 250 KiB.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("bad magic {0:02x?}: the peer does not speak the mesh protocol")]
    BadMagic([u8; 4]),
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
}

/// The dialer's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub min_version: u16,
    pub max_version: u16,
    pub record: PeerRecord,
}

/// The fixed-shape head of a [`Hello`], decodable whatever the rest looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloHead {
    pub magic: [u8; 4],
    pub min_version: u16,
    pub max_version: u16,
}

/// The acceptor's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome { version: u16, record: PeerRecord },
    Refuse { reason: RefuseReason },
}

/// Why an acceptor refused a connection. Shown verbatim in `meshctl status connections`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    ProtocolVersion {
        ours: (u16, u16),
        theirs: (u16, u16),
    },
    /// The dialer claims our own id (a cloned state directory, or dialing ourselves).
    SameId,
    /// The acceptor is at its connection limit.
    TooManyConnections {
        limit: u32,
    },
    /// A connection with this peer already exists and wins the tie-break.
    Duplicate,
    Other(String),
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::ProtocolVersion { ours, theirs } => write!(
                f,
                "protocol version mismatch: we speak {}..={}, peer speaks {}..={}",
                ours.0, ours.1, theirs.0, theirs.1
            ),
            RefuseReason::SameId => write!(f, "peer has our own peer id (cloned state dir?)"),
            RefuseReason::TooManyConnections { limit } => {
                write!(f, "too many connections (limit {limit})")
            }
            RefuseReason::Duplicate => write!(f, "duplicate connection"),
            RefuseReason::Other(s) => f.write_str(s),
        }
    }
}

/// Every frame after the handshake. Channels (topology, later IPAM) share one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Gossip(GossipMessage),
    Ipam(crate::ipam::IpamMessage),
}

/// Picks the highest version both ranges contain.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let lo = ours.0.max(theirs.0);
    let hi = ours.1.min(theirs.1);
    (lo <= hi).then_some(hi)
}

/// Encodes a message as one frame: 4-byte big-endian length, then the postcard body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; 4];
    let body = postcard::to_extend(msg, Vec::new())?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    out[..4].copy_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a frame header and says how many body bytes follow.
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body. Trailing bytes are an error: they mean a framing bug or tampering.
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(WireError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// Decodes a `Hello` body in two steps so a peer of another version gets a clear refusal
/// instead of a decode error.
pub fn decode_hello(body: &[u8]) -> Result<(HelloHead, Result<Hello, WireError>), WireError> {
    let (head, _) = postcard::take_from_bytes::<HelloHead>(body)?;
    if head.magic != MAGIC {
        return Err(WireError::BadMagic(head.magic));
    }
    Ok((head, decode_body::<Hello>(body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{Capabilities, PeerId};

    fn record() -> PeerRecord {
        PeerRecord {
            id: PeerId(7),
            name: "n1".into(),
            incarnation: 3,
            version: 9,
            addresses: vec!["127.0.0.1:6783".parse().unwrap()],
            capabilities: Capabilities::default(),
            connections: vec![],
        }
    }

    #[test]
    fn hello_round_trips_and_head_decodes_alone() {
        let hello = Hello {
            magic: MAGIC,
            min_version: 1,
            max_version: 4,
            record: record(),
        };
        let frame = encode_frame(&hello).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        let (head, full) = decode_hello(&frame[4..]).unwrap();
        assert_eq!((head.min_version, head.max_version), (1, 4));
        assert_eq!(full.unwrap(), hello);
    }

    #[test]
    fn hello_from_a_future_version_still_yields_its_head() {
        // A future Hello whose tail we cannot parse: the head must still decode.
        let mut body = postcard::to_allocvec(&HelloHead {
            magic: MAGIC,
            min_version: 5,
            max_version: 9,
        })
        .unwrap();
        body.extend_from_slice(&[0xff; 3]);
        let (head, full) = decode_hello(&body).unwrap();
        assert_eq!(head.max_version, 9);
        assert!(full.is_err());
    }

    #[test]
    fn wrong_magic_is_named() {
        let body = postcard::to_allocvec(&HelloHead {
            magic: *b"HTTP",
            min_version: 1,
            max_version: 1,
        })
        .unwrap();
        assert!(matches!(decode_hello(&body), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (2, 2)), None);
    }

    #[test]
    fn oversized_frame_header_is_rejected() {
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut body = postcard::to_allocvec(&Frame::Gossip(crate::gossip::GossipMessage::Pull {
            ids: vec![],
        }))
        .unwrap();
        body.push(0);
        assert!(decode_body::<Frame>(&body).is_err());
    }
}
