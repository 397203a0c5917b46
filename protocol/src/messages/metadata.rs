//! Metadata (key 1): the brokers, and the topics with their partitions and leaders.
//!
//! ```text
//! request v0:   topics nullable array { name string }     (null = every topic)
//! response v0:  brokers array { node_id u32, host string, port u16 }
//!               topics array { error_code u16, name string, internal bool,
//!                              partitions array { partition u32, error_code u16, leader_id u32 } }
//! ```

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_nullable_count, put_string};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MetadataRequest {
    /// `None` asks for every topic.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::option::of(proptest::collection::vec(crate::messages::test_support::name(), 0..4))"
        )
    )]
    pub topics: Option<Vec<String>>,
}

impl Body for MetadataRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_nullable_count(dst, self.topics.as_ref().map(Vec::len));
        for topic in self.topics.iter().flatten() {
            put_string(dst, topic);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        let topics = match src.nullable_array_count("topics", 2)? {
            None => None,
            Some(count) => Some(
                (0..count)
                    .map(|_| src.string("topic"))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(MetadataRequest { topics })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct BrokerMetadata {
    pub node_id: u32,
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PartitionMetadata {
    pub partition: u32,
    pub error_code: ErrorCode,
    pub leader_id: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopicMetadata {
    pub error_code: ErrorCode,
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    pub internal: bool,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<PartitionMetadata>(), 0..4)"
        )
    )]
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MetadataResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<BrokerMetadata>(), 0..3)"
        )
    )]
    pub brokers: Vec<BrokerMetadata>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicMetadata>(), 0..4)"
        )
    )]
    pub topics: Vec<TopicMetadata>,
}

impl Body for MetadataResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.brokers.len());
        for broker in &self.brokers {
            dst.put_u32(broker.node_id);
            put_string(dst, &broker.host);
            dst.put_u16(broker.port);
        }
        put_count(dst, self.topics.len());
        for topic in &self.topics {
            dst.put_u16(topic.error_code.code());
            put_string(dst, &topic.name);
            dst.put_u8(u8::from(topic.internal));
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u16(partition.error_code.code());
                dst.put_u32(partition.leader_id);
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        let brokers = src.array("brokers", 8, |src| {
            Ok(BrokerMetadata {
                node_id: src.u32("node_id")?,
                host: src.string("host")?,
                port: src.u16("port")?,
            })
        })?;
        let topics = src.array("topics", 9, |src| {
            Ok(TopicMetadata {
                error_code: ErrorCode::from_code(src.u16("error_code")?),
                name: src.string("name")?,
                internal: src.bool("internal")?,
                partitions: src.array("partitions", 10, |src| {
                    Ok(PartitionMetadata {
                        partition: src.u32("partition")?,
                        error_code: ErrorCode::from_code(src.u16("error_code")?),
                        leader_id: src.u32("leader_id")?,
                    })
                })?,
            })
        })?;
        Ok(MetadataResponse { brokers, topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: MetadataRequest, response: MetadataResponse);

    #[test]
    fn exact_request_bytes() {
        assert_eq!(
            encoded(&MetadataRequest { topics: None }),
            [0xff, 0xff, 0xff, 0xff]
        );
        let request = MetadataRequest {
            topics: Some(vec!["ab".into()]),
        };
        assert_eq!(encoded(&request), [0, 0, 0, 1, 0, 2, b'a', b'b']);
    }
}
