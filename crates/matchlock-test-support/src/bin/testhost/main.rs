//! `matchlock-testhost --dir DIR [--ip IP] [--ip6 IPV6]... [--name NAME[=IP]]...`: the servers a hermetic
//! network test talks to, run inside the test host's network namespace. Every server logs
//! what it receives as JSON lines in `DIR/<log>.jsonl`, so tests assert what did, and did
//! not, arrive:
//!
//! | port | server | log |
//! |------|--------|-----|
//! | 80/tcp | HTTP/1.1 and h2c: echoes method, path, query, headers, `host` (Host or `:authority`) and body as JSON; `/sse` streams 3 events 300 ms apart; `/ws` WebSocket echo | `http` |
//! | 443/tcp | the same over TLS (test-CA leaf, ALPN `h2` and `http/1.1`) | `https` (+ one `handshake` line per connection: SNI, ALPN) |
//! | 8443/tcp | the same with a self-signed certificate nobody trusts | `https-untrusted` |
//! | 9443/tcp | the same as 443 (test-CA leaf) on a port that is not 443 | `https-alt` |
//! | 7/tcp | echo | `tcp` |
//! | 25/tcp | server speaks first: `220` banner, then `250 <line>` per line, `221` on `QUIT` | `banner` |
//! | 9/udp | logger (no reply) | `udp` |
//! | 53/udp, 53/tcp | DNS: `A` answers for the `--name`s (default: `--ip`), NXDOMAIN otherwise | `dns` |
//!
//! Each `--ip6` address also gets HTTP :80, TCP echo :7 and the UDP logger :9 (bound to
//! that address, so they coexist with the IPv4 wildcard listeners).
//!
//! It writes the test CA to `DIR/ca.pem` (the tests give it to the sandbox owner through
//! `SSL_CERT_FILE`) and, once every socket is bound, the file `DIR/ready`.
//!
//! # Design
//! One tokio runtime, one task per listener and per connection; hyper's auto connection
//! builder serves HTTP/1.1 and HTTP/2 on the same port, as real upstreams do. Every record is
//! written (and flushed) before the response, so a test that sees the reply also sees the
//! log line. Reads are bounded (request bodies to 1 MiB, WebSocket messages to 64 KiB).
//!
//! # Limitations
//! A test fixture: no graceful shutdown (the harness kills it); HTTPS and DNS are IPv4 only.

mod http;
mod tls;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, ResourceRecord, CLASS, QTYPE, RCODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Largest DNS message over TCP accepted.
const MAX_DNS_TCP: usize = 4096;

/// Append-only JSON-lines logs, one file per server.
#[derive(Clone)]
pub struct Logs {
    dir: PathBuf,
    files: Arc<Mutex<BTreeMap<&'static str, File>>>,
}

impl Logs {
    /// Appends `record` (plus a `ts_ms` field) to `DIR/<log>.jsonl`, flushed.
    pub fn write(&self, log: &'static str, mut record: Value) {
        if let Some(obj) = record.as_object_mut() {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            obj.insert("ts_ms".into(), json!(ts));
        }
        let Ok(mut files) = self.files.lock() else {
            return;
        };
        if !files.contains_key(log) {
            match File::options()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{log}.jsonl")))
            {
                Ok(f) => {
                    files.insert(log, f);
                }
                Err(e) => {
                    eprintln!("testhost: opening log {log}: {e}");
                    return;
                }
            }
        }
        if let Some(f) = files.get_mut(log) {
            let _ = writeln!(f, "{record}").and_then(|()| f.flush());
        }
    }
}

