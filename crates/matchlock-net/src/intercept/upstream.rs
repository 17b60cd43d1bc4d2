//! Upstream connections of the interceptor: resolve on the host, check the address actually
//! dialled, connect, TLS with verification, and a hyper client connection on top.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::{Interceptor, HANDSHAKE_TIMEOUT};
use crate::policy::Denied;

/// Longest host-side name resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest TCP connect to one upstream address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Addresses tried per request before giving up.
const MAX_ATTEMPTS: usize = 3;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("resolve {host:?}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {host:?} timed out")]
    ResolveTimeout { host: String },
    #[error("{host:?} has no address")]
    NoAddress { host: String },
    #[error("refused by policy: {0}")]
    Denied(Denied),
    #[error("too many upstream connections open")]
    TooMany,
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("{host:?} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("TLS with {host:?}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {host:?} timed out")]
    TlsTimeout { host: String },
    #[error("HTTP handshake with {host:?}")]
    Handshake {
        host: String,
        #[source]
        source: hyper::Error,
    },
}

/// A client connection to one upstream.
pub(crate) enum Sender {
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
}

impl Sender {
    pub(crate) fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    /// Whether the connection can take a request now (waits briefly for an HTTP/1.1
    /// connection finishing its previous response).
    pub(crate) async fn usable(&mut self) -> bool {
        let wait = Duration::from_millis(100);
        match self {
            Sender::H1(s) => matches!(tokio::time::timeout(wait, s.ready()).await, Ok(Ok(()))),
            Sender::H2(s) => matches!(tokio::time::timeout(wait, s.ready()).await, Ok(Ok(()))),
        }
    }

    pub(crate) async fn send(
        &mut self,
        req: hyper::Request<Incoming>,
    ) -> hyper::Result<hyper::Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }

    /// Another handle on a multiplexed connection.
    pub(crate) fn share(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

/// Resolves `host` and returns the addresses the policy allows, in resolver order.
async fn allowed_addrs(
    icpt: &Interceptor,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let lookup = tokio::net::lookup_host((host, port));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(source)) => {
            return Err(DialError::Resolve {
                host: host.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(DialError::ResolveTimeout {
                host: host.to_string(),
            })
        }
    };
    let mut denied = None;
    let mut allowed = Vec::new();
    for a in addrs {
        match icpt.policy.check_connect(host, a.ip()) {
            Ok(()) => allowed.push(a),
            Err(d) => denied = denied.or(Some(d)),
        }
    }
    match (allowed.is_empty(), denied) {
        (true, Some(d)) => Err(DialError::Denied(d)),
        (true, None) => Err(DialError::NoAddress {
            host: host.to_string(),
        }),
        (false, _) => Ok(allowed),
    }
}

/// TCP to the first allowed address of `host` that answers.
async fn connect(icpt: &Interceptor, host: &str, port: u16) -> Result<TcpStream, DialError> {
    let addrs = allowed_addrs(icpt, host, port).await?;
    let mut last = None;
    for addr in addrs.into_iter().take(MAX_ATTEMPTS) {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                tracing::debug!(%host, %addr, "upstream connected");
                return Ok(s);
            }
            Ok(Err(source)) => last = Some(DialError::Connect { addr, source }),
            Err(_) => last = Some(DialError::ConnectTimeout { addr }),
        }
    }
    Err(last.unwrap_or(DialError::NoAddress {
        host: host.to_string(),
    }))
}

/// A new upstream connection for `host` on `port`: TLS when `tls`, HTTP/2 when the
/// upstream picks it (never with `h1_only`, used for upgrades).
pub(crate) async fn dial(
    icpt: &Interceptor,
    host: &str,
    port: u16,
    tls: bool,
    h1_only: bool,
) -> Result<Sender, DialError> {
    let slot = icpt
        .upstream_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| DialError::TooMany)?;
    let tcp = connect(icpt, host, port).await?;
    if !tls {
        return handshake(tcp, false, host, slot).await;
    }
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.to_string()).map_err(|_| DialError::ServerName {
            host: host.to_string(),
        })?,
    };
    let config = if h1_only {
        icpt.upstream_tls_h1.clone()
    } else {
        icpt.upstream_tls.clone()
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(DialError::Tls {
                host: host.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(DialError::TlsTimeout {
                host: host.to_string(),
            })
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    handshake(stream, h2, host, slot).await
}

/// The client connection over `stream`; its driver task holds `slot` until it ends.
async fn handshake<S>(
    stream: S,
    h2: bool,
    host: &str,
    slot: OwnedSemaphorePermit,
) -> Result<Sender, DialError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let fail = |source| DialError::Handshake {
        host: host.to_string(),
        source,
    };
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(fail)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            drop(slot);
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(fail)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
        drop(slot);
    });
    Ok(Sender::H1(sender))
}

/// Whether `e` is a policy refusal (403) rather than an upstream failure (502).
pub(crate) fn denied(e: &DialError) -> Option<&Denied> {
    match e {
        DialError::Denied(d) => Some(d),
        _ => None,
    }
}
