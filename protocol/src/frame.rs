//! Frames: the length-prefixed envelope around every request and response.
//!
//! ```text
//! request frame                         response frame
//! +----------------------+              +----------------------+
//! | length u32           | of the rest  | length u32           | of the rest
//! +----------------------+              +----------------------+
//! | api_key u16          |              | correlation_id u32   |
//! | api_version u16      |              | error_code u16       |
//! | correlation_id u32   |              +----------------------+
//! | flags u16            |              | body                 |
//! +----------------------+              +----------------------+
//! | body                 |
//! +----------------------+
//! ```
//!
//! A response whose header carries an error code other than `None` has an empty body: the
//! request as a whole failed (unknown api key, unsupported version, undecodable body). Errors
//! of one partition travel inside a successful body instead.
//!
//! [`FrameDecoder`] is a two-state machine (`Head → Body(length)`): it returns `Ok(None)` until
//! a whole frame is buffered and refuses a length over `max_frame_bytes` before reserving any
//! memory for it.

use bytes::{Buf, BufMut, BytesMut};

use crate::error::{ErrorCode, WireError};
use crate::wire::Reader;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes of a request header.
pub const REQUEST_HEADER_BYTES: usize = 10;
/// Bytes of a response header.
pub const RESPONSE_HEADER_BYTES: usize = 6;
/// The default `max_frame_bytes`: 8 MiB, room for the default 1 MiB batch many times over.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 8 * 1024 * 1024;
/// The least rest of a frame [`FrameDecoder::low_water_bytes`] asks to wait for; a smaller
/// rest comes in a piece or two anyway, and changing the socket's mark costs a system call.
pub const LOW_WATER_FROM_BYTES: usize = 128 * 1024;
/// The most [`FrameDecoder::low_water_bytes`] asks to wait for: Linux lets a socket's receive
/// buffer grow to about twice the mark, so a frame of many MiB is read a MiB at a time.
pub const MAX_LOW_WATER_BYTES: usize = 1024 * 1024;

/// The header in front of every request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RequestHeader {
    pub api_key: u16,
    pub api_version: u16,
    pub correlation_id: u32,
    /// Reserved for request-wide options; no bit is defined yet and receivers ignore them.
    pub flags: u16,
}

impl RequestHeader {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u16(self.api_key);
        dst.put_u16(self.api_version);
        dst.put_u32(self.correlation_id);
        dst.put_u16(self.flags);
    }

    pub fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(RequestHeader {
            api_key: src.u16("api_key")?,
            api_version: src.u16("api_version")?,
            correlation_id: src.u32("correlation_id")?,
            flags: src.u16("flags")?,
        })
    }
}

/// The header in front of every response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub correlation_id: u32,
    pub error_code: ErrorCode,
}

impl ResponseHeader {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(self.correlation_id);
        dst.put_u16(self.error_code.code());
    }

    pub fn decode(src: &mut Reader) -> Result<Self, WireError> {
        Ok(ResponseHeader {
            correlation_id: src.u32("correlation_id")?,
            error_code: ErrorCode::from_code(src.u16("error_code")?),
        })
    }
}

/// Writes a length prefix placeholder and returns where it is, for [`finish_frame`].
pub fn start_frame(dst: &mut BytesMut) -> usize {
    let at = dst.len();
    dst.put_u32(0);
    at
}

/// Fills in the length prefix written by [`start_frame`] at `at`.
///
/// # Panics
/// When the frame is over 4 GiB, which no caller can produce within the limits.
pub fn finish_frame(dst: &mut BytesMut, at: usize) {
    let length = dst.len() - at - LENGTH_PREFIX_BYTES;
    let length = u32::try_from(length).expect("frame over 4 GiB");
    dst[at..at + LENGTH_PREFIX_BYTES].copy_from_slice(&length.to_be_bytes());
}

/// Where a [`FrameDecoder`] is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a length prefix.
    Head,
    /// The prefix was read; waiting for this many bytes of frame.
    Body(usize),
}

/// Splits a byte stream into frames (the bytes after each length prefix).
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    max_frame_bytes: u32,
    min_frame_bytes: usize,
    state: State,
}

impl FrameDecoder {
    /// A decoder for frames that carry request headers.
    pub fn for_requests(max_frame_bytes: u32) -> Self {
        FrameDecoder {
            max_frame_bytes,
            min_frame_bytes: REQUEST_HEADER_BYTES,
            state: State::Head,
        }
    }

    /// A decoder for frames that carry response headers.
    pub fn for_responses(max_frame_bytes: u32) -> Self {
        FrameDecoder {
            max_frame_bytes,
            min_frame_bytes: RESPONSE_HEADER_BYTES,
            state: State::Head,
        }
    }

    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// True when a frame has been started but not finished: a peer that stops here is a slow
    /// sender the caller may time out.
    pub fn is_mid_frame(&self, buffered: &BytesMut) -> bool {
        matches!(self.state, State::Body(_)) || !buffered.is_empty()
    }

