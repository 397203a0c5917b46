//! DescribeTopic (key 5): one topic's partitions with their offsets and sizes, and its
//! configuration.
//!
//! ```text
//! request v0:   name string
//! response v0:  error_code u16, name string
//!               partitions array { partition u32, error_code u16, log_start_offset u64,
//!                                  high_watermark u64, size_bytes u64, segment_count u32 }
//!               configs array { key string, value string }
//! ```

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_string};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DescribeTopicRequest {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
}

impl Body for DescribeTopicRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_string(dst, &self.name);
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DescribeTopicRequest {
            name: src.string("name")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PartitionDescription {
    pub partition: u32,
    pub error_code: ErrorCode,
    /// The first offset still in the log.
    pub log_start_offset: u64,
    /// The offset the next appended record gets.
    pub high_watermark: u64,
    pub size_bytes: u64,
    pub segment_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DescribeTopicResponse {
    pub error_code: ErrorCode,
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<PartitionDescription>(), 0..4)"
        )
    )]
    pub partitions: Vec<PartitionDescription>,
    /// Effective configuration: overrides and defaults.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec((crate::messages::test_support::name(), crate::messages::test_support::name()), 0..3)"
        )
    )]
    pub configs: Vec<(String, String)>,
}

impl Body for DescribeTopicResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_string(dst, &self.name);
        put_count(dst, self.partitions.len());
        for partition in &self.partitions {
            dst.put_u32(partition.partition);
            dst.put_u16(partition.error_code.code());
            dst.put_u64(partition.log_start_offset);
            dst.put_u64(partition.high_watermark);
            dst.put_u64(partition.size_bytes);
            dst.put_u32(partition.segment_count);
        }
        put_count(dst, self.configs.len());
        for (key, value) in &self.configs {
            put_string(dst, key);
            put_string(dst, value);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DescribeTopicResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            name: src.string("name")?,
            partitions: src.array("partitions", 34, |src| {
                Ok(PartitionDescription {
                    partition: src.u32("partition")?,
                    error_code: ErrorCode::from_code(src.u16("error_code")?),
                    log_start_offset: src.u64("log_start_offset")?,
                    high_watermark: src.u64("high_watermark")?,
                    size_bytes: src.u64("size_bytes")?,
                    segment_count: src.u32("segment_count")?,
                })
            })?,
            configs: src.array("configs", 4, |src| {
                Ok((src.string("config key")?, src.string("config value")?))
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: DescribeTopicRequest, response: DescribeTopicResponse);

    #[test]
    fn exact_request_bytes() {
        let request = DescribeTopicRequest {
            name: "orders".into(),
        };
        assert_eq!(
            encoded(&request),
            [0, 6, b'o', b'r', b'd', b'e', b'r', b's']
        );
    }
}
