//! What the after rules decided for the response body, and applying it to the upstream body
//! (spec §7.7.1 "Body application").
//!
//! # Design
//! [`BodyPlan::apply`] takes the upstream body (any `http_body::Body` of `Bytes`, such as
//! `hyper::body::Incoming`) and returns a boxed body plus the fixed-up response headers:
//! - a callback set the body: that body with the replacements, `Content-Length` set,
//!   `Transfer-Encoding` dropped (the upstream body is dropped unread);
//! - replacements and `Content-Type: text/event-stream`: the streaming `data:`-line
//!   transformer ([`super::sse`]), `Content-Length` and `Transfer-Encoding` removed;
//! - replacements otherwise: the full body is read (at most [`MAX_FULL_BODY`]), every
//!   replacement applied in order, `Content-Length` set, `Transfer-Encoding` dropped;
//! - nothing, or a response without a body (HEAD, 1xx, 204, 304; unlike the reference,
//!   which gave a HEAD answer `Content-Length: 0`): the upstream body unchanged.
//!
//! Replacement uses `memchr`'s linear-time substring search, since the body is upstream
//! (hostile) input and the patterns are the user's. Bodies read in full also draw on one
//! budget per [`super::HookRules`] (that is, per sandbox), [`FULL_BODY_BUDGET`], held until
//! the rewritten body has been sent, so a guest opening many flows to a server with large
//! bodies cannot make the owner buffer `flows × 16 MiB`.
//!
//! # Limitations
//! A non-SSE body larger than [`MAX_FULL_BODY`] (by `Content-Length`, or found while
//! reading), or one that would overdraw the sandbox's budget, is passed through
//! **unmodified**, headers untouched, with a `warn` trace: the reference buffered without
//! limit. The budget counts bytes read, not the (possibly longer) rewritten body. Trailers
//! of a fully read body are dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::sse::{SseBody, MAX_SSE_LINE};
use super::{BodyError, Replacement};

/// Largest non-SSE body read into memory to apply replacements.
pub const MAX_FULL_BODY: usize = 16 * 1024 * 1024;

/// Bytes of response bodies one sandbox may hold in memory at once for replacements.
pub const FULL_BODY_BUDGET: usize = 64 * 1024 * 1024;

/// The response body type handed back to the proxy.
pub type HookBody = BoxBody<Bytes, BodyError>;

/// What the after rules decided for the body; see [`BodyPlan::apply`].
#[derive(Debug, Clone)]
pub struct BodyPlan {
    pub(crate) set_body: Option<Bytes>,
    pub(crate) replacements: Vec<Replacement>,
    pub(crate) budget: Arc<Semaphore>,
    /// A response that has no body by definition (HEAD, 1xx, 204, 304).
    pub(crate) bodyless: bool,
}

impl BodyPlan {
    pub(crate) fn new(budget: Arc<Semaphore>) -> BodyPlan {
        BodyPlan {
            set_body: None,
            replacements: Vec::new(),
            budget,
            bodyless: false,
        }
    }

    /// Whether the body passes through untouched (the proxy may skip [`BodyPlan::apply`]):
    /// nothing to do, or a response without a body (HEAD, 1xx, 204, 304), whose headers
    /// describe a body that is not there and must not be rewritten.
    pub fn is_passthrough(&self) -> bool {
        self.bodyless || (self.set_body.is_none() && self.replacements.is_empty())
    }

    /// The replacements accumulated from rules and callbacks, in order.
    pub fn replacements(&self) -> &[Replacement] {
        &self.replacements
    }

    /// Applies the plan to `body`, fixing `headers` (the response's, after the rules ran).
    /// An error means the upstream body failed while being read in full.
    pub async fn apply<B>(self, headers: &mut HeaderMap, body: B) -> Result<HookBody, BodyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if self.bodyless {
            return Ok(body.map_err(|e| BodyError::Upstream(e.into())).boxed());
        }
        if let Some(set) = self.set_body {
            drop(body);
            let out = Bytes::from(replace_all(&set, &self.replacements));
            return Ok(fixed_length(headers, out));
        }
        if self.replacements.is_empty() {
            return Ok(body.map_err(|e| BodyError::Upstream(e.into())).boxed());
        }
        if is_sse(headers) {
            headers.remove(CONTENT_LENGTH);
            headers.remove(TRANSFER_ENCODING);
            return Ok(SseBody::new(body, self.replacements, MAX_SSE_LINE).boxed());
        }
        let limits = Limits {
            max: MAX_FULL_BODY,
            budget: self.budget,
        };
        full_replace(headers, body, self.replacements, limits).await
    }
}

