//! Network events (spec §2.6 `event` notifications of type `network`): one per intercepted
//! request and one per flow or request refused by policy.
//!
//! # Design
//! The network crate knows nothing of RPC or logs: it calls an [`EventSink`] the sandbox
//! owner supplies, which forwards to RPC subscribers and the per-sandbox log. Events carry
//! the guest's view of a request (placeholders, never real secret values) and the URL
//! without its query string, so a secret substituted into the query is never reported.
//!
//! # Limitations
//! The sink is called synchronously on the network thread: it must not block.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One network event, in the reference's shape (§2.6, §7.7 "Network events").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkEvent {
    /// HTTP method; empty for a refused raw TCP flow.
    pub method: String,
    /// `scheme://host/path` (no query); empty for a refused raw TCP flow.
    pub url: String,
    /// The request's host, or `ip:port` for a raw TCP flow.
    pub host: String,
    /// Status sent to the guest (0 when no response was sent).
    pub status_code: u16,
    /// Request body size when the guest declared it (Content-Length), else 0.
    pub request_bytes: u64,
    /// Response body size when the upstream declared it (Content-Length), else 0.
    pub response_bytes: u64,
    /// Time from the request's arrival to the response head.
    pub duration_ms: u64,
    pub blocked: bool,
    pub block_reason: Option<String>,
    /// Unix seconds.
    pub timestamp_unix: i64,
}

/// Where events go; must not block.
pub type EventSink = Arc<dyn Fn(NetworkEvent) + Send + Sync>;

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now (the reference stamps file events in ms).
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A refused flow or request.
pub fn blocked(host: &str, reason: &str) -> NetworkEvent {
    NetworkEvent {
        host: host.to_string(),
        blocked: true,
        block_reason: Some(reason.to_string()),
        timestamp_unix: now_unix(),
        ..NetworkEvent::default()
    }
}

/// Sends `ev` to `sink` when there is one.
pub fn emit(sink: Option<&EventSink>, ev: NetworkEvent) {
    if let Some(sink) = sink {
        sink(ev);
    }
}
