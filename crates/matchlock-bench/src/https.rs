//! `matchlock-bench https`: HTTPS request latency and throughput through matchlock's TLS
//! interception, against the same client talking to the same upstream directly and through
//! `mitmproxy` (issue 9, "Benchmarks", first row).
//!
//! # Design
//! - One upstream for all three paths: hyper + rustls on 127.0.0.1 with a throwaway rcgen
//!   CA, HTTP/1.1 only (ALPN `http/1.1`, so every hop speaks the same protocol), serving
//!   `/small` (100 B) and `/large` (16 MiB) from memory, on its own thread.
//! - One client for all three paths: hyper + rustls, HTTP/1.1 keep-alive, one connection
//!   per path, on the main thread. Latency is a small GET from sending the request to the
//!   last body byte; throughput is the large bodies' bytes over the large GETs' time. Bodies
//!   are counted frame by frame, never copied.
//! - **direct**: TCP + TLS to the upstream. **interception**: the client's TLS over a
//!   `tokio::io::duplex` pipe (as much as the network stack buffers toward a guest: its
//!   pipe plus the guest socket's window) into
//!   [`Interceptor::serve_tls`], which runs on its own current-thread runtime as on the
//!   stack's network thread, and dials the upstream itself (policy: `localhost` allowed,
//!   private addresses not blocked). **mitmproxy**: `mitmdump` as an explicit proxy
//!   (`CONNECT`), trusting the test CA for the upstream (`ssl_verify_upstream_trusted_ca`),
//!   the client trusting mitmproxy's CA from a temporary confdir.
//! - Connection set-up (TLS handshakes, the proxies' first upstream dial) is outside the
//!   figures: each connection serves warm-up requests first. The paths are measured in
//!   rounds, round-robin, so machine noise falls on all of them alike.
//! - mitmproxy is installed with pip into a cached venv on first use; when that or its
//!   start fails, its rows say "not measured" with the reason: never a made-up figure.
//!
//! # Limitations
//! - The interception path excludes the VM, virtio-net and the smoltcp stack: it measures
//!   the interceptor (TLS termination, policy, re-origination upstream), not a guest's
//!   request end to end (that is `https --vm`, [`crate::https_vm`]).
//! - mitmproxy runs with its defaults (quiet): it buffers whole bodies rather than streaming
//!   them (`stream_large_bodies` unset), which is part of what its throughput row shows.
//! - Client, proxy and upstream share this machine's cores; the figures are for one run.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use matchlock_net::intercept::{InterceptConfig, Interceptor};
use matchlock_net::policy::Policy;
use matchlock_net::secrets::Secrets;
use matchlock_net::stack::{INTERCEPT_PIPE, SOCKET_BUFFER};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Small response body.
const SMALL: usize = 100;
/// Large response body.
const LARGE: usize = 16 << 20;
/// Small and large GETs per path per round.
const SMALL_PER_ROUND: usize = 200;
const LARGE_PER_ROUND: usize = 4;
/// Small and large requests per connection before measuring.
const WARMUP_SMALL: usize = 20;
const WARMUP_LARGE: usize = 2;
/// Buffer each way of the pipe into the interceptor: what the network stack holds between
/// the interceptor and a guest that keeps up, its in-memory pipe plus the guest-side TCP
/// socket's buffer (the guest's window). A pipe of `INTERCEPT_PIPE` alone under-modelled
/// the real path: the client here runs on another thread, so every 32 KiB became a
/// cross-thread wake-up, which on the network thread is a task switch.
const PIPE: usize = INTERCEPT_PIPE + SOCKET_BUFFER;
/// Longest wait for `mitmdump` to listen.
const MITM_START: Duration = Duration::from_secs(60);
/// Largest error response body shown.
const MAX_ERROR_BODY: usize = 1024;
/// Largest `CONNECT` response head read from the proxy.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A throwaway CA and a leaf for `localhost` / 127.0.0.1 (or other names) signed by it.
pub(crate) struct TestCa {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TestCa {
    fn new() -> anyhow::Result<TestCa> {
        TestCa::for_names(&["localhost", "127.0.0.1"])
    }

