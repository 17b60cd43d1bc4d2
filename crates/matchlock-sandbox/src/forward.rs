//! Port forwarding: host TCP listeners whose connections are tunnelled through the guest agent
//! to `127.0.0.1:REMOTE` inside the VM (spec §10.1). Used by `run -p`, `matchlock
//! port-forward` (through the exec relay) and the RPC `port_forward` method.
//!
//! # Design
//! Every accepted connection gets its own guest connection (from a caller-supplied
//! [`Dial`], so the same code serves in-process sandboxes and relay clients), sends
//! `PortForward{host: 127.0.0.1, port, framed}` and waits for `Ok` (at most
//! [`REPLY_TIMEOUT`], so a wedged agent fails the connection instead of holding it). The tunnel is framed
//! (`Data`, then `DataEnd` for a half-close) rather than a raw pipe, because the hybrid vsock
//! socket turns a unix-socket half-close into a full close; framing carries half-close in
//! both directions, so request/EOF/response protocols work. No guest NIC is needed. All listeners are bound before any is served, so a bind
//! failure leaves nothing behind. [`Forwarder::close`] stops the listeners and every live
//! tunnel and waits for them.
//!
//! # Limitations
//! TCP only. The guest only reaches services listening on its loopback (or on 0.0.0.0).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use matchlock_guest_proto::{Frame, FrameType, PortForwardRequest, ProtoError, CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::codec::{read_frame, write_frame, REPLY_TIMEOUT};
use crate::sandbox::error_chain;

/// Opens a fresh connection to the guest agent (directly or through an exec relay).
pub type Dial =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<UnixStream, String>> + Send>> + Send + Sync>;

/// Reports a per-connection failure (the CLI prints it; the RPC server logs it).
pub type OnError = Arc<dyn Fn(String) + Send + Sync>;

