//! The HTTP echo service (plain and TLS), its `/sse` stream and `/ws` WebSocket echo.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use base64::Engine;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::Logs;

type Body = BoxBody<Bytes, Infallible>;

const MAX_BODY: usize = 1 << 20;
const MAX_WS_MESSAGE: u64 = 64 * 1024;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What a connection adds to each request's log record (peer, SNI, ALPN).
#[derive(Clone)]
struct ConnInfo {
    log: &'static str,
    extra: Value,
}

pub async fn serve_plain(listener: TcpListener, logs: Logs) {
    while let Ok((conn, peer)) = listener.accept().await {
        let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let info = ConnInfo {
            log: "http",
            extra: json!({"peer": peer.to_string(), "local": local}),
        };
        tokio::spawn(serve_conn(conn, info, logs.clone()));
    }
}

pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    log: &'static str,
    logs: Logs,
) {
    let acceptor = TlsAcceptor::from(config);
    while let Ok((conn, peer)) = listener.accept().await {
        let (acceptor, logs) = (acceptor.clone(), logs.clone());
        let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tokio::spawn(async move {
            let tls = match acceptor.accept(conn).await {
                Ok(tls) => tls,
                Err(e) => {
                    logs.write(
                        log,
                        json!({"event": "handshake-failed", "peer": peer.to_string(), "error": e.to_string()}),
                    );
                    return;
                }
            };
            let (_, session) = tls.get_ref();
            let extra = json!({
                "peer": peer.to_string(),
                "local": local,
                "sni": session.server_name(),
                "alpn": session.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
            });
            let mut record = extra.clone();
            record["event"] = json!("handshake");
            logs.write(log, record);
            serve_conn(tls, ConnInfo { log, extra }, logs).await;
        });
    }
}

async fn serve_conn<S>(io: S, info: ConnInfo, logs: Logs)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (info, logs) = (info.clone(), logs.clone());
        async move { Ok::<_, Infallible>(handle(req, info, logs).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle(mut req: Request<Incoming>, info: ConnInfo, logs: Logs) -> Response<Body> {
    let mut record = info.extra.clone();
    record["method"] = json!(req.method().as_str());
    record["path"] = json!(req.uri().path());
    record["query"] = json!(req.uri().query());
    record["version"] = json!(format!("{:?}", req.version()));
    let authority = req.uri().authority().map(|a| a.to_string());
    let host_header = req
        .headers()
        .get(hyper::header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    // HTTP/1.1 names the host in `Host`, HTTP/2 in `:authority`.
    record["host"] = json!(host_header.or(authority.clone()));
    record["authority"] = json!(authority);
    let headers: serde_json::Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    record["headers"] = Value::Object(headers);
    if req.uri().path() == "/ws" {
        logs.write(info.log, record);
        return websocket(&mut req, info.log, logs);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            record["error"] = json!(e.to_string());
            logs.write(info.log, record);
            return full(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                "body too large\n",
            );
        }
    };
    record["body"] = json!(String::from_utf8_lossy(&body));
    logs.write(info.log, record.clone());
    if record["path"] == "/sse" {
        return sse();
    }
    let mut text = record.to_string();
    text.push('\n');
    full(StatusCode::OK, "application/json", text)
}

/// A body fed from a channel: each message is one frame, sent as soon as it is produced.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// Three events, 300 ms apart: a client sees the first long before the last.
fn sse() -> Response<Body> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for i in 1..=3 {
            if i > 1 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let event = format!("id: {i}\ndata: event {i}\n\n");
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(ChannelBody(rx)));
    if let Ok(v) = "text/event-stream".parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn websocket(req: &mut Request<Incoming>, log: &'static str, logs: Logs) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec());
    let Some(key) = key else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "not a WebSocket\n");
    };
    let mut sha = Sha1::new();
    sha.update(&key);
    sha.update(WS_GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            ws_echo(TokioIo::new(up), log, logs).await;
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", "");
    let h = resp.headers_mut();
    h.remove(hyper::header::CONTENT_TYPE);
    for (k, v) in [
        ("upgrade", "websocket".to_owned()),
        ("connection", "Upgrade".to_owned()),
        ("sec-websocket-accept", accept),
    ] {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    }
    resp
}

/// Echoes text and binary messages (unfragmented), answers ping, ends on close.
async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, log: &'static str, logs: Logs) {
    loop {
        let Ok((opcode, payload)) = ws_read(&mut io).await else {
            return;
        };
        let reply_opcode = match opcode {
            0x1 | 0x2 => {
                logs.write(
                    log,
                    json!({"event": "ws-message", "opcode": opcode, "data": String::from_utf8_lossy(&payload)}),
                );
                opcode
            }
            0x9 => 0xA,
            0x8 => {
                let _ = ws_write(&mut io, 0x8, &payload).await;
                return;
            }
            _ => continue,
        };
        if ws_write(&mut io, reply_opcode, &payload).await.is_err() {
            return;
        }
    }
}

async fn ws_read<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => u64::from(io.read_u16().await?),
        127 => io.read_u64().await?,
        n => u64::from(n),
    };
    if len > MAX_WS_MESSAGE {
        return Err(std::io::Error::other("WebSocket message too large"));
    }
    let mut mask = [0u8; 4];
    if masked {
        io.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    io.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((opcode, payload))
}

async fn ws_write<S: AsyncWrite + Unpin>(
    io: &mut S,
    opcode: u8,
    data: &[u8],
) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match data.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(data);
    io.write_all(&frame).await?;
    io.flush().await
}
