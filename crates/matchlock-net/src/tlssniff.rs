//! Tells a TLS ClientHello from anything else in the first bytes a guest sends on a TCP port
//! the interceptor does not own by number (issue 9 item 5: "TLS on other ports detected from
//! the ClientHello").
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
//! [`peek`] collects a flow's first chunks from the stack's guest-to-host channel until
//! [`sniff`] decides, the guest half-closes, the upstream speaks first (SMTP, SSH banners:
//! [`Decision::ServerFirst`], a TLS server never does) or a deadline passes with nothing
//! sent ([`Decision::Silent`]). The bytes it read
//! are handed back so the caller can pass them on first, whichever way the flow goes.
//!
//! [`Decision::intercept`] fails closed: a stream that looks like TLS but is not confirmed
//! within the bounds (a hello dribbled past the deadline, split into many tiny records, or
//! too large) still goes to the interceptor, whose TLS stack accepts or refuses it. Otherwise
//! a guest could slip a ClientHello for a name the policy refuses past the SNI check by
//! sending it slowly to an address the policy allows.
//!
//! # Limitations
//! Only the record framing and the hello's first fields are checked, not its extensions
//! (rustls parses those). SSLv2-compatible hellos are not recognised (no client sends them
//! any more); they are spliced raw like any other protocol.

use std::time::Duration;

use tokio::sync::mpsc;

/// Largest ClientHello (handshake header included) recognised as such.
pub const MAX_HELLO: usize = 16 * 1024;
/// Most bytes [`sniff`] looks at: one full-size record header plus [`MAX_HELLO`], with room
/// for a few more record headers when the hello is fragmented.
pub const MAX_PEEK: usize = MAX_HELLO + 64;
/// How long [`peek`] waits for a guest's first bytes by default.
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
    /// Nothing arrived before the deadline.
    Silent,
    /// The upstream sent first, before the guest sent anything.
    ServerFirst,
    /// The guest half-closed (or the flow ended) before a TLS hello was complete; what was
    /// read is not TLS.
    Closed,
}

impl Decision {
    /// Whether the flow goes to the interceptor as TLS (fail closed: anything TLS-looking).
    pub fn intercept(self) -> bool {
        matches!(
            self,
            Decision::ClientHello | Decision::Oversized | Decision::Incomplete
        )
    }
}

/// The bytes [`peek`] took from the flow, and what they are.
#[derive(Debug)]
pub struct Peeked {
    pub decision: Decision,
    pub bytes: Vec<u8>,
}

/// Reads chunks from `rx` until [`sniff`] decides, `rx` closes, `window` passes, or, while
/// the guest has sent nothing, `server_first` completes (the upstream spoke first, which a
/// TLS server never does); `on_chunk` runs after each chunk (the stack wakes its loop:
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
    let deadline = tokio::time::Instant::now() + window;
    let mut bytes = Vec::new();
    tokio::pin!(server_first);
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout_at(deadline, rx.recv()) => r,
            _ = &mut server_first, if bytes.is_empty() => {
                return Peeked { decision: Decision::ServerFirst, bytes };
            }
        };
        let chunk = match next {
            Ok(Some(c)) => c,
            Ok(None) => {
                let decision = if sniff(&bytes) == Sniff::NeedMore && !bytes.is_empty() {
                    Decision::Incomplete
                } else {
                    Decision::Closed
                };
                return Peeked { decision, bytes };
            }
            Err(_) => {
                let decision = if bytes.is_empty() {
                    Decision::Silent
                } else {
                    Decision::Incomplete
                };
                return Peeked { decision, bytes };
            }
        };
        on_chunk();
        bytes.extend_from_slice(&chunk);
        let decision = match sniff(&bytes) {
            Sniff::NeedMore => continue,
            Sniff::ClientHello => Decision::ClientHello,
            Sniff::Oversized => Decision::Oversized,
            Sniff::NotTls => Decision::NotTls,
        };
        return Peeked { decision, bytes };
    }
}
