//! Requests and responses, one file per api, and the dispatch that ties api keys to them.
//!
//! Every body type implements [`Body`]. [`Request`] and [`Response`] are the closed sets a
//! broker and a client match on; [`decode_request`] turns a frame into a request or into a
//! [`RequestError`] that already knows the error response to send back, so an unknown api key,
//! an unsupported version or a body that does not decode never costs the connection.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{ErrorCode, WireError};
use crate::frame::{LENGTH_PREFIX_BYTES, RequestHeader, ResponseHeader, finish_frame, start_frame};
use crate::wire::Reader;

pub mod api_versions;
pub mod create_topics;
pub mod delete_topics;
pub mod describe_topic;
pub mod fetch;
pub mod groups;
pub mod init_producer_id;
pub mod list_offsets;
pub mod list_topics;
pub mod metadata;
pub mod produce;

pub use api_versions::{ApiVersionRange, ApiVersionsRequest, ApiVersionsResponse};
pub use create_topics::{
    CreateTopic, CreateTopicResult, CreateTopicsRequest, CreateTopicsResponse,
};
pub use delete_topics::{DeleteTopicResult, DeleteTopicsRequest, DeleteTopicsResponse};
pub use describe_topic::{DescribeTopicRequest, DescribeTopicResponse, PartitionDescription};
pub use fetch::{
    FetchPartition, FetchPartitionResponse, FetchRequest, FetchResponse, FetchTopic,
    FetchTopicResponse,
};
pub use groups::{
    CommitOffsetsRequest, CommitOffsetsResponse, CommitPartition, CommitTopic, CommittedPartition,
    CommittedTopic, ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse,
    DescribeGroupRequest, DescribeGroupResponse, FetchOffsetsRequest, FetchOffsetsResponse,
    GroupListing, GroupMemberDescription, GroupOffsetDescription, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, PartitionResult, TopicPartitions,
    TopicResults,
};
pub use init_producer_id::{
    InitProducerIdRequest, InitProducerIdResponse, PartitionSequence, ProducerIdAndEpoch,
    TopicSequences,
};
pub use list_offsets::{
    ListOffsetsPartition, ListOffsetsPartitionResponse, ListOffsetsRequest, ListOffsetsResponse,
    ListOffsetsTopic, ListOffsetsTopicResponse, OffsetSpec,
};
pub use list_topics::{ListTopicsRequest, ListTopicsResponse, TopicListing};
pub use metadata::{
    BrokerMetadata, MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata,
};
pub use produce::{
    Acks, ProducePartition, ProducePartitionResponse, ProduceRequest, ProduceResponse,
    ProduceTopic, ProduceTopicResponse,
};

/// A request or response body: its bytes after the frame header.
pub trait Body: Sized {
    /// Appends the body's bytes.
    fn encode(&self, dst: &mut BytesMut);
    /// Appends the body to a frame kept in parts: a body with large [`Bytes`] fields (record
    /// batches) hands them over as parts of their own instead of copying them. By default
    /// the whole body is copied, as [`encode`](Body::encode) writes it.
    fn encode_parts(&self, dst: &mut FrameParts) {
        self.encode(dst.buf());
    }
    /// Reads the body; the caller checks that nothing is left over.
    fn decode(src: &mut Reader) -> Result<Self, WireError>;

    /// Reads the body as `version` of its api wrote it. [`encode`](Body::encode) and
    /// [`decode`](Body::decode) are the current version; a body whose api has older versions
    /// still spoken reads those here.
    fn decode_version(src: &mut Reader, version: u16) -> Result<Self, WireError> {
        let _ = version;
        Self::decode(src)
    }

    /// Decodes a whole body, refusing trailing bytes.
    fn decode_exact(body: Bytes) -> Result<Self, WireError> {
        let mut reader = Reader::new(body);
        let value = Self::decode(&mut reader)?;
        reader.finish()?;
        Ok(value)
    }

    /// Decodes a whole body of `version`, refusing trailing bytes.
    fn decode_exact_version(body: Bytes, version: u16) -> Result<Self, WireError> {
        let mut reader = Reader::new(body);
        let value = Self::decode_version(&mut reader, version)?;
        reader.finish()?;
        Ok(value)
    }
}

