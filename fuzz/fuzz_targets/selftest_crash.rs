//! Not a target: proves the runner (fuzz/run.sh) fails when a target panics. It panics on
//! inputs starting with "cr" (two separate branches, so the fuzzer also finds them by
//! itself in a second or so: `fuzz/run.sh selftest_crash` must fail); run.sh feeds it
//! "crash" first and requires a reported crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&b'c') && data.get(1) == Some(&b'r') {
        panic!("selftest: deliberate crash");
    }
});
