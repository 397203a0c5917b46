//! Produce (key 6): append one record batch to each of many partitions.
//!
//! ```text
//! request v0:   acks u8 (0 none, 1 leader, 2 durable), timeout_ms u32
//!               topics array { name string,
//!                              partitions array { partition u32, records bytes } }
//! response v0:  topics array { name string,
//!                              partitions array { partition u32, error_code u16,
//!                                                 base_offset u64, log_start_offset u64,
//!                                                 error_message nullable string } }
//! ```
//!
//! `records` holds exactly one record batch (see [`crate::batch`]); it is decoded as a
//! zero-copy slice of the frame and validated by the broker per partition, so one corrupt batch
//! fails only its own partition. A request with `acks = none` gets no response frame at all.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Body, BodySink, FrameParts};
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_nullable_string, put_string};

/// When the broker answers a produce.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Acks {
    /// No answer at all: fire and forget.
    None = 0,
    /// Once the batch is in the log (the page cache), before any fsync.
    Leader = 1,
    /// Once the batch is fsynced to disk. The default: safe first.
    #[default]
    Durable = 2,
}

impl Acks {
    pub fn from_code(code: u8) -> Result<Acks, WireError> {
        match code {
            0 => Ok(Acks::None),
            1 => Ok(Acks::Leader),
            2 => Ok(Acks::Durable),
            other => Err(WireError::invalid(
                "acks",
                format!("{other} (expected 0, 1 or 2)"),
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProducePartition {
    pub partition: u32,
    /// One encoded record batch.
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::bytes()"))]
    pub records: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProduceTopic {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ProducePartition>(), 0..4)"
        )
    )]
    pub partitions: Vec<ProducePartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProduceRequest {
    pub acks: Acks,
    /// How long the broker may wait for durability before answering `RequestTimedOut`.
    pub timeout_ms: u32,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ProduceTopic>(), 0..4)"
        )
    )]
    pub topics: Vec<ProduceTopic>,
}

impl ProduceRequest {
    fn encode_into(&self, dst: &mut impl BodySink) {
        let small = dst.small();
        small.put_u8(self.acks as u8);
        small.put_u32(self.timeout_ms);
        put_count(small, self.topics.len());
        for topic in &self.topics {
            let small = dst.small();
            put_string(small, &topic.name);
            put_count(small, topic.partitions.len());
            for partition in &topic.partitions {
                dst.small().put_u32(partition.partition);
                dst.put_shared(&partition.records);
            }
        }
    }
}

impl Body for ProduceRequest {
    fn encode(&self, dst: &mut BytesMut) {
        self.encode_into(dst);
    }

    fn encode_parts(&self, dst: &mut FrameParts) {
        self.encode_into(dst);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ProduceRequest {
            acks: Acks::from_code(src.u8("acks")?)?,
            timeout_ms: src.u32("timeout_ms")?,
            topics: src.array("topics", 6, |src| {
                Ok(ProduceTopic {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 8, |src| {
                        Ok(ProducePartition {
                            partition: src.u32("partition")?,
                            records: src.bytes("records")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProducePartitionResponse {
    pub partition: u32,
    pub error_code: ErrorCode,
    /// Offset given to the batch's first record (meaningful when `error_code` is `None` or
    /// `DuplicateSequence`).
    pub base_offset: u64,
    pub log_start_offset: u64,
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::messages::test_support::name())")
    )]
    pub error_message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProduceTopicResponse {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ProducePartitionResponse>(), 0..4)"
        )
    )]
    pub partitions: Vec<ProducePartitionResponse>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProduceResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ProduceTopicResponse>(), 0..4)"
        )
    )]
    pub topics: Vec<ProduceTopicResponse>,
}

impl Body for ProduceResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u16(partition.error_code.code());
                dst.put_u64(partition.base_offset);
                dst.put_u64(partition.log_start_offset);
                put_nullable_string(dst, partition.error_message.as_deref());
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ProduceResponse {
            topics: src.array("topics", 6, |src| {
                Ok(ProduceTopicResponse {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 24, |src| {
                        Ok(ProducePartitionResponse {
                            partition: src.u32("partition")?,
                            error_code: ErrorCode::from_code(src.u16("error_code")?),
                            base_offset: src.u64("base_offset")?,
                            log_start_offset: src.u64("log_start_offset")?,
                            error_message: src.nullable_string("error_message")?,
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

    round_trip_tests!(request: ProduceRequest, response: ProduceResponse);

    #[test]
    fn exact_request_bytes() {
        let request = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 500,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 2,
                    records: Bytes::from_static(b"RB"),
                }],
            }],
        };
        assert_eq!(
            encoded(&request),
            [
                1, 0, 0, 1, 0xf4, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, b'R',
                b'B'
            ]
        );
    }

    #[test]
    fn unknown_acks_refused() {
        let mut body = BytesMut::new();
        body.put_u8(3);
        body.put_u32(0);
        body.put_u32(0);
        assert!(ProduceRequest::decode_exact(body.freeze()).is_err());
    }

    #[test]
    fn records_are_a_slice_of_the_frame() {
        let request = ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 0,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: Bytes::from_static(&[7; 100]),
                }],
            }],
        };
        let mut body = BytesMut::new();
        request.encode(&mut body);
        let body = body.freeze();
        let decoded = ProduceRequest::decode_exact(body.clone()).unwrap();
        let records = &decoded.topics[0].partitions[0].records;
        let start = records.as_ptr() as usize - body.as_ptr() as usize;
        assert!(start < body.len(), "records were copied out of the frame");
    }
}
