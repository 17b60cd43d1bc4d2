//! A small blocking client for the OCI distribution API: manifests and blobs of one
//! repository, with Docker token auth, basic auth and retries.
//!
//! # Design
//! - `ureq` (blocking, rustls): pulls are I/O bound and use a few threads, so no async runtime
//!   is needed. One `Client` per pull; its agent pools connections across threads.
//! - Auth is challenge-driven, like the Docker CLI: requests go out anonymously (or with a
//!   token we already hold); on `401` the `WWW-Authenticate` challenge says what to do:
//!   `Basic` resends with the configured credentials, `Bearer realm=..,service=..,scope=..`
//!   fetches a token from the realm (with basic credentials when configured) and resends.
//!   The token is shared by all threads of the pull.
//! - Transient failures (connect/read errors and timeouts, `429`, `5xx`) are retried with
//!   exponential backoff, honouring a `Retry-After` of up to 30 s. Everything else fails
//!   at once with the registry's own error message (`{"errors":[{"message":..}]}`).
//! - Plain HTTP is used only for loopback registries (`localhost`, `127.0.0.0/8`, `::1`)
//!   and the hosts the user lists as insecure; all others are HTTPS only (redirects to
//!   `http:` are refused by the agent).
//!
//! # Limitations
//! - Insecure/loopback registries are spoken to over plain HTTP only (no HTTPS attempt first).
//! - A blob download that fails mid-stream restarts from its first byte (no `Range` resume).

// `ureq::Error` is large by its own design; the closures here just pass it through.
#![allow(clippy::result_large_err)]

use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{parse_challenge, Challenge, Credentials};
use crate::reference::Reference;

/// Largest registry error body or token response we read.
const MAX_SMALL_BODY: u64 = 64 << 10;
/// Longest `Retry-After` we honour.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The source (ureq's transport error) names the URL.
    #[error("registry request failed")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{url}: registry still failing after {attempts} attempts: HTTP {status}: {message}")]
    GaveUp {
        url: String,
        attempts: u32,
        status: u16,
        message: String,
    },
    #[error("{registry}: authentication required: {message}")]
    Unauthorized { registry: String, message: String },
    #[error("{registry}: access to {repository} denied: {message}")]
    Denied {
        registry: String,
        repository: String,
        message: String,
    },
    #[error("{what} not found: {message}")]
    NotFound { what: String, message: String },
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{registry}: unsupported auth challenge {challenge:?}")]
    Challenge { registry: String, challenge: String },
    #[error("token server {realm} returned no usable token")]
    Token { realm: String },
}

impl RegistryError {
    /// True for failures a later retry might not see (network, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Transport { .. } | RegistryError::GaveUp { .. }
        )
    }
}

/// Retry policy for transient failures.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total attempts per request (>= 1).
    pub attempts: u32,
    /// First backoff; doubled after each failure.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }
}

/// True for `localhost`, `127.0.0.0/8` and `::1` hosts (with or without a port).
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct TokenReply {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// The registry's message from an error response (its JSON `errors`, else the body text).
fn error_message(resp: ureq::Response) -> String {
    let mut body = String::new();
    let _ = resp
        .into_reader()
        .take(MAX_SMALL_BODY)
        .read_to_string(&mut body);
    if let Ok(e) = serde_json::from_str::<ErrorBody>(&body) {
        let msgs: Vec<String> = e
            .errors
            .iter()
            .map(|i| {
                if i.message.is_empty() {
                    i.code.to_lowercase()
                } else {
                    i.message.clone()
                }
            })
            .collect();
        if !msgs.is_empty() {
            return msgs.join("; ");
        }
    }
    let t: String = body.trim().chars().take(200).collect();
    if t.is_empty() {
        "(no message)".to_owned()
    } else {
        t
    }
}

fn transient_transport(t: &ureq::Transport) -> bool {
    matches!(
        t.kind(),
        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Io | ureq::ErrorKind::BadStatus
    )
}

/// Client for one repository on one registry.
pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
    registry: String,
    repository: String,
    creds: Option<Credentials>,
    authorization: Mutex<Option<String>>,
    retry: RetryPolicy,
}

impl Client {
    pub(crate) fn new(
        r: &Reference,
        insecure: bool,
        creds: Option<Credentials>,
        retry: RetryPolicy,
        read_timeout: Duration,
    ) -> Client {
        let plain = insecure || is_loopback(&r.registry);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(read_timeout)
            .https_only(!plain)
            .user_agent(concat!("matchlock/", env!("CARGO_PKG_VERSION")))
            .build();
        let scheme = if plain { "http" } else { "https" };
        Client {
            agent,
            base: format!("{scheme}://{}", r.api_host()),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            creds,
            authorization: Mutex::new(None),
            retry,
        }
    }

    fn current_auth(&self) -> Option<String> {
        self.authorization.lock().ok().and_then(|g| g.clone())
    }

    fn set_auth(&self, v: String) {
        if let Ok(mut g) = self.authorization.lock() {
            *g = Some(v);
        }
    }

