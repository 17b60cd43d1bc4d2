//! A real OCI registry for tests (Debian's `docker-registry`, distribution v2) on a free
//! loopback port with temp storage, a pusher for [`ImageSpec`]s, and a fault-injecting
//! HTTP proxy to put in front of it.
//!
//! # Design
//! - The registry is the real server; only the proxy injects faults (status codes, corrupt
//!   or truncated bodies, refused connections), so clients are tested against real
//!   distribution behaviour plus the failures a network produces.
//! - The proxy handles one request per connection (it forces `Connection: close`), which
//!   keeps it a few dozen lines and makes every request visible in its log.
//! - htpasswd entries are bcrypt (`$2y$`) hashes made with the `bcrypt` crate, so no
//!   `htpasswd` binary is needed.
//!
//! # Limitations
//! - The proxy is for GETs (pulls); pushes go to the registry directly.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::archive::ImageSpec;

/// The Debian package's binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running `docker-registry`; killed on drop.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    dir: tempfile::TempDir,
    auth: Option<(String, String)>,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ureq_err(e: ureq::Error) -> io::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            io::Error::other(format!("HTTP {code}: {body}"))
        }
        ureq::Error::Transport(t) => io::Error::other(t.to_string()),
    }
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> io::Result<Registry> {
        Self::launch(None)
    }

    /// Starts a registry that requires basic auth as `user`/`password` (htpasswd).
    pub fn start_with_auth(user: &str, password: &str) -> io::Result<Registry> {
        Self::launch(Some((user.to_owned(), password.to_owned())))
    }

    fn launch(auth: Option<(String, String)>) -> io::Result<Registry> {
        let dir = tempfile::Builder::new().prefix("ml-registry-").tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut reg = Registry {
            child: None,
            addr,
            dir,
            auth,
        };
        reg.write_config()?;
        reg.spawn()?;
        Ok(reg)
    }

    fn write_config(&self) -> io::Result<()> {
        let root = self.dir.path();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n",
            root.join("data").display(),
            self.addr
        );
        if let Some((user, pass)) = &self.auth {
            let hash = bcrypt::hash_with_result(pass, 5)
                .map_err(io::Error::other)?
                .format_for_version(bcrypt::Version::TwoY);
            std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n"))?;
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: matchlock-test\n    path: {}\n",
                root.join("htpasswd").display()
            ));
        }
        std::fs::write(root.join("config.yml"), cfg)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::other(format!("start {REGISTRY_BIN}: {e}")))?;
        self.child = Some(child);
        let url = format!("http://{}/v2/", self.addr);
        crate::wait_until(
            Duration::from_secs(20),
            "registry to listen",
            || match ureq::get(&url).timeout(Duration::from_secs(2)).call() {
                Ok(_) => true,
                Err(ureq::Error::Status(401, _)) => true,
                Err(_) => false,
            },
        )
        .map_err(|e| io::Error::other(format!("{e}; log: {}", self.log())))
    }

    /// The registry's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stops the server (storage is kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address with the same storage.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Storage directory (blobs live under it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn authed(&self, req: ureq::Request) -> ureq::Request {
        match &self.auth {
            Some((u, p)) => {
                use base64::Engine;
                let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                req.set("Authorization", &format!("Basic {enc}"))
            }
            None => req,
        }
    }

    /// Uploads one blob (monolithic: POST, then PUT `?digest=`); skips existing ones.
    pub fn push_blob(&self, repo: &str, digest: &str, data: &[u8]) -> io::Result<()> {
        let base = format!("http://{}", self.addr);
        let head = self
            .authed(ureq::head(&format!("{base}/v2/{repo}/blobs/{digest}")))
            .call();
        if head.is_ok() {
            return Ok(());
        }
        let resp = self
            .authed(ureq::post(&format!("{base}/v2/{repo}/blobs/uploads/")))
            .call()
            .map_err(ureq_err)?;
        let loc = resp
            .header("Location")
            .ok_or_else(|| io::Error::other("upload response without Location"))?
            .to_owned();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.authed(ureq::put(&format!("{loc}{sep}digest={digest}")))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .map_err(ureq_err)?;
        Ok(())
    }

    /// Uploads a manifest under `reference` (tag or digest).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> io::Result<()> {
        self.authed(ureq::put(&format!(
            "http://{}/v2/{repo}/manifests/{reference}",
            self.addr
        )))
        .set("Content-Type", media_type)
        .send_bytes(body)
        .map_err(ureq_err)?;
        Ok(())
    }

    /// Pushes `spec` as `repo:tag`; returns the digest of the document the tag names.
    pub fn push(&self, repo: &str, tag: &str, spec: &ImageSpec) -> io::Result<String> {
        let parts = spec.registry_parts();
        for (digest, data) in &parts.blobs {
            self.push_blob(repo, digest, data)?;
        }
        for (digest, media_type, body) in &parts.manifests {
            self.push_manifest(repo, digest, media_type, body)?;
        }
        let (media_type, body) = &parts.top;
        self.push_manifest(repo, tag, media_type, body)?;
        Ok(sha256_digest(body))
    }
}

