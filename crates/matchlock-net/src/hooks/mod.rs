//! Network hook rules (spec §3.6, §7.7.1) and SDK callbacks (§4.6), applied by the HTTP/TLS
//! interception proxy to every intercepted request and response.
//!
//! # Design
//! [`HookRules::compile`] turns the create-time `network.interception` object (the wire
//! form the published SDKs send, including the SDK-internal `callback_socket`) into
//! normalised rules once. The proxy then calls, per request:
//! 1. [`HookRules::before`] on the request parts, *before* secret substitution (so a hook
//!    may add a placeholder that is then substituted, and callbacks never see real secret
//!    values); `Err(Blocked)` ⇒ 403 `Blocked by policy` and a blocked event.
//! 2. [`HookRules::after`] on the upstream response parts, with the request parts as they
//!    were after `before` (again without real secrets); `Err(Blocked)` ⇒ 403.
//! 3. [`BodyPlan::apply`] on the upstream body, which returns the body to send the guest
//!    and fixes `Content-Length`/`Transfer-Encoding`.
//!
//! Rules run in order; the host is matched without its port. The types are the `http`
//! crate's, so the engine is independent of the proxy's server stack. Callback failures
//! (socket missing, timeout, garbage, an `error` answer) are traced at `warn` and the
//! callback is ignored, as in the reference; the request goes on with the changes earlier
//! rules made. `Host` is outside the header map hooks can edit (see `edit.rs`), so hooks
//! cannot redirect a request to another upstream.
//!
//! # Limitations
//! A callback's wait holds that one request (never the proxy) for at most its timeout
//! ([`DEFAULT_CALLBACK_TIMEOUT`] when the rule gives none). Header names a callback sends
//! that HTTP cannot carry are skipped. Body limits: [`MAX_FULL_BODY`], [`FULL_BODY_BUDGET`],
//! [`MAX_SSE_LINE`], [`MAX_REPLY`].

mod body;
mod callback;
mod edit;
mod rules;
mod sse;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::HOST;
use http::{request, response};
use serde::Deserialize;
use tokio::sync::Semaphore;

pub use body::{BodyPlan, HookBody, FULL_BODY_BUDGET, MAX_FULL_BODY};
pub use callback::{CallbackError, MAX_REPLY};
pub use matchlock_api::pathglob::path_match;
pub use rules::{Phase, Replacement};
pub use sse::MAX_SSE_LINE;

use crate::policy::strip_port;
use rules::{Action, Rule};
use wire::{CallbackRequest, CallbackResponse, InterceptionWire};

