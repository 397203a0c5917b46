//! ApiVersions (key 0): which api keys and versions the broker speaks.
//!
//! ```text
//! request v0:   (empty)
//! response v0:  error_code u16
//!               apis array { api_key u16, min_version u16, max_version u16 }
//! ```

use bytes::{BufMut, BytesMut};

use super::{ApiKey, Body};
use crate::error::{ErrorCode, WireError};
use crate::wire::{Reader, put_count};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ApiVersionsRequest {}

impl Body for ApiVersionsRequest {
    fn encode(&self, _dst: &mut BytesMut) {}

    fn decode(_src: &mut Reader) -> Result<Self, WireError> {
        Ok(ApiVersionsRequest {})
    }
}

/// One api key and the versions of it a peer speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ApiVersionRange {
    pub api_key: u16,
    pub min_version: u16,
    pub max_version: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ApiVersionsResponse {
    pub error_code: ErrorCode,
    pub apis: Vec<ApiVersionRange>,
}

impl ApiVersionsResponse {
    /// What this build speaks.
    pub fn supported() -> Self {
        ApiVersionsResponse {
            error_code: ErrorCode::None,
            apis: ApiKey::ALL
                .iter()
                .map(|key| {
                    let (min_version, max_version) = key.versions();
                    ApiVersionRange {
                        api_key: key.code(),
                        min_version,
                        max_version,
                    }
                })
                .collect(),
        }
    }
}

impl Body for ApiVersionsResponse {
    fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.error_code.code());
        put_count(dst, self.apis.len());
        for api in &self.apis {
            dst.put_u16(api.api_key);
            dst.put_u16(api.min_version);
            dst.put_u16(api.max_version);
        }
    }

    fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ApiVersionsResponse {
            error_code: ErrorCode::from_code(src.u16("error_code")?),
            apis: src.array("apis", 6, |src| {
                Ok(ApiVersionRange {
                    api_key: src.u16("api_key")?,
                    min_version: src.u16("min_version")?,
                    max_version: src.u16("max_version")?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::{encoded, round_trip_tests};

    round_trip_tests!(request: ApiVersionsRequest, response: ApiVersionsResponse);

    #[test]
    fn exact_bytes() {
        assert!(encoded(&ApiVersionsRequest {}).is_empty());
        let response = ApiVersionsResponse {
            error_code: ErrorCode::None,
            apis: vec![ApiVersionRange {
                api_key: 6,
                min_version: 0,
                max_version: 2,
            }],
        };
        assert_eq!(encoded(&response), [0, 0, 0, 0, 0, 1, 0, 6, 0, 0, 0, 2]);
    }

    #[test]
    fn supported_lists_every_key() {
        let supported = ApiVersionsResponse::supported();
        assert_eq!(supported.apis.len(), ApiKey::ALL.len());
        assert!(
            supported
                .apis
                .iter()
                .any(|api| api.api_key == ApiKey::Fetch.code())
        );
    }
}
