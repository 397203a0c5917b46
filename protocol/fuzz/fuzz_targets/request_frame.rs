//! Arbitrary bytes as a stream from a peer: split into frames with a small `max_frame_bytes`,
//! decode each as a request (and as every kind of response). Nothing may panic; whatever
//! decodes must re-encode to the same frame.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sluice_protocol::messages::{ApiKey, Response, decode_request, decode_response_header};
use sluice_protocol::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let mut stream = BytesMut::from(data);
    let mut decoder = FrameDecoder::for_requests(4096);
    while let Ok(Some(frame)) = decoder.decode(&mut stream) {
        let frame = frame.freeze();
        match decode_request(frame.clone()) {
            Ok((header, request)) => {
                let mut again = BytesMut::new();
                request.encode_frame(header.correlation_id, &mut again);
                if header.api_version == request.api_key().current_version() {
                    // Flags are reserved and not kept; everything else must survive.
                    assert_eq!(&again[4..12], &frame[..8], "header changed in round trip");
                    assert_eq!(&again[14..], &frame[10..], "body changed in round trip");
                } else {
                    // An older version is read into the current form and written as the
                    // current version: what it said must survive.
                    let (_, reread) = decode_request(again.freeze().slice(4..))
                        .expect("a re-encoded request decodes");
                    assert_eq!(reread, request, "request changed in round trip");
                }
            }
            Err(error) => {
                let mut response = BytesMut::new();
                error.encode_response(&mut response);
                assert_eq!(response.len(), 10);
            }
        }
    }
    let bytes = Bytes::copy_from_slice(data);
    if let Ok((_, body)) = decode_response_header(bytes) {
        for api_key in ApiKey::ALL {
            let _ = Response::decode(*api_key, body.clone());
        }
    }
});
