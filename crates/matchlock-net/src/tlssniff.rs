//! Tells a TLS ClientHello, or a plain HTTP/1.x request line, from anything else in the
//! first bytes a guest sends on a TCP port the interceptor does not own by number (issue 9
//! item 5: "TLS on other ports detected from the ClientHello"; item 6: a placeholder sent
//! in plain HTTP to another port must be refused, not spliced).
//!
//! # Design
//! [`sniff`] is a pure, bounded parser of a byte prefix: it walks TLS records (content type
//! 22 = handshake, legacy version 3.x, length at most 2^14), joins their fragments into one
//! handshake message and answers [`Sniff::ClientHello`] once a whole ClientHello (type 1, at
//! most [`MAX_HELLO`] bytes, with a 3.x client version) is there, [`Sniff::NotTls`] as soon as
//! a byte rules TLS out, [`Sniff::Oversized`] when it still looks like TLS past
//! [`MAX_PEEK`] bytes or declares a hello larger than [`MAX_HELLO`], and [`Sniff::NeedMore`]
//! otherwise. It never reads past the slice and never allocates.
//!
//! [`sniff_http`] does the same for an HTTP/1.x request line: a method token (RFC 9110
//! `tchar`s, at most [`MAX_METHOD`]), one space, a request target (visible bytes), one
//! space and `HTTP/` (any case) is [`HttpSniff::Request`], as soon as `HTTP/` is there (the
//! interceptor's hyper parses the rest and refuses what is malformed). So is an HTTP/0.9
//! simple request (`GET /...` and a line end), which servers may still take, and a prefix
//! that still fits a request line past [`MAX_PEEK`] (an absurdly long target). The first
//! byte that cannot continue a request line makes it [`HttpSniff::NotHttp`]: protocols with
//! text commands (`SET k v`, `get k`, `EHLO x`, `hello\n`) are told apart within their
//! first line. The two parsers never both accept: a request line starts with a `tchar`,
//! a TLS record with byte 22.
//!
//! [`peek`] collects a flow's first chunks from the stack's guest-to-host channel until
//! the parsers decide, the guest half-closes, the upstream speaks first (SMTP, SSH banners:
//! [`Decision::ServerFirst`], neither a TLS nor an HTTP server ever does) or a deadline
//! passes after the guest's first bytes. A guest that sends nothing is waited for, with no
//! deadline: while neither side speaks there is nothing to splice, and a deadline there
//! would let a guest (or a slow, loaded VM) skip interception by waiting before its
//! ClientHello or request line. The bytes it read are handed back so the caller can pass
//! them on first, whichever way the flow goes.
//!
//! [`Decision::intercept`] fails closed: a stream that looks like TLS but is not confirmed
//! within the bounds (a hello dribbled past the deadline, split into many tiny records, or
//! too large) still goes to the interceptor, whose TLS stack accepts or refuses it. Otherwise
//! a guest could slip a ClientHello for a name the policy refuses past the SNI check by
//! sending it slowly to an address the policy allows. Likewise [`Decision::intercept_http`]
//! takes a request line cut short by the deadline or the guest's FIN once its method and
//! the space after it arrived ([`Decision::HttpIncomplete`]); a bare word with no space
//! yet (`ping`) is spliced, so text protocols that send one word and wait still work.
//!
//! # Limitations
//! Only the record framing and the hello's first fields are checked, not its extensions
//! (rustls parses those). SSLv2-compatible hellos are not recognised (no client sends them
//! any more); they are spliced raw like any other protocol. Plain HTTP is recognised from
//! the first request of a connection only, and only as a client writes it: bytes that are
//! not a request line (or a lone word and then nothing for the window) are spliced raw to an
//! address the policy allowed, so a guest that wants to send a placeholder there in some
//! other framing can; it is never substituted on that path (the real value never leaves),
//! only not refused.

use std::time::Duration;

use tokio::sync::mpsc;

/// Largest ClientHello (handshake header included) recognised as such.
pub const MAX_HELLO: usize = 16 * 1024;
/// Most bytes [`sniff`] looks at: one full-size record header plus [`MAX_HELLO`], with room
/// for a few more record headers when the hello is fragmented.
pub const MAX_PEEK: usize = MAX_HELLO + 64;
/// How long [`peek`] gives a guest's first bytes, from the first of them, to decide.
pub const SNIFF_WINDOW: Duration = Duration::from_secs(1);

/// TLS record content type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// Client version (2) + random (32) + session id length (1).
const MIN_HELLO_BODY: usize = 35;

/// What a byte prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not decided yet: every byte so far fits a ClientHello (or there is none).
    NeedMore,
    /// A complete TLS ClientHello.
    ClientHello,
    /// Looks like TLS, but larger than the bounds allow to confirm.
    Oversized,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Classifies the first bytes of a stream; see the module docs.
