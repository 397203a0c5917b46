//! A `tokio_util::codec` pair over the sans-IO frame decoder, for callers that use `Framed`.
//!
//! [`FrameCodec`] decodes frames (without their length prefix) and encodes already-built
//! frames (with their prefix, as [`crate::Request::encode_frame`] writes them).

use bytes::{Bytes, BytesMut};

use crate::error::WireError;
use crate::frame::FrameDecoder;

/// Splits a stream into frames and writes whole frames.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec for a broker: it reads request frames.
    pub fn for_requests(max_frame_bytes: u32) -> Self {
        FrameCodec {
            decoder: FrameDecoder::for_requests(max_frame_bytes),
        }
    }

    /// A codec for a client: it reads response frames.
    pub fn for_responses(max_frame_bytes: u32) -> Self {
        FrameCodec {
            decoder: FrameDecoder::for_responses(max_frame_bytes),
        }
    }
}

/// The codec's error: a bad frame or an IO error underneath.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        Ok(self.decoder.decode(src)?)
    }
}

impl tokio_util::codec::Encoder<Bytes> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::messages::{ApiVersionsRequest, Request, decode_request};

    #[test]
    fn encode_then_decode_a_request() {
        let mut wire = BytesMut::new();
        Request::from(ApiVersionsRequest {}).encode_frame(9, &mut wire);
        let mut codec = FrameCodec::for_requests(1024);
        let mut stream = BytesMut::new();
        codec.encode(wire.freeze(), &mut stream).unwrap();
        let frame = codec.decode(&mut stream).unwrap().unwrap();
        let (header, request) = decode_request(frame.freeze()).unwrap();
        assert_eq!(header.correlation_id, 9);
        assert_eq!(request, Request::ApiVersions(ApiVersionsRequest {}));
    }
}