struct Args {
    dir: PathBuf,
    ip: Ipv4Addr,
    ip6: Vec<Ipv6Addr>,
    names: Vec<(String, Ipv4Addr)>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut dir, mut ip, mut raw_names) = (None, Ipv4Addr::new(198, 51, 100, 2), Vec::new());
    let mut ip6 = Vec::new();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value)),
            "--ip" => ip = value.parse().context("--ip")?,
            "--ip6" => ip6.push(value.parse().context("--ip6")?),
            "--name" => raw_names.push(value),
            _ => bail!(
                "usage: matchlock-testhost --dir DIR [--ip IP] [--ip6 IPV6]... [--name NAME[=IP]]..."
            ),
        }
    }
    let names = raw_names
        .into_iter()
        .map(|n| match n.split_once('=') {
            Some((name, addr)) => Ok((name.to_owned(), addr.parse().context("--name IP")?)),
            None => Ok((n, ip)),
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Args {
        dir: dir.context("--dir is required")?,
        ip,
        ip6,
        names,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let logs = Logs {
        dir: args.dir.clone(),
        files: Arc::default(),
    };
    let mut cert_names: Vec<String> = args.names.iter().map(|(n, _)| n.clone()).collect();
    cert_names.push(args.ip.to_string());
    let certs = tls::TestCerts::generate(&cert_names)?;
    std::fs::write(args.dir.join("ca.pem"), certs.ca_pem()).context("writing ca.pem")?;
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let http = TcpListener::bind(any(80)).await.context("bind :80")?;
    let https = TcpListener::bind(any(443)).await.context("bind :443")?;
    let untrusted = TcpListener::bind(any(8443)).await.context("bind :8443")?;
    let alt = TcpListener::bind(any(9443)).await.context("bind :9443")?;
    let echo = TcpListener::bind(any(7)).await.context("bind :7")?;
    let banner = TcpListener::bind(any(25)).await.context("bind :25")?;
    let udp9 = UdpSocket::bind(any(9)).await.context("bind udp :9")?;
    let dns_udp = UdpSocket::bind(any(53)).await.context("bind udp :53")?;
    let dns_tcp = TcpListener::bind(any(53)).await.context("bind tcp :53")?;
    let names: Arc<BTreeMap<String, Ipv4Addr>> = Arc::new(args.names.into_iter().collect());

    tokio::spawn(http::serve_plain(http, logs.clone()));
    tokio::spawn(http::serve_tls(
        https,
        certs.trusted()?,
        "https",
        logs.clone(),
    ));
    tokio::spawn(http::serve_tls(
        untrusted,
        certs.untrusted()?,
        "https-untrusted",
        logs.clone(),
    ));
    tokio::spawn(http::serve_tls(
        alt,
        certs.trusted()?,
        "https-alt",
        logs.clone(),
    ));
    tokio::spawn(tcp_echo(echo, logs.clone()));
    tokio::spawn(banner_server(banner, logs.clone()));
    tokio::spawn(udp_logger(udp9, logs.clone()));
    tokio::spawn(dns_over_udp(dns_udp, names.clone(), logs.clone()));
    tokio::spawn(dns_over_tcp(dns_tcp, names, logs.clone()));
    for ip in &args.ip6 {
        serve_ipv6(*ip, &logs).await?;
    }
    write_ready(&args.dir)?;
    std::future::pending::<()>().await;
    Ok(())
}

/// HTTP :80, TCP echo :7 and the UDP logger :9 on one IPv6 address.
async fn serve_ipv6(ip: Ipv6Addr, logs: &Logs) -> anyhow::Result<()> {
    let at = |port| SocketAddr::from((ip, port));
    let http = TcpListener::bind(at(80)).await.context("bind [v6]:80")?;
    let echo = TcpListener::bind(at(7)).await.context("bind [v6]:7")?;
    let udp9 = UdpSocket::bind(at(9)).await.context("bind udp [v6]:9")?;
    tokio::spawn(http::serve_plain(http, logs.clone()));
    tokio::spawn(tcp_echo(echo, logs.clone()));
    tokio::spawn(udp_logger(udp9, logs.clone()));
    Ok(())
}

fn write_ready(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("ready"), std::process::id().to_string()).context("writing ready")
}

async fn tcp_echo(listener: TcpListener, logs: Logs) {
    while let Ok((mut conn, peer)) = listener.accept().await {
        let logs = logs.clone();
        tokio::spawn(async move {
            logs.write("tcp", json!({"event": "connect", "peer": peer.to_string()}));
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            let mut data = Vec::new();
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                total += n;
                if data.len() < 4096 {
                    data.extend_from_slice(&buf[..n.min(4096 - data.len())]);
                }
            }
            let data = String::from_utf8_lossy(&data);
            logs.write(
                "tcp",
                json!({"event": "close", "peer": peer.to_string(), "bytes": total, "data": data}),
            );
        });
    }
}