pub use matchlock_api::rpc::port::{parse_port_spec, PortSpecError};
pub use matchlock_api::rpc::PortMapping;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("at least one --address must be provided")]
    NoAddress,
    #[error("invalid bind address {0:?} (use an IP literal or localhost)")]
    Address(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("duplicate listen address {0}")]
    Duplicate(SocketAddr),
    #[error("bind local port-forward listener {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("read the bound address of {addr}")]
    LocalAddr {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid remote port 0")]
    RemotePortZero,
    #[error("connect to the guest: {0}")]
    Dial(String),
    #[error("send the port-forward request")]
    Request(#[source] ProtoError),
    #[error("read the guest's port-forward reply")]
    Reply(#[source] ProtoError),
    #[error("guest closed the connection before replying")]
    Closed,
    #[error("the guest did not answer the port-forward request within {REPLY_TIMEOUT:?}")]
    ReplyTimeout,
    #[error("{0}")]
    Guest(String),
    #[error("unexpected {0:?} frame from the guest")]
    Unexpected(FrameType),
    #[error("copy bytes")]
    Copy(#[source] std::io::Error),
}

/// A listener that is serving: the actual bound address and the guest port behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub address: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
}

/// Parses bind addresses (IP literals or `localhost`), comma-splittable, de-duplicated.
pub fn parse_addresses<S: AsRef<str>>(list: &[S]) -> Result<Vec<IpAddr>, AddressError> {
    let mut out = Vec::new();
    for item in list {
        for a in item.as_ref().split(',') {
            let a = a.trim();
            if a.is_empty() {
                continue;
            }
            let ip = if a.eq_ignore_ascii_case("localhost") {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                a.parse::<IpAddr>()
                    .map_err(|_| AddressError::Address(a.to_string()))?
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    if out.is_empty() {
        return Err(AddressError::NoAddress);
    }
    Ok(out)
}

/// Running listeners and tunnels.
pub struct Forwarder {
    bindings: Vec<Binding>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Forwarder {
    /// Binds a listener for every (spec x address), then serves them. On a bind failure
    /// every listener bound so far is closed again.
    pub async fn start(
        addresses: &[IpAddr],
        specs: &[PortMapping],
        dial: Dial,
        on_error: OnError,
    ) -> Result<Forwarder, ForwardError> {
        let mut listeners = Vec::new();
        let mut seen = Vec::new();
        for spec in specs {
            if spec.remote_port == 0 {
                return Err(ForwardError::RemotePortZero);
            }
            for ip in addresses {
                let addr = SocketAddr::new(*ip, spec.local_port);
                if spec.local_port != 0 {
                    if seen.contains(&addr) {
                        return Err(ForwardError::Duplicate(addr));
                    }
                    seen.push(addr);
                }
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ForwardError::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| ForwardError::LocalAddr { addr, source })?;
                listeners.push((
                    l,
                    Binding {
                        address: bound.ip(),
                        local_port: bound.port(),
                        remote_port: spec.remote_port,
                    },
                ));
            }
        }
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut bindings = Vec::new();
        for (l, b) in listeners {
            bindings.push(b);
            tasks.spawn(accept_loop(
                l,
                b.remote_port,
                dial.clone(),
                on_error.clone(),
                stop.clone(),
            ));
        }
        Ok(Forwarder {
            bindings,
            stop,
            tasks,
        })
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Stops listening, ends every tunnel and waits for all of them.
    pub async fn close(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Dropping a JoinSet aborts its tasks; cancelling first lets them end cleanly.
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    remote: u16,
    dial: Dial,
    on_error: OnError,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
            // Reap finished tunnels so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((client, _)) => {
                let dial = dial.clone();
                let on_error = on_error.clone();
                let stop = stop.clone();
                conns.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = connect_and_tunnel(client, remote, &dial) => {
                            if let Err(e) = r {
                                on_error(error_chain(&e));
                            }
                        }
                    }
                });
            }
            Err(e) => {
                on_error(format!("accept: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn connect_and_tunnel(
    client: TcpStream,
    remote: u16,
    dial: &Dial,
) -> Result<(), ForwardError> {
    let guest = dial().await.map_err(ForwardError::Dial)?;
    tunnel(client, guest, remote).await
}

/// Asks the guest (on `guest`, a fresh agent connection) to connect to `127.0.0.1:remote`,
/// then splices `client` and the guest stream until both directions end.
pub async fn tunnel<C>(
    mut client: C,
    mut guest: UnixStream,
    remote: u16,
) -> Result<(), ForwardError>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    open(&mut guest, remote).await?;
    let (mut g_read, mut g_write) = guest.into_split();
    let (mut c_read, mut c_write) = tokio::io::split(&mut client);
    // Client -> guest: bytes as `Data`, EOF as `DataEnd` (the guest half-closes its TCP side).
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = c_read.read(&mut buf).await.map_err(ForwardError::Copy)?;
            let f = if n == 0 {
                Frame::empty(FrameType::DataEnd)
            } else {
                Frame::new(FrameType::Data, buf[..n].to_vec())
            };
            write_frame(&mut g_write, &f)
                .await
                .map_err(ForwardError::Request)?;
            if n == 0 {
                return Ok::<(), ForwardError>(());
            }
        }
    };
    // Guest -> client: `Data` as bytes, `DataEnd` as a half-close of the client.
    let down = async {
        loop {
            let f = read_frame(&mut g_read)
                .await
                .map_err(ForwardError::Reply)?
                .ok_or(ForwardError::Closed)?;
            match f.kind {
                FrameType::Data => c_write
                    .write_all(&f.payload)
                    .await
                    .map_err(ForwardError::Copy)?,
                FrameType::DataEnd => {
                    c_write.shutdown().await.map_err(ForwardError::Copy)?;
                    return Ok::<(), ForwardError>(());
                }
                other => return Err(ForwardError::Unexpected(other)),
            }
        }
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

/// Sends the `PortForward` request and waits for the guest's `Ok` (within
/// [`REPLY_TIMEOUT`]).
pub async fn open(guest: &mut UnixStream, remote: u16) -> Result<(), ForwardError> {
    if remote == 0 {
        return Err(ForwardError::RemotePortZero);
    }
    tokio::time::timeout(REPLY_TIMEOUT, request(guest, remote))
        .await
        .map_err(|_| ForwardError::ReplyTimeout)?
}

async fn request(guest: &mut UnixStream, remote: u16) -> Result<(), ForwardError> {
    let req = PortForwardRequest {
        host: "127.0.0.1".into(),
        port: remote,
        framed: true,
    };
    let f = Frame::json(FrameType::PortForward, &req).map_err(ForwardError::Request)?;
    write_frame(guest, &f)
        .await
        .map_err(ForwardError::Request)?;
    let reply = read_frame(guest)
        .await
        .map_err(ForwardError::Reply)?
        .ok_or(ForwardError::Closed)?;
    match reply.kind {
        FrameType::Ok => Ok(()),
        FrameType::Error => Err(ForwardError::Guest(
            String::from_utf8_lossy(&reply.payload).into_owned(),
        )),
        other => Err(ForwardError::Unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = parse_addresses(&["127.0.0.1,localhost", "::1"]).expect("addrs");
        assert_eq!(a.len(), 2);
        assert_eq!(
            parse_addresses(&["example.com"])
                .expect_err("name")
                .to_string(),
            "invalid bind address \"example.com\" (use an IP literal or localhost)"
        );
        assert_eq!(
            parse_addresses::<&str>(&[]).expect_err("none"),
            AddressError::NoAddress
        );
    }

    /// A scripted guest agent on a socket pair stands in for the VM side of the vsock:
    /// the listener, the request framing, the splice and half-close are all real.
    #[tokio::test]
    async fn tunnels_with_half_close() {
        let dial: Dial = Arc::new(|| {
            Box::pin(async {
                let (host, mut guest) = UnixStream::pair().map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let f = read_frame(&mut guest).await.expect("r").expect("f");
                    let req: PortForwardRequest =
                        f.expect(FrameType::PortForward, "pf").expect("json");
                    if req.port == 81 {
                        let msg = b"connect 127.0.0.1:81 failed: refused".to_vec();
                        write_frame(&mut guest, &Frame::new(FrameType::Error, msg))
                            .await
                            .expect("w");
                        return;
                    }
                    assert!(req.framed);
                    write_frame(&mut guest, &Frame::empty(FrameType::Ok))
                        .await
                        .expect("w");
                    // Echo server that answers only after the client half-closes.
                    let mut buf = Vec::new();
                    loop {
                        let f = read_frame(&mut guest).await.expect("r").expect("f");
                        match f.kind {
                            FrameType::Data => buf.extend_from_slice(&f.payload),
                            FrameType::DataEnd => break,
                            k => panic!("unexpected {k:?}"),
                        }
                    }
                    buf.reverse();
                    write_frame(&mut guest, &Frame::new(FrameType::Data, buf))
                        .await
                        .expect("w");
                    write_frame(&mut guest, &Frame::empty(FrameType::DataEnd))
                        .await
                        .expect("w");
                });
                Ok(host)
            })
        });
        let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let e2 = errors.clone();
        let on_error: OnError = Arc::new(move |m| e2.lock().expect("lock").push(m));
        let fw = Forwarder::start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            &[
                PortMapping {
                    local_port: 0,
                    remote_port: 80,
                },
                PortMapping {
                    local_port: 0,
                    remote_port: 81,
                },
            ],
            dial,
            on_error,
        )
        .await
        .expect("start");
        let b = fw.bindings().to_vec();
        assert_eq!(b.len(), 2);
        assert!(b[0].local_port != 0);
        let mut c = TcpStream::connect((b[0].address, b[0].local_port))
            .await
            .expect("connect");
        c.write_all(b"abc").await.expect("w");
        c.shutdown().await.expect("half-close");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "cba");

        let mut c = TcpStream::connect((b[1].address, b[1].local_port))
            .await
            .expect("connect");
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.expect("closed");
        assert!(out.is_empty());
        fw.close().await;
        assert!(errors.lock().expect("lock")[0].contains("refused"));
        assert!(TcpStream::connect((b[0].address, b[0].local_port))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn duplicate_listen_address_rejected() {
        let dial: Dial = Arc::new(|| Box::pin(async { Err("unused".to_string()) }));
        let on_error: OnError = Arc::new(|_| {});
        let r = Forwarder::start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            &[
                PortMapping {
                    local_port: 38471,
                    remote_port: 1,
                },
                PortMapping {
                    local_port: 38471,
                    remote_port: 2,
                },
            ],
            dial,
            on_error,
        )
        .await;
        assert!(matches!(r, Err(ForwardError::Duplicate(_))));
    }

    /// A wedged agent that never answers the port-forward request: an error naming the
    /// step after REPLY_TIMEOUT, not a hang.
    #[tokio::test(start_paused = true)]
    async fn unanswered_request_times_out() {
        let (mut host, mut guest) = UnixStream::pair().expect("pair");
        tokio::spawn(async move { while let Ok(Some(_)) = read_frame(&mut guest).await {} });
        let e = tokio::time::timeout(REPLY_TIMEOUT * 6, open(&mut host, 80))
            .await
            .expect("open hung")
            .expect_err("no answer");
        assert_eq!(
            e.to_string(),
            "the guest did not answer the port-forward request within 10s"
        );
    }
}
