//! The host side of the network hook callback protocol (spec §4.6): one Unix-socket
//! connection per call to the SDK process's server, one JSON line out, one JSON object back.
//!
//! # Design
//! Connect, write and read all run under one deadline: the rule's `timeout_ms`, or
//! [`super::DEFAULT_CALLBACK_TIMEOUT`] (5 s) when it is 0. The reference's spec says "no
//! timeout" for 0, and an older reference build used a fixed 2 s; a bounded default keeps a
//! hung SDK from holding a guest request forever while leaving slow hooks room. The reply
//! is read up to a newline or EOF and bounded ([`MAX_REPLY`]); a longer reply is an error.
//! Every failure is returned to the engine, which traces it and ignores the callback, as
//! the reference does.
//!
//! # Limitations
//! One connection per call (as the SDKs expect); no pooling.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::wire::{CallbackRequest, CallbackResponse};

/// Largest callback reply accepted: room for a 16 MiB `set_body_base64` plus headers.
pub const MAX_REPLY: u64 = 24 * 1024 * 1024;

/// Why a callback was ignored.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// The SDK's socket refused or was missing.
    #[error("cannot connect to the callback socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The request could not be encoded.
    #[error("cannot encode the callback request")]
    Encode(#[source] serde_json::Error),
    /// Writing the request failed.
    #[error("cannot write the callback request")]
    Write(#[source] std::io::Error),
    /// Reading the reply failed.
    #[error("cannot read the callback reply")]
    Read(#[source] std::io::Error),
    /// The reply was longer than [`MAX_REPLY`].
    #[error("callback reply longer than {limit} bytes")]
    ReplyTooLarge { limit: u64 },
    /// The SDK closed the connection without a reply.
    #[error("callback closed the connection without a reply")]
    EmptyReply,
    /// The reply was not a callback response object.
    #[error("callback reply is not a valid response")]
    Decode(#[source] serde_json::Error),
    /// The SDK answered with an `error`.
    #[error("callback answered with an error: {message}")]
    Remote { message: String },
    /// No reply within the deadline.
    #[error("callback did not answer within {ms} ms")]
    Timeout { ms: u128 },
}

/// Calls the SDK's callback server at `socket` with `req`, within `timeout`.
pub(crate) async fn invoke(
    socket: &Path,
    req: &CallbackRequest<'_>,
    timeout: Duration,
) -> Result<CallbackResponse, CallbackError> {
    match tokio::time::timeout(timeout, exchange(socket, req)).await {
        Ok(result) => result,
        Err(_) => Err(CallbackError::Timeout {
            ms: timeout.as_millis(),
        }),
    }
}

async fn exchange(
    socket: &Path,
    req: &CallbackRequest<'_>,
) -> Result<CallbackResponse, CallbackError> {
    let mut line = serde_json::to_vec(req).map_err(CallbackError::Encode)?;
    line.push(b'\n');
    let mut stream =
        UnixStream::connect(socket)
            .await
            .map_err(|source| CallbackError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
    stream
        .write_all(&line)
        .await
        .map_err(CallbackError::Write)?;
    let mut reply = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REPLY + 1);
    reader
        .read_until(b'\n', &mut reply)
        .await
        .map_err(CallbackError::Read)?;
    if reply.len() as u64 > MAX_REPLY {
        return Err(CallbackError::ReplyTooLarge { limit: MAX_REPLY });
    }
    if reply.iter().all(u8::is_ascii_whitespace) {
        return Err(CallbackError::EmptyReply);
    }
    let resp: CallbackResponse = serde_json::from_slice(&reply).map_err(CallbackError::Decode)?;
    match resp.error.as_deref().map(str::trim) {
        Some(message) if !message.is_empty() => Err(CallbackError::Remote {
            message: message.to_owned(),
        }),
        _ => Ok(resp),
    }
}