/// Longest line the banner server reads.
const MAX_BANNER_LINE: u64 = 1024;

/// A server-speaks-first exchange (SMTP-like): the banner at once, then one reply per line.
async fn banner_server(listener: TcpListener, logs: Logs) {
    use tokio::io::AsyncBufReadExt;
    while let Ok((conn, peer)) = listener.accept().await {
        let logs = logs.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            if wr.write_all(b"220 testhost ready\r\n").await.is_err() {
                return;
            }
            let mut rd = tokio::io::BufReader::new(rd.take(16 * MAX_BANNER_LINE));
            let mut line = String::new();
            while matches!(rd.read_line(&mut line).await, Ok(n) if n > 0) {
                let text = line.trim_end().to_string();
                logs.write("banner", json!({"peer": peer.to_string(), "line": text}));
                let reply = if text.eq_ignore_ascii_case("QUIT") {
                    "221 bye\r\n".to_string()
                } else {
                    format!("250 {text}\r\n")
                };
                if wr.write_all(reply.as_bytes()).await.is_err() || reply.starts_with("221") {
                    return;
                }
                line.clear();
            }
        });
    }
}

async fn udp_logger(sock: UdpSocket, logs: Logs) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        let data = String::from_utf8_lossy(&buf[..n.min(4096)]);
        logs.write(
            "udp",
            json!({"peer": peer.to_string(), "port": 9, "len": n, "data": data}),
        );
    }
}

/// The reply to one DNS query (logged with `proto`), or `None` for an unparseable message.
fn dns_answer(
    query: &[u8],
    names: &BTreeMap<String, Ipv4Addr>,
    peer: SocketAddr,
    proto: &str,
    logs: &Logs,
) -> Option<Vec<u8>> {
    let packet = match Packet::parse(query) {
        Ok(p) => p,
        Err(e) => {
            logs.write(
                "dns",
                json!({"proto": proto, "peer": peer.to_string(), "len": query.len(), "error": e.to_string()}),
            );
            return None;
        }
    };
    let mut reply = Packet::new_reply(packet.id());
    for q in &packet.questions {
        let name = q
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let qtype = match q.qtype {
            QTYPE::TYPE(t) => format!("{t:?}"),
            other => format!("{other:?}"),
        };
        logs.write(
            "dns",
            json!({"proto": proto, "peer": peer.to_string(), "name": name, "type": qtype}),
        );
        reply.questions.push(q.clone());
        match names.get(&name) {
            Some(ip) if qtype == "A" => reply.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                60,
                RData::A(A {
                    address: u32::from(*ip),
                }),
            )),
            Some(_) => {}
            None => *reply.rcode_mut() = RCODE::NameError,
        }
    }
    reply.build_bytes_vec().ok()
}

async fn dns_over_udp(sock: UdpSocket, names: Arc<BTreeMap<String, Ipv4Addr>>, logs: Logs) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        if let Some(reply) = dns_answer(&buf[..n], &names, peer, "udp", &logs) {
            let _ = sock.send_to(&reply, peer).await;
        }
    }
}

async fn dns_over_tcp(listener: TcpListener, names: Arc<BTreeMap<String, Ipv4Addr>>, logs: Logs) {
    while let Ok((conn, peer)) = listener.accept().await {
        let (names, logs) = (names.clone(), logs.clone());
        tokio::spawn(async move { dns_tcp_conn(conn, peer, &names, &logs).await });
    }
}

async fn dns_tcp_conn(
    mut conn: TcpStream,
    peer: SocketAddr,
    names: &BTreeMap<String, Ipv4Addr>,
    logs: &Logs,
) {
    loop {
        let Ok(len) = conn.read_u16().await else {
            return;
        };
        let len = usize::from(len);
        if len > MAX_DNS_TCP {
            logs.write(
                "dns",
                json!({"proto": "tcp", "peer": peer.to_string(), "len": len, "error": "too long"}),
            );
            return;
        }
        let mut msg = vec![0u8; len];
        if conn.read_exact(&mut msg).await.is_err() {
            return;
        }
        let Some(reply) = dns_answer(&msg, names, peer, "tcp", logs) else {
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        if conn.write_u16(reply_len).await.is_err() || conn.write_all(&reply).await.is_err() {
            return;
        }
    }
}