fn sha256_digest(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Faults the proxy injects; change them at any time through [`FaultProxy::faults`].
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close every connection without answering (the registry is "down").
    pub down: bool,
    /// Answer the next `fail_count` requests whose path contains `fail_path` with
    /// `fail_status` and a registry-style JSON error.
    pub fail_status: u16,
    pub fail_count: usize,
    pub fail_path: String,
    /// Flip one byte of response bodies whose request path contains this.
    pub corrupt_path: Option<String>,
    /// Cut the connection after `truncate_after` body bytes, for the next `truncate_count`
    /// responses whose path contains `truncate_path`.
    pub truncate_path: Option<String>,
    pub truncate_after: u64,
    pub truncate_count: usize,
}

/// A one-request-per-connection HTTP proxy in front of a real registry.
pub struct FaultProxy {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    pub faults: Arc<Mutex<Faults>>,
    /// `METHOD PATH` of every request seen.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (f, r, up) = (faults.clone(), requests.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (f, r, up) = (f.clone(), r.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &f, &r);
                });
            }
        });
        Ok(FaultProxy {
            addr,
            faults,
            requests,
        })
    }

    /// Replaces the faults.
    pub fn set(&self, faults: Faults) {
        if let Ok(mut g) = self.faults.lock() {
            *g = faults;
        }
    }

    /// Requests seen so far whose line contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.requests
            .lock()
            .map(|g| g.iter().filter(|l| l.contains(needle)).count())
            .unwrap_or(0)
    }
}

fn read_head(r: &mut impl BufRead) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<String>>,
) -> io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let head = read_head(&mut reader)?;
    let request_line = head.first().cloned().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    if let Ok(mut g) = log.lock() {
        g.push(format!("{method} {path}"));
    }
    let f = faults.lock().map(|g| g.clone()).unwrap_or_default();
    if f.down {
        let _ = client_w.shutdown(Shutdown::Both);
        return Ok(());
    }
    if f.fail_count > 0 && path.contains(&f.fail_path) {
        if let Ok(mut g) = faults.lock() {
            g.fail_count = g.fail_count.saturating_sub(1);
        }
        let body = format!(
            r#"{{"errors":[{{"code":"INJECTED","message":"injected failure {}"}}]}}"#,
            f.fail_status
        );
        write!(
            client_w,
            "HTTP/1.1 {} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            f.fail_status,
            body.len()
        )?;
        return Ok(());
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut out = String::new();
    for (i, line) in head.iter().enumerate() {
        if i > 0 && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes())?;
    let content_length: u64 = head
        .iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    io::copy(&mut (&mut reader).take(content_length), &mut up)?;
    let mut up_r = BufReader::new(up);
    let resp_head = read_head(&mut up_r)?;
    let mut out = resp_head.join("\r\n");
    out.push_str("\r\n\r\n");
    client_w.write_all(out.as_bytes())?;
    let corrupt = f.corrupt_path.as_deref().is_some_and(|p| path.contains(p));
    let mut truncate = None;
    if let Some(tp) = &f.truncate_path {
        if f.truncate_count > 0 && path.contains(tp.as_str()) {
            if let Ok(mut g) = faults.lock() {
                g.truncate_count = g.truncate_count.saturating_sub(1);
            }
            truncate = Some(f.truncate_after);
        }
    }
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = up_r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut chunk = &mut buf[..n];
        if corrupt && sent == 0 && !chunk.is_empty() {
            let mid = chunk.len() / 2;
            chunk[mid] ^= 0xff;
        }
        if let Some(limit) = truncate {
            let room = limit.saturating_sub(sent) as usize;
            if room < chunk.len() {
                chunk = &mut chunk[..room];
                client_w.write_all(chunk)?;
                let _ = client_w.shutdown(Shutdown::Both);
                return Ok(());
            }
        }
        client_w.write_all(chunk)?;
        sent += n as u64;
    }
    Ok(())
}