/// Callback deadline when a rule's `timeout_ms` is 0 (absent).
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `network.interception` could not be compiled (create fails with this).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Not the §3.6 shape (wrong JSON types).
    #[error("invalid network interception config")]
    Parse(#[source] serde_json::Error),
    /// A `set_*headers`/`delete_*headers` key is not a valid header name.
    #[error("network hook rule {index} ({rule:?}): invalid header name {name:?}")]
    HeaderName {
        index: usize,
        rule: String,
        name: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
    /// A `set_*headers` value is not a valid header value.
    #[error("network hook rule {index} ({rule:?}): invalid value for header {name:?}")]
    HeaderValue {
        index: usize,
        rule: String,
        name: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
}

/// What decided a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockCause {
    /// A rule with `action: block`.
    Rule,
    /// A callback answered `block`.
    Callback,
    /// A rewrite produced a request target that cannot be sent (fail closed).
    InvalidRewrite,
}

/// A request or response the hook rules refuse: the proxy answers 403 `Blocked by policy`
/// and emits a blocked event with this as `block_reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request blocked by policy")]
pub struct Blocked {
    /// The phase that blocked.
    pub phase: Phase,
    /// The rule's `name` (may be empty).
    pub rule: String,
    /// What decided it.
    pub cause: BlockCause,
}

/// Compiled `network.interception` rules and the SDK's callback socket. Build one per
/// sandbox and share it (`Arc`) across the sandbox's flows: it also holds the sandbox's
/// [`FULL_BODY_BUDGET`].
#[derive(Debug, Clone)]
pub struct HookRules {
    rules: Vec<Rule>,
    callback_socket: Option<PathBuf>,
    body_budget: Arc<Semaphore>,
}

impl Default for HookRules {
    fn default() -> HookRules {
        HookRules {
            rules: Vec::new(),
            callback_socket: None,
            body_budget: Arc::new(Semaphore::new(FULL_BODY_BUDGET)),
        }
    }
}

impl HookRules {
    /// Compiles `{"rules": [...], "callback_socket": "..."}` (JSON `null` = no rules).
    pub fn compile(interception: &serde_json::Value) -> Result<HookRules, HookError> {
        if interception.is_null() {
            return Ok(HookRules::default());
        }
        let wire = InterceptionWire::deserialize(interception).map_err(HookError::Parse)?;
        let mut rules = Vec::new();
        for (index, w) in wire.rules.unwrap_or_default().into_iter().enumerate() {
            if let Some(rule) = Rule::compile(index, w)? {
                rules.push(rule);
            }
        }
        let callback_socket = wire
            .callback_socket
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if callback_socket.is_none() && rules.iter().any(|r| r.callback_id.is_some()) {
            tracing::warn!(
                "network hook rules name callbacks but no callback_socket; callbacks skipped"
            );
        }
        Ok(HookRules {
            rules,
            callback_socket,
            ..HookRules::default()
        })
    }

    /// Whether there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule runs in `phase` (the proxy may skip a phase without rules).
    pub fn has_phase(&self, phase: Phase) -> bool {
        self.rules.iter().any(|r| r.phase == phase)
    }

    /// The SDK's callback server, if one was given.
    pub fn callback_socket(&self) -> Option<&Path> {
        self.callback_socket.as_deref()
    }

    /// Runs the `before` rules on a request to `host` (port ignored): block, header, query
    /// and path mutations, then each matching rule's callback.
    pub async fn before(&self, host: &str, req: &mut request::Parts) -> Result<(), Blocked> {
        let host = strip_port(host);
        for rule in self.rules.iter().filter(|r| r.phase == Phase::Before) {
            let path = edit::decoded_path(&req.uri);
            if !rule.matches(host, req.method.as_str(), &path) {
                continue;
            }
            if rule.action == Action::Block {
                return Err(blocked(rule, BlockCause::Rule));
            }
            apply_static_request(rule, req)?;
            let Some(reply) = self.call(rule, host, req, None).await else {
                continue;
            };
            apply_callback_request(rule, reply, req)?;
        }
        Ok(())
    }

    /// Runs the `after` rules on `resp` for the request `req` to `host`: block, response
    /// header mutations and callbacks; returns what to do with the body.
    pub async fn after(
        &self,
        host: &str,
        req: &request::Parts,
        resp: &mut response::Parts,
    ) -> Result<BodyPlan, Blocked> {
        let host = strip_port(host);
        let path = edit::decoded_path(&req.uri);
        let mut plan = BodyPlan::new(self.body_budget.clone());
        for rule in self.rules.iter().filter(|r| r.phase == Phase::After) {
            if !rule.matches(host, req.method.as_str(), &path) {
                continue;
            }
            if rule.action == Action::Block {
                return Err(blocked(rule, BlockCause::Rule));
            }
            for (name, value) in &rule.set_response_headers {
                resp.headers.insert(name.clone(), value.clone());
            }
            for name in &rule.delete_response_headers {
                resp.headers.remove(name);
            }
            plan.replacements
                .extend(rule.body_replacements.iter().cloned());
            let Some(reply) = self.call(rule, host, req, Some(resp)).await else {
                continue;
            };
            apply_callback_response(rule, reply, resp, &mut plan)?;
        }
        let status = resp.status;
        plan.bodyless = req.method == http::Method::HEAD
            || status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        Ok(plan)
    }

    /// Calls the rule's callback, if it has one and a socket is configured; `None` when
    /// there is none or it failed (traced).
    async fn call(
        &self,
        rule: &Rule,
        host: &str,
        req: &request::Parts,
        resp: Option<&response::Parts>,
    ) -> Option<CallbackResponse> {
        let id = rule.callback_id.as_deref()?;
        let socket = self.callback_socket.as_deref()?;
        let cb = CallbackRequest {
            callback_id: id,
            phase: rule.phase.as_str(),
            host,
            method: req.method.as_str(),
            path: edit::decoded_path(&req.uri),
            query: edit::query_first(&req.uri),
            request_headers: edit::header_view(&req.headers),
            status_code: resp.map_or(0, |r| r.status.as_u16()),
            response_headers: resp.and_then(|r| edit::header_view(&r.headers)),
            is_sse: resp.is_some_and(|r| body::is_sse(&r.headers)),
        };
        match callback::invoke(socket, &cb, rule.callback_timeout()).await {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::warn!(
                    rule = %rule.name,
                    callback_id = id,
                    phase = rule.phase.as_str(),
                    error = %error_chain(&e),
                    "network hook callback ignored"
                );
                None
            }
        }
    }
}

