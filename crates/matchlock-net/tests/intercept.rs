//! The interceptor against real servers on 127.0.0.1 (hyper, rustls with a test CA) and a
//! real client (hyper, rustls trusting the interceptor's CA) on the guest side of an
//! in-memory pipe, as the network stack hands flows over.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_net::events::{EventSink, NetworkEvent};
use matchlock_net::hooks::HookRules;
use matchlock_net::intercept::{InterceptConfig, Interceptor};
use matchlock_net::policy::Policy;
use matchlock_net::secrets::{Secret, Secrets};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Body = UnsyncBoxBody<Bytes, Infallible>;
const WAIT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throwaway CA with a leaf for `localhost` / 127.0.0.1.
struct TestCa {
    ca_der: CertificateDer<'static>,
    leaf: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).expect("ca");
        let key = KeyPair::generate().expect("leaf key");
        let p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
        let leaf = p.signed_by(&key, &ca, &ca_key).expect("leaf");
        TestCa {
            ca_der: ca.der().clone(),
            leaf: vec![leaf.der().clone(), ca.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.ca_der.clone()).expect("root");
        r
    }

    fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                self.leaf.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .expect("cert");
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// What the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    /// Path and query.
    target: String,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct UpstreamState {
    log: Mutex<Vec<Seen>>,
    /// TCP connections accepted.
    conns: AtomicUsize,
    /// SNI of each TLS connection.
    sni: Mutex<Vec<Option<String>>>,
    /// Releases the second server-sent event.
    gate: Notify,
}

struct Upstream {
    port: u16,
    state: Arc<UpstreamState>,
}

impl Upstream {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                st.conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_upstream(tcp, tls.clone(), st.clone()));
            }
        });
        Upstream { port, state }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.log.lock().expect("log").clone()
    }

    fn conns(&self) -> usize {
        self.state.conns.load(Ordering::SeqCst)
    }
}

