//! InitProducerId (key 9): an id and epoch for an idempotent producer.
//!
//! ```text
//! request v0:   producer_name nullable string
//! request v1:   producer_name nullable string,
//!               has_current bool, then if true: producer_id u64, producer_epoch u16
//! response v0, v1:
//!               error_code u16, producer_id u64, producer_epoch u16
//!               sequences array { topic string,
//!                                 partitions array { partition u32, next_sequence u64 } }
//! ```
//!
//! Without a name every call gets a fresh id. With a stable name the same id comes back with
//! its epoch bumped, which fences any older instance (`ProducerFenced`), and `sequences` says
//! where each partition's sequence continues, so a restarted producer neither duplicates nor
//! leaves a gap.
//!
//! v1 adds `current`: a running producer that needs a new epoch (a batch's outcome became
//! unknown) says which id and epoch it holds, and is answered `ProducerFenced` if the name has
//! moved on since. Without it the broker could not tell that call from a new instance starting,
//! and a stale instance coming back from a network partition would take the name back from its
//! successor.

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_nullable_string, put_string};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InitProducerIdRequest {
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::messages::test_support::name())")
    )]
    pub producer_name: Option<String>,
    /// The id and epoch the caller holds, when it asks for a new epoch of its own (v1).
    pub current: Option<ProducerIdAndEpoch>,
}

/// A producer id with one of its epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProducerIdAndEpoch {
    pub producer_id: u64,
    pub producer_epoch: u16,
}

impl Body for InitProducerIdRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_nullable_string(dst, self.producer_name.as_deref());
        dst.put_u8(u8::from(self.current.is_some()));
        if let Some(current) = self.current {
            dst.put_u64(current.producer_id);
            dst.put_u16(current.producer_epoch);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Self::decode_version(src, 1)
    }

    fn decode_version(src: &mut Reader, version: u16) -> Result<Self, WireError> {
        let producer_name = src.nullable_string("producer_name")?;
        let current = if version >= 1 && src.bool("has_current")? {
            Some(ProducerIdAndEpoch {
                producer_id: src.u64("producer_id")?,
                producer_epoch: src.u16("producer_epoch")?,
            })
        } else {
            None
        };
        Ok(InitProducerIdRequest {
            producer_name,
            current,
        })
    }
}

/// Where a partition's sequence continues.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PartitionSequence {
    pub partition: u32,
    pub next_sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopicSequences {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub topic: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<PartitionSequence>(), 0..4)"
        )
    )]
    pub partitions: Vec<PartitionSequence>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InitProducerIdResponse {
    pub error_code: ErrorCode,
    pub producer_id: u64,
    pub producer_epoch: u16,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<TopicSequences>(), 0..4)"
        )
    )]
    pub sequences: Vec<TopicSequences>,
}

impl Body for InitProducerIdResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        dst.put_u64(self.producer_id);
        dst.put_u16(self.producer_epoch);
        put_count(dst, self.sequences.len());
        for topic in &self.sequences {
            put_string(dst, &topic.topic);
            put_count(dst, topic.partitions.len());
            for partition in &topic.partitions {
                dst.put_u32(partition.partition);
                dst.put_u64(partition.next_sequence);
            }
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(InitProducerIdResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            producer_id: src.u64("producer_id")?,
            producer_epoch: src.u16("producer_epoch")?,
            sequences: src.array("sequences", 6, |src| {
                Ok(TopicSequences {
                    topic: src.string("topic")?,
                    partitions: src.array("partitions", 12, |src| {
                        Ok(PartitionSequence {
                            partition: src.u32("partition")?,
                            next_sequence: src.u64("next_sequence")?,
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

    round_trip_tests!(request: InitProducerIdRequest, response: InitProducerIdResponse);

    #[test]
    fn exact_request_bytes() {
        assert_eq!(
            encoded(&InitProducerIdRequest {
                producer_name: None,
                current: None,
            }),
            [0xff, 0xff, 0]
        );
        let named = InitProducerIdRequest {
            producer_name: Some("relay".into()),
            current: Some(ProducerIdAndEpoch {
                producer_id: 7,
                producer_epoch: 2,
            }),
        };
        assert_eq!(
            encoded(&named),
            [
                0, 5, b'r', b'e', b'l', b'a', b'y', 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 2
            ]
        );
    }

    #[test]
    fn a_version_0_request_has_no_current_id() {
        let body = bytes::Bytes::from_static(&[0, 5, b'r', b'e', b'l', b'a', b'y']);
        let request = InitProducerIdRequest::decode_exact_version(body.clone(), 0).unwrap();
        assert_eq!(request.producer_name.as_deref(), Some("relay"));
        assert_eq!(request.current, None);
        // The same bytes are short of a version 1 body.
        assert!(InitProducerIdRequest::decode_exact_version(body, 1).is_err());
    }
}