    /// How many received bytes a reader waiting on a socket is best woken for (`SO_RCVLOWAT`),
    /// with `buffered` already read: the rest of a frame being received, when that is at least
    /// [`LOW_WATER_FROM_BYTES`] and at most [`MAX_LOW_WATER_BYTES`]; else 1, any byte.
    ///
    /// A big frame arriving over loopback comes in pieces of 64 KiB and less, and every piece
    /// wakes a reader that has caught up with the sender: a wake-up costs the sender's core an
    /// inter-processor interrupt, which a virtual machine's core pays dearly for, and the reader
    /// a pass through the scheduler, for a frame it cannot decode until the last piece. None of
    /// the frame's bytes can be used before it is whole, so waking for all of them costs nothing.
    pub fn low_water_bytes(&self, buffered: &BytesMut) -> usize {
        match self.state {
            State::Body(length) => match length.saturating_sub(buffered.len()) {
                missing @ LOW_WATER_FROM_BYTES.. => missing.min(MAX_LOW_WATER_BYTES),
                _ => 1,
            },
            State::Head => 1,
        }
    }

    /// Whether a Linux kernel of this release (`/proc/sys/kernel/osrelease`, `uname -r`) honours
    /// a TCP socket's receive low-water mark safely: from 5.7 on. Earlier kernels could leave a
    /// reader asleep for good under a mark, when the receive buffer filled with packets of much
    /// more memory than data before the mark was reached ("tcp: fix SO_RCVLOWAT hangs with fat
    /// skbs"), and before 4.18 lowering the mark did not wake a reader for what had arrived.
    /// False for a release that does not parse.
    pub fn low_water_mark_is_safe(os_release: &str) -> bool {
        let mut parts = os_release.trim().split(['.', '-']);
        let major = parts.next().and_then(|part| part.parse::<u32>().ok());
        let minor = parts.next().and_then(|part| part.parse::<u32>().ok());
        match (major, minor) {
            (Some(major), Some(minor)) => (major, minor) >= (5, 7),
            _ => false,
        }
    }

