//! Secrets the guest never sees (spec §3.8, §7.6): the CLI syntax, placeholders, and the
//! rule that decides, for one outgoing request, where a placeholder is replaced by the real
//! value and when the request must be refused.
//!
//! # Design
//! The guest gets `NAME=SANDBOX_SECRET_<32 hex>` (16 random bytes per sandbox). For a
//! request to `host`: if a placeholder appears anywhere in it (header values, path, query)
//! and the secret is not scoped to `host`, the whole request is refused; otherwise the
//! placeholder is replaced in header values and in the raw query string only, never in the
//! path or the body (so a server cannot echo the real value back into the VM). Real values
//! are never printed: `Debug` shows the placeholder only.
//!
//! # Limitations
//! Placeholders in request bodies are neither replaced nor detected (as the reference): a
//! guest may send its placeholder anywhere in a body, which reveals nothing.

use std::fmt;

use crate::policy::{glob_match, strip_port};

/// Prefix of every placeholder.
pub const PLACEHOLDER_PREFIX: &str = "SANDBOX_SECRET_";

/// A fresh placeholder: the prefix and 32 lowercase hex characters.
pub fn new_placeholder() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{PLACEHOLDER_PREFIX}{}", hex::encode(bytes))
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SecretSpecError {
    #[error("secret name cannot be empty")]
    EmptyName,
    #[error("missing @hosts (format: NAME=VALUE@host1,host2 or NAME@host1,host2)")]
    MissingHosts,
    #[error("no hosts specified after @")]
    NoHosts,
    #[error("environment variable ${0} is not set (hint: use 'sudo -E' to preserve env vars, or pass inline: NAME=VALUE@hosts)")]
    EnvUnset(String),
}

/// A parsed `--secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretSpec {
    pub name: String,
    pub value: String,
    pub hosts: Vec<String>,
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSpec")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// Parses `NAME=VALUE@h1,h2` or `NAME@h1,h2` (value from `env(NAME)`): split at the last
/// `@`, the value at the first `=`.
pub fn parse_secret_spec(
    spec: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SecretSpec, SecretSpecError> {
    let (left, hosts) = spec.rsplit_once('@').ok_or(SecretSpecError::MissingHosts)?;
    let hosts: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if hosts.is_empty() {
        return Err(SecretSpecError::NoHosts);
    }
    let (name, value) = match left.split_once('=') {
        Some((n, v)) => (n.trim().to_string(), v.to_string()),
        None => {
            let n = left.trim().to_string();
            let v = env(&n).filter(|v| !v.is_empty());
            match v {
                Some(v) => (n, v),
                None if n.is_empty() => return Err(SecretSpecError::EmptyName),
                None => return Err(SecretSpecError::EnvUnset(n)),
            }
        }
    };
    if name.is_empty() {
        return Err(SecretSpecError::EmptyName);
    }
    Ok(SecretSpec { name, value, hosts })
}

/// One sandbox secret.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub placeholder: String,
    value: String,
    /// Empty: may be substituted toward any host.
    pub hosts: Vec<String>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// A secret with `placeholder`, or a fresh one when empty.
    pub fn new(name: &str, value: &str, hosts: &[String], placeholder: &str) -> Secret {
        Secret {
            name: name.to_string(),
            placeholder: if placeholder.is_empty() {
                new_placeholder()
            } else {
                placeholder.to_string()
            },
            value: value.to_string(),
            hosts: hosts.to_vec(),
        }
    }

    fn scoped_to(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|p| glob_match(p, host))
    }
}

/// A request about to leave the sandbox, as far as secrets are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRequest {
    /// Host header or SNI, as the guest sent it (a port is ignored).
    pub host: String,
    pub path: String,
    /// Raw query string, without `?`.
    pub query: String,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
}

/// The request carried a placeholder toward a host its secret is not scoped to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret placeholder for {name} sent to unauthorized host {host:?}")]
pub struct SecretLeak {
    pub name: String,
    pub host: String,
}

/// The secrets of one sandbox.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    secrets: Vec<Secret>,
}

impl Secrets {
    pub fn new(secrets: Vec<Secret>) -> Secrets {
        Secrets { secrets }
    }

