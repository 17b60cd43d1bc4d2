//! Network hook rules (spec §3.6, §7.7.1) and SDK callbacks (§4.6) on real `http` parts,
//! real streaming bodies, callback servers on real Unix sockets, and the published Python
//! SDK 0.2.17's own callback server.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{request, response, HeaderMap};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use matchlock_net::hooks::{
    BlockCause, BodyError, BodyPlan, HookError, HookRules, Phase, DEFAULT_CALLBACK_TIMEOUT,
    MAX_FULL_BODY,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------
// helpers

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn resp(status: u16, headers: &[(&str, &str)]) -> response::Parts {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("response").into_parts().0
}

fn rules(v: Value) -> HookRules {
    HookRules::compile(&v).expect("compile")
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().expect("ascii header"))
}

/// A body fed through a channel, so a test controls when each chunk arrives.
struct ChanBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    hint: SizeHint,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

fn chan_body() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, ChanBody) {
    let (tx, rx) = mpsc::channel(64);
    (
        tx,
        ChanBody {
            rx,
            hint: SizeHint::default(),
        },
    )
}

/// A body that yields `chunks` in order.
fn chunks_body(chunks: &[&[u8]]) -> ChanBody {
    let (tx, body) = chan_body();
    for c in chunks {
        tx.try_send(Ok(Bytes::copy_from_slice(c))).expect("send");
    }
    body
}

async fn collect(body: matchlock_net::hooks::HookBody) -> Result<Bytes, BodyError> {
    Ok(body.collect().await?.to_bytes())
}

// ---------------------------------------------------------------------------------------
// compilation and normalisation (§7.7.1)

#[test]
fn engine_futures_are_send_so_the_proxy_can_spawn_them() {
    fn is_send<T: Send>(_: &T) {}
    let hooks = HookRules::default();
    let mut request = req("GET", "/", &[]);
    let before = hooks.before("h", &mut request);
    is_send(&before);
    drop(before);
    let mut r = resp(200, &[]);
    let after = hooks.after("h", &request, &mut r);
    is_send(&after);
    drop(after);
    let plan = plan_without_rules(&hooks, &request);
    let mut headers = HeaderMap::new();
    let apply = plan.apply(&mut headers, chunks_body(&[]));
    is_send(&apply);
}

/// A plan from a rule-less engine without running a runtime.
fn plan_without_rules(hooks: &HookRules, request: &request::Parts) -> BodyPlan {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(hooks.after("h", request, &mut resp(200, &[])))
        .expect("no rules")
}

#[tokio::test]
async fn compile_null_empty_and_effectless_rules_give_nothing() {
    for v in [
        Value::Null,
        json!({}),
        json!({"rules": null}),
        json!({"rules": []}),
        // allow without mutation or callback: discarded
        json!({"rules": [{"action": "allow", "hosts": ["*"]}]}),
        // mutation fields of the other phase do not count
        json!({"rules": [{"phase": "after", "set_headers": {"X-A": "1"}}]}),
        json!({"rules": [{"phase": "before", "body_replacements": [{"find": "a", "replace": "b"}]}]}),
        // empty keys / finds dropped, so nothing is left
        json!({"rules": [{"set_headers": {" ": "1"}, "delete_query": ["", " "], "rewrite_path": "  "}]}),
        json!({"rules": [{"phase": "after", "body_replacements": [{"find": "", "replace": "x"}]}]}),
    ] {
        let r = rules(v.clone());
        assert!(r.is_empty(), "{v}");
    }
    let r = rules(json!({"rules": [{"callback_id": " network_hook_1 "}]}));
    assert!(!r.is_empty(), "a callback-only rule is kept");
    assert!(r.has_phase(Phase::Before) && !r.has_phase(Phase::After));
}

#[tokio::test]
async fn compile_normalisation_table() {
    // (rule, method, uri, expectation on the request after `before`)
    type Check = fn(&Result<(), matchlock_net::hooks::Blocked>, &request::Parts) -> bool;
    let table: Vec<(Value, &str, &str, Check)> = vec![
        // action case-insensitive, trimmed
        (json!({"action": " BLOCK "}), "GET", "/", |r, _| r.is_err()),
        // unknown phase means before
        (
            json!({"phase": "sometime", "action": "block"}),
            "GET",
            "/",
            |r, _| r.is_err(),
        ),
        (
            json!({"phase": "AFTER", "action": "block"}),
            "GET",
            "/",
            |r, _| r.is_ok(),
        ),
        // unknown action means allow; allow + mutation means mutate
        (
            json!({"action": "frobnicate", "set_headers": {"x-hook": "v"}}),
            "GET",
            "/",
            |_, p| header(&p.headers, "X-Hook") == Some("v"),
        ),
        // header names canonical: set lower-case, delete upper-case: deleted
        (
            json!({"set_headers": {"x-hook": "v"}, "delete_headers": ["X-HOOK", "x-hook"]}),
            "GET",
            "/",
            |_, p| !p.headers.contains_key("x-hook"),
        ),
        // methods upper-cased and trimmed
        (
            json!({"methods": [" get "], "action": "block"}),
            "GET",
            "/",
            |r, _| r.is_err(),
        ),
        (
            json!({"methods": ["post"], "action": "block"}),
            "GET",
            "/",
            |r, _| r.is_ok(),
        ),
        // path glob: '*' does not cross '/'; empty path is '/'
        (
            json!({"path": "/api/*", "action": "block"}),
            "GET",
            "/api/v1",
            |r, _| r.is_err(),
        ),
        (
            json!({"path": "/api/*", "action": "block"}),
            "GET",
            "/api/v1/x",
            |r, _| r.is_ok(),
        ),
        (
            json!({"path": "/", "action": "block"}),
            "GET",
            "http://a.example/",
            |r, _| r.is_err(),
        ),
        // invalid pattern never matches
        (
            json!({"path": "/api/[", "action": "block"}),
            "GET",
            "/api/[",
            |r, _| r.is_ok(),
        ),
        // hosts: blank entries dropped (so empty = all)
        (
            json!({"hosts": [" ", ""], "action": "block"}),
            "GET",
            "/",
            |r, _| r.is_err(),
        ),
        // delete_query de-duplicated, keys trimmed
        (
            json!({"set_query": {" a ": "1"}, "delete_query": ["b", "b"]}),
            "GET",
            "/?b=2&c=3",
            |_, p| p.uri.query() == Some("a=1&c=3"),
        ),
    ];
    for (rule, method, uri, check) in table {
        let hooks = rules(json!({ "rules": [rule.clone()] }));
        let mut parts = req(method, uri, &[("Host", "a.example")]);
        let result = hooks.before("a.example", &mut parts).await;
        assert!(
            check(&result, &parts),
            "rule {rule} on {method} {uri}: {result:?} {parts:?}"
        );
    }
}

