//! Dispatch tests: whole frames through `FrameDecoder` and `decode_request`.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::frame::FrameDecoder;

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<ApiVersionsRequest>().prop_map(Request::from),
        any::<MetadataRequest>().prop_map(Request::from),
        any::<CreateTopicsRequest>().prop_map(Request::from),
        any::<DeleteTopicsRequest>().prop_map(Request::from),
        any::<ListTopicsRequest>().prop_map(Request::from),
        any::<DescribeTopicRequest>().prop_map(Request::from),
        any::<ProduceRequest>().prop_map(Request::from),
        any::<FetchRequest>().prop_map(Request::from),
        any::<ListOffsetsRequest>().prop_map(Request::from),
        any::<InitProducerIdRequest>().prop_map(Request::from),
        any::<ConsumerGroupHeartbeatRequest>().prop_map(Request::from),
        any::<LeaveGroupRequest>().prop_map(Request::from),
        any::<CommitOffsetsRequest>().prop_map(Request::from),
        any::<FetchOffsetsRequest>().prop_map(Request::from),
        any::<DescribeGroupRequest>().prop_map(Request::from),
        any::<ListGroupsRequest>().prop_map(Request::from),
    ]
}

fn any_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        any::<ApiVersionsResponse>().prop_map(Response::from),
        any::<MetadataResponse>().prop_map(Response::from),
        any::<CreateTopicsResponse>().prop_map(Response::from),
        any::<DeleteTopicsResponse>().prop_map(Response::from),
        any::<ListTopicsResponse>().prop_map(Response::from),
        any::<DescribeTopicResponse>().prop_map(Response::from),
        any::<ProduceResponse>().prop_map(Response::from),
        any::<FetchResponse>().prop_map(Response::from),
        any::<ListOffsetsResponse>().prop_map(Response::from),
        any::<InitProducerIdResponse>().prop_map(Response::from),
        any::<ConsumerGroupHeartbeatResponse>().prop_map(Response::from),
        any::<LeaveGroupResponse>().prop_map(Response::from),
        any::<CommitOffsetsResponse>().prop_map(Response::from),
        any::<FetchOffsetsResponse>().prop_map(Response::from),
        any::<DescribeGroupResponse>().prop_map(Response::from),
        any::<ListGroupsResponse>().prop_map(Response::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn request_frames_round_trip_and_every_truncation_is_clean(
        request in any_request(),
        correlation_id in any::<u32>(),
    ) {
        let mut wire = BytesMut::new();
        request.encode_frame(correlation_id, &mut wire);
        // Every strict prefix of the stream is "need more bytes".
        for cut in 0..wire.len() {
            let mut partial = BytesMut::from(&wire[..cut]);
            let mut decoder = FrameDecoder::for_requests(u32::MAX);
            prop_assert_eq!(decoder.decode(&mut partial).unwrap(), None);
        }
        let mut stream = wire.clone();
        let mut decoder = FrameDecoder::for_requests(u32::MAX);
        let frame = decoder.decode(&mut stream).unwrap().expect("whole frame");
        prop_assert!(stream.is_empty());
        let frame = frame.freeze();
        // Every strict prefix of the frame fails to decode, never panics: no api at its
        // current version takes a shorter body (an empty body is valid only for the apis that
        // have one, and those have nothing to cut past the header). Older versions do take
        // shorter bodies (InitProducerId v0 has no `current`), but a prefix keeps the header's
        // version. Once the header is whole, the error carries it, for the error answer.
        for cut in 0..frame.len() {
            match decode_request(frame.slice(..cut)) {
                Ok((header, decoded)) => prop_assert!(
                    false,
                    "{} of {} bytes decoded as {:?} (header {:?})",
                    cut,
                    frame.len(),
                    decoded,
                    header
                ),
                Err(error) if cut >= crate::frame::REQUEST_HEADER_BYTES => prop_assert_eq!(
                    error.header.map(|header| (header.correlation_id, header.api_key)),
                    Some((correlation_id, request.api_key().code()))
                ),
                Err(_) => {}
            }
        }
        let (header, decoded) = decode_request(frame).unwrap();
        prop_assert_eq!(header.correlation_id, correlation_id);
        prop_assert_eq!(header.api_key, request.api_key().code());
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn response_frames_round_trip(response in any_response(), correlation_id in any::<u32>()) {
        let mut wire = BytesMut::new();
        response.encode_frame(correlation_id, &mut wire);
        let mut decoder = FrameDecoder::for_responses(u32::MAX);
        let frame = decoder.decode(&mut wire).unwrap().expect("whole frame").freeze();
        let (header, body) = decode_response_header(frame).unwrap();
        prop_assert_eq!(header.correlation_id, correlation_id);
        prop_assert_eq!(header.error_code, ErrorCode::None);
        prop_assert_eq!(Response::decode(response.api_key(), body).unwrap(), response);
    }

    #[test]
    fn frames_in_parts_are_the_same_bytes(
        request in any_request(),
        response in any_response(),
        correlation_id in any::<u32>(),
    ) {
        let mut wire = BytesMut::new();
        request.encode_frame(correlation_id, &mut wire);
        prop_assert_eq!(&request.encode_frame_parts(correlation_id).concat()[..], &wire[..]);
        let mut wire = BytesMut::new();
        response.encode_frame(correlation_id, &mut wire);
        prop_assert_eq!(&response.encode_frame_parts(correlation_id).concat()[..], &wire[..]);
    }

    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_request(Bytes::from(bytes.clone()));
        for api_key in ApiKey::ALL {
            let _ = Response::decode(*api_key, Bytes::from(bytes.clone()));
        }
    }

    #[test]
    fn random_bodies_behind_valid_headers_never_panic(
        api_key in 0u16..18,
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut frame = BytesMut::new();
        RequestHeader { api_key, api_version: 0, correlation_id: 1, flags: 0 }.encode(&mut frame);
        frame.put_slice(&bytes);
        if let Err(error) = decode_request(frame.freeze()) {
            prop_assert_eq!(error.header.map(|header| header.correlation_id), Some(1));
        }
    }
}

