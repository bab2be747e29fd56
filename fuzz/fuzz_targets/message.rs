//! Message and offer decoding on arbitrary bytes: postcard payloads, and the
//! hand-encoded offer body the broker and receivers parse.
#![no_main]

use keyferry_common::wire::message::{self as frame, Message, SignedOffer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = frame::decode_payload(data) {
        let again = postcard::to_stdvec(&msg).expect("a decoded message re-encodes");
        assert_eq!(frame::decode_payload(&again), Ok(msg));
    }
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let offer = SignedOffer {
        body: data[split..].to_vec(),
        signature: data[..split].to_vec(),
    };
    let _ = offer.parse();
    let _ = postcard::from_bytes::<Message>(data);
});
