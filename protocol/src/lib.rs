//! The Sluice wire format, sans IO: bytes in, values out, and back. No sockets, no runtime, no
//! clock; the broker and the client drive it.
//!
//! ```text
//!  bytes from a socket                                      bytes to a socket
//!        │                                                         ▲
//!        ▼                                                         │
//!  FrameDecoder::decode ──frame──▶ decode_request ──▶ Request ──▶ handler ──▶ Response::encode_frame
//!  (Head → Body(len),              (header, api key,                │
//!   max_frame_bytes checked         version, body;     Produce/Fetch carry RecordBatch bytes
//!   before allocating)              errors become      zero-copy: RecordBatchRef::validate,
//!                                   error responses)   stamp_base_offset, records()
//! ```
//!
//! Modules:
//! - [`frame`]: the length prefix, request and response headers, [`FrameDecoder`].
//! - [`batch`]: the record batch: builder, zero-copy views, CRC32C, in-place stamping,
//!   `validate()`.
//! - [`checksum`]: CRC-32C, of batches and of the broker's own files.
//! - [`messages`]: one module per api, the [`Request`]/[`Response`] enums and their dispatch.
//! - [`error`]: the wire [`ErrorCode`]s and the decoding error [`WireError`].
//! - [`wire`]: primitive encodings (integers, strings, arrays, varints).
//! - `codec` (feature `codec`): a `tokio_util::codec` Decoder/Encoder pair.
//!
//! Decoding never panics and never allocates more than the input could fill: every count is
//! checked against the bytes that remain, every length against the frame.

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod batch;
pub mod checksum;
#[cfg(feature = "codec")]
pub mod codec;
pub mod error;
pub mod frame;
pub mod messages;
pub mod wire;

pub use batch::{Record, RecordBatch, RecordBatchBuilder, RecordBatchRef};
pub use error::{ErrorCode, WireError};
pub use frame::{FrameDecoder, RequestHeader, ResponseHeader};
pub use messages::{
    ApiKey, Body, Request, RequestError, Response, decode_request, decode_response_header,
    encode_error_response,
};