async fn serve_upstream(
    tcp: tokio::net::TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    st: Arc<UpstreamState>,
) {
    let svc_st = st.clone();
    let svc = service_fn(move |req| upstream_handle(req, svc_st.clone()));
    let Some(tls) = tls else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .with_upgrades()
            .await;
        return;
    };
    let Ok(s) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
        return;
    };
    let (_, c) = s.get_ref();
    st.sni
        .lock()
        .expect("sni")
        .push(c.server_name().map(str::to_string));
    if c.alpn_protocol() == Some(b"h2") {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .with_upgrades()
            .await;
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

/// `/sse`: two events, the second only once the gate opens; `/ws`: upgrade then echo;
/// anything else: `<method> <target> <body length>`.
async fn upstream_handle(
    mut req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<Body>, Infallible> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    st.log.lock().expect("log").push(Seen {
        method: parts.method.clone(),
        target: target.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let path = parts.uri.path();
    if path == "/sse" {
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
            st.gate.notified().await;
            let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
        });
        let mut r = Response::new(rx.boxed_unsync());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        return Ok(r);
    }
    if path == "/ws" {
        tokio::spawn(async move {
            let Ok(up) = on_upgrade.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        return Ok(r);
    }
    let text = format!("{} {} {}", parts.method, target, body.len());
    Ok(Response::new(full(text)))
}

/// An interceptor for these tests: `localhost` allowed, loopback not blocked.
struct Setup {
    icpt: Arc<Interceptor>,
    events: Arc<Mutex<Vec<NetworkEvent>>>,
}

impl Setup {
    fn new(ca: &TestCa, secrets: Vec<Secret>, block_private: bool) -> Setup {
        Setup::build(ca, secrets, block_private, |i| i)
    }

    fn build(
        ca: &TestCa,
        secrets: Vec<Secret>,
        block_private: bool,
        tune: impl FnOnce(Interceptor) -> Interceptor,
    ) -> Setup {
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let sink: EventSink = Arc::new(move |e| ev.lock().expect("events").push(e));
        let icpt = Interceptor::new(InterceptConfig {
            policy: Arc::new(Policy::new(["localhost"], block_private)),
            secrets: Arc::new(Secrets::new(secrets)),
            events: Some(sink),
            upstream_roots: Some(ca.roots()),
        })
        .expect("interceptor");
        Setup {
            icpt: Arc::new(tune(icpt)),
            events,
        }
    }

    fn events(&self) -> Vec<NetworkEvent> {
        self.events.lock().expect("events").clone()
    }

    /// The guest end of a flow to `127.0.0.1:port` served as HTTP or TLS.
    fn pipe(&self, port: u16, tls: bool) -> tokio::io::DuplexStream {
        let dst = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let icpt = self.icpt.clone();
        if tls {
            tokio::spawn(icpt.serve_tls(dst.into(), theirs));
        } else {
            tokio::spawn(icpt.serve_http(dst.into(), theirs));
        }
        ours
    }

    /// A guest connection to `127.0.0.1:port`: plain, or TLS with `sni` offering `alpn`.
    async fn guest(&self, port: u16, tls: Option<(&str, &[&[u8]])>) -> Guest {
        let Some((sni, alpn)) = tls else {
            return Guest::handshake(self.pipe(port, false), false, None).await;
        };
        let s = self.tls(self.pipe(port, true), sni, alpn).await;
        let alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let h2 = alpn.as_deref() == Some(b"h2");
        Guest::handshake(s, h2, alpn).await
    }

    /// TLS over `pipe` trusting the interceptor's CA.
    async fn tls(
        &self,
        pipe: tokio::io::DuplexStream,
        sni: &str,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::io::DuplexStream> {
        let mut roots = RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.icpt.ca_pem().as_bytes()).expect("ca pem");
        roots.add(ca).expect("trust the interceptor's CA");
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(sni.to_string()).expect("sni");
        tokio_rustls::TlsConnector::from(Arc::new(c))
            .connect(name, pipe)
            .await
            .expect("TLS with the interceptor")
    }
}

enum GuestSender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

struct Guest {
    sender: GuestSender,
    alpn: Option<Vec<u8>>,
}

impl Guest {
    async fn handshake<S>(s: S, h2: bool, alpn: Option<Vec<u8>>) -> Guest
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(s);
        let sender = if h2 {
            let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            GuestSender::H2(tx)
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("h1 handshake");
            tokio::spawn(conn.with_upgrades());
            GuestSender::H1(tx)
        };
        Guest { sender, alpn }
    }

    /// A request to `authority` (Host / `:authority`) for `target`.
    fn request(&self, method: Method, authority: &str, target: &str, body: Body) -> Request<Body> {
        let b = Request::builder().method(method);
        let b = match self.sender {
            GuestSender::H1(_) => b.uri(target).header(header::HOST, authority),
            GuestSender::H2(_) => b
                .uri(format!("https://{authority}{target}"))
                .version(Version::HTTP_2),
        };
        b.body(body).expect("request")
    }

    async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        let fut = async {
            match &mut self.sender {
                GuestSender::H1(s) => s.send_request(req).await,
                GuestSender::H2(s) => s.send_request(req).await,
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("response in time")
            .expect("response")
    }

    async fn get(&mut self, authority: &str, target: &str) -> (StatusCode, String) {
        let req = self.request(Method::GET, authority, target, full(Bytes::new()));
        text(self.send(req).await).await
    }
}

async fn text(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn local(port: u16) -> String {
    format!("localhost:{port}")
}

#[tokio::test]
async fn http_keep_alive_get_and_post_reuse_one_upstream_connection() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, None).await;
    let a = local(up.port);
    assert_eq!(
        g.get(&a, "/echo?x=1").await,
        (StatusCode::OK, "GET /echo?x=1 0".into())
    );
    let req = g.request(Method::POST, &a, "/submit", full("hello world"));
    assert_eq!(
        text(g.send(req).await).await,
        (StatusCode::OK, "POST /submit 11".into())
    );
    assert_eq!(
        g.get(&a, "/again").await,
        (StatusCode::OK, "GET /again 0".into())
    );
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].method, Method::POST);
    assert_eq!(seen[1].body, Bytes::from_static(b"hello world"));
    assert_eq!(seen[0].headers[header::HOST], a.as_str());
    assert_eq!(up.conns(), 1, "keep-alive reuses the upstream connection");
    let ev = s.events();
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!(ev[0].url, "http://localhost/echo", "no query in events");
    assert_eq!(ev[0].method, "GET");
    assert_eq!(ev[0].host, "localhost");
    assert_eq!(ev[0].status_code, 200);
    assert_eq!(ev[1].request_bytes, 11);
    assert!(ev.iter().all(|e| !e.blocked && e.timestamp_unix > 0));
}

