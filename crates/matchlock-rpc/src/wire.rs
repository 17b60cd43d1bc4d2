//! JSON-RPC 2.0 framing: newline-delimited objects, bounded lines, ids, responses and
//! notifications (spec §2.1).
//!
//! # Design
//! Only this module knows the envelope. Ids are kept as the JSON value the client sent
//! (unsigned integers as the reference requires, and also strings, which JSON-RPC 2.0
//! allows) and echoed back unchanged; [`id_key`] turns one into a map key for `cancel` and
//! input routing. Lines longer than [`MAX_LINE`] are skipped up to their newline and answered
//! with an error instead of ending the server (the reference exits).
//!
//! # Limitations
//! Batches (JSON arrays) are not supported; they are answered `Invalid Request`, as the
//! reference's clients never send them.

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest accepted request line, newline excluded (the reference's scanner limit).
pub const MAX_LINE: usize = 10 << 20;

/// A decoded request or notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub params: Value,
    /// `None` for notifications (no `id` member or `null`).
    pub id: Option<Value>,
}

/// Why a line is not a usable request; `id` is echoed when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub enum BadLine {
    Parse,
    Invalid {
        id: Option<Value>,
        why: &'static str,
    },
}

/// Decodes one line.
pub fn parse_request(line: &[u8]) -> Result<Request, BadLine> {
    let v: Value = serde_json::from_slice(line).map_err(|_| BadLine::Parse)?;
    let Value::Object(mut obj) = v else {
        return Err(BadLine::Invalid {
            id: None,
            why: "request must be a JSON object",
        });
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Value::String(s)),
        Some(Value::Number(n)) if n.is_u64() => Some(Value::Number(n)),
        Some(_) => {
            return Err(BadLine::Invalid {
                id: None,
                why: "id must be an unsigned integer or a string",
            })
        }
    };
    let method = match obj.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            return Err(BadLine::Invalid {
                id,
                why: "method must be a non-empty string",
            })
        }
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    Ok(Request { method, params, id })
}

/// A stable map key for an id value (`7` and `"7"` are different ids).
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// A success response line.
pub fn response(id: Option<&Value>, result: Value) -> String {
    let mut m = Map::new();
    m.insert("jsonrpc".into(), json!("2.0"));
    m.insert("result".into(), result);
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    Value::Object(m).to_string()
}

/// An error response line.
pub fn error_response(id: Option<&Value>, code: i64, message: &str) -> String {
    let mut m = Map::new();
    m.insert("jsonrpc".into(), json!("2.0"));
    m.insert("error".into(), json!({"code": code, "message": message}));
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    Value::Object(m).to_string()
}

/// A server -> client notification line.
pub fn notification(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

/// One line from the client.
#[derive(Debug, PartialEq)]
pub enum Line {
    Text(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
}

/// Reads newline-delimited lines with a length bound, without ever buffering more than
/// `max` bytes of one line.
pub struct LineReader<R> {
    inner: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader { inner, max }
    }

    /// The next line (without its newline), or `None` at EOF. A final line without a newline
    /// is returned as a line.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                return Ok(match (too_long, buf.is_empty()) {
                    (true, _) => Some(Line::TooLong),
                    (false, true) => None,
                    (false, false) => Some(Line::Text(buf)),
                });
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if buf.len() + take > self.max {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(if too_long {
                    Line::TooLong
                } else {
                    Line::Text(buf)
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r =
            parse_request(br#"{"jsonrpc":"2.0","method":"exec","params":{"command":"x"},"id":3}"#)
                .expect("ok");
        assert_eq!(r.method, "exec");
        assert_eq!(r.id, Some(json!(3)));
        let r = parse_request(br#"{"method":"log","id":"a-1"}"#).expect("string id");
        assert_eq!(r.id, Some(json!("a-1")));
        assert_eq!(r.params, Value::Null);
        let r = parse_request(br#"{"method":"exec_pipe.stdin","params":{"id":1}}"#).expect("n");
        assert_eq!(r.id, None);
        assert_eq!(parse_request(b"{nope"), Err(BadLine::Parse));
        assert!(matches!(
            parse_request(br#"{"method":"x","id":-1}"#),
            Err(BadLine::Invalid { id: None, .. })
        ));
        assert!(matches!(
            parse_request(br#"{"id":4}"#),
            Err(BadLine::Invalid { id: Some(_), .. })
        ));
        assert!(matches!(
            parse_request(b"[1]"),
            Err(BadLine::Invalid { .. })
        ));
        assert_ne!(id_key(&json!(7)), id_key(&json!("7")));
    }

    #[test]
    fn envelopes() {
        assert_eq!(
            response(Some(&json!(1)), json!({})),
            r#"{"id":1,"jsonrpc":"2.0","result":{}}"#
        );
        assert_eq!(
            error_response(None, -32700, "Parse error"),
            r#"{"error":{"code":-32700,"message":"Parse error"},"jsonrpc":"2.0"}"#
        );
        assert_eq!(
            notification("exec_pipe.ready", json!({"id": 7})),
            r#"{"jsonrpc":"2.0","method":"exec_pipe.ready","params":{"id":7}}"#
        );
    }

    #[tokio::test]
    async fn line_limit() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nafter\nlast");
        // A tiny buffer makes the long line span many fill_buf calls.
        let r = tokio::io::BufReader::with_capacity(8, input.as_slice());
        let mut lr = LineReader::new(r, 10);
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"short".to_vec()))
        );
        assert_eq!(lr.next().await.expect("r"), Some(Line::TooLong));
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"after".to_vec()))
        );
        assert_eq!(
            lr.next().await.expect("r"),
            Some(Line::Text(b"last".to_vec()))
        );
        assert_eq!(lr.next().await.expect("r"), None);
    }
}
