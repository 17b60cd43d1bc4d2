//! HTTP (port 80) and TLS (port 443) interception: the guest's requests are terminated on
//! the host, checked against the policy and the secrets, and re-sent upstream by the host
//! (spec §7.4, §7.6, §7.7; issue 9 item 5).
//!
//! # Design
//! The network stack hands each intercepted guest flow over as a byte stream
//! ([`Interceptor::serve_http`], [`Interceptor::serve_tls`]); this module never sees
//! packets. Both sides speak HTTP through hyper (no hand-written parser): the guest side is
//! served with `hyper::server::conn` (HTTP/1.1 with keep-alive, chunked and close-delimited
//! bodies and upgrades; HTTP/2 when the guest's TLS ClientHello offers `h2`, with RFC 8441
//! extended CONNECT for WebSocket, see `websocket.rs`), the upstream
//! side is a hyper client connection over TCP or rustls (HTTP/2 when the upstream picks it
//! through ALPN). Bodies are streamed frame by frame in both directions, never buffered or
//! rewritten, so server-sent events reach the guest as they are produced.
//!
//! TLS toward the guest uses a leaf signed by the sandbox's in-memory CA ([`ca`]) for the
//! ClientHello's SNI, or for the destination IP when there is none. **Each request's own
//! authority decides where it goes**: the `Host` header (HTTP/1.1) or `:authority`
//! (HTTP/2), port stripped, falling back to the destination IP when empty. That name is
//! checked ([`Policy::check_host`]), resolved on the host, and the address actually dialled
//! is checked again ([`Policy::check_connect`]); upstream TLS is verified for that name. The
//! SNI is only used to pick the guest-facing certificate, so a guest cannot reach host A by
//! sending SNI B and `Host: A` (A is what is checked, dialled and verified) nor host B by
//! the reverse. The upstream port is always the port the guest connected to; a port in the
//! `Host` header is passed on in the header but never steers the connection.
//!
//! Secrets ([`crate::secrets`]) are applied to every request before anything is sent: a
//! placeholder toward a host its secret is not scoped to, or a host the policy refuses,
//! gets `403 Blocked by policy` and a blocked event, and no upstream connection is made.
//! Upstream failures (resolution, connect, TLS verification) are `502`.
//!
//! Bounds: hyper's header limits (64 KiB read buffer, 128 headers on HTTP/1.1; 64 KiB
//! header list and [`MAX_H2_STREAMS`] concurrent streams on HTTP/2), a TLS handshake
//! timeout, connect timeouts, at most one idle upstream connection kept per guest
//! connection, at most [`MAX_UPSTREAM_CONNECTIONS`] upstream connections per interceptor,
//! and [`IDLE_TIMEOUT`] without any byte in either direction and no request in
//! flight closes a guest connection.
//!
//! # Limitations
//! Upstream HTTP is HTTP/1.1 only for plain port 80 (no h2c). A WebSocket always goes
//! upstream as an HTTP/1.1 upgrade, also when the guest used HTTP/2 (`websocket.rs`). Hook
//! rules see the handshake (before phase) but not the frames. An HTTP/1.1 upgraded
//! connection stops counting toward [`MAX_UPSTREAM_CONNECTIONS`] once upgraded (it is
//! bounded by the stack's flow limit instead, being one guest flow); an HTTP/2 WebSocket
//! keeps one upstream slot for its whole life, since up to [`MAX_H2_STREAMS`] of them
//! share one guest flow, and keeps its guest connection from being closed as idle. TLS on ports other than 443 reaches [`Interceptor::serve_tls`] only when the
//! stack's sniffer recognises a ClientHello after the policy allowed the destination
//! address ([`crate::tlssniff`]); plain HTTP on other ports likewise only when the sniffer
//! recognises a request line. The TLS handshakes and leaf signing run on the network thread.

pub mod ca;
mod proxy;
mod upstream;
mod websocket;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::Acceptor;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::LazyConfigAcceptor;

use crate::events::EventSink;
use crate::hooks::HookRules;
use crate::policy::Policy;
use crate::secrets::Secrets;

pub use ca::{Ca, CaError};
/// Re-exported so owners can build [`InterceptConfig::upstream_roots`] without a direct
/// rustls dependency.
pub use rustls::RootCertStore;