#[tokio::test]
async fn chunked_upload_is_forwarded_chunked() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, None).await;
    let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    let req = g.request(Method::PUT, &local(up.port), "/upload", rx.boxed_unsync());
    tokio::spawn(async move {
        for part in ["first,", "second,", "third"] {
            let _ = tx.send_data(Bytes::from(part)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (status, body) = text(g.send(req).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "PUT /upload 18"));
    let seen = up.seen();
    assert_eq!(seen[0].body, Bytes::from_static(b"first,second,third"));
    assert_eq!(seen[0].headers[header::TRANSFER_ENCODING], "chunked");
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_upstream_finishes() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, None).await;
    let req = g.request(Method::GET, &local(up.port), "/sse", full(Bytes::new()));
    let resp = g.send(req).await;
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event before the upstream finished")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().expect("data"), "data: one\n\n");
    up.state.gate.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("rest")
        .expect("body")
        .to_bytes();
    assert_eq!(rest, "data: two\n\n");
}

#[tokio::test]
async fn http2_on_both_sides_by_alpn() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"h2", b"http/1.1"]))).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s
        .guest(up.port, Some(("localhost", &[b"h2", b"http/1.1"])))
        .await;
    assert_eq!(g.alpn.as_deref(), Some(&b"h2"[..]), "guest side speaks h2");
    let a = local(up.port);
    let mut req = g.request(Method::GET, &a, "/one", full(Bytes::new()));
    req.headers_mut()
        .insert(header::TE, "trailers".parse().expect("value"));
    assert_eq!(
        text(g.send(req).await).await,
        (StatusCode::OK, "GET /one 0".into())
    );
    assert_eq!(
        g.get(&a, "/two").await,
        (StatusCode::OK, "GET /two 0".into())
    );
    let seen = up.seen();
    assert!(
        seen.iter().all(|r| r.version == Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(up.conns(), 1, "streams share one upstream h2 connection");
    // An HTTP/1.1-only guest still reaches the h2 upstream.
    let mut g1 = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    assert_eq!(g1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(
        g1.get(&a, "/three").await,
        (StatusCode::OK, "GET /three 0".into())
    );
    assert_eq!(
        s.events()[0].url,
        "https://localhost/one",
        "{:?}",
        s.events()
    );
}

#[tokio::test]
async fn http2_stream_to_a_denied_authority_is_refused_alone() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"h2"]))).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, Some(("localhost", &[b"h2"]))).await;
    let denied = g.get(&format!("evil.test:{}", up.port), "/steal").await;
    assert_eq!(denied, (StatusCode::FORBIDDEN, "Blocked by policy".into()));
    assert_eq!(
        g.get(&local(up.port), "/fine").await,
        (StatusCode::OK, "GET /fine 0".into()),
        "the connection survives the refused stream"
    );
    assert_eq!(up.seen().len(), 1);
    let ev = s.events();
    assert!(ev[0].blocked && ev[0].host == "evil.test", "{ev:?}");
    let reason = ev[0].block_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("not in the allow-list"), "{reason}");
}