#[test]
fn compile_rejects_what_http_cannot_carry_and_wrong_types() {
    let e = HookRules::compile(&json!({"rules": [{"name": "bad", "set_headers": {"X Bad": "1"}}]}))
        .expect_err("bad header name");
    assert!(matches!(e, HookError::HeaderName { index: 0, .. }), "{e:?}");
    assert!(e.to_string().contains("\"bad\""), "{e}");
    let e = HookRules::compile(
        &json!({"rules": [{}, {"set_response_headers": {"X-A": "a\nb"}, "phase": "after"}]}),
    )
    .expect_err("bad header value");
    assert!(
        matches!(e, HookError::HeaderValue { index: 1, .. }),
        "{e:?}"
    );
    let e = HookRules::compile(&json!({"rules": {"not": "a list"}})).expect_err("wrong type");
    assert!(matches!(e, HookError::Parse(_)), "{e:?}");
    let e = HookRules::compile(&json!("rules")).expect_err("not an object");
    assert!(matches!(e, HookError::Parse(_)), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// before (static)

#[tokio::test]
async fn before_reference_request_mutation_scenario() {
    // Spec §13.2 #138.
    let hooks = rules(json!({"rules": [{
        "name": "mutate", "phase": "before", "hosts": ["httpbin.org"], "methods": ["GET"],
        "path": "/anything/v1", "action": "mutate",
        "set_headers": {"X-Hook": "set"}, "delete_headers": ["X-Remove"],
        "set_query": {"trace": "hooked"}, "delete_query": ["drop"], "rewrite_path": "/anything/v2"
    }]}));
    let mut parts = req(
        "GET",
        "/anything/v1?drop=1",
        &[
            ("Host", "httpbin.org"),
            ("X-Remove", "1"),
            ("Accept", "*/*"),
        ],
    );
    hooks
        .before("httpbin.org:80", &mut parts)
        .await
        .expect("not blocked");
    assert_eq!(parts.uri.to_string(), "/anything/v2?trace=hooked");
    assert_eq!(header(&parts.headers, "x-hook"), Some("set"));
    assert!(!parts.headers.contains_key("x-remove"));
    assert_eq!(header(&parts.headers, "accept"), Some("*/*"));
    assert_eq!(header(&parts.headers, "host"), Some("httpbin.org"));
}

#[tokio::test]
async fn before_query_is_reencoded_with_sorted_keys_and_form_encoding() {
    let hooks = rules(json!({"rules": [{
        "set_query": {"c": "x y/z~*", "a": "new"}, "delete_query": ["d"]
    }]}));
    let mut parts = req("GET", "/p?b=2&a=1&a=3&d=4&e=%C3%A9+f", &[]);
    hooks.before("h", &mut parts).await.expect("not blocked");
    // Go url.Values.Encode: keys sorted; QueryEscape keeps only ALNUM and -_.~
    assert_eq!(
        parts.uri.query(),
        Some("a=new&b=2&c=x+y%2Fz~%2A&e=%C3%A9+f")
    );
    // No query mutation: the raw query is left exactly as the guest wrote it.
    let hooks = rules(json!({"rules": [{"set_headers": {"X-A": "1"}}]}));
    let mut parts = req("GET", "/p?z=1&a=%7e", &[]);
    hooks.before("h", &mut parts).await.expect("not blocked");
    assert_eq!(parts.uri.query(), Some("z=1&a=%7e"));
}

#[tokio::test]
async fn before_rules_run_in_order_and_block_stops() {
    let hooks = rules(json!({"rules": [
        {"name": "tag", "set_headers": {"X-Step": "1"}},
        {"name": "other-host", "hosts": ["other.example"], "action": "block"},
        {"name": "second", "set_headers": {"X-Step": "2"}, "rewrite_path": "/two"},
        {"name": "match-rewritten", "path": "/two", "action": "block"},
    ]}));
    let mut parts = req("GET", "/one", &[]);
    let blocked = hooks
        .before("api.example", &mut parts)
        .await
        .expect_err("blocked");
    assert_eq!(blocked.rule, "match-rewritten");
    assert_eq!(blocked.phase, Phase::Before);
    assert_eq!(blocked.cause, BlockCause::Rule);
    assert_eq!(blocked.to_string(), "request blocked by policy");
    assert_eq!(header(&parts.headers, "x-step"), Some("2"));
}

#[tokio::test]
async fn before_matches_host_without_port_decoded_path_and_glob_hosts() {
    let hooks = rules(json!({"rules": [{
        "hosts": ["*.example.com"], "path": "/admin/*", "action": "block"
    }]}));
    for (host, uri, blocked) in [
        ("api.example.com:8443", "/admin/x", true),
        ("api.example.com", "/%61dmin/x", true),
        ("api.example.com", "/admin%2Fx", true),
        ("api.example.com", "/admin/x/y", false),
        ("example.com", "/admin/x", false),
        // Names are case-insensitive: a block rule cannot be dodged by capitals.
        ("API.EXAMPLE.COM", "/admin/x", true),
        ("api.example.org", "/admin/x", false),
        ("api.example.com.", "/admin/x", true),
        // Dot segments and doubled slashes resolve as an upstream server would.
        ("api.example.com", "/x/../admin/y", true),
        ("api.example.com", "//admin/./y", true),
        ("api.example.com", "/x/%2E%2E/admin/y", true),
        ("[2001:db8::1]:443", "/admin/x", false),
    ] {
        let mut parts = req("GET", uri, &[]);
        let got = hooks.before(host, &mut parts).await.is_err();
        assert_eq!(got, blocked, "{host} {uri}");
    }
}

#[tokio::test]
async fn before_rewrite_keeps_absolute_form_and_never_touches_host() {
    let hooks = rules(json!({"rules": [{
        "set_headers": {"Host": "evil.example", "X-A": "1"}, "delete_headers": ["host"],
        "rewrite_path": "no slash/sp ace?q", "set_query": {"k": "v"}
    }]}));
    let mut parts = req(
        "POST",
        "https://api.example.com:8443/old?x=1",
        &[("Host", "api.example.com:8443")],
    );
    hooks
        .before("api.example.com:8443", &mut parts)
        .await
        .expect("not blocked");
    assert_eq!(
        parts.uri.to_string(),
        "https://api.example.com:8443/no%20slash/sp%20ace%3Fq?k=v&x=1"
    );
    assert_eq!(header(&parts.headers, "host"), Some("api.example.com:8443"));
    assert_eq!(header(&parts.headers, "x-a"), Some("1"));
}

// ---------------------------------------------------------------------------------------
// after (static) and bodies

#[tokio::test]
async fn after_block_and_response_header_mutation() {
    let hooks = rules(json!({"rules": [
        {"phase": "after", "hosts": ["a.example"], "set_response_headers": {"x-added": "1"},
         "delete_response_headers": ["X-Upstream"]},
        {"phase": "after", "hosts": ["b.example"], "action": "block", "name": "no-b"},
    ]}));
    let request = req("GET", "/", &[]);
    let mut r = resp(200, &[("X-Upstream", "1"), ("Content-Type", "text/plain")]);
    let plan = hooks
        .after("a.example", &request, &mut r)
        .await
        .expect("not blocked");
    assert!(plan.is_passthrough());
    assert_eq!(header(&r.headers, "X-Added"), Some("1"));
    assert!(!r.headers.contains_key("x-upstream"));
    let mut r = resp(200, &[]);
    let blocked = hooks
        .after("b.example", &request, &mut r)
        .await
        .expect_err("blocked");
    assert_eq!(
        (blocked.phase, blocked.rule.as_str()),
        (Phase::After, "no-b")
    );
}

#[tokio::test]
async fn after_matches_the_rewritten_request() {
    let hooks = rules(json!({"rules": [
        {"phase": "before", "rewrite_path": "/v2"},
        {"phase": "after", "path": "/v2", "action": "block"},
    ]}));
    let mut request = req("GET", "/v1", &[]);
    hooks.before("h", &mut request).await.expect("not blocked");
    let mut r = resp(200, &[]);
    assert!(hooks.after("h", &request, &mut r).await.is_err());
}

#[tokio::test]
async fn full_body_replacement_in_order_sets_content_length() {
    let hooks = rules(json!({"rules": [
        {"phase": "after", "body_replacements": [{"find": "foo", "replace": "bar"}]},
        {"phase": "after", "body_replacements": [{"find": "barbar", "replace": "X"}, {"find": "aaa"}]},
    ]}));
    let request = req("GET", "/", &[]);
    let mut r = resp(
        200,
        &[
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ],
    );
    let plan = hooks
        .after("h", &request, &mut r)
        .await
        .expect("not blocked");
    assert_eq!(plan.replacements().len(), 3);
    // "foo" split across chunks; replacements apply in order (foo->bar, then barbar->X).
    let body = chunks_body(&[b"{\"v\":\"fo", b"ofoo aaaaa\"}"]);
    let out = plan.apply(&mut r.headers, body).await.expect("apply");
    let bytes = collect(out).await.expect("body");
    assert_eq!(&bytes[..], b"{\"v\":\"X aa\"}");
    assert_eq!(header(&r.headers, "content-length"), Some("12"));
    assert!(!r.headers.contains_key("transfer-encoding"));
}

#[tokio::test]
async fn responses_without_a_body_keep_their_headers() {
    let hooks = rules(json!({"rules": [
        {"phase": "after", "body_replacements": [{"find": "a", "replace": "b"}]},
    ]}));
    for (method, status) in [("HEAD", 200), ("GET", 204), ("GET", 304)] {
        let request = req(method, "/", &[]);
        let mut r = resp(status, &[("Content-Length", "1234")]);
        let plan = hooks
            .after("h", &request, &mut r)
            .await
            .expect("not blocked");
        assert!(plan.is_passthrough(), "{method} {status}");
        let out = plan
            .apply(&mut r.headers, chunks_body(&[]))
            .await
            .expect("apply");
        assert!(collect(out).await.expect("body").is_empty());
        assert_eq!(
            header(&r.headers, "content-length"),
            Some("1234"),
            "{method} {status}"
        );
    }
}

#[tokio::test]
async fn full_body_over_the_limit_passes_through_unmodified() {
    let hooks = rules(json!({"rules": [
        {"phase": "after", "body_replacements": [{"find": "a", "replace": "b"}]},
    ]}));
    let request = req("GET", "/", &[]);
    let big = vec![b'a'; MAX_FULL_BODY + 10];
    // Found while reading (no Content-Length).
    let mut r = resp(200, &[]);
    let plan = hooks
        .after("h", &request, &mut r)
        .await
        .expect("not blocked");
    let (tx, body) = chan_body();
    let feeder = {
        let big = big.clone();
        tokio::spawn(async move {
            for c in big.chunks(1 << 20) {
                if tx.send(Ok(Bytes::copy_from_slice(c))).await.is_err() {
                    return;
                }
            }
        })
    };
    let out = plan.apply(&mut r.headers, body).await.expect("apply");
    let bytes = collect(out).await.expect("body");
    feeder.await.expect("feeder");
    assert_eq!(bytes.len(), big.len());
    assert!(bytes.iter().all(|b| *b == b'a'), "unmodified");
    assert!(!r.headers.contains_key("content-length"));
    // Declared by Content-Length: not read at all before passing through.
    let mut r = resp(200, &[("Content-Length", &(MAX_FULL_BODY + 1).to_string())]);
    let plan = hooks
        .after("h", &request, &mut r)
        .await
        .expect("not blocked");
    let body = chunks_body(&[b"aaa"]);
    let out = plan.apply(&mut r.headers, body).await.expect("apply");
    assert_eq!(&collect(out).await.expect("body")[..], b"aaa");
    assert_eq!(
        header(&r.headers, "content-length"),
        Some((MAX_FULL_BODY + 1).to_string().as_str())
    );
}

#[tokio::test]
async fn sse_replacements_only_in_data_lines_streamed_across_split_chunks() {
    // Spec §13.2 #140: "id" -> "sid" only inside data: lines.
    let hooks = rules(json!({"rules": [{
        "phase": "after", "hosts": ["httpbingo.org"], "path": "/sse",
        "body_replacements": [{"find": "\"id\"", "replace": "\"sid\""}]
    }]}));
    let request = req("GET", "/sse?count=2", &[]);
    let mut r = resp(
        200,
        &[
            ("Content-Type", "Text/Event-Stream; charset=utf-8"),
            ("Content-Length", "999"),
        ],
    );
    let plan = hooks
        .after("httpbingo.org", &request, &mut r)
        .await
        .expect("not blocked");
    let (tx, body) = chan_body();
    let mut out = plan.apply(&mut r.headers, body).await.expect("apply");
    assert!(!r.headers.contains_key("content-length"));
    assert!(!r.headers.contains_key("transfer-encoding"));

    // The first event arrives while the upstream stream is still open; the `data:` line is
    // split mid-prefix and mid-pattern across chunks.
    tx.send(Ok(Bytes::from_static(b"event: ping\r\nid: \"id\"\r\nda")))
        .await
        .expect("send");
    tx.send(Ok(Bytes::from_static(b"ta: {\"i")))
        .await
        .expect("send");
    tx.send(Ok(Bytes::from_static(b"d\":0}\r\n\r\n")))
        .await
        .expect("send");
    let mut first = Vec::new();
    while !first.ends_with(b"\r\n\r\n") {
        let frame = tokio::time::timeout(Duration::from_secs(5), out.frame())
            .await
            .expect("streamed before upstream end")
            .expect("frame")
            .expect("ok");
        first.extend_from_slice(&frame.into_data().expect("data"));
    }
    assert_eq!(
        String::from_utf8_lossy(&first),
        "event: ping\r\nid: \"id\"\r\ndata: {\"sid\":0}\r\n\r\n"
    );
    tx.send(Ok(Bytes::from_static(
        b"data: {\"id\":1}\n\n: comment \"id\"\ndata:\"id\"",
    )))
    .await
    .expect("send");
    drop(tx);
    let rest = collect(out).await.expect("body");
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "data: {\"sid\":1}\n\n: comment \"id\"\ndata:\"sid\""
    );
}

#[tokio::test]
async fn sse_unterminated_line_over_the_bound_fails_closed() {
    let hooks = rules(json!({"rules": [{"phase": "after", "body_replacements": [{"find": "x"}]}]}));
    let request = req("GET", "/", &[]);
    let mut r = resp(200, &[("Content-Type", "text/event-stream")]);
    let plan = hooks
        .after("h", &request, &mut r)
        .await
        .expect("not blocked");
    let (tx, body) = chan_body();
    let out = plan.apply(&mut r.headers, body).await.expect("apply");
    tokio::spawn(async move {
        tx.send(Ok(Bytes::from_static(b"data: ok x\n"))).await.ok();
        let chunk = Bytes::from(vec![b'y'; 256 * 1024]);
        for _ in 0..8 {
            if tx.send(Ok(chunk.clone())).await.is_err() {
                return;
            }
        }
    });
    let e = collect(out).await.expect_err("line too long");
    assert!(matches!(e, BodyError::SseLineTooLong { .. }), "{e:?}");
}

#[tokio::test]
async fn upstream_body_errors_are_reported() {
    let hooks = rules(json!({"rules": [{"phase": "after", "body_replacements": [{"find": "x"}]}]}));
    let request = req("GET", "/", &[]);
    let mut r = resp(200, &[]);
    let plan = hooks
        .after("h", &request, &mut r)
        .await
        .expect("not blocked");
    let (tx, body) = chan_body();
    tx.send(Ok(Bytes::from_static(b"xx"))).await.expect("send");
    tx.send(Err(std::io::Error::other("reset")))
        .await
        .expect("send");
    let e = plan.apply(&mut r.headers, body).await.expect_err("error");
    assert!(matches!(e, BodyError::Upstream(_)), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// callbacks against a callback server on a real Unix socket

enum Reply {
    Line(String),
    Sleep(Duration, String),
    Raw(Vec<u8>),
    Close,
}

struct FakeSdk {
    _dir: tempfile::TempDir,
    path: PathBuf,
    seen: Arc<Mutex<Vec<Value>>>,
}

/// A callback server that behaves like the SDKs: reads one JSON line, answers per
/// `callback_id`, closes.
fn fake_sdk(answer: fn(&Value) -> Reply) -> FakeSdk {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hook.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let mut line = String::new();
                BufReader::new(rd).read_line(&mut line).await.expect("read");
                let v: Value = serde_json::from_str(&line).expect("one JSON line");
                let reply = answer(&v);
                seen.lock().expect("lock").push(v);
                let bytes = match reply {
                    Reply::Line(s) => format!("{s}\n").into_bytes(),
                    Reply::Sleep(d, s) => {
                        tokio::time::sleep(d).await;
                        format!("{s}\n").into_bytes()
                    }
                    Reply::Raw(b) => b,
                    Reply::Close => return,
                };
                let _ = wr.write_all(&bytes).await;
            });
        }
    });
    FakeSdk {
        _dir: dir,
        path,
        seen,
    }
}