/// A guest connection with no byte either way and no request in flight for this long is
/// closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest TLS handshake with the guest or an upstream.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream connections one interceptor (sandbox) may hold open at once; past it a request
/// gets `502` rather than a new connection.
pub const MAX_UPSTREAM_CONNECTIONS: usize = 512;
/// Concurrent streams a guest may open on one HTTP/2 connection.
pub const MAX_H2_STREAMS: u32 = 100;
/// hyper's read buffer per HTTP/1.1 connection, bounding the request head.
const MAX_H1_BUF: usize = 64 * 1024;
const MAX_H1_HEADERS: usize = 128;
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;

/// What an [`Interceptor`] needs.
pub struct InterceptConfig {
    pub policy: Arc<Policy>,
    pub secrets: Arc<Secrets>,
    pub events: Option<EventSink>,
    /// Upstream trust; `None` = the host's system store via rustls-native-certs (which
    /// honours `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    pub upstream_roots: Option<RootCertStore>,
}

/// Failures making an [`Interceptor`].
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("create the interception CA")]
    Ca(#[source] CaError),
    #[error("configure upstream TLS")]
    UpstreamTls(#[source] rustls::Error),
    #[error("make the certificate for {name:?}")]
    Leaf {
        name: String,
        #[source]
        source: CaError,
    },
    #[error("configure guest-facing TLS")]
    GuestTls(#[source] rustls::Error),
}

/// One sandbox's interception: its CA, policy, secrets and upstream TLS settings.
pub struct Interceptor {
    policy: Arc<Policy>,
    secrets: Arc<Secrets>,
    events: Option<EventSink>,
    ca: Ca,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Upstream TLS offering `h2` and `http/1.1`.
    upstream_tls: Arc<ClientConfig>,
    /// Upstream TLS offering `http/1.1` only (for upgrades).
    upstream_tls_h1: Arc<ClientConfig>,
    idle_timeout: Duration,
    /// One permit per open upstream connection.
    upstream_slots: Arc<tokio::sync::Semaphore>,
    /// Hook rules (`network.interception`), applied before secrets and to responses.
    hooks: Option<Arc<HookRules>>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("policy", &self.policy)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no system root certificates: every upstream TLS connection will fail");
    }
    tracing::debug!(added, ignored, "system root certificates loaded");
    roots
}

impl Interceptor {
    pub fn new(cfg: InterceptConfig) -> Result<Interceptor, InterceptError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = Ca::new(provider.clone()).map_err(InterceptError::Ca)?;
        let roots = cfg.upstream_roots.unwrap_or_else(system_roots);
        let client = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, InterceptError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(InterceptError::UpstreamTls)?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Interceptor {
            upstream_tls: client(&[b"h2", b"http/1.1"])?,
            upstream_tls_h1: client(&[b"http/1.1"])?,
            policy: cfg.policy,
            secrets: cfg.secrets,
            events: cfg.events,
            ca,
            provider,
            idle_timeout: IDLE_TIMEOUT,
            upstream_slots: Arc::new(tokio::sync::Semaphore::new(MAX_UPSTREAM_CONNECTIONS)),
            hooks: None,
        })
    }

    /// Applies `hooks` to every request and response (none when they are empty).
    pub fn with_hooks(mut self, hooks: Arc<HookRules>) -> Interceptor {
        self.hooks = (!hooks.is_empty()).then_some(hooks);
        self
    }

    /// Replaces [`MAX_UPSTREAM_CONNECTIONS`].
    pub fn with_max_upstream_connections(mut self, n: usize) -> Interceptor {
        self.upstream_slots = Arc::new(tokio::sync::Semaphore::new(n));
        self
    }

    /// Replaces [`IDLE_TIMEOUT`] (tests use a short one).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Interceptor {
        self.idle_timeout = idle;
        self
    }

    /// The CA certificate (PEM) the guest must trust.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Serves a guest's plain HTTP connection to `dst` (port 80, or any port whose first
    /// bytes were a request line) until it closes; the upstream port is `dst`'s.
    pub async fn serve_http<S>(self: Arc<Self>, dst: SocketAddr, guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = proxy::Conn::new(self, dst, false);
        serve_h1(conn, guest).await;
    }

    /// Serves a guest's TLS connection to `dst` (port 443, or any port whose first bytes were
    /// a ClientHello) until it closes; the upstream port is `dst`'s:
    /// handshake with a leaf for the SNI (or `dst`'s IP), then HTTP/2 or HTTP/1.1 by ALPN.
    pub async fn serve_tls<S>(self: Arc<Self>, dst: SocketAddr, guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let accept = LazyConfigAcceptor::new(Acceptor::default(), guest);
        let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return tracing::debug!(%dst, error = %e, "guest TLS hello failed"),
            Err(_) => return tracing::debug!(%dst, "guest TLS hello timed out"),
        };
        let name = match start.client_hello().server_name() {
            Some(n) => n.to_string(),
            None => dst.ip().to_string(),
        };
        let config = match self.server_config(&name) {
            Ok(c) => c,
            Err(e) => return tracing::debug!(%dst, error = %e, "no certificate for the guest"),
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return tracing::debug!(%dst, error = %e, "guest TLS handshake failed"),
            Err(_) => return tracing::debug!(%dst, "guest TLS handshake timed out"),
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let conn = proxy::Conn::new(self, dst, true);
        if h2 {
            serve_h2(conn, tls).await;
        } else {
            serve_h1(conn, tls).await;
        }
    }

    fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, InterceptError> {
        let leaf = self.ca.leaf(name).map_err(|source| InterceptError::Leaf {
            name: name.to_string(),
            source,
        })?;
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(InterceptError::GuestTls)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(leaf)));
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// Serves one certificate whatever the ClientHello says (it was chosen from it already).
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

