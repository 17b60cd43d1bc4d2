//! Wire forms: the `network.interception` object sent at create (spec §3.6) and the
//! callback protocol's request and response (§4.6).
//!
//! # Design
//! Every collection is optional so JSON `null` and an absent field mean the same thing, as
//! with Go's decoder; unknown fields are ignored (the SDKs may add some). Maps are
//! `BTreeMap`s so compilation is deterministic when two keys normalise to the same header.
//! The callback request leaves out empty fields (Go's `omitempty`), which the published
//! SDKs read with defaults.
//!
//! # Limitations
//! Values of the wrong JSON type make the whole object invalid (create fails) rather than
//! being skipped field by field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `network.interception` (§3.6 plus the SDK-internal `callback_socket`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct InterceptionWire {
    #[serde(default)]
    pub rules: Option<Vec<RuleWire>>,
    #[serde(default)]
    pub callback_socket: Option<String>,
}

/// One `NetworkHookRule` as sent on the wire.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RuleWire {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub callback_id: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub set_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub delete_headers: Option<Vec<String>>,
    #[serde(default)]
    pub set_query: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub delete_query: Option<Vec<String>>,
    #[serde(default)]
    pub rewrite_path: Option<String>,
    #[serde(default)]
    pub set_response_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub delete_response_headers: Option<Vec<String>>,
    #[serde(default)]
    pub body_replacements: Option<Vec<ReplacementWire>>,
}

/// `{"find": ..., "replace": ...}`; the Python SDK omits an empty `replace`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ReplacementWire {
    #[serde(default)]
    pub find: Option<String>,
    #[serde(default)]
    pub replace: Option<String>,
}

/// `NetworkHookCallbackRequest` (§4.6), written as one JSON line to the SDK.
#[derive(Debug, Serialize)]
pub(crate) struct CallbackRequest<'a> {
    pub callback_id: &'a str,
    pub phase: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub host: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub method: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "is_zero")]
    pub status_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(skip_serializing_if = "is_false")]
    pub is_sse: bool,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// `NetworkHookCallbackResponse` (§4.6).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CallbackResponse {
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub request: Option<RequestMutationWire>,
    #[serde(default)]
    pub response: Option<ResponseMutationWire>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A callback's request mutation; `headers`/`query` present (even empty) replace the whole
/// map, `null`/absent leave it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RequestMutationWire {
    #[serde(default)]
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub query: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub path: Option<String>,
}

/// A callback's response mutation.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResponseMutationWire {
    #[serde(default)]
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub body_replacements: Option<Vec<ReplacementWire>>,
    #[serde(default)]
    pub set_body_base64: Option<String>,
}
