//! Registry credentials from the Docker client config, and `WWW-Authenticate` parsing.
//!
//! # Design
//! - Credentials come from `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`):
//!   a per-registry `credHelpers` entry wins, then `auths` (the `auth` base64 field or
//!   `username`/`password`), then the global `credsStore` helper, else anonymous. Keys in
//!   `auths` are compared by host (schemes and paths such as `https://index.docker.io/v1/`
//!   are ignored), and Docker Hub is known by all its historical names.
//! - Helpers run as `docker-credential-<name> get` with the server URL on stdin, exactly as
//!   the Docker CLI does; "credentials not found" from a helper means anonymous.
//! - Secrets never appear in errors or logs (`Credentials` has a redacting `Debug`).
//!
//! # Limitations
//! - Identity tokens (`identitytoken`, helper username `<token>`) are sent as the password of
//!   a basic-auth token request, not exchanged through the OAuth2 refresh-token flow, so
//!   registries that only accept the OAuth2 form will reject them.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

use crate::reference::DOCKER_HUB;

/// Largest Docker config file we read.
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("read docker config {path}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config {path} is larger than 1 MiB")]
    ConfigTooLarge { path: String },
    #[error("parse docker config {path}")]
    ParseConfig {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("docker config {path}: `auth` for {host} is not base64 user:password")]
    BadAuthField { path: String, host: String },
    #[error("run credential helper docker-credential-{helper}")]
    HelperSpawn {
        helper: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential helper docker-credential-{helper} failed: {message}")]
    HelperFailed { helper: String, message: String },
    #[error("credential helper docker-credential-{helper} printed invalid JSON")]
    HelperOutput {
        helper: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A username and secret for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// `Basic <base64(user:password)>`.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: HashMap<String, String>,
    #[serde(rename = "credsStore", default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(rename = "identitytoken", default)]
    identity_token: Option<String>,
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// The Docker config path: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// The host part of an `auths` key (`https://index.docker.io/v1/` -> `index.docker.io`).
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn is_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

fn same_registry(key: &str, registry: &str) -> bool {
    let h = key_host(key);
    h == registry || (is_hub(h) && is_hub(registry))
}

/// The server URL helpers are asked about (Docker's historical one for Hub).
fn helper_server(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_owned()
    } else {
        registry.to_owned()
    }
}

fn run_helper(
    helper: &str,
    registry: &str,
    helper_dir: Option<&Path>,
) -> Result<Option<Credentials>, AuthError> {
    let program = format!("docker-credential-{helper}");
    let program = match helper_dir {
        Some(d) => d.join(program),
        None => PathBuf::from(program),
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AuthError::HelperSpawn {
            helper: helper.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading stdin is reported through its status below.
        let _ = stdin.write_all(helper_server(registry).as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| AuthError::HelperSpawn {
            helper: helper.to_owned(),
            source,
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + String::from_utf8_lossy(&out.stderr).trim();
        if msg.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(AuthError::HelperFailed {
            helper: helper.to_owned(),
            message: msg.chars().take(200).collect(),
        });
    }
    let reply: HelperReply =
        serde_json::from_slice(&out.stdout).map_err(|source| AuthError::HelperOutput {
            helper: helper.to_owned(),
            source,
        })?;
    Ok(Some(Credentials {
        username: reply.username,
        password: reply.secret,
    }))
}

/// Credentials for `registry` (as written in references: `docker.io`, `ghcr.io`,
/// `localhost:5000`) from the Docker config at `path`; `None` means anonymous.
pub fn lookup(path: &Path, registry: &str) -> Result<Option<Credentials>, AuthError> {
    lookup_with(path, registry, None)
}

/// `lookup`, finding credential helpers in `helper_dir` instead of `$PATH` (tests).
fn lookup_with(
    path: &Path,
    registry: &str,
    helper_dir: Option<&Path>,
) -> Result<Option<Credentials>, AuthError> {
    let shown = path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuthError::ReadConfig {
                path: shown,
                source,
            })
        }
    };
    if meta.len() > MAX_CONFIG {
        return Err(AuthError::ConfigTooLarge { path: shown });
    }
    let bytes = std::fs::read(path).map_err(|source| AuthError::ReadConfig {
        path: shown.clone(),
        source,
    })?;
    match resolve(&bytes, registry, &shown)? {
        Source::Helper(helper) => run_helper(&helper, registry, helper_dir),
        Source::Config(creds) => Ok(creds),
    }
}

/// Where a registry's credentials come from, decided from the config alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Ask `docker-credential-<name>`.
    Helper(String),
    /// Found in the config (`None`: anonymous).
    Config(Option<Credentials>),
}