#[tokio::test]
async fn websocket_upgrade_is_spliced() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, None).await;
    let mut req = g.request(Method::GET, &local(up.port), "/ws", full(Bytes::new()));
    req.headers_mut()
        .insert(header::UPGRADE, "websocket".parse().expect("value"));
    req.headers_mut()
        .insert(header::CONNECTION, "Upgrade".parse().expect("value"));
    req.headers_mut().insert(
        "sec-websocket-key",
        "dGhlIHNhbXBsZSBub25jZQ==".parse().expect("v"),
    );
    let mut resp = g.send(req).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up_seen = up.seen();
    assert_eq!(up_seen[0].headers[header::UPGRADE], "websocket");
    assert_eq!(
        up_seen[0].headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
    let upgraded = tokio::time::timeout(WAIT, hyper::upgrade::on(&mut resp))
        .await
        .expect("upgrade in time")
        .expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    for msg in [&b"ping"[..], b"second message"] {
        io.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, io.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn secret_is_substituted_toward_its_host_only_in_header_and_query() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"h2", b"http/1.1"]))).await;
    let secret = Secret::new("API_KEY", "real-secret-value", &["localhost".into()], "");
    let p = secret.placeholder.clone();
    let s = Setup::new(&ca, vec![secret], false);
    let mut g = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    let target = format!("/v1/{p}?key={p}");
    let mut req = g.request(Method::POST, &local(up.port), &target, full(p.clone()));
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {p}").parse().expect("value"),
    );
    let (status, _) = text(g.send(req).await).await;
    assert_eq!(status, StatusCode::OK);
    let seen = up.seen();
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        "Bearer real-secret-value"
    );
    assert_eq!(
        seen[0].target,
        format!("/v1/{p}?key=real-secret-value"),
        "query substituted, path never"
    );
    assert_eq!(seen[0].body, p.as_bytes(), "bodies are never rewritten");
    let ev = format!("{:?}", s.events());
    assert!(!ev.contains("real-secret-value"), "{ev}");
}

/// Reference §13.2 #116: two secrets in one request, each toward its own host list (both
/// include this upstream), are both substituted; a third secret scoped to another host in
/// the same request refuses the whole request before anything is sent.
#[tokio::test]
async fn two_secrets_in_one_request_are_both_substituted() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"h2", b"http/1.1"]))).await;
    let a = Secret::new("KEY_A", "value-a-1111", &["localhost".into()], "");
    let b = Secret::new(
        "KEY_B",
        "value-b-2222",
        &["api.example".into(), "localhost".into()],
        "",
    );
    let c = Secret::new("KEY_C", "value-c-3333", &["api.example".into()], "");
    let (pa, pb, pc) = (
        a.placeholder.clone(),
        b.placeholder.clone(),
        c.placeholder.clone(),
    );
    let s = Setup::new(&ca, vec![a, b, c], false);
    let mut g = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    let mut req = g.request(
        Method::GET,
        &local(up.port),
        &format!("/two?a={pa}&b={pb}"),
        full(Bytes::new()),
    );
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {pa}").parse().expect("value"),
    );
    req.headers_mut()
        .insert("x-api-key", pb.parse().expect("value"));
    let (status, _) = text(g.send(req).await).await;
    assert_eq!(status, StatusCode::OK);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers[header::AUTHORIZATION],
        "Bearer value-a-1111"
    );
    assert_eq!(seen[0].headers["x-api-key"], "value-b-2222");
    assert_eq!(seen[0].target, "/two?a=value-a-1111&b=value-b-2222");
    // KEY_C may not go to localhost: the request carrying it with the others is refused.
    let mut req = g.request(
        Method::GET,
        &local(up.port),
        &format!("/three?a={pa}&c={pc}"),
        full(Bytes::new()),
    );
    req.headers_mut()
        .insert("x-api-key", pb.parse().expect("value"));
    assert_eq!(
        text(g.send(req).await).await,
        (StatusCode::FORBIDDEN, "Blocked by policy".into())
    );
    assert_eq!(up.seen().len(), 1, "the refused request never arrived");
    let ev = format!("{:?}", s.events());
    for real in ["value-a-1111", "value-b-2222", "value-c-3333"] {
        assert!(!ev.contains(real), "{ev}");
    }
    assert!(ev.contains("KEY_C"), "{ev}");
}

