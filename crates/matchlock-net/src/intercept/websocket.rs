//! WebSocket over HTTP/2 (RFC 8441 extended CONNECT) from the guest, carried upstream as an
//! HTTP/1.1 `Upgrade: websocket` handshake (RFC 6455).
//!
//! # Design
//! The guest-facing HTTP/2 server advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`; a guest
//! stream `CONNECT` with `:protocol websocket` goes through the same checks as an HTTP/1.1
//! upgrade (policy on `:authority`, hook rules, secrets, events; see `proxy.rs`). Upstream it
//! always becomes an HTTP/1.1 `GET` with `Upgrade: websocket` on a fresh connection: every
//! WebSocket server speaks that, whereas an upstream that negotiated h2 may well not have
//! enabled extended CONNECT, and one code path is easier to get right. The translation is
//! RFC 8441 §5's: the proxy makes its own `Sec-WebSocket-Key`, checks the upstream's
//! `Sec-WebSocket-Accept` against it, and answers the guest `200` carrying the negotiated
//! `Sec-WebSocket-Protocol` / `Sec-WebSocket-Extensions`. The frames themselves are the
//! same on both transports and are relayed byte for byte, never parsed or buffered.
//!
//! # Limitations
//! Only `:protocol websocket` is accepted; other extended CONNECT protocols and plain
//! CONNECT are refused with 403.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Version};
use sha1::{Digest, Sha1};

/// RFC 6455 §1.3.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Headers of the upstream's `101` passed on to the guest's `200`.
const NEGOTIATED: [&str; 2] = ["sec-websocket-protocol", "sec-websocket-extensions"];

/// Whether `req` is an RFC 8441 WebSocket bootstrap (`CONNECT` + `:protocol websocket`).
pub(crate) fn is_h2_websocket<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns the guest's extended CONNECT into an HTTP/1.1 upgrade request (the `Host` and the
/// origin-form URI are set later, as for any request); returns the `Sec-WebSocket-Key` made
/// for it.
pub(crate) fn to_h1_upgrade(parts: &mut Parts) -> String {
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    parts.extensions.remove::<hyper::ext::Protocol>();
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let h = &mut parts.headers;
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if !h.contains_key(header::SEC_WEBSOCKET_VERSION) {
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    key
}

/// Whether the upstream's `101` answers `key` (RFC 6455 §4.1: otherwise the client fails
/// the connection).
pub(crate) fn accept_matches(resp: &HeaderMap, key: &str) -> bool {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID);
    let want = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let upgrade_ok = resp
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    upgrade_ok
        && resp
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == want.as_bytes())
}

/// The headers of the guest's `200` (RFC 8441 §5): what the upstream negotiated.
pub(crate) fn negotiated(resp: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in NEGOTIATED {
        for v in resp.get_all(name) {
            out.append(name, v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_is_checked_against_the_key_made() {
        // RFC 6455 §1.3's example.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        assert!(accept_matches(&h, key));
        assert!(!accept_matches(&h, "AAAAAAAAAAAAAAAAAAAAAA=="));
        h.remove(header::UPGRADE);
        assert!(!accept_matches(&h, key));
    }

    #[test]
    fn extended_connect_becomes_an_upgrade_with_a_fresh_key() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://web.test/ws?x=1")
            .header("sec-websocket-key", "guest-chosen")
            .body(())
            .expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(is_h2_websocket(&req));
        let (mut parts, ()) = req.into_parts();
        let key = to_h1_upgrade(&mut parts);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_KEY], key.as_str());
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&key)
                .expect("base64")
                .len(),
            16
        );
    }

    #[test]
    fn plain_connect_and_other_protocols_are_not_websocket() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("web.test:443")
            .body(())
            .expect("request");
        assert!(!is_h2_websocket(&req));
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("connect-udp"));
        assert!(!is_h2_websocket(&req));
    }
}