pub fn sniff(buf: &[u8]) -> Sniff {
    let mut hs_len = 0usize; // handshake bytes joined so far
    let mut hs_head = [0u8; 4 + MIN_HELLO_BODY];
    let mut rest = buf.get(..buf.len().min(MAX_PEEK)).unwrap_or_default();
    loop {
        let Some(header) = rest.get(..5) else {
            if let Some(v) = partial_header(rest) {
                return v;
            }
            return more_or_oversized(buf);
        };
        if header[0] != HANDSHAKE || header[1] != 3 || header[2] > 4 {
            return Sniff::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Sniff::NotTls;
        }
        let body = rest.get(5..).unwrap_or_default();
        let take = body.len().min(len);
        for &b in body.iter().take(take) {
            if let Some(slot) = hs_head.get_mut(hs_len) {
                *slot = b;
            }
            hs_len += 1;
        }
        if let Some(v) = judge_handshake(&hs_head, hs_len) {
            return v;
        }
        if take < len {
            return more_or_oversized(buf);
        }
        rest = body.get(len..).unwrap_or_default();
    }
}

/// A record header cut short: `NotTls` as soon as one of its bytes rules TLS out.
fn partial_header(h: &[u8]) -> Option<Sniff> {
    let bad = h.first().is_some_and(|b| *b != HANDSHAKE)
        || h.get(1).is_some_and(|b| *b != 3)
        || h.get(2).is_some_and(|b| *b > 4);
    bad.then_some(Sniff::NotTls)
}

fn more_or_oversized(buf: &[u8]) -> Sniff {
    if buf.len() >= MAX_PEEK {
        Sniff::Oversized
    } else {
        Sniff::NeedMore
    }
}

/// The verdict from the handshake bytes joined so far (`head` holds the first of them), if
/// they are enough for one.
fn judge_handshake(head: &[u8], joined: usize) -> Option<Sniff> {
    if joined == 0 {
        return None;
    }
    if head.first() != Some(&CLIENT_HELLO) {
        return Some(Sniff::NotTls);
    }
    if joined < 4 {
        return None;
    }
    let [_, a, b, c] = [head[0], head[1], head[2], head[3]];
    let body = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if body < MIN_HELLO_BODY {
        return Some(Sniff::NotTls);
    }
    if body + 4 > MAX_HELLO {
        return Some(Sniff::Oversized);
    }
    if joined >= 5 && head[4] != 3 {
        return Some(Sniff::NotTls);
    }
    // The session id is at most 32 bytes.
    if joined >= 4 + MIN_HELLO_BODY && head[4 + MIN_HELLO_BODY - 1] > 32 {
        return Some(Sniff::NotTls);
    }
    (joined >= body + 4).then_some(Sniff::ClientHello)
}

/// Longest method token a request line may start with.
pub const MAX_METHOD: usize = 32;

/// What a byte prefix is, as the start of an HTTP/1.x request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpSniff {
    /// Not decided yet: every byte so far fits a request line (or there is none).
    NeedMore,
    /// Not decided, but the method and the space after it are there.
    NeedMoreAfterMethod,
    /// A request line (up to `HTTP/`), an HTTP/0.9 `GET /...` line, or a prefix still
    /// fitting one past [`MAX_PEEK`].
    Request,
    /// Not an HTTP request.
    NotHttp,
}

/// RFC 9110 `tchar`: the bytes of a method token.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes of a stream as an HTTP request line; see the module docs.
pub fn sniff_http(buf: &[u8]) -> HttpSniff {
    let buf = buf.get(..buf.len().min(MAX_PEEK)).unwrap_or_default();
    let method_len = buf.iter().take_while(|b| tchar(**b)).count();
    let Some(&after_method) = buf.get(method_len) else {
        return if method_len > MAX_METHOD {
            HttpSniff::NotHttp
        } else {
            HttpSniff::NeedMore
        };
    };
    if method_len == 0 || method_len > MAX_METHOD || after_method != b' ' {
        return HttpSniff::NotHttp;
    }
    let method = &buf[..method_len];
    let rest = &buf[method_len + 1..];
    let target_len = rest
        .iter()
        .take_while(|b| **b > b' ' && **b != 0x7f)
        .count();
    let Some(&after_target) = rest.get(target_len) else {
        return more_http(buf);
    };
    let target = &rest[..target_len];
    if target.is_empty() {
        return HttpSniff::NotHttp;
    }
    if after_target == b'\r' || after_target == b'\n' {
        // HTTP/0.9: `GET /path` and the line end.
        let simple = method == b"GET" && target.first() == Some(&b'/');
        return if simple {
            HttpSniff::Request
        } else {
            HttpSniff::NotHttp
        };
    }
    if after_target != b' ' {
        return HttpSniff::NotHttp;
    }
    let version = &rest[target_len + 1..];
    let want = b"HTTP/";
    let n = version.len().min(want.len());
    if !version[..n].eq_ignore_ascii_case(&want[..n]) {
        return HttpSniff::NotHttp;
    }
    if n == want.len() {
        HttpSniff::Request
    } else {
        more_http(buf)
    }
}