    /// Answers a 401 challenge: sets the Authorization to use next. `Err` if we cannot.
    fn authenticate(&self, challenge: Option<&str>, message: String) -> Result<(), RegistryError> {
        let unauthorized = |message| RegistryError::Unauthorized {
            registry: self.registry.clone(),
            message,
        };
        match challenge.and_then(parse_challenge) {
            Some(Challenge::Basic) => match &self.creds {
                Some(c) => {
                    self.set_auth(c.basic_header());
                    Ok(())
                }
                None => Err(unauthorized(format!(
                    "{message} (no credentials for {} in the docker config)",
                    self.registry
                ))),
            },
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let token = self.fetch_token(&realm, service.as_deref(), scope.as_deref())?;
                self.set_auth(format!("Bearer {token}"));
                Ok(())
            }
            None => Err(RegistryError::Challenge {
                registry: self.registry.clone(),
                challenge: challenge.unwrap_or("").chars().take(100).collect(),
            }),
        }
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, RegistryError> {
        let scope = scope
            .map(str::to_owned)
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(s) = service {
            req = req.query("service", s);
        }
        if let Some(c) = &self.creds {
            req = req.set("Authorization", &c.basic_header());
        }
        let resp = self.send(realm, || req.clone().call())?;
        let mut body = String::new();
        resp.into_reader()
            .take(MAX_SMALL_BODY)
            .read_to_string(&mut body)
            .map_err(|_| RegistryError::Token {
                realm: realm.to_owned(),
            })?;
        let reply: TokenReply = serde_json::from_str(&body).map_err(|_| RegistryError::Token {
            realm: realm.to_owned(),
        })?;
        reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Token {
                realm: realm.to_owned(),
            })
    }

    /// Sends with retries for transient failures; maps error statuses (401 included).
    fn send(
        &self,
        url: &str,
        call: impl Fn() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, RegistryError> {
        match self.send_or_challenge(url, call)? {
            Ok(resp) => Ok(resp),
            Err((_, message)) => Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                message,
            }),
        }
    }

    /// Like `send`, but a 401 comes back as `Ok(Err((challenge, message)))`.
    #[allow(clippy::type_complexity)]
    fn send_or_challenge(
        &self,
        url: &str,
        call: impl Fn() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<Result<ureq::Response, (Option<String>, String)>, RegistryError> {
        let mut delay = self.retry.backoff;
        let attempts = self.retry.attempts.max(1);
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            let wait = match call() {
                Ok(resp) => return Ok(Ok(resp)),
                Err(ureq::Error::Status(401, resp)) => {
                    let challenge = resp.header("WWW-Authenticate").map(str::to_owned);
                    return Ok(Err((challenge, error_message(resp))));
                }
                Err(ureq::Error::Status(status, resp)) if status == 429 || status >= 500 => {
                    let retry_after = resp
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                    let message = error_message(resp);
                    if last {
                        return Err(RegistryError::GaveUp {
                            url: url.to_owned(),
                            attempts,
                            status,
                            message,
                        });
                    }
                    tracing::debug!(url, status, attempt, %message, "transient registry error; retrying");
                    retry_after.unwrap_or(delay)
                }
                Err(ureq::Error::Status(status, resp)) => {
                    return Err(self.status_error(url, status, resp));
                }
                Err(ureq::Error::Transport(t)) => {
                    if last || !transient_transport(&t) {
                        return Err(RegistryError::Transport {
                            url: url.to_owned(),
                            source: Box::new(t),
                        });
                    }
                    tracing::debug!(url, attempt, error = %t, "transport error; retrying");
                    delay
                }
            };
            std::thread::sleep(wait);
            delay = delay.saturating_mul(2);
        }
        // attempts >= 1, so the loop always returns.
        Err(RegistryError::Status {
            url: url.to_owned(),
            status: 0,
            message: "no attempt made".to_owned(),
        })
    }

    fn status_error(&self, url: &str, status: u16, resp: ureq::Response) -> RegistryError {
        let message = error_message(resp);
        match status {
            401 => RegistryError::Unauthorized {
                registry: self.registry.clone(),
                message,
            },
            403 => RegistryError::Denied {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                message,
            },
            404 => RegistryError::NotFound {
                what: url.to_owned(),
                message,
            },
            _ => RegistryError::Status {
                url: url.to_owned(),
                status,
                message,
            },
        }
    }

    /// GET `/v2/<repo>/<path>` with auth and retries.
    pub(crate) fn get(&self, path: &str, accept: &str) -> Result<ureq::Response, RegistryError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let call = |auth: Option<String>| {
            let mut req = self.agent.get(&url);
            if !accept.is_empty() {
                req = req.set("Accept", accept);
            }
            if let Some(a) = &auth {
                req = req.set("Authorization", a);
            }
            req.call()
        };
        let first_auth = self.current_auth();
        let (challenge, message) =
            match self.send_or_challenge(&url, || call(first_auth.clone()))? {
                Ok(resp) => return Ok(resp),
                Err(c) => c,
            };
        self.authenticate(challenge.as_deref(), message)?;
        let auth = self.current_auth();
        self.send(&url, || call(auth.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.9.9",
            "[::1]:80",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "ghcr.io:443",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