fn blocked(rule: &Rule, cause: BlockCause) -> Blocked {
    tracing::debug!(rule = %rule.name, phase = rule.phase.as_str(), ?cause, "network hook blocked");
    Blocked {
        phase: rule.phase,
        rule: rule.name.clone(),
        cause,
    }
}

/// Static `before` mutations: headers (Set, then Del), query (Set, Del, re-encode with
/// sorted keys), then the path.
fn apply_static_request(rule: &Rule, req: &mut request::Parts) -> Result<(), Blocked> {
    for (name, value) in &rule.set_headers {
        if *name != HOST {
            req.headers.insert(name.clone(), value.clone());
        }
    }
    for name in &rule.delete_headers {
        if *name != HOST {
            req.headers.remove(name);
        }
    }
    let query = if rule.set_query.is_empty() && rule.delete_query.is_empty() {
        None
    } else {
        let mut values = edit::query_values(&req.uri);
        for (k, v) in &rule.set_query {
            values.insert(k.clone(), vec![v.clone()]);
        }
        for k in &rule.delete_query {
            values.remove(k);
        }
        Some(edit::encode_query(&values))
    };
    rewrite_uri(rule, req, rule.rewrite_path.as_deref(), query.as_deref())
}

fn rewrite_uri(
    rule: &Rule,
    req: &mut request::Parts,
    path: Option<&str>,
    query: Option<&str>,
) -> Result<(), Blocked> {
    if path.is_none() && query.is_none() {
        return Ok(());
    }
    match edit::rebuild_uri(&req.uri, path, query) {
        Ok(uri) => {
            req.uri = uri;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(rule = %rule.name, error = %error_chain(&e), "network hook rewrite invalid");
            Err(blocked(rule, BlockCause::InvalidRewrite))
        }
    }
}

/// The callback's verdict: `block`, or whether to apply its mutation (`mutate`, or any
/// mutation present with `allow`).
fn callback_blocks_or_applies(action: Option<&str>, has_mutation: bool) -> (bool, bool) {
    match Action::parse(action) {
        Action::Block => (true, false),
        Action::Mutate => (false, true),
        Action::Allow => (false, has_mutation),
    }
}

fn apply_callback_request(
    rule: &Rule,
    reply: CallbackResponse,
    req: &mut request::Parts,
) -> Result<(), Blocked> {
    let mutation = reply.request.filter(|m| {
        m.headers.is_some()
            || m.query.is_some()
            || m.path.as_deref().is_some_and(|p| !p.trim().is_empty())
    });
    let (block, apply) = callback_blocks_or_applies(reply.action.as_deref(), mutation.is_some());
    if block {
        return Err(blocked(rule, BlockCause::Callback));
    }
    let Some(m) = mutation.filter(|_| apply) else {
        return Ok(());
    };
    if let Some(headers) = &m.headers {
        edit::replace_headers(&mut req.headers, headers);
    }
    let query = m.query.as_ref().map(|q| {
        let values = q
            .iter()
            .map(|(k, v)| (k.trim().to_owned(), vec![v.clone()]))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        edit::encode_query(&values)
    });
    let path = m.path.as_deref().map(str::trim).filter(|p| !p.is_empty());
    rewrite_uri(rule, req, path, query.as_deref())
}

fn apply_callback_response(
    rule: &Rule,
    reply: CallbackResponse,
    resp: &mut response::Parts,
    plan: &mut BodyPlan,
) -> Result<(), Blocked> {
    let mutation = reply.response.map(|m| {
        let replacements = rules::replacements(m.body_replacements);
        (m.headers, replacements, m.set_body_base64)
    });
    let mutation = mutation.filter(|(h, r, b)| h.is_some() || !r.is_empty() || b.is_some());
    let (block, apply) = callback_blocks_or_applies(reply.action.as_deref(), mutation.is_some());
    if block {
        return Err(blocked(rule, BlockCause::Callback));
    }
    let Some((headers, replacements, set_body)) = mutation.filter(|_| apply) else {
        return Ok(());
    };
    if let Some(headers) = &headers {
        edit::replace_headers(&mut resp.headers, headers);
    }
    if let Some(b64) = set_body {
        match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(body) => plan.set_body = Some(Bytes::from(body)),
            Err(e) => {
                tracing::warn!(rule = %rule.name, error = %e, "network hook callback body is not base64; ignored")
            }
        }
    }
    plan.replacements.extend(replacements);
    Ok(())
}

/// `err` and its sources, `: `-joined, for one trace field.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The body error of a [`HookBody`].
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream body failed.
    #[error("upstream response body failed")]
    Upstream(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An SSE line without terminator outgrew the buffer.
    #[error("SSE line longer than {limit} bytes")]
    SseLineTooLong { limit: usize },
}
