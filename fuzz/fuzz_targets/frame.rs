//! The frame decoder on arbitrary bytes: never panics; whatever it accepts
//! re-encodes to the same bytes.
#![no_main]

use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message as frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = frame::decode(rest, MAX_FRAME_LEN) {
        let again = frame::encode(&msg, MAX_FRAME_LEN).expect("a decoded message re-encodes");
        assert_eq!(
            frame::decode(&again, MAX_FRAME_LEN),
            Ok(Some((msg, again.len())))
        );
        rest = &rest[used..];
    }
});
