use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

type OwnedRecord = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

fn build(records: &[OwnedRecord]) -> RecordBatch {
    let mut builder = RecordBatchBuilder::new();
    for (timestamp, key, value, headers) in records {
        let headers: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect();
        builder.append(*timestamp, key.as_deref(), value, &headers);
    }
    builder.build()
}

fn record_strategy() -> impl Strategy<Value = OwnedRecord> {
    (
        1_600_000_000_000i64..1_900_000_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::collection::vec(any::<u8>(), 0..200),
        proptest::collection::vec(
            (
                "[a-z-]{0,12}",
                proptest::collection::vec(any::<u8>(), 0..16),
            ),
            0..4,
        ),
    )
}

/// Recomputes the CRC after a test edits covered bytes, to reach the checks behind it.
fn recompute_crc(buf: &mut [u8]) {
    let crc = crc32c::crc32c(&buf[CRC_START..]);
    buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

fn assert_decodes_to(batch: &RecordBatch, records: &[OwnedRecord]) {
    batch.validate().expect("built batch validates");
    assert_eq!(batch.record_count() as usize, records.len());
    let decoded: Vec<Record<'_>> = batch.records().map(Result::unwrap).collect();
    assert_eq!(decoded.len(), records.len());
    for (index, (record, (timestamp, key, value, headers))) in
        decoded.iter().zip(records).enumerate()
    {
        assert_eq!(record.offset_delta as usize, index);
        assert_eq!(record.timestamp_ms, *timestamp);
        assert_eq!(record.key, key.as_deref());
        assert_eq!(record.value, value.as_slice());
        let got: Vec<(String, Vec<u8>)> = record
            .headers()
            .map(|header| header.map(|(k, v)| (k.to_owned(), v.to_vec())).unwrap())
            .collect();
        assert_eq!(&got, headers);
    }
}

#[test]
fn exact_bytes_of_a_small_batch() {
    let batch = build(&[(1000, Some(b"k".to_vec()), b"v".to_vec(), vec![])]);
    let bytes = batch.as_bytes();
    let mut expected = vec![
        0, 0, 0, 0, 0, 0, 0, 0, // base_offset
        0, 0, 0, 62, // batch_length: 65 + 9 - 12
        0, 0, 0, 0, // leader_epoch
        1, // magic
        0, 0, 0, 0, // crc, filled below
        0, 0, // attributes
        0, 0, 0, 0, // last_offset_delta
        0, 0, 0, 0, 0, 0, 0x03, 0xe8, // base_timestamp 1000
        0, 0, 0, 0, 0, 0, 0x03, 0xe8, // max_timestamp 1000
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // producer_id: none
        0xff, 0xff, // producer_epoch: none
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // base_sequence: none
        0, 0, 0, 1, // record_count
        // record: length 8 (zig-zag 16), attributes, ts delta 0, offset delta 0,
        // key length 1 (zig-zag 2), "k", value length 1, "v", header count 0
        16, 0, 0, 0, 2, b'k', 2, b'v', 0,
    ];
    assert_eq!(expected.len(), 74);
    expected[17..21].copy_from_slice(&0x5794_b274u32.to_be_bytes());
    assert_eq!(
        &bytes[..],
        &expected[..],
        "crc is {:#010x}",
        batch.view().crc()
    );
}

#[test]
fn header_fields_read_back() {
    let mut builder = RecordBatchBuilder::new().producer(42, 3, 1_000_000);
    builder.append(10, None, b"a", &[]);
    builder.append(7, None, b"b", &[("h", b"1")]);
    builder.append(30, Some(b""), b"", &[]);
    let batch = builder.build();
    let view = batch.view();
    assert_eq!(view.magic(), MAGIC);
    assert_eq!(view.record_count(), 3);
    assert_eq!(view.last_offset_delta(), 2);
    assert_eq!(view.base_timestamp(), 10);
    assert_eq!(view.max_timestamp(), 30);
    assert_eq!(view.producer_id(), 42);
    assert_eq!(view.producer_epoch(), 3);
    assert_eq!(view.base_sequence(), 1_000_000);
    assert!(view.has_producer_id());
    assert_eq!(view.size_bytes(), batch.size_bytes());
    batch.validate().unwrap();
    let records: Vec<_> = batch.records().map(Result::unwrap).collect();
    assert_eq!(records[1].timestamp_ms, 7, "negative timestamp delta");
    assert_eq!(
        records[2].key,
        Some(&b""[..]),
        "empty key is not a null key"
    );
    assert_eq!(records[0].key, None);
}

#[test]
fn stamping_keeps_the_crc_valid() {
    let batch = build(&[(5, None, b"x".to_vec(), vec![])]);
    let stamped = batch.clone().stamped(123_456, 9);
    assert_eq!(stamped.base_offset(), 123_456);
    assert_eq!(stamped.view().leader_epoch(), 9);
    assert_eq!(stamped.last_offset(), 123_456);
    stamped.validate().unwrap();
    assert_eq!(stamped.view().crc(), batch.view().crc());
    let mut raw = BytesMut::from(&batch.as_bytes()[..]);
    stamp_base_offset(&mut raw, 7).unwrap();
    stamp_leader_epoch(&mut raw, 1).unwrap();
    RecordBatchRef::new(&raw).unwrap().validate().unwrap();
    assert!(stamp_base_offset(&mut raw[..20], 1).is_err());
}

#[test]
fn stamping_a_unique_buffer_does_not_copy() {
    let batch = build(&[(5, None, vec![1; 100], vec![])]);
    let before = batch.as_bytes().as_ptr();
    let stamped = batch.stamped(1, 0);
    assert_eq!(stamped.as_bytes().as_ptr(), before);
}

#[test]
fn thousands_of_records() {
    let records: Vec<OwnedRecord> = (0..5000)
        .map(|index| {
            let key = (index % 3 != 0).then(|| format!("key-{index}").into_bytes());
            let headers = if index % 7 == 0 {
                vec![("trace".to_owned(), index.to_string().into_bytes())]
            } else {
                vec![]
            };
            (
                1_700_000_000_000 + index as i64,
                key,
                vec![index as u8; 100],
                headers,
            )
        })
        .collect();
    let batch = build(&records);
    assert_decodes_to(&batch, &records);
    assert_eq!(batch.last_offset(), 4999);
}

#[test]
fn wrong_record_count_is_caught_even_with_a_fresh_crc() {
    let batch = build(&[
        (1, None, b"a".to_vec(), vec![]),
        (2, None, b"b".to_vec(), vec![]),
    ]);
    for count in [0u32, 1, 3, u32::MAX] {
        let mut raw = batch.as_bytes().to_vec();
        raw[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
        recompute_crc(&mut raw);
        let error = RecordBatchRef::new(&raw).unwrap().validate().unwrap_err();
        assert!(
            matches!(error, WireError::CorruptBatch(_)),
            "count {count}: {error}"
        );
    }
}

#[test]
fn wrong_offset_delta_is_caught_even_with_a_fresh_crc() {
    let batch = build(&[
        (1, None, b"a".to_vec(), vec![]),
        (1, None, b"b".to_vec(), vec![]),
    ]);
    let mut raw = batch.as_bytes().to_vec();
    // Second record: length, attributes, timestamp delta, then its offset delta (zig-zag 1 = 2).
    let second = HEADER_BYTES + 8;
    assert_eq!(raw[second + 3], 2);
    raw[second + 3] = 4;
    recompute_crc(&mut raw);
    let error = RecordBatchRef::new(&raw).unwrap().validate().unwrap_err();
    assert!(error.to_string().contains("offset_delta"), "{error}");
}

#[test]
fn wrong_max_timestamp_and_last_offset_delta_are_caught() {
    let batch = build(&[(1, None, b"a".to_vec(), vec![])]);
    let mut raw = batch.as_bytes().to_vec();
    raw[MAX_TIMESTAMP_AT + 7] = 9;
    recompute_crc(&mut raw);
    assert!(RecordBatchRef::new(&raw).unwrap().validate().is_err());
    let mut raw = batch.as_bytes().to_vec();
    raw[LAST_OFFSET_DELTA_AT + 3] = 1;
    recompute_crc(&mut raw);
    assert!(RecordBatchRef::new(&raw).unwrap().validate().is_err());
}

#[test]
fn compression_and_unknown_attributes_refused() {
    let batch = build(&[(1, None, b"a".to_vec(), vec![])]);
    for attributes in [1u16, 0x10, 0x8000] {
        let mut raw = batch.as_bytes().to_vec();
        raw[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
        recompute_crc(&mut raw);
        assert!(RecordBatchRef::new(&raw).unwrap().validate().is_err());
    }
}

#[test]
fn split_batches_walks_back_to_back_batches() {
    let first = build(&[(1, None, b"a".to_vec(), vec![])]).stamped(0, 0);
    let second = build(&[
        (2, None, b"b".to_vec(), vec![]),
        (3, None, b"c".to_vec(), vec![]),
    ])
    .stamped(1, 0);
    let mut joined = first.as_bytes().to_vec();
    joined.extend_from_slice(second.as_bytes());
    let batches: Vec<_> = split_batches(&joined).map(Result::unwrap).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].base_offset(), 1);
    assert_eq!(batches[1].last_offset(), 2);
    // A cut anywhere inside the second batch yields the first, then an error.
    for cut in first.size_bytes() + 1..joined.len() {
        let results: Vec<_> = split_batches(&joined[..cut]).collect();
        assert_eq!(results.len(), 2, "cut at {cut}");
        assert!(results[0].is_ok());
        assert!(results[1].is_err());
    }
}

#[test]
fn every_truncation_of_a_batch_is_refused() {
    let batch = build(&[(
        1,
        Some(b"key".to_vec()),
        b"value".to_vec(),
        vec![("h".into(), b"v".to_vec())],
    )]);
    let bytes = batch.as_bytes();
    for cut in 0..bytes.len() {
        assert!(RecordBatchRef::new(&bytes[..cut]).is_err(), "cut at {cut}");
        assert!(RecordBatch::new(bytes.slice(..cut)).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn batches_round_trip(records in proptest::collection::vec(record_strategy(), 1..60)) {
        let batch = build(&records);
        assert_decodes_to(&batch, &records);
        let reparsed = RecordBatch::new(batch.as_bytes().clone()).unwrap();
        prop_assert_eq!(reparsed, batch);
    }

    #[test]
    fn every_byte_flip_outside_the_stamped_fields_is_caught(
        records in proptest::collection::vec(record_strategy(), 1..6),
        flip in 1u8..=255,
    ) {
        let batch = build(&records);
        let original = batch.as_bytes().to_vec();
        for position in 0..original.len() {
            let mut raw = original.clone();
            raw[position] ^= flip;
            let stamped_field = (BASE_OFFSET_AT..BASE_OFFSET_AT + 8).contains(&position)
                || (LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4).contains(&position);
            let verdict = RecordBatchRef::new(&raw).and_then(|view| view.validate());
            if stamped_field {
                // By design outside the CRC: the broker overwrites them on append.
                prop_assert!(verdict.is_ok(), "stamped byte {} rejected", position);
            } else {
                prop_assert!(verdict.is_err(), "flip {:#04x} at byte {} not caught", flip, position);
            }
        }
    }

    #[test]
    fn validate_never_panics_on_random_bytes(
        mut raw in proptest::collection::vec(any::<u8>(), HEADER_BYTES..400),
        fix_crc in any::<bool>(),
    ) {
        // Make the header plausible so the random tail reaches the record decoder.
        let length = (raw.len() - LOG_OVERHEAD_BYTES) as u32;
        raw[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
        raw[MAGIC_AT] = MAGIC;
        if fix_crc {
            recompute_crc(&mut raw);
        }
        let view = RecordBatchRef::new(&raw).unwrap();
        let _ = view.validate();
        for record in view.records().flatten() {
            for header in record.headers() {
                let _ = header;
            }
        }
        for batch in split_batches(&raw) {
            let _ = batch.map(|batch| batch.validate());
        }
    }
}

/// The fast record decoder and the detailed one give the same answer: the same record and
/// length, or both a refusal. `Records` and `validate` take the fast one's word and ask the
/// detailed one only why.
fn assert_decoders_agree(src: &[u8], base_timestamp: i64) {
    let fast = decode_record_fast(src, base_timestamp);
    let detailed = decode_record(src, base_timestamp);
    match (&fast, &detailed) {
        (Some(fast), Ok(detailed)) => assert_eq!(fast, detailed, "bytes {src:02x?}"),
        (None, Err(_)) => {}
        _ => panic!("fast {fast:?}, detailed {detailed:?}, bytes {src:02x?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A record followed by a few more bytes (as the next record would), with each byte in
    /// turn moved by one or two (a length one off reaches into what follows) or replaced by a value
    /// at a varint's edges, and cut at every length.
    #[test]
    fn record_decoders_agree_on_edited_records(
        record in record_strategy(),
        after in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let batch = build(std::slice::from_ref(&record));
        let mut bytes = batch.as_bytes()[HEADER_BYTES..].to_vec();
        bytes.extend_from_slice(&after);
        let base_timestamp = record.0;
        for at in 0..bytes.len() {
            let original = bytes[at];
            // Zig-zag: two apart in a varint's first byte is one apart in its value.
            let edits = [
                original.wrapping_add(1),
                original.wrapping_sub(1),
                original.wrapping_add(2),
                original.wrapping_sub(2),
                0x00,
                0x01,
                0x7f,
                0x80,
                0xff,
            ];
            for edit in edits {
                bytes[at] = edit;
                assert_decoders_agree(&bytes, base_timestamp);
            }
            bytes[at] = original;
        }
        for cut in 0..=bytes.len() {
            assert_decoders_agree(&bytes[..cut], base_timestamp);
        }
    }

    #[test]
    fn record_decoders_agree_on_random_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        base_timestamp in any::<i64>(),
    ) {
        assert_decoders_agree(&bytes, base_timestamp);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `try_append` takes a record exactly when `record_size_bytes` says it fits, and builds
    /// the same bytes as `append`.
    #[test]
    fn try_append_fills_a_batch_to_its_limit_and_no_further(
        records in proptest::collection::vec(record_strategy(), 1..40),
        limit in HEADER_BYTES..4_000usize,
    ) {
        let mut bounded = RecordBatchBuilder::new();
        let mut taken = Vec::new();
        for (timestamp, key, value, headers) in &records {
            let headers: Vec<(&str, &[u8])> = headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_slice()))
                .collect();
            let size = bounded.record_size_bytes(*timestamp, key.as_deref(), value, &headers);
            let fits = bounded.size_bytes() + size <= limit;
            let before = bounded.size_bytes();
            let took = bounded.try_append(limit, *timestamp, key.as_deref(), value, &headers);
            prop_assert_eq!(took, fits);
            if !took {
                prop_assert_eq!(bounded.size_bytes(), before, "a refused record left bytes");
                break;
            }
            prop_assert!(bounded.size_bytes() <= limit);
            taken.push((*timestamp, key.clone(), value.clone(), headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.to_vec()))
                .collect::<Vec<_>>()));
        }
        if !taken.is_empty() {
            let batch = bounded.build();
            let expected = build(&taken);
            prop_assert_eq!(batch.as_bytes(), expected.as_bytes());
            assert_decodes_to(&batch, &taken);
        }
    }
}

#[test]
fn try_append_refuses_a_timestamp_too_far_from_the_batch_first_and_a_new_batch_takes_it() {
    let mut builder = RecordBatchBuilder::new();
    builder.append(i64::MIN, None, b"oldest", &[]);
    assert!(!builder.try_append(usize::MAX, 1, None, b"now", &[]));
    assert!(builder.try_append(usize::MAX, i64::MIN + 5, None, b"near", &[]));
    let batch = builder.build();
    batch.validate().unwrap();
    assert_eq!(batch.view().record_count(), 2);
    let mut fresh = RecordBatchBuilder::new();
    assert!(fresh.try_append(usize::MAX, 1, None, b"now", &[]));
    fresh.build().validate().unwrap();
}

#[test]
fn a_batch_built_in_a_reused_buffer_is_the_batch_built_fresh() {
    let build = |builder: RecordBatchBuilder| {
        let mut builder = builder.producer(9, 2, 40);
        builder.append(1_000, Some(b"k"), b"first", &[("h", b"v")]);
        builder.append(1_005, None, b"second", &[]);
        builder.build()
    };
    let fresh = build(RecordBatchBuilder::with_capacity(64));
    let mut old = RecordBatchBuilder::new();
    old.append(7, None, &[0xAB; 300], &[]);
    let buffer = old
        .build()
        .try_into_buffer()
        .expect("nothing else holds it");
    let pointer = buffer.as_ptr();
    let reused = build(RecordBatchBuilder::with_buffer(buffer, 64));
    assert_eq!(reused.as_bytes(), fresh.as_bytes());
    assert_eq!(
        reused.as_bytes().as_ptr(),
        pointer,
        "built in the same memory"
    );
    reused.validate().unwrap();

    let shared = fresh.as_bytes().clone();
    let fresh = fresh.try_into_buffer().expect_err("its bytes are shared");
    assert_eq!(fresh.as_bytes(), &shared);
}
