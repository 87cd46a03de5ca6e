//! Length-delimited frames on a QUIC stream (see `mesh_proto::wire`).

use mesh_proto::wire::{self, WireError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream closed")]
    Closed,
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("protocol error: {0}")]
    Wire(#[from] WireError),
}

/// Reads one frame body of at most `max` bytes into `buf` (reused between calls).
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = wire::frame_len(header)?;
    if len > max {
        return Err(FrameError::Wire(WireError::TooLarge(len)));
    }
    buf.clear();
    buf.resize(len, 0);
    recv.read_exact(buf).await?;
    Ok(())
}

pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<usize, FrameError> {
    let frame = wire::encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}