/// Undecided past the method: a request (fail closed) once [`MAX_PEEK`] bytes were seen.
fn more_http(buf: &[u8]) -> HttpSniff {
    if buf.len() >= MAX_PEEK {
        HttpSniff::Request
    } else {
        HttpSniff::NeedMoreAfterMethod
    }
}

/// How [`peek`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A complete ClientHello.
    ClientHello,
    /// TLS-looking, past the size bounds.
    Oversized,
    /// TLS-looking so far when the deadline passed.
    Incomplete,
    /// Not TLS.
    NotTls,
    /// The upstream sent first, before the guest sent anything.
    ServerFirst,
    /// The guest half-closed (or the flow ended) before a TLS hello was complete; what was
    /// read is not TLS.
    Closed,
    /// An HTTP/1.x request line ([`sniff_http`]).
    HttpRequest,
    /// A request line's method and space, the rest cut short by the deadline or the FIN.
    HttpIncomplete,
}

impl Decision {
    /// Whether the flow goes to the interceptor as TLS (fail closed: anything TLS-looking).
    pub fn intercept(self) -> bool {
        matches!(
            self,
            Decision::ClientHello | Decision::Oversized | Decision::Incomplete
        )
    }

    /// Whether the flow goes to the interceptor as plain HTTP (fail closed: anything past a
    /// request line's method).
    pub fn intercept_http(self) -> bool {
        matches!(self, Decision::HttpRequest | Decision::HttpIncomplete)
    }
}

/// The decision the bytes read so far allow, if any.
fn decide(bytes: &[u8]) -> Option<Decision> {
    match sniff(bytes) {
        Sniff::NeedMore => None,
        Sniff::ClientHello => Some(Decision::ClientHello),
        Sniff::Oversized => Some(Decision::Oversized),
        Sniff::NotTls => match sniff_http(bytes) {
            HttpSniff::NeedMore | HttpSniff::NeedMoreAfterMethod => None,
            HttpSniff::Request => Some(Decision::HttpRequest),
            HttpSniff::NotHttp => Some(Decision::NotTls),
        },
    }
}

/// The decision when the bytes stop coming (deadline or FIN) before [`decide`] had one:
/// `empty` is what no bytes at all get, `other` what a prefix neither parser claims gets.
fn undecided(bytes: &[u8], empty: Decision, other: Decision) -> Decision {
    if bytes.is_empty() {
        return empty;
    }
    if sniff(bytes) == Sniff::NeedMore {
        return Decision::Incomplete;
    }
    match sniff_http(bytes) {
        HttpSniff::NeedMoreAfterMethod | HttpSniff::Request => Decision::HttpIncomplete,
        HttpSniff::NeedMore | HttpSniff::NotHttp => other,
    }
}

/// The bytes [`peek`] took from the flow, and what they are.
#[derive(Debug)]
pub struct Peeked {
    pub decision: Decision,
    pub bytes: Vec<u8>,
}

/// Reads chunks from `rx` until [`sniff`] or [`sniff_http`] decides, `rx` closes, `window`
/// passes after the first chunk, or, while the guest has sent nothing, `server_first`
/// completes (the upstream spoke first, which a TLS server never does); `on_chunk` runs after each chunk (the stack wakes its loop:
/// channel capacity was freed). Holds at most [`MAX_PEEK`] bytes plus one chunk.
pub async fn peek<F>(
    rx: &mut mpsc::Receiver<Vec<u8>>,
    window: Duration,
    server_first: F,
    mut on_chunk: impl FnMut(),
) -> Peeked
where
    F: std::future::Future,
{
    let mut deadline = None;
    let mut bytes = Vec::new();
    tokio::pin!(server_first);
    loop {
        let recv = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, rx.recv()).await,
                None => Ok(rx.recv().await),
            }
        };
        let next = tokio::select! {
            r = recv => r,
            _ = &mut server_first, if bytes.is_empty() => {
                return Peeked { decision: Decision::ServerFirst, bytes };
            }
        };
        let chunk = match next {
            Ok(Some(c)) => c,
            Ok(None) => {
                let decision = undecided(&bytes, Decision::Closed, Decision::Closed);
                return Peeked { decision, bytes };
            }
            Err(_) => {
                let decision = undecided(&bytes, Decision::NotTls, Decision::NotTls);
                return Peeked { decision, bytes };
            }
        };
        on_chunk();
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + window);
        bytes.extend_from_slice(&chunk);
        if let Some(decision) = decide(&bytes) {
            return Peeked { decision, bytes };
        }
    }
}