macro_rules! apis {
    ($($(#[$doc:meta])* $name:ident = $key:literal, $request:ty, $response:ty, $min:literal ..= $max:literal;)*) => {
        /// The api keys. Numbers are stable and never reused.
        #[repr(u16)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ApiKey {
            $($(#[$doc])* $name = $key,)*
        }

        impl ApiKey {
            /// Every api key this build speaks.
            pub const ALL: &'static [ApiKey] = &[$(ApiKey::$name,)*];

            pub const fn code(self) -> u16 {
                self as u16
            }

            pub fn from_code(code: u16) -> Option<ApiKey> {
                match code {
                    $($key => Some(ApiKey::$name),)*
                    _ => None,
                }
            }

            /// The lowest and highest version this build speaks.
            pub const fn versions(self) -> (u16, u16) {
                match self {
                    $(ApiKey::$name => ($min, $max),)*
                }
            }

            /// The version a client sends: the highest this build speaks.
            pub const fn current_version(self) -> u16 {
                self.versions().1
            }
        }

        /// Every request body, tagged by api.
        #[derive(Clone, Debug, PartialEq)]
        #[non_exhaustive]
        pub enum Request {
            $($name($request),)*
        }

        impl Request {
            pub fn api_key(&self) -> ApiKey {
                match self {
                    $(Request::$name(_) => ApiKey::$name,)*
                }
            }

            fn encode_body(&self, dst: &mut BytesMut) {
                match self {
                    $(Request::$name(body) => body.encode(dst),)*
                }
            }

            fn encode_body_parts(&self, dst: &mut FrameParts) {
                match self {
                    $(Request::$name(body) => body.encode_parts(dst),)*
                }
            }

            fn decode_body(
                api_key: ApiKey,
                version: u16,
                body: Bytes,
            ) -> Result<Request, WireError> {
                match api_key {
                    $(ApiKey::$name => {
                        <$request>::decode_exact_version(body, version).map(Request::$name)
                    })*
                }
            }
        }

        $(impl From<$request> for Request {
            fn from(body: $request) -> Request {
                Request::$name(body)
            }
        })*

        /// Every response body, tagged by api.
        #[derive(Clone, Debug, PartialEq)]
        #[non_exhaustive]
        pub enum Response {
            $($name($response),)*
        }

        impl Response {
            pub fn api_key(&self) -> ApiKey {
                match self {
                    $(Response::$name(_) => ApiKey::$name,)*
                }
            }

            fn encode_body(&self, dst: &mut BytesMut) {
                match self {
                    $(Response::$name(body) => body.encode(dst),)*
                }
            }

            fn encode_body_parts(&self, dst: &mut FrameParts) {
                match self {
                    $(Response::$name(body) => body.encode_parts(dst),)*
                }
            }

            /// Decodes the body of a successful response to a request of `api_key`.
            pub fn decode(api_key: ApiKey, body: Bytes) -> Result<Response, WireError> {
                match api_key {
                    $(ApiKey::$name => <$response>::decode_exact(body).map(Response::$name),)*
                }
            }
        }

        $(impl From<$response> for Response {
            fn from(body: $response) -> Response {
                Response::$name(body)
            }
        })*
    };
}

apis! {
    /// Which api keys and versions the broker speaks.
    ApiVersions = 0, ApiVersionsRequest, ApiVersionsResponse, 0..=0;
    /// Brokers, topics and partitions.
    Metadata = 1, MetadataRequest, MetadataResponse, 0..=0;
    /// Create topics.
    CreateTopics = 2, CreateTopicsRequest, CreateTopicsResponse, 0..=0;
    /// Delete topics.
    DeleteTopics = 3, DeleteTopicsRequest, DeleteTopicsResponse, 0..=0;
    /// Names and partition counts of all topics.
    ListTopics = 4, ListTopicsRequest, ListTopicsResponse, 0..=0;
    /// One topic's partitions, offsets, sizes and configuration.
    DescribeTopic = 5, DescribeTopicRequest, DescribeTopicResponse, 0..=0;
    /// Append record batches.
    Produce = 6, ProduceRequest, ProduceResponse, 0..=0;
    /// Read record batches, long polling.
    Fetch = 7, FetchRequest, FetchResponse, 0..=0;
    /// Earliest, latest, durable or by-timestamp offsets.
    ListOffsets = 8, ListOffsetsRequest, ListOffsetsResponse, 0..=1;
    /// An id and epoch for an idempotent producer.
    InitProducerId = 9, InitProducerIdRequest, InitProducerIdResponse, 0..=1;
    /// Join, stay in, and learn the assignment of a consumer group.
    ConsumerGroupHeartbeat = 10, ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, 0..=0;
    /// Leave a consumer group.
    LeaveGroup = 11, LeaveGroupRequest, LeaveGroupResponse, 0..=0;
    /// Commit a group's offsets.
    CommitOffsets = 12, CommitOffsetsRequest, CommitOffsetsResponse, 0..=0;
    /// Read a group's committed offsets.
    FetchOffsets = 13, FetchOffsetsRequest, FetchOffsetsResponse, 0..=0;
    /// A group's members, assignment, committed offsets and lag.
    DescribeGroup = 14, DescribeGroupRequest, DescribeGroupResponse, 0..=0;
    /// Every group.
    ListGroups = 15, ListGroupsRequest, ListGroupsResponse, 0..=0;
}

impl Request {
    /// The header of this request at the current version of its api.
    fn header(&self, correlation_id: u32) -> RequestHeader {
        let api_key = self.api_key();
        RequestHeader {
            api_key: api_key.code(),
            api_version: api_key.current_version(),
            correlation_id,
            flags: 0,
        }
    }

    /// Appends a whole frame (length, header, body) at the current version of its api.
    pub fn encode_frame(&self, correlation_id: u32, dst: &mut BytesMut) {
        let at = start_frame(dst);
        self.header(correlation_id).encode(dst);
        self.encode_body(dst);
        finish_frame(dst, at);
    }

    /// The same frame as [`encode_frame`](Request::encode_frame) writes, as parts to be
    /// written back to back: record batches are parts of their own, not copied.
    pub fn encode_frame_parts(&self, correlation_id: u32) -> Vec<Bytes> {
        let mut parts = FrameParts::new();
        self.header(correlation_id).encode(parts.buf());
        self.encode_body_parts(&mut parts);
        parts.finish()
    }
}

impl Response {
    /// Appends a whole successful response frame.
    pub fn encode_frame(&self, correlation_id: u32, dst: &mut BytesMut) {
        let at = start_frame(dst);
        ResponseHeader {
            correlation_id,
            error_code: ErrorCode::None,
        }
        .encode(dst);
        self.encode_body(dst);
        finish_frame(dst, at);
    }

    /// The same frame as [`encode_frame`](Response::encode_frame) writes, as parts to be
    /// written back to back: record batches are parts of their own, not copied.
    pub fn encode_frame_parts(&self, correlation_id: u32) -> Vec<Bytes> {
        let mut parts = FrameParts::new();
        ResponseHeader {
            correlation_id,
            error_code: ErrorCode::None,
        }
        .encode(parts.buf());
        self.encode_body_parts(&mut parts);
        parts.finish()
    }
}

/// A frame built in parts: small fields are copied into a buffer, large [`Bytes`] fields are
/// kept as parts of their own, so a record batch goes from the producer's builder (or the
/// broker's read) to the socket without being copied into the frame.
#[derive(Debug)]
pub struct FrameParts {
    /// Starts with the length prefix, filled in by `finish`.
    prefix: BytesMut,
    parts: Vec<Bytes>,
    buf: BytesMut,
}

impl FrameParts {
    /// `Bytes` fields shorter than this are copied: a part of their own costs more than that.
    pub const SHARE_AT_LEAST: usize = 4096;

    fn new() -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_u32(0);
        let prefix = buf.split_to(LENGTH_PREFIX_BYTES);
        FrameParts {
            prefix,
            parts: Vec::new(),
            buf,
        }
    }

    /// The buffer small fields are written to.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends a length-prefixed bytes field, as [`put_bytes`](crate::wire::put_bytes) does.
    pub fn put_bytes(&mut self, value: &Bytes) {
        if value.len() < Self::SHARE_AT_LEAST {
            crate::wire::put_bytes(&mut self.buf, value);
            return;
        }
        let length = u32::try_from(value.len()).expect("bytes field longer than 4 GiB");
        self.buf.put_u32(length);
        self.parts.push(self.buf.split().freeze());
        self.parts.push(value.clone());
    }

    /// The parts, the length prefix filled in. A frame without shared parts is one part.
    fn finish(mut self) -> Vec<Bytes> {
        let length: usize = self.parts.iter().map(Bytes::len).sum::<usize>() + self.buf.len();
        let length = u32::try_from(length).expect("frame over 4 GiB");
        self.prefix.copy_from_slice(&length.to_be_bytes());
        if self.parts.is_empty() {
            // Split from one buffer and still adjacent: joined again without a copy.
            self.prefix.unsplit(self.buf);
            return vec![self.prefix.freeze()];
        }
        if !self.buf.is_empty() {
            self.parts.push(self.buf.freeze());
        }
        self.parts.insert(0, self.prefix.freeze());
        self.parts
    }
}

/// Where a body with record batches is written: a plain buffer (batches copied) or a
/// [`FrameParts`] (batches kept as parts), so such a body's encoding is written once.
pub(crate) trait BodySink {
    /// The buffer small fields go to.
    fn small(&mut self) -> &mut BytesMut;
    /// A length-prefixed bytes field.
    fn put_shared(&mut self, value: &Bytes);
}

impl BodySink for BytesMut {
    fn small(&mut self) -> &mut BytesMut {
        self
    }

    fn put_shared(&mut self, value: &Bytes) {
        crate::wire::put_bytes(self, value);
    }
}

impl BodySink for FrameParts {
    fn small(&mut self) -> &mut BytesMut {
        self.buf()
    }

    fn put_shared(&mut self, value: &Bytes) {
        self.put_bytes(value);
    }
}

/// Appends a response frame that fails a whole request: the header's error code, no body.
pub fn encode_error_response(correlation_id: u32, error_code: ErrorCode, dst: &mut BytesMut) {
    let at = start_frame(dst);
    ResponseHeader {
        correlation_id,
        error_code,
    }
    .encode(dst);
    finish_frame(dst, at);
}

/// A request frame that could not be turned into a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    /// The header, when it decoded; without it the answer goes out with correlation id 0.
    pub header: Option<RequestHeader>,
    pub error: WireError,
}

impl RequestError {
    /// The code the whole request fails with.
    pub fn error_code(&self) -> ErrorCode {
        self.error.error_code()
    }

    /// Appends the error response frame the peer should get.
    pub fn encode_response(&self, dst: &mut BytesMut) {
        let correlation_id = self.header.map_or(0, |header| header.correlation_id);
        encode_error_response(correlation_id, self.error_code(), dst);
    }
}

/// Decodes a request frame (header and body, without the length prefix).
///
/// # Errors
/// A [`RequestError`] for a short header, an unknown api key, an unsupported version or a body
/// that does not decode exactly. Never panics, whatever the bytes.
pub fn decode_request(frame: Bytes) -> Result<(RequestHeader, Request), RequestError> {
    let mut reader = Reader::new(frame);
    let header = RequestHeader::decode(&mut reader).map_err(|error| RequestError {
        header: None,
        error,
    })?;
    let fail = |error| RequestError {
        header: Some(header),
        error,
    };
    let api_key = ApiKey::from_code(header.api_key)
        .ok_or_else(|| fail(WireError::UnknownApiKey(header.api_key)))?;
    let (min, max) = api_key.versions();
    if header.api_version < min || header.api_version > max {
        return Err(fail(WireError::UnsupportedVersion {
            api_key: header.api_key,
            version: header.api_version,
        }));
    }
    let body = reader.bytes_rest();
    let request = Request::decode_body(api_key, header.api_version, body).map_err(fail)?;
    Ok((header, request))
}

/// Splits a response frame (without the length prefix) into its header and body.
pub fn decode_response_header(frame: Bytes) -> Result<(ResponseHeader, Bytes), WireError> {
    let mut reader = Reader::new(frame);
    let header = ResponseHeader::decode(&mut reader)?;
    Ok((header, reader.bytes_rest()))
}

#[cfg(test)]
pub(crate) mod test_support {
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;

    use super::Body;

    /// Arbitrary byte strings up to 64 bytes.
    pub fn bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
    }

    /// Names as the wire allows them (short, any UTF-8).
    pub fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._é-]{0,20}"
    }

    /// Encode, decode, compare; then check that every strict prefix fails to decode cleanly.
    pub fn round_trip<T: Body + PartialEq + std::fmt::Debug>(
        value: &T,
    ) -> Result<(), TestCaseError> {
        let mut encoded = BytesMut::new();
        value.encode(&mut encoded);
        let encoded = encoded.freeze();
        let decoded = T::decode_exact(encoded.clone())
            .map_err(|error| TestCaseError::fail(format!("decode failed: {error}")))?;
        prop_assert_eq!(&decoded, value);
        for cut in 0..encoded.len() {
            prop_assert!(
                T::decode_exact(encoded.slice(..cut)).is_err(),
                "prefix of {} of {} bytes decoded",
                cut,
                encoded.len()
            );
        }
        let mut extended = BytesMut::from(&encoded[..]);
        extended.extend_from_slice(&[0]);
        prop_assert!(
            T::decode_exact(extended.freeze()).is_err(),
            "trailing byte accepted"
        );
        Ok(())
    }

    /// Encodes a body to bytes for exact-layout assertions.
    pub fn encoded<T: Body>(value: &T) -> Vec<u8> {
        let mut out = BytesMut::new();
        value.encode(&mut out);
        out.to_vec()
    }

    macro_rules! round_trip_tests {
        ($($name:ident: $ty:ty),* $(,)?) => {
            proptest::proptest! {
                #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
                $(
                    #[test]
                    fn $name(value in proptest::prelude::any::<$ty>()) {
                        $crate::messages::test_support::round_trip(&value)?;
                    }
                )*
            }
        };
    }
    pub(crate) use round_trip_tests;
}

#[cfg(test)]
mod tests;
