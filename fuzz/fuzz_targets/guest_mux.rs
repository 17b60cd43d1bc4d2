//! The host end of the virtio-serial channel mux on arbitrary guest bytes: frames are decoded
//! and dispatched (opens, data beyond credit, credit overflow, unknown ids, resets) and the
//! session must end with an error or EOF, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_guest_proto::mux::{read_mux_frame, Mux, MuxRole};

fuzz_target!(|data: &[u8]| {
    // Stream decoder alone: every decoded frame re-encodes to the bytes it came from.
    let mut r = data;
    while let Ok(Some(f)) = read_mux_frame(&mut r) {
        let bytes = f.encode();
        assert_eq!(read_mux_frame(&mut bytes.as_slice()).ok().flatten(), Some(f));
    }
    // The whole host side: a listener on 5002 (the ready port), the session over the input.
    let mux = Mux::new(MuxRole::Host, "fuzz", None);
    let _accepted = mux.listen(5002);
    let _ = mux.run_session(data, Box::new(std::io::sink()));
    mux.end_session();
});
