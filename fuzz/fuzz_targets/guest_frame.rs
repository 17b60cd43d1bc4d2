//! Host<->guest frame decoding on arbitrary bytes: must return frames or errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_guest_proto::{read_frame, Frame};

fuzz_target!(|data: &[u8]| {
    // Slice decoder: walk every frame the buffer holds.
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        if used == 0 || used > rest.len() {
            panic!("decode consumed {used} of {} bytes", rest.len());
        }
        // Re-encoding a decoded frame must round-trip.
        if let Ok(bytes) = frame.encode() {
            let again = Frame::decode(&bytes).ok().flatten();
            assert_eq!(again, Some((frame, bytes.len())));
        }
        rest = &rest[used..];
    }
    // Stream reader.
    let mut r = data;
    while let Ok(Some(_)) = read_frame(&mut r) {}
});
