//! The JSON-RPC 2.0 envelope: requests, responses, notifications (spec §2.1).
//!
//! # Design
//! Ids are kept as the JSON value the client sent (unsigned integers as the reference
//! requires, and strings, which JSON-RPC 2.0 allows) and echoed back unchanged. The method is
//! parsed into [`Method`] here, once. Output lines are built from `serde_json` maps, whose
//! keys are sorted, so lines are deterministic.
//!
//! # Limitations
//! Batches (JSON arrays) are not supported; they are answered `Invalid Request`, as the
//! reference's clients never send them.

use serde_json::{json, Map, Value};

use super::{Method, Notice};

/// A decoded request or input notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    pub params: Value,
    /// `None` for notifications (no `id` member, or `null`).
    pub id: Option<Value>,
}

/// Why a line is not a usable request; `id` is echoed when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub enum BadLine {
    /// Not JSON.
    Parse,
    /// JSON, but not a request object.
    Invalid {
        id: Option<Value>,
        why: &'static str,
    },
    /// A well-formed request for a method this server does not have.
    UnknownMethod { id: Option<Value> },
}

/// Decodes one request line (server side).
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
    let name = match obj.remove("method") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => {
            return Err(BadLine::Invalid {
                id,
                why: "method must be a non-empty string",
            })
        }
    };
    let Some(method) = Method::parse(&name) else {
        return Err(BadLine::UnknownMethod { id });
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
pub fn notification(notice: Notice, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": notice.as_str(), "params": params}).to_string()
}

/// A client -> server request line.
pub fn request(method: Method, params: Value, id: u64) -> String {
    json!({"jsonrpc": "2.0", "method": method.as_str(), "params": params, "id": id}).to_string()
}

/// A client -> server notification line (exec input).
pub fn input_notification(method: Method, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method.as_str(), "params": params}).to_string()
}

/// The `error` member of a response.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RpcErrorObject {
    #[serde(default)]
    pub code: i64,
    #[serde(default)]
    pub message: String,
}

/// A line a client receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The answer to request `id`.
    Response {
        id: u64,
        outcome: Result<Value, RpcErrorObject>,
    },
    /// A notification; `target` is `params.id` (the request it belongs to), when present.
    Notification {
        notice: Notice,
        target: Option<u64>,
        params: Value,
    },
}

impl Incoming {
    /// Decodes a server line (client side); `None` for lines that are neither a response to
    /// a numeric id nor a known notification.
    pub fn parse(line: &str) -> Option<Incoming> {
        let mut v: Value = serde_json::from_str(line).ok()?;
        let obj = v.as_object_mut()?;
        if let Some(id) = obj.get("id").and_then(Value::as_u64) {
            if let Some(e) = obj.remove("error") {
                let e = serde_json::from_value(e).unwrap_or(RpcErrorObject {
                    code: 0,
                    message: String::new(),
                });
                return Some(Incoming::Response {
                    id,
                    outcome: Err(e),
                });
            }
            if let Some(r) = obj.remove("result") {
                return Some(Incoming::Response { id, outcome: Ok(r) });
            }
        }
        let notice = Notice::parse(obj.get("method")?.as_str()?)?;
        let params = obj.remove("params").unwrap_or(Value::Null);
        let target = params.get("id").and_then(Value::as_u64);
        Some(Incoming::Notification {
            notice,
            target,
            params,
        })
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
        assert_eq!(r.method, Method::Exec);
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
        assert_eq!(
            parse_request(br#"{"method":"frobnicate","id":5}"#),
            Err(BadLine::UnknownMethod { id: Some(json!(5)) })
        );
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
            notification(Notice::ExecPipeReady, json!({"id": 7})),
            r#"{"jsonrpc":"2.0","method":"exec_pipe.ready","params":{"id":7}}"#
        );
    }

    #[test]
    fn client_side_round_trip() {
        let line = request(Method::Exec, json!({"command": "true"}), 9);
        let r = parse_request(line.as_bytes()).expect("server parses what clients send");
        assert_eq!((r.method, r.id), (Method::Exec, Some(json!(9))));
        assert_eq!(
            Incoming::parse(&response(Some(&json!(9)), json!({"x": 1}))),
            Some(Incoming::Response {
                id: 9,
                outcome: Ok(json!({"x": 1}))
            })
        );
        assert_eq!(
            Incoming::parse(&error_response(Some(&json!(2)), -32001, "boom")),
            Some(Incoming::Response {
                id: 2,
                outcome: Err(RpcErrorObject {
                    code: -32001,
                    message: "boom".into()
                })
            })
        );
        let n = notification(Notice::ExecStreamStdout, json!({"id": 4, "data": "aGk="}));
        assert!(matches!(
            Incoming::parse(&n),
            Some(Incoming::Notification {
                notice: Notice::ExecStreamStdout,
                target: Some(4),
                ..
            })
        ));
        assert_eq!(Incoming::parse("not json"), None);
    }
}
