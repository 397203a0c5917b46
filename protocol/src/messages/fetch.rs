//! Fetch (key 7): read record batches from many partitions, long polling.
//!
//! ```text
//! request v0:   max_wait_ms u32, min_bytes u32, max_bytes u32
//!               topics array { name string,
//!                              partitions array { partition u32, fetch_offset u64,
//!                                                 partition_max_bytes u32 } }
//! response v0:  topics array { name string,
//!                              partitions array { partition u32, error_code u16,
//!                                                 high_watermark u64, log_start_offset u64,
//!                                                 records bytes } }
//! ```
//!
//! The broker waits up to `max_wait_ms` for `min_bytes` to be available, returns at most
//! `max_bytes` in all and `partition_max_bytes` per partition, but always at least one whole
//! batch for the first partition with data, however large, so a consumer never gets stuck.
//! `records` is zero or more whole record batches back to back; split them with
//! [`crate::batch::split_batches`].

use bytes::{BufMut, Bytes, BytesMut};

use super::{Body, BodySink, FrameParts};
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_string};

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchPartition {
    pub partition: u32,
    pub fetch_offset: u64,
    pub partition_max_bytes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchTopic {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<FetchPartition>(), 0..4)"
        )
    )]
    pub partitions: Vec<FetchPartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchRequest {
    pub max_wait_ms: u32,
    pub min_bytes: u32,
    pub max_bytes: u32,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<FetchTopic>(), 0..4)"
        )
    )]
    pub topics: Vec<FetchTopic>,
}

impl Body for FetchRequest {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(self.max_wait_ms);
        dst.put_u32(self.min_bytes);
        dst.put_u32(self.max_bytes);
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u64(partition.fetch_offset);
                dst.put_u32(partition.partition_max_bytes);
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(FetchRequest {
            max_wait_ms: src.u32("max_wait_ms")?,
            min_bytes: src.u32("min_bytes")?,
            max_bytes: src.u32("max_bytes")?,
            topics: src.array("topics", 6, |src| {
                Ok(FetchTopic {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 16, |src| {
                        Ok(FetchPartition {
                            partition: src.u32("partition")?,
                            fetch_offset: src.u64("fetch_offset")?,
                            partition_max_bytes: src.u32("partition_max_bytes")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchPartitionResponse {
    pub partition: u32,
    pub error_code: ErrorCode,
    /// The offset the next appended record will get.
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// Whole record batches, back to back.
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::bytes()"))]
    pub records: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchTopicResponse {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<FetchPartitionResponse>(), 0..4)"
        )
    )]
    pub partitions: Vec<FetchPartitionResponse>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct FetchResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<FetchTopicResponse>(), 0..4)"
        )
    )]
    pub topics: Vec<FetchTopicResponse>,
}

impl FetchResponse {
    /// Bytes of a response frame besides its records (after the length prefix, as
    /// `max_frame_bytes` counts): the response header, and per topic (its name, its number
    /// of partitions) their fields. A fetch asking for `max_bytes` of records gets a frame of
    /// at most that plus this.
    pub fn overhead_bytes<'a>(topics: impl IntoIterator<Item = (&'a str, usize)>) -> u64 {
        // Topic count; per topic its name (u16 length) and partition count; per partition
        // partition, error code, high watermark, log start offset and the records' length.
        const TOPICS_BYTES: u64 = 4;
        const TOPIC_BYTES: u64 = 2 + 4;
        const PARTITION_BYTES: u64 = 4 + 2 + 8 + 8 + 4;
        crate::frame::RESPONSE_HEADER_BYTES as u64
            + TOPICS_BYTES
            + topics
                .into_iter()
                .map(|(name, partitions)| {
                    TOPIC_BYTES + name.len() as u64 + PARTITION_BYTES * partitions as u64
                })
                .sum::<u64>()
    }

    fn encode_into(&self, dst: &mut impl BodySink) {
        put_count(dst.small(), self.topics.len());
        for topic in &self.topics {
            let small = dst.small();
            put_string(small, &topic.name);
            put_count(small, topic.partitions.len());
            for partition in &topic.partitions {
                let small = dst.small();
                small.put_u32(partition.partition);
                small.put_u16(partition.error_code.code());
                small.put_u64(partition.high_watermark);
                small.put_u64(partition.log_start_offset);
                dst.put_shared(&partition.records);
            }
        }
    }
}

impl Body for FetchResponse {
    fn encode(&self, dst: &mut BytesMut) {
        self.encode_into(dst);
    }

    fn encode_parts(&self, dst: &mut FrameParts) {
        self.encode_into(dst);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(FetchResponse {
            topics: src.array("topics", 6, |src| {
                Ok(FetchTopicResponse {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 26, |src| {
                        Ok(FetchPartitionResponse {
                            partition: src.u32("partition")?,
                            error_code: ErrorCode::from_code(src.u16("error_code")?),
                            high_watermark: src.u64("high_watermark")?,
                            log_start_offset: src.u64("log_start_offset")?,
                            records: src.bytes("records")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: FetchRequest, response: FetchResponse);

    #[test]
    fn a_response_frame_is_its_records_plus_the_overhead() {
        let partition = |records: &'static [u8]| FetchPartitionResponse {
            partition: 0,
            error_code: ErrorCode::None,
            high_watermark: 9,
            log_start_offset: 0,
            records: Bytes::from_static(records),
        };
        let response = FetchResponse {
            topics: vec![
                FetchTopicResponse {
                    name: "orders".into(),
                    partitions: vec![partition(b"abc"), partition(b"")],
                },
                FetchTopicResponse {
                    name: "t".into(),
                    partitions: vec![partition(b"0123456789")],
                },
            ],
        };
        let mut frame = BytesMut::new();
        crate::Response::Fetch(response).encode_frame(7, &mut frame);
        let after_prefix = frame.len() as u64 - crate::frame::LENGTH_PREFIX_BYTES as u64;
        let overhead = FetchResponse::overhead_bytes([("orders", 2), ("t", 1)]);
        assert_eq!(after_prefix, overhead + 13);
    }

    #[test]
    fn exact_request_bytes() {
        let request = FetchRequest {
            max_wait_ms: 100,
            min_bytes: 1,
            max_bytes: 1024,
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 1,
                    fetch_offset: 5,
                    partition_max_bytes: 256,
                }],
            }],
        };
        assert_eq!(
            encoded(&request),
            [
                0, 0, 0, 100, 0, 0, 0, 1, 0, 0, 4, 0, // wait, min, max
                0, 0, 0, 1, 0, 1, b't', // topics
                0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 1, 0, // partition
            ]
        );
    }
}
