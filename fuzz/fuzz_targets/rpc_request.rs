//! One JSON-RPC request line (what `matchlock rpc` reads from an SDK) on arbitrary bytes: must
//! decode to a request or a `BadLine`, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_rpc::wire::parse_request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert!(!req.method.is_empty(), "accepted an empty method");
    }
});