    /// Takes the next whole frame (header and body, without the length prefix) off the front of
    /// `src`, or `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// [`WireError::FrameTooLarge`] for a length over `max_frame_bytes`, checked before any
    /// memory is reserved; [`WireError::Invalid`] for a length too short to hold a header. The
    /// stream cannot be resynchronised after either: the caller answers and closes.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, WireError> {
        let length = match self.state {
            State::Body(length) => length,
            State::Head => {
                if src.len() < LENGTH_PREFIX_BYTES {
                    return Ok(None);
                }
                let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
                prefix.copy_from_slice(&src[..LENGTH_PREFIX_BYTES]);
                let length = u32::from_be_bytes(prefix);
                if length > self.max_frame_bytes {
                    return Err(WireError::FrameTooLarge {
                        length: u64::from(length),
                        max_frame_bytes: self.max_frame_bytes,
                    });
                }
                let length = length as usize;
                if length < self.min_frame_bytes {
                    return Err(WireError::invalid(
                        "frame length",
                        format!(
                            "{length} bytes cannot hold a {}-byte header",
                            self.min_frame_bytes
                        ),
                    ));
                }
                src.advance(LENGTH_PREFIX_BYTES);
                // Safe to reserve now: the length is within the limit.
                src.reserve(length.saturating_sub(src.len()));
                self.state = State::Body(length);
                length
            }
        };
        if src.len() < length {
            return Ok(None);
        }
        self.state = State::Head;
        Ok(Some(src.split_to(length)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_frame(body: &[u8]) -> BytesMut {
        let mut dst = BytesMut::new();
        let at = start_frame(&mut dst);
        RequestHeader {
            api_key: 3,
            api_version: 0,
            correlation_id: 0x0102_0304,
            flags: 0,
        }
        .encode(&mut dst);
        dst.put_slice(body);
        finish_frame(&mut dst, at);
        dst
    }

    #[test]
    fn exact_request_header_bytes() {
        let frame = request_frame(b"xy");
        assert_eq!(
            &frame[..],
            &[0, 0, 0, 12, 0, 3, 0, 0, 1, 2, 3, 4, 0, 0, b'x', b'y']
        );
    }

    #[test]
    fn exact_response_header_bytes() {
        let mut dst = BytesMut::new();
        let at = start_frame(&mut dst);
        ResponseHeader {
            correlation_id: 7,
            error_code: ErrorCode::UnknownApiKey,
        }
        .encode(&mut dst);
        finish_frame(&mut dst, at);
        assert_eq!(&dst[..], &[0, 0, 0, 6, 0, 0, 0, 7, 0, 8]);
    }

    #[test]
    fn byte_at_a_time_yields_one_frame() {
        let frame = request_frame(b"hello");
        let mut decoder = FrameDecoder::for_requests(1024);
        let mut buffer = BytesMut::new();
        for (index, byte) in frame.iter().enumerate() {
            buffer.put_u8(*byte);
            let out = decoder.decode(&mut buffer).unwrap();
            if index + 1 < frame.len() {
                assert!(out.is_none(), "frame yielded early at byte {index}");
            } else {
                let out = out.expect("whole frame buffered");
                assert_eq!(&out[..], &frame[4..]);
            }
        }
        assert!(buffer.is_empty());
    }

    #[test]
    fn low_water_is_the_rest_of_a_big_frame_capped() {
        let big = request_frame(&vec![7u8; 3 * MAX_LOW_WATER_BYTES]);
        let body = big.len() - LENGTH_PREFIX_BYTES;
        let mut decoder = FrameDecoder::for_requests(8 * MAX_LOW_WATER_BYTES as u32);
        let mut buffer = BytesMut::new();
        // Between frames, and with only part of a length prefix, any byte is worth waking for.
        assert_eq!(decoder.low_water_bytes(&buffer), 1);
        buffer.extend_from_slice(&big[..2]);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
        assert_eq!(decoder.low_water_bytes(&buffer), 1);
        // With the prefix read, the rest of the frame, at most the cap.
        buffer.extend_from_slice(&big[2..100]);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
        assert_eq!(decoder.low_water_bytes(&buffer), MAX_LOW_WATER_BYTES);
        let near_end = big.len() - LOW_WATER_FROM_BYTES - 5;
        buffer.extend_from_slice(&big[100..near_end]);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
        assert_eq!(decoder.low_water_bytes(&buffer), LOW_WATER_FROM_BYTES + 5);
        // A small rest is not waited for as a whole.
        buffer.extend_from_slice(&big[near_end..near_end + 10]);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
        assert_eq!(decoder.low_water_bytes(&buffer), 1);
        buffer.extend_from_slice(&big[near_end + 10..]);
        assert_eq!(decoder.decode(&mut buffer).unwrap().unwrap().len(), body);
        assert_eq!(decoder.low_water_bytes(&buffer), 1);
        // A small frame never asks for more than a byte.
        let small = request_frame(&[1; 1000]);
        buffer.extend_from_slice(&small[..10]);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
        assert_eq!(decoder.low_water_bytes(&buffer), 1);
    }

    #[test]
    fn the_low_water_mark_is_used_from_linux_5_7() {
        for (release, safe) in [
            ("6.18.44-fc-v595", true),
            ("5.7.0", true),
            ("5.15.0-91-generic\n", true),
            ("10.0", true),
            ("5.6.19", false),
            ("4.19.0-26-amd64", false),
            ("3.10.0-1160.el7.x86_64", false),
            ("", false),
            ("linux", false),
            ("6", false),
        ] {
            assert_eq!(
                FrameDecoder::low_water_mark_is_safe(release),
                safe,
                "{release:?}"
            );
        }
    }

    #[test]
    fn two_frames_in_one_read() {
        let mut buffer = request_frame(b"a");
        buffer.extend_from_slice(&request_frame(b"bc"));
        let mut decoder = FrameDecoder::for_requests(1024);
        assert_eq!(decoder.decode(&mut buffer).unwrap().unwrap().len(), 11);
        assert_eq!(decoder.decode(&mut buffer).unwrap().unwrap().len(), 12);
        assert!(decoder.decode(&mut buffer).unwrap().is_none());
    }

    #[test]
    fn oversized_length_refused_before_allocating() {
        let mut buffer = BytesMut::with_capacity(4);
        buffer.put_u32(u32::MAX);
        let capacity_before = buffer.capacity();
        let mut decoder = FrameDecoder::for_requests(1 << 20);
        let error = decoder.decode(&mut buffer).unwrap_err();
        assert_eq!(
            error,
            WireError::FrameTooLarge {
                length: u64::from(u32::MAX),
                max_frame_bytes: 1 << 20
            }
        );
        assert_eq!(
            buffer.capacity(),
            capacity_before,
            "decoder reserved memory"
        );
        assert_eq!(
            buffer.len(),
            4,
            "a refused frame leaves the buffer as it was"
        );
        assert_eq!(error.error_code(), ErrorCode::MessageTooLarge);
    }

    #[test]
    fn length_shorter_than_header_refused() {
        let mut buffer = BytesMut::new();
        buffer.put_u32(3);
        buffer.put_slice(b"abc");
        let mut decoder = FrameDecoder::for_requests(1024);
        assert!(matches!(
            decoder.decode(&mut buffer),
            Err(WireError::Invalid { .. })
        ));
    }

    #[test]
    fn limit_is_inclusive() {
        let frame = request_frame(&[0u8; 6]);
        let mut buffer = frame.clone();
        assert!(
            FrameDecoder::for_requests(16)
                .decode(&mut buffer)
                .unwrap()
                .is_some()
        );
        let mut buffer = frame;
        assert!(FrameDecoder::for_requests(15).decode(&mut buffer).is_err());
    }
}