/// Reference §15 #30: before-hooks run first, then secrets. A placeholder a hook puts in a
/// header is substituted toward the secret's host like one the guest sent, and one a hook
/// puts in toward a host the secret is not for refuses the request.
#[tokio::test]
async fn a_placeholder_set_by_a_before_hook_is_substituted_then_checked() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"http/1.1"]))).await;
    let ours = Secret::new("KEY_A", "value-a-1111", &["localhost".into()], "");
    let other = Secret::new("KEY_C", "value-c-3333", &["api.example".into()], "");
    let hooks = HookRules::compile(&serde_json::json!({"rules": [
        {"phase": "before", "action": "mutate", "path": "/ours",
         "set_headers": {"X-Injected": ours.placeholder.clone()}},
        {"phase": "before", "action": "mutate", "path": "/other",
         "set_headers": {"X-Injected": other.placeholder.clone()}}
    ]}))
    .expect("rules");
    let s = Setup::build(&ca, vec![ours, other], false, |i| {
        i.with_hooks(Arc::new(hooks))
    });
    let mut g = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    let req = g.request(Method::GET, &local(up.port), "/ours", full(Bytes::new()));
    assert_eq!(text(g.send(req).await).await.0, StatusCode::OK);
    assert_eq!(up.seen()[0].headers["x-injected"], "value-a-1111");
    let req = g.request(Method::GET, &local(up.port), "/other", full(Bytes::new()));
    assert_eq!(
        text(g.send(req).await).await,
        (StatusCode::FORBIDDEN, "Blocked by policy".into())
    );
    assert_eq!(up.seen().len(), 1, "the refused request never arrived");
}

#[tokio::test]
async fn placeholder_toward_another_host_is_refused_and_never_sent() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let secret = Secret::new("API_KEY", "real-secret-value", &["api.example".into()], "");
    let p = secret.placeholder.clone();
    let s = Setup::new(&ca, vec![secret], false);
    let mut g = s.guest(up.port, None).await;
    let a = local(up.port);
    for (target, header_value) in [
        (format!("/x/{p}"), None),
        (format!("/x?k={p}"), None),
        ("/x".to_string(), Some(format!("Bearer {p}"))),
    ] {
        let mut req = g.request(Method::GET, &a, &target, full(Bytes::new()));
        if let Some(v) = header_value {
            req.headers_mut()
                .insert(header::AUTHORIZATION, v.parse().expect("value"));
        }
        assert_eq!(
            text(g.send(req).await).await,
            (StatusCode::FORBIDDEN, "Blocked by policy".into()),
            "{target}"
        );
    }
    assert_eq!(up.conns(), 0, "nothing reached the upstream");
    let ev = s.events();
    assert_eq!(ev.len(), 3);
    for e in &ev {
        assert!(e.blocked, "{e:?}");
        let reason = e.block_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("API_KEY"), "{reason}");
        assert!(!reason.contains("real-secret-value"));
    }
}

#[tokio::test]
async fn host_not_in_allow_list_gets_403_and_no_connection() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, None).await;
    assert_eq!(
        g.get(&format!("evil.test:{}", up.port), "/").await,
        (StatusCode::FORBIDDEN, "Blocked by policy".into())
    );
    // An IP literal is judged as itself, not as the name it belongs to.
    assert_eq!(
        g.get(&format!("127.0.0.1:{}", up.port), "/").await.0,
        StatusCode::FORBIDDEN
    );
    // Absolute-form request-target: its authority decides, not the Host header.
    let mut req = g.request(Method::GET, &local(up.port), "/", full(Bytes::new()));
    *req.uri_mut() = format!("http://evil.test:{}/", up.port)
        .parse()
        .expect("uri");
    assert_eq!(text(g.send(req).await).await.0, StatusCode::FORBIDDEN);
    let mut req = g.request(Method::CONNECT, &local(up.port), "/", full(Bytes::new()));
    *req.uri_mut() = local(up.port).parse().expect("authority");
    assert_eq!(text(g.send(req).await).await.0, StatusCode::FORBIDDEN);
    assert_eq!(up.conns(), 0);
    assert_eq!(s.events().len(), 4);
}

#[tokio::test]
async fn name_resolving_to_a_blocked_range_is_refused() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    // Default policy: private ranges blocked; localhost resolves to loopback.
    let s = Setup::new(&ca, vec![], true);
    let mut g = s.guest(up.port, None).await;
    assert_eq!(
        g.get(&local(up.port), "/").await,
        (StatusCode::FORBIDDEN, "Blocked by policy".into())
    );
    assert_eq!(up.conns(), 0);
    let reason = s.events()[0].block_reason.clone().unwrap_or_default();
    assert!(reason.contains("loopback"), "{reason}");
}

