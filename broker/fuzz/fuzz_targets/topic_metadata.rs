//! Arbitrary bytes as a `topic.toml`. Nothing may panic; a file that is accepted has a
//! partition count within `max_partitions_per_topic`, and encoding it gives a file that
//! decodes to the same metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::fuzzing::{decode_topic_metadata, encode_topic_metadata};
use sluice_broker::storage::LogConfig;

const MAX_PARTITIONS_PER_TOPIC: u32 = 1024;

fuzz_target!(|data: &[u8]| {
    let defaults = LogConfig::default();
    let Ok(metadata) = decode_topic_metadata(data, MAX_PARTITIONS_PER_TOPIC, &defaults) else {
        return;
    };
    assert!((1..=MAX_PARTITIONS_PER_TOPIC).contains(&metadata.partitions));
    let text = encode_topic_metadata(&metadata);
    let again = decode_topic_metadata(text.as_bytes(), MAX_PARTITIONS_PER_TOPIC, &defaults)
        .expect("an encoded topic.toml decodes");
    assert_eq!(again, metadata, "topic metadata changed in a round trip");
});