    /// `NAME=placeholder` for the guest's environment.
    pub fn guest_env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.secrets
            .iter()
            .map(|s| (s.name.as_str(), s.placeholder.as_str()))
    }

    /// Every secret's hosts (they join the allow-list).
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.secrets
            .iter()
            .flat_map(|s| s.hosts.iter().map(String::as_str))
    }

    /// Applies the rules of §7.6 to `req`: refuses a leak, else substitutes in header values
    /// and the query. Returns the names of the secrets substituted (for events).
    pub fn apply(&self, req: &mut OutgoingRequest) -> Result<Vec<String>, SecretLeak> {
        let host = strip_port(&req.host).to_string();
        for s in &self.secrets {
            if s.scoped_to(&host) {
                continue;
            }
            let p = s.placeholder.as_str();
            let leaked = req.path.contains(p)
                || req.query.contains(p)
                || req.headers.iter().any(|(_, v)| v.contains(p));
            if leaked {
                return Err(SecretLeak {
                    name: s.name.clone(),
                    host,
                });
            }
        }
        let mut used = Vec::new();
        for s in self.secrets.iter().filter(|s| s.scoped_to(&host)) {
            let p = s.placeholder.as_str();
            let mut hit = false;
            for (_, v) in req.headers.iter_mut() {
                if v.contains(p) {
                    *v = v.replace(p, &s.value);
                    hit = true;
                }
            }
            if req.query.contains(p) {
                req.query = req.query.replace(p, &s.value);
                hit = true;
            }
            if hit {
                used.push(s.name.clone());
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "TOKEN").then(|| "from-env".to_string())
    }

    #[test]
    fn spec_parsing() {
        let s = parse_secret_spec("API=abc=d@ef@api.x.com, b.com ", &env).expect("inline");
        assert_eq!(s.name, "API");
        assert_eq!(s.value, "abc=d@ef");
        assert_eq!(s.hosts, ["api.x.com", "b.com"]);
        let s = parse_secret_spec("TOKEN@h", &env).expect("env");
        assert_eq!(s.value, "from-env");
        let err = |spec: &str| parse_secret_spec(spec, &env).expect_err(spec).to_string();
        assert!(err("NOPE@h").contains("$NOPE is not set"));
        assert!(err("A=b").contains("missing @hosts"));
        assert_eq!(err("A=b@ , "), "no hosts specified after @");
        assert_eq!(err("=b@h"), "secret name cannot be empty");
        assert!(!format!("{:?}", parse_secret_spec("A=hunter2@h", &env)).contains("hunter2"));
    }

    #[test]
    fn placeholders() {
        let p = new_placeholder();
        assert_eq!(p.len(), PLACEHOLDER_PREFIX.len() + 32);
        assert!(p[PLACEHOLDER_PREFIX.len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(p, new_placeholder());
    }

    fn request(host: &str, path: &str, query: &str, header: &str) -> OutgoingRequest {
        OutgoingRequest {
            host: host.into(),
            path: path.into(),
            query: query.into(),
            headers: vec![("Authorization".into(), header.into())],
        }
    }

    #[test]
    fn substitution_and_leaks() {
        let key = Secret::new("KEY", "real-value", &["*.api.com".into()], "");
        let any = Secret::new("ANY", "v2", &[], "SANDBOX_SECRET_any");
        let p = key.placeholder.clone();
        let secrets = Secrets::new(vec![key.clone(), any]);
        assert!(!format!("{secrets:?}").contains("real-value"));

        let mut r = request(
            "x.api.com:443",
            &format!("/p/{p}"),
            &format!("k={p}"),
            &format!("Bearer {p}"),
        );
        assert_eq!(secrets.apply(&mut r).expect("allowed"), ["KEY"]);
        assert_eq!(r.headers[0].1, "Bearer real-value");
        assert_eq!(r.query, "k=real-value");
        assert_eq!(r.path, format!("/p/{p}"), "the path is never rewritten");

        for (path, query, header) in [
            (format!("/{p}"), String::new(), String::new()),
            (String::from("/"), format!("q={p}"), String::new()),
            (String::from("/"), String::new(), format!("Bearer {p}")),
        ] {
            let mut r = request("evil.com", &path, &query, &header);
            let e = secrets.apply(&mut r).expect_err("leak");
            assert_eq!(e.name, "KEY");
            assert!(!e.to_string().contains("real-value"));
            assert!(!r.headers[0].1.contains("real-value"));
        }

        // A secret without hosts is substituted anywhere; no placeholder, nothing changes.
        let mut r = request("evil.com", "/", "", "SANDBOX_SECRET_any");
        assert_eq!(secrets.apply(&mut r).expect("ok"), ["ANY"]);
        assert_eq!(r.headers[0].1, "v2");
        let mut r = request("evil.com", "/", "a=1", "plain");
        assert!(secrets.apply(&mut r).expect("ok").is_empty());
        assert_eq!(secrets.hosts().collect::<Vec<_>>(), ["*.api.com"]);
    }
}
