//! CreateTopics (key 2): create topics with a partition count and configuration overrides.
//!
//! ```text
//! request v0:   topics array { name string, partitions u32,
//!                              configs array { key string, value string } }
//!               validate_only bool
//! response v0:  results array { name string, error_code u16, error_message nullable string }
//! ```

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_nullable_string, put_string};

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CreateTopic {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    pub partitions: u32,
    /// Per-topic overrides such as `retention_ms` or `segment_bytes`.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec((crate::messages::test_support::name(), crate::messages::test_support::name()), 0..3)"
        )
    )]
    pub configs: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CreateTopicsRequest {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CreateTopic>(), 0..4)"
        )
    )]
    pub topics: Vec<CreateTopic>,
    /// Check everything, create nothing.
    pub validate_only: bool,
}

impl Body for CreateTopicsRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            dst.put_u32(topic.partitions);
            put_count(dst, topic.configs.len());
            for (key, value) in &topic.configs {
                put_string(dst, key);
                put_string(dst, value);
            }
        }
        dst.put_u8(u8::from(self.validate_only));
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(CreateTopicsRequest {
            topics: src.array("topics", 10, |src| {
                Ok(CreateTopic {
                    name: src.string("name")?,
                    partitions: src.u32("partitions")?,
                    configs: src.array("configs", 4, |src| {
                        Ok((src.string("config key")?, src.string("config value")?))
                    })?,
                })
            })?,
            validate_only: src.bool("validate_only")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CreateTopicResult {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    pub error_code: ErrorCode,
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::messages::test_support::name())")
    )]
    pub error_message: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CreateTopicsResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CreateTopicResult>(), 0..4)"
        )
    )]
    pub results: Vec<CreateTopicResult>,
}

impl Body for CreateTopicsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.results.len());
        for result in &self.results {
            put_string(dst, &result.name);
            dst.put_u16(result.error_code.code());
            put_nullable_string(dst, result.error_message.as_deref());
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(CreateTopicsResponse {
            results: src.array("results", 6, |src| {
                Ok(CreateTopicResult {
                    name: src.string("name")?,
                    error_code: ErrorCode::from_code(src.u16("error_code")?),
                    error_message: src.nullable_string("error_message")?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: CreateTopicsRequest, response: CreateTopicsResponse);

    #[test]
    fn exact_request_bytes() {
        let request = CreateTopicsRequest {
            topics: vec![CreateTopic {
                name: "t".into(),
                partitions: 3,
                configs: vec![("k".into(), "v".into())],
            }],
            validate_only: false,
        };
        assert_eq!(
            encoded(&request),
            [
                0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 3, 0, 0, 0, 1, 0, 1, b'k', 0, 1, b'v', 0
            ]
        );
    }
}
