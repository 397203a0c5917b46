//! ListTopics (key 4): every topic's name and partition count.
//!
//! ```text
//! request v0:   (empty)
//! response v0:  topics array { name string, partitions u32, internal bool }
//! ```

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::WireError;
use crate::wire::{Reader, put_count, put_string};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListTopicsRequest {}

impl Body for ListTopicsRequest {
    fn encode(&self, _dst: &mut BytesMut) {}

    fn decode(_src: &mut Reader) -> Result<Self, WireError> {
        Ok(ListTopicsRequest {})
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopicListing {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    pub partitions: u32,
    pub internal: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ListTopicsResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicListing>(), 0..6)"
        )
    )]
    pub topics: Vec<TopicListing>,
}

impl Body for ListTopicsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            put_string(dst, &topic.name);
            dst.put_u32(topic.partitions);
            dst.put_u8(u8::from(topic.internal));
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ListTopicsResponse {
            topics: src.array("topics", 7, |src| {
                Ok(TopicListing {
                    name: src.string("name")?,
                    partitions: src.u32("partitions")?,
                    internal: src.bool("internal")?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: ListTopicsRequest, response: ListTopicsResponse);

    #[test]
    fn exact_bytes() {
        assert!(encoded(&ListTopicsRequest {}).is_empty());
        let response = ListTopicsResponse {
            topics: vec![TopicListing {
                name: "q".into(),
                partitions: 2,
                internal: true,
            }],
        };
        assert_eq!(encoded(&response), [0, 0, 0, 1, 0, 1, b'q', 0, 0, 0, 2, 1]);
    }
}