/// Whether `Content-Type` starts with `text/event-stream` (case-insensitive).
pub(crate) fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .map(|v| {
            let v = String::from_utf8_lossy(v.as_bytes());
            v.trim()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
        .unwrap_or(false)
}

fn fixed_length(headers: &mut HeaderMap, body: Bytes) -> HookBody {
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.remove(TRANSFER_ENCODING);
    Full::new(body).map_err(|never| match never {}).boxed()
}

/// Bounds on reading a body in full.
pub(crate) struct Limits {
    /// Largest single body.
    pub max: usize,
    /// The sandbox's shared budget, one permit per byte.
    pub budget: Arc<Semaphore>,
}

/// Reads `body` (bounded by `limits`) and applies `replacements`; a body over the bounds
/// comes back unmodified with `headers` untouched.
pub(crate) async fn full_replace<B>(
    headers: &mut HeaderMap,
    body: B,
    replacements: Vec<Replacement>,
    limits: Limits,
) -> Result<HookBody, BodyError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = limits.max;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_big = |n: u64| n > limit as u64;
    if declared.is_some_and(too_big) || too_big(body.size_hint().lower()) {
        tracing::warn!(
            limit,
            "response body too large for hook replacements; passed through unmodified"
        );
        return Ok(body.map_err(|e| BodyError::Upstream(e.into())).boxed());
    }
    let mut body = Box::pin(body);
    let mut collected = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Upstream(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let fits = collected.len() + data.len() <= limit;
        let granted = u32::try_from(data.len())
            .ok()
            .filter(|_| fits)
            .and_then(|n| limits.budget.clone().try_acquire_many_owned(n).ok());
        collected.extend_from_slice(&data);
        match (granted, held.as_mut()) {
            (Some(permit), Some(h)) => h.merge(permit),
            (Some(permit), None) => held = Some(permit),
            (None, _) => {
                tracing::warn!(
                    limit,
                    fits,
                    "response body over the hook replacement bounds; passed through unmodified"
                );
                let rest = Prefixed {
                    prefix: Some(collected.freeze()),
                    inner: body,
                };
                return Ok(rest.boxed());
            }
        }
    }
    let out = Bytes::from(replace_all(&collected, &replacements));
    drop(collected);
    let body = fixed_length(headers, out);
    Ok(Holding {
        inner: body,
        _permit: held,
    }
    .boxed())
}

/// A body that keeps its share of the budget until it is dropped.
struct Holding {
    inner: HookBody,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Body for Holding {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Go's `bytes.ReplaceAll` for each replacement in turn.
pub(crate) fn replace_all(input: &[u8], replacements: &[Replacement]) -> Vec<u8> {
    let mut current = input.to_vec();
    for r in replacements {
        if r.find.is_empty() {
            continue;
        }
        let finder = memchr::memmem::Finder::new(&r.find);
        let mut out = Vec::with_capacity(current.len());
        let mut last = 0;
        for at in finder.find_iter(&current) {
            // find_iter yields overlapping matches; take only non-overlapping ones.
            if at < last {
                continue;
            }
            out.extend_from_slice(&current[last..at]);
            out.extend_from_slice(&r.replace);
            last = at + r.find.len();
        }
        out.extend_from_slice(&current[last..]);
        current = out;
    }
    current
}

/// Bytes already read, then the rest of the body.
struct Prefixed<B> {
    prefix: Option<Bytes>,
    inner: Pin<Box<B>>,
}

impl<B> Body for Prefixed<B>
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
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Upstream(e.into())))),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(extra));
        }
        hint.set_lower(inner.lower().saturating_add(extra));
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full};
    use tokio::sync::Semaphore;

    use super::{full_replace, Limits, Replacement};

    fn repl() -> Vec<Replacement> {
        vec![Replacement {
            find: b"a".to_vec(),
            replace: b"b".to_vec(),
        }]
    }

    #[tokio::test]
    async fn budget_is_shared_held_until_sent_and_released() {
        let budget = Arc::new(Semaphore::new(10));
        let limits = || Limits {
            max: 100,
            budget: budget.clone(),
        };
        let mut h1 = HeaderMap::new();
        let first = full_replace(
            &mut h1,
            Full::new(Bytes::from_static(b"aaaaaa")),
            repl(),
            limits(),
        )
        .await
        .expect("first");
        assert_eq!(
            budget.available_permits(),
            4,
            "held while the body is unsent"
        );
        // The second body would overdraw: passed through unmodified, headers untouched.
        let mut h2 = HeaderMap::new();
        let second = full_replace(
            &mut h2,
            Full::new(Bytes::from_static(b"aaaaaa")),
            repl(),
            limits(),
        )
        .await
        .expect("second");
        assert!(h2.is_empty());
        assert_eq!(
            &second.collect().await.expect("body").to_bytes()[..],
            b"aaaaaa"
        );
        assert_eq!(
            &first.collect().await.expect("body").to_bytes()[..],
            b"bbbbbb"
        );
        assert_eq!(budget.available_permits(), 10, "released once sent");
        assert_eq!(
            h1.get("content-length").map(|v| v.as_bytes()),
            Some(&b"6"[..])
        );
    }
}