async fn serve_h1<S>(conn: Arc<proxy::Conn>, guest: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, activity) = Tracked::new(guest, conn.active.clone());
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| {
        let c = svc_conn.clone();
        async move { Ok::<_, Infallible>(c.handle(req).await) }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.half_close(true)
        .keep_alive(true)
        .max_buf_size(MAX_H1_BUF)
        .max_headers(MAX_H1_HEADERS)
        .timer(TokioTimer::new())
        .header_read_timeout(conn.idle_timeout());
    let served = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
    drive(served, &activity, &conn).await;
}

async fn serve_h2<S>(conn: Arc<proxy::Conn>, guest: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, activity) = Tracked::new(guest, conn.active.clone());
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| {
        let c = svc_conn.clone();
        async move { Ok::<_, Infallible>(c.handle(req).await) }
    });
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.enable_connect_protocol()
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_header_list_size(MAX_H2_HEADER_LIST)
        .timer(TokioTimer::new());
    let served = b.serve_connection(TokioIo::new(io), svc);
    drive(served, &activity, &conn).await;
}

/// Runs a served connection until it ends or stays idle for the idle timeout.
async fn drive<F>(served: F, activity: &Activity, conn: &proxy::Conn)
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(served);
    let (idle, dst) = (conn.idle_timeout(), conn.dst);
    let check = (idle / 6).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            r = &mut served => {
                if let Err(e) = r {
                    tracing::debug!(%dst, error = %e, "guest HTTP connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(check) => {
                if activity.idle_for() >= idle {
                    tracing::debug!(%dst, "idle guest HTTP connection closed");
                    return;
                }
            }
        }
    }
}

/// When a guest connection last moved a byte, and how many requests are in flight on it.
struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
    active: Arc<AtomicUsize>,
}

impl Activity {
    fn idle_for(&self) -> Duration {
        if self.active.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A guest stream that records when it last moved bytes.
struct Tracked<S> {
    inner: S,
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
}

impl<S> Tracked<S> {
    fn new(inner: S, active: Arc<AtomicUsize>) -> (Tracked<S>, Activity) {
        let epoch = Instant::now();
        let last_ms = Arc::new(AtomicU64::new(0));
        let activity = Activity {
            epoch,
            last_ms: last_ms.clone(),
            active,
        };
        (
            Tracked {
                inner,
                epoch,
                last_ms,
            },
            activity,
        )
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The upstream connections a guest connection may reuse (at most one, idle).
type Pool = Mutex<Option<(String, upstream::Sender)>>;