/// Parses a Docker config document and decides where `registry`'s credentials come from;
/// `shown` names the file in errors. Pure: runs no helper (the fuzz target's entry point).
pub(crate) fn resolve(bytes: &[u8], registry: &str, shown: &str) -> Result<Source, AuthError> {
    let cfg: DockerConfig =
        serde_json::from_slice(bytes).map_err(|source| AuthError::ParseConfig {
            path: shown.to_owned(),
            source,
        })?;
    if let Some((_, helper)) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, registry))
    {
        return Ok(Source::Helper(helper.clone()));
    }
    // Prefer an exact key over an alias (several Hub spellings may be present).
    let mut entries: Vec<(&String, &AuthEntry)> = cfg
        .auths
        .iter()
        .filter(|(k, _)| same_registry(k, registry))
        .collect();
    entries.sort_by_key(|(k, _)| (key_host(k) != registry, k.as_str()));
    for (key, e) in entries {
        if let Some(creds) = entry_credentials(key, e, shown)? {
            return Ok(Source::Config(Some(creds)));
        }
    }
    Ok(match cfg.creds_store.filter(|s| !s.is_empty()) {
        Some(store) => Source::Helper(store),
        None => Source::Config(None),
    })
}

/// The credentials one `auths` entry holds, if any.
fn entry_credentials(
    key: &str,
    e: &AuthEntry,
    shown: &str,
) -> Result<Option<Credentials>, AuthError> {
    if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        let Some((u, p)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Err(AuthError::BadAuthField {
                path: shown.to_owned(),
                host: key.to_owned(),
            });
        };
        return Ok(Some(Credentials {
            username: u.to_owned(),
            password: p.to_owned(),
        }));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    Ok(e.identity_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| Credentials {
            username: "<token>".to_owned(),
            password: t.to_owned(),
        }))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm").filter(|r| !r.is_empty())?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).expect("write config");
        p
    }

    #[test]
    fn auths_by_host_and_hub_aliases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3:cret");
        let p = write_config(
            dir.path(),
            &format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "localhost:5000":{{"username":"u","password":"p"}}}}}}"#
            ),
        );
        let hub = lookup(&p, "docker.io").expect("lookup").expect("creds");
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("bob", "s3:cret")
        );
        let local = lookup(&p, "localhost:5000")
            .expect("lookup")
            .expect("creds");
        assert_eq!(local.username, "u");
        assert_eq!(lookup(&p, "ghcr.io").expect("lookup"), None);
        assert!(!format!("{hub:?}").contains("s3:cret"));
        assert_eq!(
            lookup(&dir.path().join("missing.json"), "ghcr.io").expect("lookup"),
            None
        );
    }

    #[test]
    fn bad_config_and_missing_helper_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write_config(dir.path(), "{not json");
        assert!(matches!(
            lookup(&p, "x.io"),
            Err(AuthError::ParseConfig { .. })
        ));
        let p = write_config(dir.path(), r#"{"auths":{"x.io":{"auth":"!!!"}}}"#);
        assert!(matches!(
            lookup(&p, "x.io"),
            Err(AuthError::BadAuthField { .. })
        ));
        let p = write_config(
            dir.path(),
            r#"{"credHelpers":{"x.io":"matchlock-no-such-helper"}}"#,
        );
        assert!(matches!(
            lookup(&p, "x.io"),
            Err(AuthError::HelperSpawn { .. })
        ));
    }

    #[test]
    fn credential_helper_protocol() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("docker-credential-mltest");
        // Echoes the server URL it was asked about as the username.
        std::fs::write(
            &bin,
            "#!/bin/sh\nread url\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"pw\"}' \"$url\" \"$url\"\n",
        )
        .expect("write helper");
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let p = write_config(dir.path(), r#"{"credsStore":"mltest"}"#);
        let hub = lookup_with(&p, "docker.io", Some(dir.path()));
        let other = lookup_with(&p, "ghcr.io", Some(dir.path()));
        let hub = hub.expect("lookup").expect("creds");
        assert_eq!(hub.username, "https://index.docker.io/v1/");
        assert_eq!(hub.password, "pw");
        assert_eq!(other.expect("lookup").expect("creds").username, "ghcr.io");
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(
            parse_challenge("bearer realm=http://a/t, service=s"),
            Some(Challenge::Bearer {
                realm: "http://a/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
    }
}