    /// A CA and a leaf whose subject alternative names are `names`.
    pub(crate) fn for_names(names: &[&str]) -> anyhow::Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (mitmproxy) takes a leaf whose issuer equals its own
        // subject (rcgen's default name on both) for a self-signed certificate.
        p.distinguished_name
            .push(DnType::CommonName, "matchlock bench CA");
        let ca = p.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        let leaf = p.signed_by(&key, &ca, &ca_key)?;
        Ok(TestCa {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// The CA certificate, PEM.
    pub(crate) fn pem(&self) -> &str {
        &self.ca_pem
    }

    fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.ca_der.clone())?;
        Ok(r)
    }

    pub(crate) fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

/// A current-thread runtime on its own thread running a future until dropped.
struct Worker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn spawn<F, Fut>(name: &str, make: F) -> anyhow::Result<Worker>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        () = make() => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Worker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The upstream: HTTPS on `listener`, `/large` (`large` bytes) or else the small body.
pub(crate) async fn upstream(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    large: usize,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return eprintln!("upstream: listener unusable");
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let small = Bytes::from(vec![b's'; SMALL]);
    let large = Bytes::from(vec![b'l'; large]);
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let (acceptor, small, large) = (acceptor.clone(), small.clone(), large.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = match req.uri().path() {
                    "/large" => large.clone(),
                    _ => small.clone(),
                };
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// The interceptor's thread: serves every pipe it is handed as a TLS flow to `dst`.
async fn intercept(
    icpt: Arc<Interceptor>,
    dst: SocketAddrV4,
    mut rx: mpsc::UnboundedReceiver<tokio::io::DuplexStream>,
) {
    while let Some(pipe) = rx.recv().await {
        tokio::spawn(icpt.clone().serve_tls(dst.into(), pipe));
    }
}

/// One keep-alive HTTP/1.1 client connection.
struct Client {
    tx: SendRequest<Empty<Bytes>>,
    authority: String,
}

impl Client {
    /// TLS to `localhost` over `io` trusting `roots`, then HTTP/1.1.
    async fn over<S>(io: S, roots: RootCertStore, authority: &str) -> anyhow::Result<Client>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(c))
            .connect(name, io)
            .await
            .context("TLS handshake")?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("client connection ended: {e}");
            }
        });
        let mut client = Client {
            tx,
            authority: authority.to_string(),
        };
        for _ in 0..WARMUP_SMALL {
            client.get("/small", SMALL).await?;
        }
        for _ in 0..WARMUP_LARGE {
            client.get("/large", LARGE).await?;
        }
        Ok(client)
    }

    /// GET `path`, checking the status and that exactly `want` body bytes arrive.
    async fn get(&mut self, path: &str, want: usize) -> anyhow::Result<Duration> {
        let req = Request::get(path)
            .header(header::HOST, &self.authority)
            .body(Empty::new())?;
        self.tx.ready().await?;
        let t = Instant::now();
        let resp = self.tx.send_request(req).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY);
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let words: Vec<&str> = text.split_whitespace().collect();
            bail!("GET {path}: {status}: {}", words.join(" "));
        }
        let mut body = resp.into_body();
        let mut got = 0;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame?.data_ref() {
                got += d.len();
            }
        }
        let elapsed = t.elapsed();
        if got != want {
            bail!("GET {path}: {got} bytes, expected {want}");
        }
        Ok(elapsed)
    }
}

/// What one path measured.
#[derive(Default)]
struct Samples {
    small: Vec<Duration>,
    large_bytes: u64,
    large_time: Duration,
}

impl Samples {
    fn pct(&self, q: f64) -> Duration {
        let mut v = self.small.clone();
        v.sort();
        let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
        v.get(i).copied().unwrap_or_default()
    }

    fn mb_per_s(&self) -> f64 {
        self.large_bytes as f64 / 1e6 / self.large_time.as_secs_f64().max(1e-9)
    }
}

/// A client connection being measured, or why it could not be made.
struct Route {
    name: &'static str,
    client: Result<Client, String>,
    samples: Samples,
}

/// The cached venv holding mitmproxy (`~/.cache/matchlock/mitmproxy-venv`).
fn mitm_venv() -> anyhow::Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(cache.join("matchlock/mitmproxy-venv"))
}

