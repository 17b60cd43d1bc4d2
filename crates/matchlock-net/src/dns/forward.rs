//! One exchange with an upstream DNS server (`--dns-servers`), over UDP or TCP.
//!
//! # Design
//! Each UDP exchange uses a fresh socket on an ephemeral port, `connect`ed to the server so
//! the kernel drops datagrams from other sources; the query carries a fresh random ID. A
//! datagram that does not answer the query (wrong ID, not a response, other question) is
//! dropped and the wait goes on until the deadline, so a spoofed reply cannot make the real
//! one be missed. TCP reads one length-prefixed reply under the same deadline; the length
//! prefix bounds it to 65535 bytes.
//!
//! # Limitations
//! No connection reuse for TCP (one connection per truncated answer), no EDNS cookies.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::wire;

/// Largest UDP datagram read from a server.
const MAX_DATAGRAM: usize = 65_535;

/// Why an upstream exchange gave no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("binding a UDP socket for the DNS server {server}")]
    UdpBind {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting the UDP socket to the DNS server {server}")]
    UdpConnect {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the query to the DNS server {server} over UDP")]
    UdpSend {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("receiving from the DNS server {server} over UDP")]
    UdpRecv {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the DNS server {server} over TCP")]
    TcpConnect {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the query to the DNS server {server} over TCP")]
    TcpSend {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the reply of the DNS server {server} over TCP")]
    TcpRecv {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the DNS server {server} sent a TCP reply that does not answer the query")]
    TcpMismatch { server: SocketAddr },
    #[error("the query is too long for TCP ({len} bytes)")]
    TcpQueryTooLong { len: usize },
    #[error("no reply from the DNS server {server} within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
}

/// Sends `query` to `server` over UDP and returns the first datagram that answers it.
pub async fn udp(
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local)
        .await
        .map_err(|source| ForwardError::UdpBind { server, source })?;
    sock.connect(server)
        .await
        .map_err(|source| ForwardError::UdpConnect { server, source })?;
    let exchange = async {
        sock.send(query)
            .await
            .map_err(|source| ForwardError::UdpSend { server, source })?;
        let mut buf = vec![0; MAX_DATAGRAM];
        loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|source| ForwardError::UdpRecv { server, source })?;
            let reply = &buf[..n];
            if wire::answers(query, reply) {
                return Ok(reply.to_vec());
            }
            tracing::debug!(%server, len = n, "DNS reply that does not answer the query dropped");
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ForwardError::Timeout { server, timeout })?
}

/// Sends `query` to `server` over TCP (2-byte length prefix) and returns its reply.
pub async fn tcp(
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let len = u16::try_from(query.len())
        .map_err(|_| ForwardError::TcpQueryTooLong { len: query.len() })?;
    let exchange = async {
        let mut conn = TcpStream::connect(server)
            .await
            .map_err(|source| ForwardError::TcpConnect { server, source })?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        conn.write_all(&framed)
            .await
            .map_err(|source| ForwardError::TcpSend { server, source })?;
        let reply_len = conn
            .read_u16()
            .await
            .map_err(|source| ForwardError::TcpRecv { server, source })?;
        let mut reply = vec![0; usize::from(reply_len)];
        conn.read_exact(&mut reply)
            .await
            .map_err(|source| ForwardError::TcpRecv { server, source })?;
        if wire::answers(query, &reply) {
            Ok(reply)
        } else {
            Err(ForwardError::TcpMismatch { server })
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ForwardError::Timeout { server, timeout })?
}