#[test]
fn exact_frame_of_an_api_versions_request() {
    let mut wire = BytesMut::new();
    Request::from(ApiVersionsRequest {}).encode_frame(0x2a, &mut wire);
    assert_eq!(&wire[..], &[0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0]);
}

#[test]
fn unknown_api_key_gets_an_error_response_with_its_correlation_id() {
    let mut frame = BytesMut::new();
    RequestHeader {
        api_key: 999,
        api_version: 0,
        correlation_id: 77,
        flags: 0,
    }
    .encode(&mut frame);
    frame.put_slice(b"whatever");
    let error = decode_request(frame.freeze()).unwrap_err();
    assert_eq!(error.error, WireError::UnknownApiKey(999));
    assert_eq!(error.error_code(), ErrorCode::UnknownApiKey);
    let mut response = BytesMut::new();
    error.encode_response(&mut response);
    assert_eq!(&response[..], &[0, 0, 0, 6, 0, 0, 0, 77, 0, 8]);
}

#[test]
fn unsupported_version_gets_an_error_response() {
    let mut frame = BytesMut::new();
    RequestHeader {
        api_key: ApiKey::Fetch.code(),
        api_version: 9,
        correlation_id: 5,
        flags: 0,
    }
    .encode(&mut frame);
    let error = decode_request(frame.freeze()).unwrap_err();
    assert_eq!(error.error_code(), ErrorCode::UnsupportedVersion);
    assert_eq!(error.header.unwrap().correlation_id, 5);
}

#[test]
fn undecodable_body_is_invalid_request() {
    let mut frame = BytesMut::new();
    RequestHeader {
        api_key: ApiKey::DescribeTopic.code(),
        api_version: 0,
        correlation_id: 3,
        flags: 0,
    }
    .encode(&mut frame);
    frame.put_u16(10); // a 10-byte name, but only 2 bytes follow
    frame.put_slice(b"ab");
    let error = decode_request(frame.freeze()).unwrap_err();
    assert_eq!(error.error_code(), ErrorCode::InvalidRequest);
}

#[test]
fn api_keys_round_trip_and_are_pinned() {
    for key in ApiKey::ALL {
        assert_eq!(ApiKey::from_code(key.code()), Some(*key));
    }
    assert_eq!(ApiKey::Produce.code(), 6);
    assert_eq!(ApiKey::Fetch.code(), 7);
    assert_eq!(ApiKey::from_code(1000), None);
}

/// Record batches of at least [`FrameParts::SHARE_AT_LEAST`] bytes become parts of their own,
/// the very same buffers, and the parts still make the frame `encode_frame` writes.
#[test]
fn large_record_fields_are_shared_not_copied() {
    let big = Bytes::from(vec![7u8; FrameParts::SHARE_AT_LEAST + 5]);
    let small = Bytes::from(vec![9u8; 100]);
    let request = Request::from(ProduceRequest {
        acks: Acks::Leader,
        timeout_ms: 5,
        topics: vec![ProduceTopic {
            name: "t".into(),
            partitions: vec![
                ProducePartition {
                    partition: 0,
                    records: big.clone(),
                },
                ProducePartition {
                    partition: 1,
                    records: small.clone(),
                },
            ],
        }],
    });
    let parts = request.encode_frame_parts(3);
    let mut wire = BytesMut::new();
    request.encode_frame(3, &mut wire);
    assert_eq!(parts.concat(), wire.to_vec());
    assert_eq!(
        parts.len(),
        4,
        "prefix, fields, the big batch, the rest: {parts:?}"
    );
    assert_eq!(parts[0].len(), crate::frame::LENGTH_PREFIX_BYTES);
    assert_eq!(
        parts[2].as_ptr(),
        big.as_ptr(),
        "the batch itself, not a copy"
    );
    let response = Response::from(FetchResponse {
        topics: vec![FetchTopicResponse {
            name: "t".into(),
            partitions: vec![FetchPartitionResponse {
                partition: 0,
                error_code: ErrorCode::None,
                high_watermark: 10,
                log_start_offset: 0,
                records: big.clone(),
            }],
        }],
    });
    let parts = response.encode_frame_parts(4);
    let mut wire = BytesMut::new();
    response.encode_frame(4, &mut wire);
    assert_eq!(parts.concat(), wire.to_vec());
    assert_eq!(parts.last().unwrap().as_ptr(), big.as_ptr());
    // Without a large field the frame is one part.
    assert_eq!(
        Request::from(ListTopicsRequest {})
            .encode_frame_parts(1)
            .len(),
        1
    );
}