fn run_quiet(c: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        bail!("{what} failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(())
}

/// `mitmdump`, installed into the cached venv with pip on first use.
fn mitmdump() -> anyhow::Result<PathBuf> {
    let venv = mitm_venv()?;
    let bin = venv.join("bin/mitmdump");
    if bin.is_file() {
        return Ok(bin);
    }
    println!("  installing mitmproxy into {} (pip, once)", venv.display());
    run_quiet(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    run_quiet(
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", "mitmproxy"]),
        "pip install mitmproxy",
    )?;
    if !bin.is_file() {
        bail!("pip installed mitmproxy but {} is missing", bin.display());
    }
    Ok(bin)
}

/// A running `mitmdump` on 127.0.0.1, killed when dropped.
struct Mitm {
    child: Child,
    port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl Drop for Mitm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mitm {
    fn start(upstream_ca: &str) -> anyhow::Result<Mitm> {
        let bin = mitmdump()?;
        let dir = tempfile::Builder::new()
            .prefix("ml-mitm-")
            .tempdir_in("/tmp")?;
        let confdir = dir.path().join(".mitmproxy");
        let ca_file = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca_file, upstream_ca)?;
        let log = dir.path().join("mitmdump.log");
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let child = Command::new(&bin)
            .env("HOME", dir.path())
            .arg("--quiet")
            .args([
                "--listen-host",
                "127.0.0.1",
                "--listen-port",
                &port.to_string(),
            ])
            .arg("--set")
            .arg(format!("confdir={}", confdir.display()))
            .arg("--set")
            .arg(format!(
                "ssl_verify_upstream_trusted_ca={}",
                ca_file.display()
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("mitmdump.err"))?)
            .spawn()
            .context("spawn mitmdump")?;
        let mut m = Mitm {
            child,
            port,
            ca_pem: String::new(),
            dir,
        };
        m.wait_ready(&confdir.join("mitmproxy-ca-cert.pem"))?;
        Ok(m)
    }

    /// Waits for the CA file and the listening port.
    fn wait_ready(&mut self, ca: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + MITM_START;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                let err = self.dir.path().join("mitmdump.err");
                let tail = std::fs::read_to_string(err).unwrap_or_default();
                bail!(
                    "mitmdump exited ({st}): {}",
                    tail.lines().last().unwrap_or("")
                );
            }
            let listening = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok();
            if listening && ca.is_file() {
                self.ca_pem = std::fs::read_to_string(ca)?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("mitmdump did not listen within {MITM_START:?}")
    }

    /// A client through the proxy: `CONNECT` to the upstream, then TLS with mitmproxy.
    async fn client(&self, upstream_port: u16) -> anyhow::Result<Client> {
        let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).await?;
        tcp.set_nodelay(true)?;
        let target = format!("127.0.0.1:{upstream_port}");
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_CONNECT_HEAD {
                bail!("bad CONNECT response from mitmproxy");
            }
            head.extend_from_slice(&buf[..n]);
        }
        let status = head.split(|b| *b == b' ').nth(1).unwrap_or_default();
        if status != b"200" {
            bail!("CONNECT refused: {}", String::from_utf8_lossy(&head).trim());
        }
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?)?;
        Client::over(tcp, roots, &format!("localhost:{upstream_port}")).await
    }
}

