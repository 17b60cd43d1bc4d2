//! The async side of the host<->guest frame codec: one frame read or written on a tokio
//! stream. The frame format and its bounds live in `matchlock-guest-proto` (shared with the
//! guest, which is synchronous); every host module that talks to the guest (exec, files,
//! port forwards, the relay, the benchmark) uses these two functions.
//!
//! [`REPLY_TIMEOUT`] is the one deadline for a guest agent's reply to a request (exec
//! `Started`, a port forward's `Ok`, every frame of a file session): a wedged or hostile
//! agent becomes an error naming the step, never a hang.

use std::time::Duration;

use matchlock_guest_proto::{Frame, ProtoError, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long the host waits for the guest agent to answer a request, or to accept a frame
/// of it. Generous for TCG on a loaded host: the agent answers as soon as it has acted.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one frame; `Ok(None)` on EOF at a frame boundary. Length is bounded by the codec.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r
            .read(&mut header[got..])
            .await
            .map_err(ProtoError::ReadHeader)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ProtoError::ReadHeader(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        got += n;
    }
    let (kind, len) = Frame::decode_header(header)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(|source| ProtoError::ReadPayload { len, source })?;
    Ok(Some(Frame::new(kind, payload)))
}

/// Writes one frame in a single write.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), ProtoError> {
    let buf = f.encode()?;
    w.write_all(&buf).await.map_err(ProtoError::Write)?;
    w.flush().await.map_err(ProtoError::Write)
}
