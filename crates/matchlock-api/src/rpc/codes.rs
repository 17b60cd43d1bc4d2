//! JSON-RPC error codes (spec §2.2). The server chooses among them in one place
//! (`matchlock-rpc`'s `Failure::code`); clients test for them with these names.

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
/// Defined by JSON-RPC; as in the reference, never produced.
pub const INTERNAL: i64 = -32603;
/// Sandbox lifecycle failures (create, close, no VM, port forwards).
pub const VM_FAILED: i64 = -32000;
/// Exec failures.
pub const EXEC_FAILED: i64 = -32001;
/// Guest file operation failures.
pub const FILE_FAILED: i64 = -32002;
/// The request was cancelled (`cancel`, `close`, a timeout).
pub const CANCELLED: i64 = -32003;