fn with_socket(mut interception: Value, socket: &Path) -> HookRules {
    interception["callback_socket"] = json!(socket.to_str().expect("utf-8 path"));
    rules(interception)
}

#[tokio::test]
async fn callback_requests_have_the_reference_wire_shape() {
    let sdk = fake_sdk(|_| Reply::Line("{}".into()));
    let hooks = with_socket(
        json!({"rules": [
            {"name": "b", "phase": "before", "callback_id": "network_hook_1", "set_headers": {"x-static": "1"}},
            {"name": "a", "phase": "after", "callback_id": "network_hook_2"},
        ]}),
        &sdk.path,
    );
    let mut request = req(
        "POST",
        "/p%20q/r?b=2&a=1&a=3",
        &[
            ("Host", "api.example.com"),
            ("x-multi", "1"),
            ("X-Multi", "2"),
        ],
    );
    hooks
        .before("api.example.com:443", &mut request)
        .await
        .expect("not blocked");
    let mut r = resp(201, &[("content-type", "text/event-stream"), ("x-up", "u")]);
    let plan = hooks
        .after("api.example.com:443", &request, &mut r)
        .await
        .expect("not blocked");
    assert!(plan.is_passthrough());
    let seen = sdk.seen.lock().expect("lock").clone();
    assert_eq!(
        seen[0],
        json!({
            "callback_id": "network_hook_1", "phase": "before", "host": "api.example.com",
            "method": "POST", "path": "/p q/r", "query": {"a": "1", "b": "2"},
            "request_headers": {"X-Multi": ["1", "2"], "X-Static": ["1"]}
        })
    );
    assert_eq!(
        seen[1],
        json!({
            "callback_id": "network_hook_2", "phase": "after", "host": "api.example.com",
            "method": "POST", "path": "/p q/r", "query": {"a": "1", "b": "2"},
            "request_headers": {"X-Multi": ["1", "2"], "X-Static": ["1"]},
            "status_code": 201,
            "response_headers": {"Content-Type": ["text/event-stream"], "X-Up": ["u"]},
            "is_sse": true
        })
    );
    // An empty answer changes nothing.
    assert_eq!(request.uri.to_string(), "/p%20q/r?b=2&a=1&a=3");
}

