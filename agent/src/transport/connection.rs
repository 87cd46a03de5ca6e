//! One control connection: dial or accept, the version handshake, then a reader and a
//! writer task that move frames between the QUIC stream and the driver.
//!
//! Never decides policy (duplicates, limits, retries): it reports to the driver through
//! [`TransportEvent`]s and the driver decides.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::wire::{self, Frame, Hello, HelloReply, RefuseReason, MAGIC};
use mesh_proto::{PeerId, PeerRecord};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use super::framing::{read_frame, write_message, FrameError};
use super::tls::{describe_connection_error, SERVER_NAME};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A `Hello` is one peer record; anything larger is not a mesh peer.
const MAX_HELLO: usize = 64 * 1024;
/// QUIC application close codes.
pub const CLOSE_REFUSED: u32 = 1;
pub const CLOSE_PROTOCOL: u32 = 2;
pub const CLOSE_DUPLICATE: u32 = 3;
pub const CLOSE_IDLE: u32 = 4;
pub const CLOSE_SHUTDOWN: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// What the local side offers in a handshake, and what it can take.
#[derive(Clone)]
pub struct Local {
    pub record: watch::Receiver<PeerRecord>,
    pub protocol: (u16, u16),
    /// Established links right now (kept by the driver) and the most we accept.
    pub links: Arc<AtomicUsize>,
    pub max_links: usize,
}

/// A connection that passed TLS and the version handshake.
pub struct Established {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub peer: PeerRecord,
    pub version: u16,
    pub direction: Direction,
    pub addr: SocketAddr,
    /// The dial target this came from (outbound only).
    pub target: Option<String>,
}

pub enum TransportEvent {
    Established(Box<Established>),
    DialFailed {
        target: String,
        reason: String,
    },
    InboundFailed {
        addr: SocketAddr,
        reason: String,
    },
    Frame {
        conn_id: u64,
        peer: PeerId,
        frame: Frame,
        bytes: usize,
    },
    Closed {
        conn_id: u64,
        peer: PeerId,
        reason: String,
    },
}

/// Resolves `target` (`host:port`; names are looked up on every attempt), dials it and
/// runs the dialer's half of the handshake.
pub async fn dial(
    endpoint: quinn::Endpoint,
    target: String,
    local: Local,
    events: mpsc::Sender<TransportEvent>,
) {
    let event = match dial_inner(&endpoint, &target, &local).await {
        Ok(est) => TransportEvent::Established(Box::new(est)),
        Err(reason) => TransportEvent::DialFailed { target, reason },
    };
    let _ = events.send(event).await;
}

async fn dial_inner(
    endpoint: &quinn::Endpoint,
    target: &str,
    local: &Local,
) -> Result<Established, String> {
    let addr = match timeout(HANDSHAKE_TIMEOUT, tokio::net::lookup_host(target)).await {
        Err(_) => return Err(format!("cannot resolve {target}: lookup timed out")),
        Ok(Err(e)) => return Err(format!("cannot resolve {target}: {e}")),
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| format!("{target} resolves to no address"))?,
    };
    let connecting = endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| format!("cannot dial: {e}"))?;
    let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) => return Err("timed out (no answer from peer)".into()),
        Ok(Err(e)) => return Err(describe_connection_error(&e)),
        Ok(Ok(c)) => c,
    };
    let result = timeout(HANDSHAKE_TIMEOUT, dialer_handshake(&conn, local)).await;
    let (send, recv, peer, version) = match result {
        Err(_) => {
            conn.close(CLOSE_PROTOCOL.into(), b"handshake timed out");
            return Err("handshake timed out".into());
        }
        Ok(Err(reason)) => {
            conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
            return Err(reason);
        }
        Ok(Ok(v)) => v,
    };
    Ok(Established {
        conn,
        send,
        recv,
        peer,
        version,
        direction: Direction::Out,
        addr,
        target: Some(target.to_string()),
    })
}

async fn dialer_handshake(
    conn: &quinn::Connection,
    local: &Local,
) -> Result<(quinn::SendStream, quinn::RecvStream, PeerRecord, u16), String> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let record = local.record.borrow().clone();
    let me = record.id;
    let hello = Hello {
        magic: MAGIC,
        min_version: local.protocol.0,
        max_version: local.protocol.1,
        record,
    };
    write_message(&mut send, &hello)
        .await
        .map_err(|e| explain(conn, e))?;
    let mut buf = Vec::new();
    read_frame(&mut recv, &mut buf, MAX_HELLO)
        .await
        .map_err(|e| explain(conn, e))?;
    match wire::decode_body::<HelloReply>(&buf) {
        Ok(HelloReply::Welcome { version, record }) => {
            if record.id == me {
                return Err(RefuseReason::SameId.to_string());
            }
            Ok((send, recv, record, version))
        }
        Ok(HelloReply::Refuse { reason }) => Err(format!("refused by peer: {reason}")),
        Err(e) => Err(format!("protocol error: undecodable handshake reply: {e}")),
    }
}

/// Accepts one incoming connection and runs the acceptor's half of the handshake.
pub async fn accept(incoming: quinn::Incoming, local: Local, events: mpsc::Sender<TransportEvent>) {
    let addr = incoming.remote_address();
    let event = match accept_inner(incoming, addr, &local).await {
        Ok(est) => TransportEvent::Established(Box::new(est)),
        Err(reason) => TransportEvent::InboundFailed { addr, reason },
    };
    let _ = events.send(event).await;
}

