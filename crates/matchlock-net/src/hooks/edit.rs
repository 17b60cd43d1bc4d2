//! Editing `http` request/response parts the way the reference's Go `net/http` edits did:
//! decoded paths, `url.Values` query maps re-encoded with sorted keys, canonical header
//! names for the callback protocol.
//!
//! # Design
//! Rules match and callbacks see the *percent-decoded* path (Go's `URL.Path`), so a guest
//! cannot dodge a path rule by writing `/%61dmin`. A rewritten path is re-encoded like Go's
//! `URL.EscapedPath` (everything but unreserved characters and `$&+,/:;=@` escaped), so it
//! always forms a valid request target; scheme and authority (absolute-form, HTTP/2) are
//! kept. Query encoding is Go's `url.Values.Encode`: keys sorted, `QueryEscape`d (space as
//! `+`). The `Host` header is not part of the header map a callback sees or replaces (Go
//! keeps it in `Request.Host`), so hooks cannot point a request at another upstream.
//!
//! # Limitations
//! Query parsing is `application/x-www-form-urlencoded` as `form_urlencoded` does it: an
//! invalid `%` escape is kept literally where Go would drop the pair.

use std::collections::BTreeMap;

use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters Go's `url.QueryEscape` leaves alone: ALPHA / DIGIT / `-_.~`.
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Characters Go's path escaping leaves alone: unreserved plus `$&+,/:;=@`.
const PATH_ESCAPE: &AsciiSet = &QUERY_ESCAPE
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b',')
    .remove(b'/')
    .remove(b':')
    .remove(b';')
    .remove(b'=')
    .remove(b'@');

/// The request path, percent-decoded (lossy for non-UTF-8 bytes).
pub(crate) fn decoded_path(uri: &Uri) -> String {
    percent_decode_str(uri.path())
        .decode_utf8_lossy()
        .into_owned()
}

/// The query as Go's `url.Values`: each key's values in order.
pub(crate) fn query_values(uri: &Uri) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        out.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    out
}

/// First value per key, as the callback protocol sends it (`None` when there is no query).
pub(crate) fn query_first(uri: &Uri) -> Option<BTreeMap<String, String>> {
    let values = query_values(uri);
    if values.is_empty() {
        return None;
    }
    Some(
        values
            .into_iter()
            .map(|(k, v)| {
                let first = v.into_iter().next().unwrap_or_default();
                (k, first)
            })
            .collect(),
    )
}

/// Go's `url.Values.Encode`.
pub(crate) fn encode_query(values: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = String::new();
    for (k, vs) in values {
        for v in vs {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&query_escape(k));
            out.push('=');
            out.push_str(&query_escape(v));
        }
    }
    out
}

fn query_escape(s: &str) -> String {
    utf8_percent_encode(s, QUERY_ESCAPE)
        .to_string()
        .replace("%20", "+")
}

/// Replaces the path (decoded form, re-encoded here) and/or the raw query of `uri`.
/// `Some("")` as query removes it.
pub(crate) fn rebuild_uri(
    uri: &Uri,
    decoded_path: Option<&str>,
    raw_query: Option<&str>,
) -> Result<Uri, http::Error> {
    let mut target = match decoded_path {
        Some(p) => {
            let encoded = utf8_percent_encode(p, PATH_ESCAPE).to_string();
            if encoded.starts_with('/') {
                encoded
            } else {
                format!("/{encoded}")
            }
        }
        None => uri.path().to_owned(),
    };
    let query = match raw_query {
        Some(q) => q,
        None => uri.query().unwrap_or(""),
    };
    if !query.is_empty() {
        target.push('?');
        target.push_str(query);
    }
    let pq = PathAndQuery::try_from(target)?;
    let mut builder = Uri::builder();
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.path_and_query(pq).build()
}

/// Go's `CanonicalHeaderKey` for a valid header name (`x-hook` → `X-Hook`).
pub(crate) fn canonical_key(name: &HeaderName) -> String {
    let mut upper = true;
    name.as_str()
        .chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// The header map as the callback protocol sends it: canonical names, every value, `Host`
/// left out; `None` when empty (Go sends no field for an empty header).
pub(crate) fn header_view(headers: &HeaderMap) -> Option<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if name == HOST {
            continue;
        }
        out.entry(canonical_key(name))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    (!out.is_empty()).then_some(out)
}

/// Replaces every header (but `Host`, which is kept) with `new`; names and values HTTP
/// cannot carry are skipped and traced.
pub(crate) fn replace_headers(headers: &mut HeaderMap, new: &BTreeMap<String, Vec<String>>) {
    let host = headers.get(HOST).cloned();
    headers.clear();
    if let Some(host) = host {
        headers.insert(HOST, host);
    }
    for (k, values) in new {
        let k = k.trim();
        if k.is_empty() {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
            tracing::warn!(
                header = k,
                "network hook callback header name invalid; skipped"
            );
            continue;
        };
        if name == HOST {
            tracing::debug!("network hook callback cannot change Host; skipped");
            continue;
        }
        for v in values {
            match HeaderValue::from_str(v) {
                Ok(value) => {
                    headers.append(name.clone(), value);
                }
                Err(_) => {
                    tracing::warn!(
                        header = k,
                        "network hook callback header value invalid; skipped"
                    )
                }
            }
        }
    }
}
