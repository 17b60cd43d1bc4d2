//! One JSON-RPC request line (what `matchlock rpc` reads from an SDK) on arbitrary bytes: must
//! decode to a request or a `BadLine`, never panic; an accepted method names itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::rpc::envelope::parse_request;
use matchlock_api::rpc::Method;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert_eq!(Method::parse(req.method.as_str()), Some(req.method));
    }
});
