//! A streaming body that applies literal replacements only to the payload of SSE `data:`
//! lines (spec §7.7.1).
//!
//! # Design
//! Bytes are buffered until a `\n`; every complete line is transformed and forwarded as
//! soon as its chunk arrives, so events keep flowing without waiting for the stream's end.
//! A line starting with `data:` has the replacements applied, in order, to what lies
//! between `data:` and its terminator; the terminator (`\n` or `\r\n`) and every other
//! line are forwarded byte for byte. A final line without terminator is transformed when
//! the upstream body ends. Trailers are passed on after the buffered bytes.
//!
//! # Limitations
//! An unterminated line longer than the buffer bound ([`MAX_SSE_LINE`]) ends the body with
//! [`super::BodyError::SseLineTooLong`] rather than growing without limit or forwarding it
//! untransformed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};

use super::body::replace_all;
use super::{BodyError, Replacement};

/// Longest unterminated SSE line buffered.
pub const MAX_SSE_LINE: usize = 1024 * 1024;

/// The `data:`-line transformer around an upstream body.
pub(crate) struct SseBody<B> {
    inner: Pin<Box<B>>,
    replacements: Vec<Replacement>,
    buf: BytesMut,
    limit: usize,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> SseBody<B> {
    pub(crate) fn new(inner: B, replacements: Vec<Replacement>, limit: usize) -> SseBody<B> {
        SseBody {
            inner: Box::pin(inner),
            replacements,
            buf: BytesMut::new(),
            limit,
            trailers: None,
            done: false,
        }
    }

    /// Transforms and removes every complete line in the buffer (all of it when `all`).
    fn drain_lines(&mut self, all: bool) -> Option<Bytes> {
        let end = if all {
            self.buf.len()
        } else {
            self.buf.iter().rposition(|b| *b == b'\n')? + 1
        };
        if end == 0 {
            return None;
        }
        let complete = self.buf.split_to(end);
        let mut out = Vec::with_capacity(complete.len());
        for line in complete.split_inclusive(|b| *b == b'\n') {
            transform_line(line, &self.replacements, &mut out);
        }
        Some(Bytes::from(out))
    }
}

/// Appends `line` to `out`, with replacements applied to a `data:` line's payload.
fn transform_line(line: &[u8], replacements: &[Replacement], out: &mut Vec<u8>) {
    let Some(payload) = line.strip_prefix(b"data:") else {
        out.extend_from_slice(line);
        return;
    };
    let (payload, terminator): (&[u8], &[u8]) = if let Some(p) = payload.strip_suffix(b"\r\n") {
        (p, b"\r\n")
    } else if let Some(p) = payload.strip_suffix(b"\n") {
        (p, b"\n")
    } else {
        (payload, b"")
    };
    out.extend_from_slice(b"data:");
    out.extend_from_slice(&replace_all(payload, replacements));
    out.extend_from_slice(terminator);
}

impl<B> Body for SseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                if let Some(rest) = this.drain_lines(true) {
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(BodyError::Upstream(e.into()))));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.buf.extend_from_slice(&data);
                        if let Some(out) = this.drain_lines(false) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        if this.buf.len() > this.limit {
                            this.done = true;
                            this.buf.clear();
                            tracing::warn!(limit = this.limit, "SSE line too long; body ended");
                            return Poll::Ready(Some(Err(BodyError::SseLineTooLong {
                                limit: this.limit,
                            })));
                        }
                    }
                    Err(frame) => {
                        this.done = true;
                        this.trailers = frame.into_trailers().ok();
                    }
                },
            }
        }
    }
}
