//! One guest connection's requests: decide the target, check the policy and the secrets,
//! forward upstream, and stream the response back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use tokio::sync::OwnedSemaphorePermit;

use super::upstream::{self, Sender};
use super::websocket;
use super::{Interceptor, Pool};
use crate::events::{self, NetworkEvent};
use crate::hooks::Phase;
use crate::policy::strip_port;
use crate::secrets::OutgoingRequest;
use crate::ErrorChain;

/// Errors of a response body to the guest (upstream, or a hook's body transform).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response to the guest.
pub(crate) type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Body of every policy refusal (spec §7.7).
const BLOCKED_BODY: &str = "Blocked by policy";

/// A guest connection being served.
pub(crate) struct Conn {
    icpt: Arc<Interceptor>,
    pub(crate) dst: SocketAddr,
    tls: bool,
    pool: Pool,
    /// Requests in flight (until their response body is finished or dropped).
    pub(crate) active: Arc<AtomicUsize>,
}

/// Where a request goes, from its own authority.
struct Target {
    /// `host[:port]` as the guest wrote it (no userinfo), for the upstream `Host`.
    authority: String,
    /// The name (or IP literal) checked, resolved and verified.
    host: String,
    /// `scheme://host/path` for events (no query: it may carry substituted secrets).
    url: String,
}

/// Why a request was not forwarded.
enum Refusal {
    /// Policy or secrets: 403 and a blocked event.
    Blocked(String),
    /// Malformed request: 400.
    BadRequest,
    /// Upstream unreachable: 502 with this body.
    Failed(&'static str),
}

impl Conn {
    pub(crate) fn new(icpt: Arc<Interceptor>, dst: SocketAddr, tls: bool) -> Arc<Conn> {
        Arc::new(Conn {
            icpt,
            dst,
            tls,
            pool: Mutex::new(None),
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub(crate) fn idle_timeout(&self) -> std::time::Duration {
        self.icpt.idle_timeout
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Serves one guest request; never fails (refusals are responses).
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let guard = ActiveGuard::new(self.active.clone());
        let start = Instant::now();
        let method = req.method().to_string();
        let Some(target) = self.target(&req) else {
            return plain(StatusCode::BAD_REQUEST, "Bad request");
        };
        let request_bytes = content_length(req.headers());
        let mut ev = NetworkEvent {
            method,
            url: target.url.clone(),
            host: target.host.clone(),
            request_bytes,
            timestamp_unix: events::now_unix(),
            ..NetworkEvent::default()
        };
        let result = self.forward(req, &target).await;
        ev.duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let resp = match result {
            Ok(resp) => {
                ev.status_code = resp.status().as_u16();
                ev.response_bytes = content_length(resp.headers());
                resp.map(|b| {
                    Guarded {
                        inner: b,
                        _guard: guard,
                    }
                    .boxed_unsync()
                })
            }
            Err(Refusal::Blocked(reason)) => {
                tracing::info!(host = %target.host, %reason, "guest request blocked");
                ev.status_code = StatusCode::FORBIDDEN.as_u16();
                ev.blocked = true;
                ev.block_reason = Some(reason);
                plain(StatusCode::FORBIDDEN, BLOCKED_BODY)
            }
            Err(Refusal::BadRequest) => {
                ev.status_code = StatusCode::BAD_REQUEST.as_u16();
                plain(StatusCode::BAD_REQUEST, "Bad request")
            }
            Err(Refusal::Failed(body)) => {
                ev.status_code = StatusCode::BAD_GATEWAY.as_u16();
                plain(StatusCode::BAD_GATEWAY, body)
            }
        };
        events::emit(self.icpt.events.as_ref(), ev);
        resp
    }

    /// The request's own authority (`:authority`, an absolute URI, or `Host`), else the
    /// destination IP. `None` when it is malformed.
    fn target<B>(&self, req: &Request<B>) -> Option<Target> {
        let written = match req.uri().authority() {
            Some(a) => Some(a.as_str().to_string()),
            None => match req.headers().get(header::HOST) {
                Some(v) => Some(v.to_str().ok()?.trim().to_string()),
                None => None,
            },
        };
        let written = written
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| match self.dst {
                // An IPv6 literal is bracketed in an authority.
                SocketAddr::V6(d) => format!("[{}]", d.ip()),
                SocketAddr::V4(d) => d.ip().to_string(),
            });
        let a: http::uri::Authority = written.parse().ok()?;
        let authority = match a.port_u16() {
            Some(p) => format!("{}:{p}", a.host()),
            None => a.host().to_string(),
        };
        let host = strip_port(a.host()).to_string();
        if host.is_empty() {
            return None;
        }
        let url = format!("{}://{}{}", self.scheme(), a.host(), req.uri().path());
        Some(Target {
            authority,
            host,
            url,
        })
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        t: &Target,
    ) -> Result<Response<RespBody>, Refusal> {
        let h2_ws = websocket::is_h2_websocket(&req);
        if req.method() == Method::CONNECT && !h2_ws {
            return Err(Refusal::Blocked("CONNECT tunnels are not supported".into()));
        }
        self.icpt
            .policy
            .check_host(&t.host)
            .map_err(|d| Refusal::Blocked(d.to_string()))?;
        let upgrade = h2_ws || wants_upgrade(&req);
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let hooks = self.icpt.hooks.clone();
        if let Some(h) = &hooks {
            h.before(&t.host, &mut parts)
                .await
                .map_err(|b| Refusal::Blocked(b.to_string()))?;
        }
        // After-rules see the request as hooked, before real secret values are put in.
        let seen = hooks
            .as_ref()
            .filter(|h| !upgrade && h.has_phase(Phase::After))
            .map(|_| copy_parts(&parts));
        self.apply_secrets(&t.host, &mut parts)?;
        let ws_key = h2_ws.then(|| websocket::to_h1_upgrade(&mut parts));
        // An HTTP/2 WebSocket holds an upstream slot for its life: many can share one guest
        // connection, so the stack's per-flow limit alone does not bound them.
        let tunnel_slot = match h2_ws {
            true => Some(self.tunnel_slot()?),
            false => None,
        };
        let mut sender = self.sender(&t.host, upgrade).await?;
        let out = outgoing(parts, body, t, self.scheme(), sender.is_h2(), upgrade)?;
        let result = sender.send(out).await;
        if !upgrade {
            self.put_back(&t.host, sender);
        }
        let mut resp = result.map_err(|e| {
            tracing::debug!(host = %t.host, error = %e, "upstream request failed");
            Refusal::Failed("Upstream request failed")
        })?;
        *resp.version_mut() = Version::HTTP_11;
        if let Some(guest) = on_upgrade {
            if let Some(r) = self.upgraded(guest, &mut resp, ws_key.as_deref(), tunnel_slot)? {
                return Ok(r);
            }
        } else {
            strip_hop_by_hop(resp.headers_mut(), false);
        }
        let (Some(h), Some(seen)) = (&hooks, &seen) else {
            return Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()));
        };
        let (mut rp, body) = resp.into_parts();
        let plan = h
            .after(&t.host, seen, &mut rp)
            .await
            .map_err(|b| Refusal::Blocked(b.to_string()))?;
        let body = if plan.is_passthrough() {
            body.map_err(BoxError::from).boxed_unsync()
        } else {
            plan.apply(&mut rp.headers, body)
                .await
                .map_err(|e| {
                    tracing::debug!(host = %t.host, error = %e, "upstream body for a hook failed");
                    Refusal::Failed("Upstream request failed")
                })?
                .map_err(BoxError::from)
                .boxed_unsync()
        };
        Ok(Response::from_parts(rp, body))
    }

