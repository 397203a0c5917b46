//! ListOffsets (key 8): a partition's earliest or latest offset, or the first offset at or
//! after a timestamp.
//!
//! ```text
//! request v0:   topics array { name string,
//!                              partitions array { partition u32, spec i64 } }
//!               spec: -2 earliest, -1 latest, >= 0 a timestamp in ms
//! request v1:   as v0; spec may also be -3 durable: the offset below which every record is
//!               fsynced (at most the latest)
//! response v0:  topics array { name string,
//!                              partitions array { partition u32, error_code u16,
//!                                                 offset u64, timestamp i64 } }
//! ```
//!
//! For a timestamp past every record the answer is the latest offset (the next one to be
//! written), with timestamp -1.

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_string};

/// Which offset to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum OffsetSpec {
    /// The first offset still in the log.
    Earliest,
    /// The offset the next record will get.
    Latest,
    /// The first offset whose timestamp is at or after this many ms since the Unix epoch.
    Timestamp(#[cfg_attr(test, proptest(strategy = "0i64.."))] i64),
    /// The offset below which every record is fsynced (v1): what survives a power loss. At
    /// most the latest; behind it while records wait for their fsync.
    Durable,
}

impl OffsetSpec {
    const EARLIEST: i64 = -2;
    const LATEST: i64 = -1;
    const DURABLE: i64 = -3;

    pub fn to_wire(self) -> i64 {
        match self {
            OffsetSpec::Earliest => Self::EARLIEST,
            OffsetSpec::Latest => Self::LATEST,
            OffsetSpec::Timestamp(timestamp_ms) => timestamp_ms,
            OffsetSpec::Durable => Self::DURABLE,
        }
    }

    /// The current version's spec.
    pub fn from_wire(value: i64) -> Result<Self, WireError> {
        Self::from_wire_version(value, 1)
    }

    fn from_wire_version(value: i64, version: u16) -> Result<Self, WireError> {
        match value {
            Self::EARLIEST => Ok(OffsetSpec::Earliest),
            Self::LATEST => Ok(OffsetSpec::Latest),
            Self::DURABLE if version >= 1 => Ok(OffsetSpec::Durable),
            timestamp_ms if timestamp_ms >= 0 => Ok(OffsetSpec::Timestamp(timestamp_ms)),
            other => Err(WireError::invalid("offset spec", other.to_string())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsPartition {
    pub partition: u32,
    pub spec: OffsetSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsTopic {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ListOffsetsPartition>(), 0..4)"
        )
    )]
    pub partitions: Vec<ListOffsetsPartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsRequest {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ListOffsetsTopic>(), 0..4)"
        )
    )]
    pub topics: Vec<ListOffsetsTopic>,
}

impl Body for ListOffsetsRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_i64(partition.spec.to_wire());
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Self::decode_version(src, 1)
    }

    fn decode_version(src: &mut Reader, version: u16) -> Result<Self, WireError> {
        Ok(ListOffsetsRequest {
            topics: src.array("topics", 6, |src| {
                Ok(ListOffsetsTopic {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 12, |src| {
                        Ok(ListOffsetsPartition {
                            partition: src.u32("partition")?,
                            spec: OffsetSpec::from_wire_version(src.i64("spec")?, version)?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsPartitionResponse {
    pub partition: u32,
    pub error_code: ErrorCode,
    pub offset: u64,
    /// The timestamp of the record found, or -1.
    pub timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsTopicResponse {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ListOffsetsPartitionResponse>(), 0..4)"
        )
    )]
    pub partitions: Vec<ListOffsetsPartitionResponse>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListOffsetsResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ListOffsetsTopicResponse>(), 0..4)"
        )
    )]
    pub topics: Vec<ListOffsetsTopicResponse>,
}

impl Body for ListOffsetsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u16(partition.error_code.code());
                dst.put_u64(partition.offset);
                dst.put_i64(partition.timestamp);
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ListOffsetsResponse {
            topics: src.array("topics", 6, |src| {
                Ok(ListOffsetsTopicResponse {
                    name: src.string("name")?,
                    partitions: src.array("partitions", 22, |src| {
                        Ok(ListOffsetsPartitionResponse {
                            partition: src.u32("partition")?,
                            error_code: ErrorCode::from_code(src.u16("error_code")?),
                            offset: src.u64("offset")?,
                            timestamp: src.i64("timestamp")?,
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

    round_trip_tests!(request: ListOffsetsRequest, response: ListOffsetsResponse);

    #[test]
    fn the_durable_spec_is_v1_only() {
        let request = ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: "t".into(),
                partitions: vec![ListOffsetsPartition {
                    partition: 0,
                    spec: OffsetSpec::Durable,
                }],
            }],
        };
        let bytes = bytes::Bytes::from(encoded(&request));
        assert_eq!(
            ListOffsetsRequest::decode_exact_version(bytes.clone(), 1).unwrap(),
            request
        );
        assert!(ListOffsetsRequest::decode_exact_version(bytes, 0).is_err());
    }

    #[test]
    fn exact_request_bytes() {
        let request = ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: "t".into(),
                partitions: vec![
                    ListOffsetsPartition {
                        partition: 0,
                        spec: OffsetSpec::Earliest,
                    },
                    ListOffsetsPartition {
                        partition: 1,
                        spec: OffsetSpec::Timestamp(258),
                    },
                ],
            }],
        };
        assert_eq!(
            encoded(&request),
            [
                0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 2, //
                0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, //
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2,
            ]
        );
    }

    #[test]
    fn negative_timestamps_other_than_markers_refused() {
        assert!(OffsetSpec::from_wire(-4).is_err());
        assert!(OffsetSpec::from_wire(i64::MIN).is_err());
        assert!(OffsetSpec::from_wire_version(-3, 0).is_err());
        assert_eq!(OffsetSpec::from_wire(-3).unwrap(), OffsetSpec::Durable);
        assert_eq!(OffsetSpec::from_wire(-1).unwrap(), OffsetSpec::Latest);
    }
}