fn ms3(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the benchmark and prints its rows; `rounds` rounds of every path.
pub fn run(rounds: usize) -> anyhow::Result<()> {
    let rounds = rounds.max(1);
    let ca = TestCa::new()?;
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let tls = ca.server_config()?;
    let _upstream = Worker::spawn("bench-upstream", move || upstream(listener, tls, LARGE))?;

    let icpt = Arc::new(Interceptor::new(InterceptConfig {
        policy: Arc::new(Policy::new(["localhost"], false)),
        secrets: Arc::new(Secrets::new(Vec::new())),
        events: None,
        upstream_roots: Some(ca.roots()?),
    })?);
    let (pipes, rx) = mpsc::unbounded_channel();
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let icpt_w = icpt.clone();
    let _interceptor = Worker::spawn("bench-intercept", move || intercept(icpt_w, dst, rx))?;
    let mitm = Mitm::start(&ca.ca_pem).map_err(|e| format!("{e:#}"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let paths = rt.block_on(async {
        let mut routes = connect(&ca, port, &icpt, &pipes, &mitm).await?;
        for _ in 0..rounds {
            for r in &mut routes {
                let Ok(c) = &mut r.client else { continue };
                measure(c, &mut r.samples).await.with_context(|| r.name)?;
            }
        }
        anyhow::Ok(routes)
    })?;
    drop(rt);
    report(&paths, rounds);
    Ok(())
}

/// The three client connections (each warmed up); mitmproxy's may be the reason it is
/// missing.
async fn connect(
    ca: &TestCa,
    port: u16,
    icpt: &Interceptor,
    pipes: &mpsc::UnboundedSender<tokio::io::DuplexStream>,
    mitm: &Result<Mitm, String>,
) -> anyhow::Result<Vec<Route>> {
    let authority = format!("localhost:{port}");
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    tcp.set_nodelay(true)?;
    let direct = Client::over(tcp, ca.roots()?, &authority)
        .await
        .context("direct client")?;
    let (ours, theirs) = tokio::io::duplex(PIPE);
    pipes
        .send(theirs)
        .map_err(|_| anyhow::anyhow!("interceptor thread gone"))?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(icpt.ca_pem().as_bytes())?)?;
    let through = Client::over(ours, roots, &authority)
        .await
        .context("interception client")?;
    let via_mitm = match mitm {
        Ok(m) => m.client(port).await.map_err(|e| format!("{e:#}")),
        Err(e) => Err(e.clone()),
    };
    let route = |name, client| Route {
        name,
        client,
        samples: Samples::default(),
    };
    Ok(vec![
        route("direct", Ok(direct)),
        route("matchlock interception", Ok(through)),
        route("mitmproxy", via_mitm),
    ])
}

async fn measure(c: &mut Client, s: &mut Samples) -> anyhow::Result<()> {
    for _ in 0..SMALL_PER_ROUND {
        s.small.push(c.get("/small", SMALL).await?);
    }
    for _ in 0..LARGE_PER_ROUND {
        s.large_time += c.get("/large", LARGE).await?;
        s.large_bytes += LARGE as u64;
    }
    Ok(())
}

fn report(paths: &[Route], rounds: usize) {
    println!(
        "https (hyper+rustls client and upstream on 127.0.0.1, HTTP/1.1 keep-alive; \
         {} x {SMALL} B GETs, {} x {} MiB GETs per path, {rounds} interleaved rounds):",
        SMALL_PER_ROUND * rounds,
        LARGE_PER_ROUND * rounds,
        LARGE >> 20
    );
    for p in paths {
        match &p.client {
            Ok(_) => println!(
                "  {:<24} p50 {}  p99 {}  throughput {:.0} MB/s",
                p.name,
                ms3(p.samples.pct(0.5)),
                ms3(p.samples.pct(0.99)),
                p.samples.mb_per_s()
            ),
            Err(why) => println!("  {:<24} not measured: {why}", p.name),
        }
    }
    let [direct, ours, mitm] = paths else { return };
    for (label, p) in [("https", ours), ("mitmproxy", mitm)] {
        if let Err(why) = &p.client {
            println!("  {label}: not measured: {why}");
            continue;
        }
        let added = p.samples.pct(0.5).saturating_sub(direct.samples.pct(0.5));
        println!(
            "  {label} p50 added vs direct:  {} (target <= 1 ms)",
            ms3(added)
        );
        println!(
            "  {label} p99:                   {} ({:.2}x direct's {})",
            ms3(p.samples.pct(0.99)),
            p.samples.pct(0.99).as_secs_f64() / direct.samples.pct(0.99).as_secs_f64(),
            ms3(direct.samples.pct(0.99))
        );
        println!(
            "  {label} throughput vs direct: {:.2}x (target >= 0.5x)",
            p.samples.mb_per_s() / direct.samples.mb_per_s()
        );
    }
    if let (Ok(_), Ok(_)) = (&ours.client, &mitm.client) {
        println!(
            "  matchlock vs mitmproxy: p50 {:.2}x, throughput {:.2}x",
            ours.samples.pct(0.5).as_secs_f64() / mitm.samples.pct(0.5).as_secs_f64(),
            ours.samples.mb_per_s() / mitm.samples.mb_per_s()
        );
    }
    println!(
        "  (interception = the interceptor alone over an in-memory pipe: excludes the VM, \
         virtio-net and the smoltcp stack)"
    );
}