#[tokio::test]
async fn callback_block_in_either_phase() {
    let sdk = fake_sdk(|v| {
        if v["path"] == "/block" {
            Reply::Line(r#"{"action":"block"}"#.into())
        } else {
            Reply::Line(r#"{"action":"allow"}"#.into())
        }
    });
    let hooks = with_socket(
        json!({"rules": [
            {"name": "cb-before", "callback_id": "network_hook_1"},
            {"name": "cb-after", "phase": "after", "callback_id": "network_hook_2", "path": "/after"},
        ]}),
        &sdk.path,
    );
    let mut request = req("GET", "/block", &[]);
    let b = hooks.before("h", &mut request).await.expect_err("blocked");
    assert_eq!(
        (b.rule.as_str(), b.cause),
        ("cb-before", BlockCause::Callback)
    );
    let mut request = req("GET", "/after", &[]);
    hooks.before("h", &mut request).await.expect("allowed");
    let mut r = resp(200, &[]);
    hooks.after("h", &request, &mut r).await.expect("allowed");
    let hooks = with_socket(
        json!({"rules": [{"name": "cb-after", "phase": "after", "callback_id": "x", "path": "/block"}]}),
        &sdk.path,
    );
    let request = req("GET", "/block", &[]);
    let b = hooks
        .after("h", &request, &mut r)
        .await
        .expect_err("blocked");
    assert_eq!((b.phase, b.cause), (Phase::After, BlockCause::Callback));
}

#[tokio::test]
async fn callback_request_mutation_replaces_whole_maps() {
    let sdk = fake_sdk(|v| {
        match v["callback_id"].as_str() {
        // allow + mutation => mutate; headers replace the whole map, query too.
        Some("replace") => Reply::Line(
            json!({"request": {"headers": {"x-new": ["1", "2"], "Host": ["evil"], "bad name": ["x"]},
                                "query": {"z": "last", "a": "a b"}, "path": "/new path"}})
            .to_string(),
        ),
        // present but empty maps clear everything (except Host)
        Some("clear") => Reply::Line(json!({"action": "mutate", "request": {"headers": {}, "query": {}}}).to_string()),
        // null maps leave things alone
        _ => Reply::Line(json!({"action": "allow", "request": {"headers": null, "query": null, "path": ""}}).to_string()),
    }
    });
    let hooks = with_socket(json!({"rules": [{"callback_id": "replace"}]}), &sdk.path);
    let mut request = req("GET", "/old?q=1", &[("Host", "h.example"), ("X-Old", "1")]);
    hooks
        .before("h.example", &mut request)
        .await
        .expect("allowed");
    assert_eq!(request.uri.to_string(), "/new%20path?a=a+b&z=last");
    assert_eq!(header(&request.headers, "host"), Some("h.example"));
    assert!(!request.headers.contains_key("x-old"));
    let values: Vec<_> = request.headers.get_all("x-new").iter().collect();
    assert_eq!(values, ["1", "2"]);

    let hooks = with_socket(json!({"rules": [{"callback_id": "clear"}]}), &sdk.path);
    let mut request = req("GET", "/keep?q=1", &[("Host", "h.example"), ("X-Old", "1")]);
    hooks
        .before("h.example", &mut request)
        .await
        .expect("allowed");
    assert_eq!(request.uri.to_string(), "/keep");
    assert_eq!(request.headers.len(), 1);
    assert_eq!(header(&request.headers, "host"), Some("h.example"));

    let hooks = with_socket(json!({"rules": [{"callback_id": "nulls"}]}), &sdk.path);
    let mut request = req("GET", "/keep?q=1", &[("X-Old", "1")]);
    hooks
        .before("h.example", &mut request)
        .await
        .expect("allowed");
    assert_eq!(request.uri.to_string(), "/keep?q=1");
    assert_eq!(header(&request.headers, "x-old"), Some("1"));
}

#[tokio::test]
async fn callback_response_headers_and_body() {
    // Spec §13.2 #141 plus replacements on a set body and an explicitly empty body.
    let sdk = fake_sdk(|v| {
        match v["callback_id"].as_str() {
        Some("body") => {
            assert_eq!(v["status_code"], 200);
            Reply::Line(
                json!({"response": {
                    "headers": {"X-Intercepted": ["callback"], "Content-Type": ["application/json"]},
                    "set_body_base64": "eyJtc2ciOiJmcm9tLWNhbGxiYWNrIn0=",
                    "body_replacements": [{"find": "from", "replace": "FROM"}, {"find": ""}]
                }})
                .to_string(),
            )
        }
        Some("empty") => Reply::Line(json!({"response": {"set_body_base64": ""}}).to_string()),
        Some("badb64") => Reply::Line(
            json!({"response": {"set_body_base64": "!!!", "body_replacements": [{"find": "up", "replace": "down"}]}})
                .to_string(),
        ),
        _ => Reply::Close,
    }
    });
    let request = req("GET", "/", &[]);
    let hooks = with_socket(
        json!({"rules": [
            {"phase": "after", "body_replacements": [{"find": "callback", "replace": "cb"}]},
            {"phase": "after", "callback_id": "body"},
        ]}),
        &sdk.path,
    );
    let mut r = resp(
        200,
        &[("X-Upstream", "1"), ("Transfer-Encoding", "chunked")],
    );
    let plan = hooks.after("h", &request, &mut r).await.expect("allowed");
    let out = plan
        .apply(&mut r.headers, chunks_body(&[b"upstream"]))
        .await
        .expect("apply");
    assert_eq!(
        &collect(out).await.expect("body")[..],
        b"{\"msg\":\"FROM-cb\"}"
    );
    assert_eq!(header(&r.headers, "x-intercepted"), Some("callback"));
    assert!(!r.headers.contains_key("x-upstream"));
    assert!(!r.headers.contains_key("transfer-encoding"));
    assert_eq!(header(&r.headers, "content-length"), Some("17"));

    let hooks = with_socket(
        json!({"rules": [{"phase": "after", "callback_id": "empty"}]}),
        &sdk.path,
    );
    let mut r = resp(200, &[("Content-Length", "8")]);
    let plan = hooks.after("h", &request, &mut r).await.expect("allowed");
    let out = plan
        .apply(&mut r.headers, chunks_body(&[b"upstream"]))
        .await
        .expect("apply");
    assert_eq!(&collect(out).await.expect("body")[..], b"");
    assert_eq!(header(&r.headers, "content-length"), Some("0"));

    // Invalid base64 is ignored; the replacements still apply to the upstream body.
    let hooks = with_socket(
        json!({"rules": [{"phase": "after", "callback_id": "badb64"}]}),
        &sdk.path,
    );
    let mut r = resp(200, &[]);
    let plan = hooks.after("h", &request, &mut r).await.expect("allowed");
    let out = plan
        .apply(&mut r.headers, chunks_body(&[b"upstream"]))
        .await
        .expect("apply");
    assert_eq!(&collect(out).await.expect("body")[..], b"downstream");
}

#[tokio::test]
async fn slow_callback_is_ignored_at_its_timeout() {
    let sdk = fake_sdk(|_| Reply::Sleep(Duration::from_secs(30), r#"{"action":"block"}"#.into()));
    let hooks = with_socket(
        json!({"rules": [{"callback_id": "slow", "timeout_ms": 300, "set_headers": {"X-Static": "1"}}]}),
        &sdk.path,
    );
    let mut request = req("GET", "/", &[]);
    let start = Instant::now();
    hooks
        .before("h", &mut request)
        .await
        .expect("timeout => ignored, not blocked");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert_eq!(header(&request.headers, "x-static"), Some("1"));
}

#[tokio::test]
async fn callback_without_timeout_gets_the_default_deadline() {
    let sdk = fake_sdk(|_| Reply::Sleep(Duration::from_secs(60), r#"{"action":"block"}"#.into()));
    let hooks = with_socket(json!({"rules": [{"callback_id": "slow"}]}), &sdk.path);
    let mut request = req("GET", "/", &[]);
    let start = Instant::now();
    hooks.before("h", &mut request).await.expect("ignored");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= DEFAULT_CALLBACK_TIMEOUT
            && elapsed < DEFAULT_CALLBACK_TIMEOUT + Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn broken_callbacks_are_ignored() {
    let sdk = fake_sdk(|v| match v["callback_id"].as_str() {
        Some("garbage") => Reply::Line("this is not json".into()),
        Some("notobject") => Reply::Line("[1,2]".into()),
        Some("error") => {
            Reply::Line(r#"{"error":"network hook callback not found","action":"block"}"#.into())
        }
        Some("huge") => Reply::Raw(vec![b' '; 25 * 1024 * 1024]),
        Some("wrongtype") => Reply::Line(r#"{"action":"block","request":{"headers":"x"}}"#.into()),
        _ => Reply::Close,
    });
    for id in [
        "garbage",
        "notobject",
        "error",
        "huge",
        "wrongtype",
        "close",
    ] {
        let hooks = with_socket(
            json!({"rules": [{"callback_id": id, "set_headers": {"X-Static": "1"}},
                             {"phase": "after", "callback_id": id}]}),
            &sdk.path,
        );
        let mut request = req("GET", "/", &[]);
        hooks.before("h", &mut request).await.expect(id);
        assert_eq!(header(&request.headers, "x-static"), Some("1"), "{id}");
        let mut r = resp(200, &[]);
        let plan = hooks.after("h", &request, &mut r).await.expect(id);
        assert!(plan.is_passthrough(), "{id}");
    }
    // A socket that does not exist, and rules naming callbacks without any socket.
    let missing = sdk.path.with_file_name("missing.sock");
    let hooks = with_socket(json!({"rules": [{"callback_id": "x"}]}), &missing);
    hooks
        .before("h", &mut req("GET", "/", &[]))
        .await
        .expect("ignored");
    let hooks = rules(json!({"rules": [{"callback_id": "x"}]}));
    assert!(hooks.callback_socket().is_none());
    hooks
        .before("h", &mut req("GET", "/", &[]))
        .await
        .expect("ignored");
}

// ---------------------------------------------------------------------------------------
// the published Python SDK 0.2.17, unchanged

/// The venv's python from `scripts/python-sdk-venv.sh` (cached; installs on first use).
fn sdk_python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python-sdk-venv.sh");
        let out = std::process::Command::new(&script)
            .output()
            .expect("run scripts/python-sdk-venv.sh");
        assert!(
            out.status.success(),
            "installing matchlock==0.2.17 into a virtualenv failed (needs python3-venv and PyPI):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

const PY_SCRIPT: &str = r#"
import json, sys
from matchlock.client import Client
from matchlock.types import (NetworkBodyTransform, NetworkHookRequestMutation,
    NetworkHookResponseMutation, NetworkHookResult, NetworkHookRule, NetworkInterceptionConfig)

def before(req):
    seen = "|".join([req.phase, req.host, req.method, req.path,
                     json.dumps(req.query, sort_keys=True),
                     ",".join((req.request_headers or {}).get("X-Test", []))])
    return NetworkHookResult(request=NetworkHookRequestMutation(
        headers={"X-Seen": [seen], "X-From-Python": ["yes"]},
        query={"q": "from python"}, path="/rewritten by/python"))

def after(req):
    body = json.dumps({"status": req.status_code, "sse": req.is_sse, "path": req.path,
                       "upstream": (req.response_headers or {}).get("X-Upstream", [])},
                      sort_keys=True)
    return NetworkHookResult(response=NetworkHookResponseMutation(
        headers={"X-Intercepted": ["callback"]}, set_body=body,
        body_replacements=[NetworkBodyTransform(find="python", replace="PY")]))

def block(req):
    return NetworkHookResult(action="block")

def boom(req):
    raise RuntimeError("boom")

rules = [
    NetworkHookRule(name="py-before", phase="before", hosts=["api.example.com"], path="/v1/*", hook=before),
    NetworkHookRule(name="py-after", phase="after", hosts=["api.example.com"], hook=after),
    NetworkHookRule(name="py-block", hosts=["blocked.example.com"], hook=block),
    NetworkHookRule(name="py-static", hosts=["static.example.com"], methods=["get"],
                    set_headers={"x-static": "1"}, action="allow"),
    NetworkHookRule(name="py-boom", hosts=["boom.example.com"], hook=boom,
                    set_headers={"X-Before-Boom": "kept"}),
    NetworkHookRule(name="py-sse", phase="after", hosts=["sse.example.com"],
                    body_replacements=[NetworkBodyTransform(find='"id"', replace='"sid"')]),
]
client = Client()
wire, local = client._compile_network_hooks(NetworkInterceptionConfig(rules=rules))
wire["callback_socket"] = client._start_network_hook_server(local)
print(json.dumps(wire), flush=True)
sys.stdin.read()
client._stop_network_hook_server()
"#;

#[tokio::test]
async fn python_sdk_0_2_17_rules_and_callbacks_work_unchanged() {
    let mut child = tokio::process::Command::new(sdk_python())
        .args(["-c", PY_SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("python started")
    .expect("read");
    // Exactly what the SDK sends as network.interception at create.
    let interception: Value = serde_json::from_str(&line).expect("interception JSON");
    assert_eq!(interception["rules"][0]["callback_id"], "network_hook_1");
    let hooks = HookRules::compile(&interception).expect("compile the SDK's payload");

    // before callback: sees what the guest sent, replaces headers, query and path.
    let mut request = req(
        "GET",
        "/v1/items?b=2&a=1",
        &[
            ("Host", "api.example.com"),
            ("X-Test", "t1"),
            ("X-Gone", "1"),
        ],
    );
    hooks
        .before("api.example.com:443", &mut request)
        .await
        .expect("allowed");
    assert_eq!(
        request.uri.to_string(),
        "/rewritten%20by/python?q=from+python"
    );
    assert_eq!(
        header(&request.headers, "x-seen"),
        Some(r#"before|api.example.com|GET|/v1/items|{"a": "1", "b": "2"}|t1"#)
    );
    assert_eq!(header(&request.headers, "x-from-python"), Some("yes"));
    assert!(!request.headers.contains_key("x-gone"));
    assert_eq!(header(&request.headers, "host"), Some("api.example.com"));

    // after callback: replaces response headers and body; its replacements apply.
    let mut r = resp(200, &[("X-Upstream", "1"), ("Content-Type", "text/plain")]);
    let plan = hooks
        .after("api.example.com", &request, &mut r)
        .await
        .expect("allowed");
    let out = plan
        .apply(&mut r.headers, chunks_body(&[b"upstream"]))
        .await
        .expect("apply");
    let body: Value =
        serde_json::from_slice(&collect(out).await.expect("body")).expect("json body");
    assert_eq!(
        body,
        json!({"status": 200, "sse": false, "path": "/rewritten by/PY", "upstream": ["1"]})
    );
    assert_eq!(header(&r.headers, "x-intercepted"), Some("callback"));
    assert!(!r.headers.contains_key("x-upstream"));

    // block from a Python callback.
    let mut request = req("GET", "/", &[]);
    let b = hooks
        .before("blocked.example.com", &mut request)
        .await
        .expect_err("blocked");
    assert_eq!(
        (b.rule.as_str(), b.cause),
        ("py-block", BlockCause::Callback)
    );

    // static rule from the SDK's to_dict (action "allow" + set_headers => mutate).
    let mut request = req("GET", "/", &[]);
    hooks
        .before("static.example.com", &mut request)
        .await
        .expect("allowed");
    assert_eq!(header(&request.headers, "x-static"), Some("1"));

    // a raising hook answers {"error": ...}: ignored, static part kept.
    let mut request = req("GET", "/", &[]);
    hooks
        .before("boom.example.com", &mut request)
        .await
        .expect("ignored");
    assert_eq!(header(&request.headers, "x-before-boom"), Some("kept"));

    // SSE replacement rule from the SDK (replace omitted when empty is handled too).
    let mut r = resp(200, &[("Content-Type", "text/event-stream")]);
    let plan = hooks
        .after("sse.example.com", &req("GET", "/sse", &[]), &mut r)
        .await
        .expect("allowed");
    let out = plan
        .apply(
            &mut r.headers,
            chunks_body(&[b"id: \"id\"\ndata: {\"id\":0}\n\n"]),
        )
        .await
        .expect("apply");
    assert_eq!(
        &collect(out).await.expect("body")[..],
        b"id: \"id\"\ndata: {\"sid\":0}\n\n"
    );

    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("python exits")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn python_sdk_phase_mismatch_and_unknown_id_are_ignored() {
    // The SDK's server refuses a callback id it does not know and a phase that differs
    // from the rule's; the host ignores both answers.
    let script = r#"
import json, sys
from matchlock.client import Client
from matchlock.types import NetworkHookResult, NetworkHookRule, NetworkInterceptionConfig
client = Client()
rules = [NetworkHookRule(name="after-only", phase="after", hook=lambda r: NetworkHookResult(action="block"))]
wire, local = client._compile_network_hooks(NetworkInterceptionConfig(rules=rules))
print(json.dumps({"socket": client._start_network_hook_server(local)}), flush=True)
sys.stdin.read()
client._stop_network_hook_server()
"#;
    let mut child = tokio::process::Command::new(sdk_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("python started")
    .expect("read");
    let socket: Value = serde_json::from_str(&line).expect("json");
    // Host-side rule says "before" for the SDK's after-only hook: phase mismatch.
    let hooks = rules(json!({"rules": [
        {"callback_id": "network_hook_1", "phase": "before"},
        {"callback_id": "network_hook_9", "phase": "before"},
    ], "callback_socket": socket["socket"]}));
    hooks
        .before("h", &mut req("GET", "/", &[]))
        .await
        .expect("both ignored");
    // The matching phase blocks, proving the socket and id were right.
    let hooks = rules(
        json!({"rules": [{"callback_id": "network_hook_1", "phase": "after"}],
                             "callback_socket": socket["socket"]}),
    );
    let request = req("GET", "/", &[]);
    hooks
        .after("h", &request, &mut resp(200, &[]))
        .await
        .expect_err("blocked");
    drop(child.stdin.take());
    let status = child.wait().await.expect("wait");
    assert!(status.success(), "{status:?}");
}