async fn accept_inner(
    incoming: quinn::Incoming,
    addr: SocketAddr,
    local: &Local,
) -> Result<Established, String> {
    let connecting = incoming
        .accept()
        .map_err(|e| describe_connection_error(&e))?;
    let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) => return Err("timed out during TLS handshake".into()),
        Ok(Err(e)) => return Err(describe_connection_error(&e)),
        Ok(Ok(c)) => c,
    };
    match timeout(HANDSHAKE_TIMEOUT, acceptor_handshake(&conn, local)).await {
        Err(_) => {
            conn.close(CLOSE_PROTOCOL.into(), b"handshake timed out");
            Err("handshake timed out".into())
        }
        Ok(Err(reason)) => Err(reason),
        Ok(Ok((send, recv, peer, version))) => Ok(Established {
            conn,
            send,
            recv,
            peer,
            version,
            direction: Direction::In,
            addr,
            target: None,
        }),
    }
}

async fn acceptor_handshake(
    conn: &quinn::Connection,
    local: &Local,
) -> Result<(quinn::SendStream, quinn::RecvStream, PeerRecord, u16), String> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let mut buf = Vec::new();
    read_frame(&mut recv, &mut buf, MAX_HELLO)
        .await
        .map_err(|e| explain(conn, e))?;
    let (head, full) = match wire::decode_hello(&buf) {
        Ok(v) => v,
        Err(e) => {
            conn.close(CLOSE_PROTOCOL.into(), b"not a mesh handshake");
            return Err(format!("protocol error: {e}"));
        }
    };
    let theirs = (head.min_version, head.max_version);
    let Some(version) = wire::negotiate(local.protocol, theirs) else {
        return refuse(
            conn,
            &mut send,
            RefuseReason::ProtocolVersion {
                ours: local.protocol,
                theirs,
            },
        )
        .await;
    };
    let hello = match full {
        Ok(h) => h,
        Err(e) => {
            return refuse(
                conn,
                &mut send,
                RefuseReason::Other(format!("undecodable hello: {e}")),
            )
            .await
        }
    };
    let record = local.record.borrow().clone();
    if hello.record.id == record.id {
        return refuse(conn, &mut send, RefuseReason::SameId).await;
    }
    // Refused here, before `Welcome`, so the dialer sees a refusal (and backs off) rather
    // than a link that dies right after it was made.
    if local.links.load(Ordering::Relaxed) >= local.max_links {
        let limit = u32::try_from(local.max_links).unwrap_or(u32::MAX);
        return refuse(conn, &mut send, RefuseReason::TooManyConnections { limit }).await;
    }
    write_message(&mut send, &HelloReply::Welcome { version, record })
        .await
        .map_err(|e| explain(conn, e))?;
    Ok((send, recv, hello.record, version))
}

/// Tells the dialer why, then closes with the same reason.
async fn refuse<T>(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    reason: RefuseReason,
) -> Result<T, String> {
    let text = reason.to_string();
    let _ = write_message(send, &HelloReply::Refuse { reason }).await;
    let _ = send.finish();
    // Give the refusal a moment to arrive before the close overtakes it.
    let _ = timeout(Duration::from_millis(500), send.stopped()).await;
    conn.close(CLOSE_REFUSED.into(), text.as_bytes());
    Err(format!("refused: {text}"))
}

/// Prefers the connection's own close reason (e.g. the peer's refusal) over a stream error.
fn explain(conn: &quinn::Connection, e: FrameError) -> String {
    match conn.close_reason() {
        Some(reason) => describe_connection_error(&reason),
        None => e.to_string(),
    }
}

/// Moves frames until the connection ends; reports `Closed` exactly once.
pub fn run(
    conn_id: u64,
    est: Established,
    events: mpsc::Sender<TransportEvent>,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
) {
    let Established {
        conn,
        mut send,
        mut recv,
        peer,
        ..
    } = est;
    let peer_id = peer.id;
    let writer_conn = conn.clone();
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
        // The driver dropped us: close politely unless the connection is already gone.
        if writer_conn.close_reason().is_none() {
            let _ = send.finish();
        }
    });
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(4096);
        let reason = loop {
            match read_frame(&mut recv, &mut buf, wire::MAX_FRAME).await {
                Ok(()) => match wire::decode_body::<Frame>(&buf) {
                    Ok(frame) => {
                        let bytes = buf.len() + 4;
                        if events
                            .send(TransportEvent::Frame {
                                conn_id,
                                peer: peer_id,
                                frame,
                                bytes,
                            })
                            .await
                            .is_err()
                        {
                            break "agent shutting down".to_string();
                        }
                    }
                    Err(e) => {
                        let reason = format!("protocol error: {e}");
                        conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                        break reason;
                    }
                },
                Err(FrameError::Wire(e)) => {
                    let reason = format!("protocol error: {e}");
                    conn.close(CLOSE_PROTOCOL.into(), reason.as_bytes());
                    break reason;
                }
                Err(e) => break explain(&conn, e),
            }
        };
        let _ = events
            .send(TransportEvent::Closed {
                conn_id,
                peer: peer_id,
                reason,
            })
            .await;
    });
}