    /// One upstream slot for an HTTP/2 WebSocket's whole life.
    fn tunnel_slot(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.icpt
            .upstream_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                tracing::warn!("upstream connection limit reached: 502");
                Refusal::Failed("Too many upstream connections")
            })
    }

    /// Handles the upstream's answer to an upgrade: on `101`, splices the two upgraded
    /// connections (for an HTTP/2 WebSocket, `ws_key` is set and the answer to the guest is
    /// the returned `200`); anything else goes back to the guest as a plain response, except
    /// a success to an HTTP/2 WebSocket that did not upgrade (`502`: it cannot be relayed).
    fn upgraded(
        &self,
        guest: hyper::upgrade::OnUpgrade,
        resp: &mut Response<Incoming>,
        ws_key: Option<&str>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Option<Response<RespBody>>, Refusal> {
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let Some(key) = ws_key else {
            if switched {
                let up = hyper::upgrade::on(&mut *resp);
                tokio::spawn(splice(guest, up, None));
            } else {
                strip_hop_by_hop(resp.headers_mut(), false);
            }
            return Ok(None);
        };
        if !switched {
            if resp.status().is_success() {
                return Err(Refusal::Failed("Upstream did not accept the WebSocket"));
            }
            strip_hop_by_hop(resp.headers_mut(), false);
            return Ok(None);
        }
        if !websocket::accept_matches(resp.headers(), key) {
            tracing::debug!(dst = %self.dst, "upstream WebSocket accept key mismatch");
            return Err(Refusal::Failed("Upstream WebSocket handshake failed"));
        }
        let up = hyper::upgrade::on(&mut *resp);
        let hold = Hold {
            _active: ActiveGuard::new(self.active.clone()),
            _slot: slot,
        };
        tokio::spawn(splice(guest, up, Some(hold)));
        let mut ok = plain_empty(StatusCode::OK);
        *ok.headers_mut() = websocket::negotiated(resp.headers());
        Ok(Some(ok))
    }

    /// Applies §7.6 to the request: refuses a leaked placeholder, substitutes in header
    /// values and the query. Only headers whose value changed are rewritten.
    fn apply_secrets(&self, host: &str, parts: &mut Parts) -> Result<(), Refusal> {
        let before: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(n, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_string(), v)
            })
            .collect();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let mut req = OutgoingRequest {
            host: host.to_string(),
            path: parts.uri.path().to_string(),
            query: query.clone(),
            headers: before.clone(),
        };
        let used = self
            .icpt
            .secrets
            .apply(&mut req)
            .map_err(|leak| Refusal::Blocked(leak.to_string()))?;
        if used.is_empty() {
            return Ok(());
        }
        let invalid = || Refusal::Blocked("secret value is not valid in this request".into());
        let changes = before.iter().zip(req.headers.iter());
        for ((_, value), ((_, old), (_, new))) in parts.headers.iter_mut().zip(changes) {
            if old != new {
                let mut v = HeaderValue::from_str(new).map_err(|_| invalid())?;
                v.set_sensitive(true);
                *value = v;
            }
        }
        if req.query != query {
            let mut uri = parts.uri.clone().into_parts();
            let pq = format!("{}?{}", parts.uri.path(), req.query);
            uri.path_and_query = Some(pq.parse().map_err(|_| invalid())?);
            parts.uri = Uri::from_parts(uri).map_err(|_| invalid())?;
        }
        tracing::debug!(%host, secrets = ?used, "secrets substituted");
        Ok(())
    }

    /// A pooled connection for `host` if one is usable, else a new one.
    async fn sender(&self, host: &str, h1_only: bool) -> Result<Sender, Refusal> {
        if !h1_only {
            if let Some(mut s) = self.take(host) {
                if s.usable().await {
                    if let Some(shared) = s.share() {
                        self.put_back(host, s);
                        return Ok(shared);
                    }
                    return Ok(s);
                }
            }
        }
        let port = self.dst.port();
        match upstream::dial(&self.icpt, host, port, self.tls, h1_only).await {
            Ok(s) => {
                if let Some(shared) = s.share() {
                    self.put_back(host, shared);
                }
                Ok(s)
            }
            Err(e) => match upstream::denied(&e) {
                Some(d) => Err(Refusal::Blocked(d.to_string())),
                None if matches!(e, upstream::DialError::TooMany) => {
                    tracing::warn!(%host, "upstream connection limit reached: 502");
                    Err(Refusal::Failed("Too many upstream connections"))
                }
                None => {
                    tracing::debug!(%host, error = %ErrorChain(&e), "upstream connection failed");
                    Err(Refusal::Failed("Failed to connect"))
                }
            },
        }
    }

    fn take(&self, host: &str) -> Option<Sender> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        match pool.take() {
            Some((h, s)) if h == host => Some(s),
            _ => None,
        }
    }

    fn put_back(&self, host: &str, s: Sender) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        *pool = Some((host.to_string(), s));
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An empty response (the answer to an HTTP/2 WebSocket).
fn plain_empty(status: StatusCode) -> Response<RespBody> {
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1.1 request asking for a protocol upgrade (WebSocket).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    req.version() == Version::HTTP_11
        && h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names; for an
/// upgrade, keeps `Upgrade` and sends `Connection: upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    // `TE: trailers` is the one TE value that survives a hop (gRPC needs it on HTTP/2).
    let te_trailers = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    for n in ["keep-alive", "proxy-connection"] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// The request as sent upstream: origin-form URI and `Host` for HTTP/1.1, absolute URI
/// (`:authority`) for HTTP/2; hop-by-hop headers removed.
fn outgoing(
    mut parts: Parts,
    body: Incoming,
    t: &Target,
    scheme: &str,
    h2: bool,
    upgrade: bool,
) -> Result<Request<Incoming>, Refusal> {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = if h2 {
        format!("{scheme}://{}{pq}", t.authority)
    } else {
        pq.to_string()
    };
    parts.uri = uri.parse().map_err(|_| Refusal::BadRequest)?;
    if h2 {
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        let host = HeaderValue::from_str(&t.authority).map_err(|_| Refusal::BadRequest)?;
        parts.headers.insert(header::HOST, host);
        parts.version = Version::HTTP_11;
    }
    Ok(Request::from_parts(parts, body))
}

/// What an HTTP/2 WebSocket keeps while it is relayed: its guest connection counted as
/// busy (never closed as idle; an HTTP/1.1 upgrade leaves the idle check behind anyway) and
/// its upstream slot.
struct Hold {
    _active: ActiveGuard,
    _slot: Option<OwnedSemaphorePermit>,
}

/// Copies bytes both ways between the upgraded guest and upstream connections.
async fn splice(
    guest: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _hold: Option<Hold>,
) {
    match tokio::join!(guest, upstream) {
        (Ok(g), Ok(u)) => {
            let (mut g, mut u) = (TokioIo::new(g), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut g, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// A copy of a request's method, URI, version and headers (extensions are not copied).
fn copy_parts(p: &Parts) -> Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    let (parts, ()) = b.body(()).unwrap_or_default().into_parts();
    parts
}

/// Counts a request in flight until dropped.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(n: Arc<AtomicUsize>) -> ActiveGuard {
        n.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(n)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream response body that keeps its request counted as in flight.
struct Guarded {
    inner: RespBody,
    _guard: ActiveGuard,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