#[tokio::test]
async fn host_header_decides_not_sni() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"http/1.1"]))).await;
    let s = Setup::new(&ca, vec![], false);
    // SNI of an allowed name, Host of a denied one: refused, nothing sent.
    let mut g = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    let (status, _) = g.get(&format!("evil.test:{}", up.port), "/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(up.conns(), 0);
    // SNI of another name, Host of the allowed one: the Host is checked, dialled and
    // verified (upstream SNI = localhost).
    let mut g = s.guest(up.port, Some(("other.test", &[b"http/1.1"]))).await;
    assert_eq!(g.get(&local(up.port), "/ok").await.0, StatusCode::OK);
    assert_eq!(
        *up.state.sni.lock().expect("sni"),
        [Some("localhost".to_string())]
    );
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_502_without_data() {
    let ca = TestCa::new();
    let rogue = TestCa::new();
    let up = Upstream::start(Some(rogue.server_config(&[b"http/1.1"]))).await;
    let s = Setup::new(&ca, vec![], false);
    let mut g = s.guest(up.port, Some(("localhost", &[b"http/1.1"]))).await;
    let req = g.request(
        Method::POST,
        &local(up.port),
        "/upload",
        full("must not arrive"),
    );
    let (status, body) = text(g.send(req).await).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "Failed to connect");
    assert!(up.seen().is_empty(), "no request reached the upstream");
    assert_eq!(s.events()[0].status_code, 502);
}

#[tokio::test]
async fn tls_without_sni_gets_a_certificate_for_the_destination_ip() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"http/1.1"]))).await;
    let s = Setup::new(&ca, vec![], false);
    // rustls sends no SNI for an IP server name; the client verifies an IP SAN.
    let mut g = s.guest(up.port, Some(("127.0.0.1", &[b"http/1.1"]))).await;
    assert_eq!(
        g.get(&local(up.port), "/ip").await,
        (StatusCode::OK, "GET /ip 0".into())
    );
}

/// Reads until EOF or an error; how long it took.
async fn until_closed(mut s: impl tokio::io::AsyncRead + Unpin) -> Duration {
    let t = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    let read_all = async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("idle connection closed");
    t.elapsed()
}

#[tokio::test]
async fn idle_connections_close_but_a_silent_stream_in_flight_stays() {
    let ca = TestCa::new();
    let up = Upstream::start(Some(ca.server_config(&[b"h2"]))).await;
    let idle = Duration::from_millis(300);
    let s = Setup::build(&ca, vec![], false, |i| i.with_idle_timeout(idle));
    let took = until_closed(s.pipe(up.port, false)).await;
    assert!(took >= idle, "HTTP/1.1 closed after {took:?}");
    // TLS with h2 negotiated and no HTTP/2 preface: only the idle watch ends it.
    let tls = s.tls(s.pipe(up.port, true), "localhost", &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let took = until_closed(tls).await;
    assert!(took >= idle, "HTTP/2 closed after {took:?}");
    // A response still streaming is not idle, however long the upstream is silent.
    let mut g = s.guest(up.port, Some(("localhost", &[b"h2"]))).await;
    let req = g.request(Method::GET, &local(up.port), "/sse", full(Bytes::new()));
    let mut body = g.send(req).await.into_body();
    let first = body.frame().await.expect("frame").expect("data");
    assert_eq!(first.into_data().expect("data"), "data: one\n\n");
    tokio::time::sleep(idle * 5).await;
    up.state.gate.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("rest in time")
        .expect("stream survived the silence")
        .to_bytes();
    assert_eq!(rest, "data: two\n\n");
}

#[tokio::test]
async fn upstream_connections_are_capped_per_interceptor() {
    let ca = TestCa::new();
    let up = Upstream::start(None).await;
    let s = Setup::build(&ca, vec![], false, |i| i.with_max_upstream_connections(1));
    let a = local(up.port);
    let mut first = s.guest(up.port, None).await;
    assert_eq!(first.get(&a, "/1").await.0, StatusCode::OK);
    // The first guest connection keeps its upstream connection for reuse.
    let mut second = s.guest(up.port, None).await;
    assert_eq!(
        second.get(&a, "/2").await,
        (
            StatusCode::BAD_GATEWAY,
            "Too many upstream connections".into()
        )
    );
    assert_eq!(up.conns(), 1);
    // Closing the first guest connection closes its upstream one and frees the slot.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = second.get(&a, "/3").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.conns(), 2);
}
