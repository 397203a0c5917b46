//! DeleteTopics (key 3): delete topics and their data.
//!
//! ```text
//! request v0:   names array { string }
//! response v0:  results array { name string, error_code u16 }
//! ```

use bytes::{BufMut, BytesMut};

use super::Body;
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count, put_string};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeleteTopicsRequest {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(crate::messages::test_support::name(), 0..4)"
        )
    )]
    pub names: Vec<String>,
}

impl Body for DeleteTopicsRequest {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.names.len());
        for name in &self.names {
            put_string(dst, name);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DeleteTopicsRequest {
            names: src.array("names", 2, |src| src.string("name"))?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeleteTopicResult {
    #[cfg_attr(test, proptest(strategy = "crate::messages::test_support::name()"))]
    pub name: String,
    pub error_code: ErrorCode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeleteTopicsResponse {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<DeleteTopicResult>(), 0..4)"
        )
    )]
    pub results: Vec<DeleteTopicResult>,
}

impl Body for DeleteTopicsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        put_count(dst, self.results.len());
        for result in &self.results {
            put_string(dst, &result.name);
            dst.put_u16(result.error_code.code());
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(DeleteTopicsResponse {
            results: src.array("results", 4, |src| {
                Ok(DeleteTopicResult {
                    name: src.string("name")?,
                    error_code: ErrorCode::from_code(src.u16("error_code")?),
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: DeleteTopicsRequest, response: DeleteTopicsResponse);

    #[test]
    fn exact_request_bytes() {
        let request = DeleteTopicsRequest {
            names: vec!["x".into(), "yz".into()],
        };
        assert_eq!(
            encoded(&request),
            [0, 0, 0, 2, 0, 1, b'x', 0, 2, b'y', b'z']
        );
    }
}
