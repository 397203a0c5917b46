//! Primitive encodings shared by every message.
//!
//! ```text
//! u8 u16 u32 u64 i64      big-endian, fixed width
//! bool                    u8: 0 or 1, anything else is invalid
//! string                  u16 length, UTF-8 bytes
//! nullable string         i16 length (-1 = null), UTF-8 bytes
//! bytes                   u32 length, bytes
//! array<T>                u32 count, then the elements
//! nullable array<T>       i32 count (-1 = null), then the elements
//! varint                  zig-zag LEB128, at most 10 bytes (record batches only)
//! ```
//!
//! [`Reader`] reads from a [`Bytes`], so `bytes` fields come out as slices of the input
//! without copying. Every read is checked: bytes from the network never index or unwrap.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::WireError;

/// A checked cursor over an input buffer.
#[derive(Clone, Debug)]
pub struct Reader {
    buf: Bytes,
    position: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, position: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.position
    }

    /// Fails with [`WireError::TrailingBytes`] when input is left over.
    pub fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            left => Err(WireError::TrailingBytes(left)),
        }
    }

    fn take(&mut self, length: usize, what: &'static str) -> Result<&[u8], WireError> {
        let remaining = self.remaining();
        if length > remaining {
            return Err(WireError::Truncated {
                what,
                needed: length - remaining,
            });
        }
        let start = self.position;
        self.position += length;
        Ok(&self.buf[start..start + length])
    }

    fn fixed<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.fixed::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.fixed(what)?))
    }

    pub fn i16(&mut self, what: &'static str) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.fixed(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.fixed(what)?))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.fixed(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.fixed(what)?))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        Ok(i64::from_be_bytes(self.fixed(what)?))
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError::invalid(what, format!("boolean byte {other}"))),
        }
    }

    pub fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let length = usize::from(self.u16(what)?);
        utf8(self.take(length, what)?, what)
    }

    pub fn nullable_string(&mut self, what: &'static str) -> Result<Option<String>, WireError> {
        let length = self.i16(what)?;
        if length == -1 {
            return Ok(None);
        }
        let length = usize::try_from(length)
            .map_err(|_| WireError::invalid(what, format!("string length {length}")))?;
        utf8(self.take(length, what)?, what).map(Some)
    }

    /// A `bytes` field, as a zero-copy slice of the input.
    pub fn bytes(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let length = self.u32(what)? as usize;
        let remaining = self.remaining();
        if length > remaining {
            return Err(WireError::Truncated {
                what,
                needed: length - remaining,
            });
        }
        let start = self.position;
        self.position += length;
        Ok(self.buf.slice(start..start + length))
    }

    /// Everything not read yet, as a zero-copy slice; the reader is left empty.
    pub fn bytes_rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.position..);
        self.position = self.buf.len();
        rest
    }

    /// An array count, checked against the bytes left so that a lying count cannot make the
    /// decoder reserve memory the input could never fill: every element takes at least
    /// `min_element_bytes`.
    pub fn array_count(
        &mut self,
        what: &'static str,
        min_element_bytes: usize,
    ) -> Result<usize, WireError> {
        let count = self.u32(what)? as usize;
        self.check_count(what, count, min_element_bytes)?;
        Ok(count)
    }

    /// A nullable array count (-1 = null), checked like [`Reader::array_count`].
    pub fn nullable_array_count(
        &mut self,
        what: &'static str,
        min_element_bytes: usize,
    ) -> Result<Option<usize>, WireError> {
        let count = self.i32(what)?;
        if count == -1 {
            return Ok(None);
        }
        let count = usize::try_from(count)
            .map_err(|_| WireError::invalid(what, format!("array count {count}")))?;
        self.check_count(what, count, min_element_bytes)?;
        Ok(Some(count))
    }

    fn check_count(
        &self,
        what: &'static str,
        count: usize,
        min_element_bytes: usize,
    ) -> Result<(), WireError> {
        let needed = count.saturating_mul(min_element_bytes.max(1));
        if needed > self.remaining() {
            return Err(WireError::Truncated {
                what,
                needed: needed - self.remaining(),
            });
        }
        Ok(())
    }

    /// Decodes `count` elements with `element`, failing on the first error.
    pub fn array<T>(
        &mut self,
        what: &'static str,
        min_element_bytes: usize,
        mut element: impl FnMut(&mut Reader) -> Result<T, WireError>,
    ) -> Result<Vec<T>, WireError> {
        let count = self.array_count(what, min_element_bytes)?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(element(self)?);
        }
        Ok(out)
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, WireError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| WireError::invalid(what, "not UTF-8"))
}

/// Writes a `string`. A value over `u16::MAX` bytes is cut at the last character boundary
/// that fits (see [`fitting`]).
pub fn put_string(dst: &mut BytesMut, value: &str) {
    let value = fitting(value, usize::from(u16::MAX));
    dst.put_u16(value.len() as u16);
    dst.put_slice(value.as_bytes());
}

/// Writes a `nullable string`. A value over `i16::MAX` bytes is cut at the last character
/// boundary that fits (see [`fitting`]).
pub fn put_nullable_string(dst: &mut BytesMut, value: Option<&str>) {
    match value {
        None => dst.put_i16(-1),
        Some(value) => {
            let value = fitting(value, i16::MAX as usize);
            dst.put_i16(value.len() as i16);
            dst.put_slice(value.as_bytes());
        }
    }
}

/// `value`, or its longest prefix of at most `limit` bytes that ends at a character boundary.
///
/// Every string read from the wire fits its field, so a value passed through comes back whole;
/// what can be longer is text composed around one, an error message naming a 40,000-byte topic
/// say. Cutting it loses the tail of a message a person reads; the alternative was a panic in
/// whichever task encoded the answer.
fn fitting(value: &str, limit: usize) -> &str {
    if value.len() <= limit {
        return value;
    }
    let mut end = limit;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Writes a `bytes` field.
pub fn put_bytes(dst: &mut BytesMut, value: &[u8]) {
    let length = u32::try_from(value.len()).expect("bytes field longer than 4 GiB");
    dst.put_u32(length);
    dst.put_slice(value);
}

/// Writes an array count.
pub fn put_count(dst: &mut BytesMut, count: usize) {
    dst.put_u32(u32::try_from(count).expect("array longer than u32::MAX"));
}

/// Writes a nullable array count.
pub fn put_nullable_count(dst: &mut BytesMut, count: Option<usize>) {
    match count {
        None => dst.put_i32(-1),
        Some(count) => dst.put_i32(i32::try_from(count).expect("array longer than i32::MAX")),
    }
}

/// The largest encoding of a varint.
pub const MAX_VARINT_BYTES: usize = 10;

/// Bytes a zig-zag varint of `value` takes.
#[inline]
pub fn varint_len(value: i64) -> usize {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    // 7 payload bits per byte, zero still taking one: with `high` the index of the highest set
    // bit, (high * 9 + 73) / 64 is high / 7 + 1 for every high in 0..64, without a division.
    let high = 63 - (zigzag | 1).leading_zeros() as usize;
    (high * 9 + 73) / 64
}

/// Appends a zig-zag LEB128 varint. One- and two-byte varints, nearly every field of a record,
/// are stored straight from a register: a record batch's fields gathered in a stack array and
/// copied over stalled the builder on every record, the copy's loads waiting on the bytewise
/// stores just before them.
#[inline]
pub fn put_varint(dst: &mut impl BufMut, value: i64) {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    if zigzag < 0x80 {
        dst.put_u8(zigzag as u8);
    } else if zigzag < 0x4000 {
        dst.put_u16_le(((zigzag & 0x7f) | 0x80 | ((zigzag >> 7) << 8)) as u16);
    } else {
        put_long_varint(dst, value);
    }
}

/// [`put_varint`] for varints of three bytes and more.
#[cold]
#[inline(never)]
fn put_long_varint(dst: &mut impl BufMut, value: i64) {
    let mut bytes = [0u8; MAX_VARINT_BYTES];
    let length = encode_varint(value, &mut bytes);
    dst.put_slice(&bytes[..length]);
}

/// Writes `value` as a zig-zag LEB128 varint at the start of `out` and returns the bytes it
/// took.
///
/// # Panics
/// When `out` is shorter than the varint (never with [`MAX_VARINT_BYTES`] or more).
#[inline]
pub fn encode_varint(value: i64, out: &mut [u8]) -> usize {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let mut length = 0;
    while zigzag >= 0x80 {
        out[length] = (zigzag as u8) | 0x80;
        zigzag >>= 7;
        length += 1;
    }
    out[length] = zigzag as u8;
    length + 1
}

/// Reads a zig-zag LEB128 varint from the front of `src`; returns it and the bytes it took.
///
/// Fails when the input ends inside the varint or when it runs past 10 bytes or 64 bits.
#[inline]
pub fn get_varint(src: &[u8]) -> Result<(i64, usize), WireError> {
    // Most varints in a record (attributes, deltas, small lengths) fit in one or two bytes.
    match src {
        [first, ..] if *first < 0x80 => return Ok((unzigzag(u64::from(*first)), 1)),
        [first, second, ..] if *second < 0x80 => {
            let value = u64::from(first & 0x7f) | (u64::from(*second) << 7);
            return Ok((unzigzag(value), 2));
        }
        _ => {}
    }
    get_varint_slow(src)
}

#[inline]
pub(crate) fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cold]
fn get_varint_slow(src: &[u8]) -> Result<(i64, usize), WireError> {
    let mut value: u64 = 0;
    for (index, byte) in src.iter().take(MAX_VARINT_BYTES).enumerate() {
        let payload = u64::from(byte & 0x7f);
        if index == MAX_VARINT_BYTES - 1 && payload > 1 {
            return Err(WireError::invalid("varint", "overflows 64 bits"));
        }
        value |= payload << (7 * index);
        if byte & 0x80 == 0 {
            return Ok((unzigzag(value), index + 1));
        }
    }
    if src.len() >= MAX_VARINT_BYTES {
        Err(WireError::invalid("varint", "longer than 10 bytes"))
    } else {
        Err(WireError::Truncated {
            what: "varint",
            needed: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_known_encodings() {
        let cases: [(i64, &[u8]); 7] = [
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (300, &[0xd8, 0x04]),
        ];
        for (value, bytes) in cases {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(&out[..], bytes, "encoding of {value}");
            assert_eq!(varint_len(value), bytes.len());
            assert_eq!(get_varint(bytes).unwrap(), (value, bytes.len()));
        }
    }

    /// Each side of every byte-count boundary: the last value of each length and the first
    /// of the next, positive and negative, through every path of the encoders and the decoder.
    #[test]
    fn varint_lengths_at_every_boundary() {
        for bits in 0..=64u32 {
            let zigzags = [
                1u64.checked_shl(bits).map_or(u64::MAX, |first| first - 1),
                1u64.checked_shl(bits).unwrap_or(u64::MAX),
            ];
            for zigzag in zigzags {
                let value = unzigzag(zigzag);
                let significant = 64 - (zigzag | 1).leading_zeros();
                let expected = significant.div_ceil(7) as usize;
                let mut out = [0u8; MAX_VARINT_BYTES];
                let written = encode_varint(value, &mut out);
                assert_eq!(
                    written, expected,
                    "encoding of {value} ({zigzag:#x} zig-zagged)"
                );
                assert_eq!(varint_len(value), expected, "length of {value}");
                let mut put = BytesMut::new();
                put_varint(&mut put, value);
                assert_eq!(&put[..], &out[..written], "put_varint of {value}");
                assert_eq!(get_varint(&out[..written]).unwrap(), (value, written));
            }
        }
    }

    #[test]
    fn varint_rejects_overlong_and_truncated() {
        assert!(matches!(get_varint(&[]), Err(WireError::Truncated { .. })));
        assert!(matches!(
            get_varint(&[0x80, 0x80]),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            get_varint(&[0xff; 11]),
            Err(WireError::Invalid { .. })
        ));
        // Ten bytes whose last carries more than the 64th bit.
        let mut overflow = [0xffu8; 10];
        overflow[9] = 0x02;
        assert!(matches!(
            get_varint(&overflow),
            Err(WireError::Invalid { .. })
        ));
    }

    #[test]
    fn varint_extremes() {
        for value in [i64::MIN, i64::MAX, i64::MIN + 1, i64::MAX - 1] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), 10);
            assert_eq!(get_varint(&out).unwrap(), (value, 10));
        }
    }

    #[test]
    fn reader_refuses_lying_array_count() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        let mut reader = Reader::new(buf.freeze());
        assert!(matches!(
            reader.array_count("topics", 4),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn strings_too_long_for_their_field_are_cut_at_a_character_boundary() {
        // 'é' is two bytes: 16,383 of them and one more byte make 32,767; one more 'é' would
        // straddle the limit and is left out whole.
        let long = format!("x{}", "é".repeat(20_000));
        let mut buf = BytesMut::new();
        put_nullable_string(&mut buf, Some(&long));
        put_string(&mut buf, &"ü".repeat(40_000));
        let mut reader = Reader::new(buf.freeze());
        let cut = reader.nullable_string("message").unwrap().unwrap();
        assert_eq!(cut.len(), 32_767);
        assert!(long.starts_with(&cut));
        let cut = reader.string("name").unwrap();
        assert_eq!(cut.len(), 65_534);
        assert_eq!(cut, "ü".repeat(32_767));
        reader.finish().unwrap();
    }

    #[test]
    fn reader_bool_and_strings() {
        let mut buf = BytesMut::new();
        buf.put_u8(2);
        put_string(&mut buf, "héllo");
        put_nullable_string(&mut buf, None);
        let mut reader = Reader::new(buf.freeze());
        assert!(reader.bool("flag").is_err());
        assert_eq!(reader.string("name").unwrap(), "héllo");
        assert_eq!(reader.nullable_string("maybe").unwrap(), None);
        reader.finish().unwrap();
    }

    proptest! {
        #[test]
        fn varint_round_trip(value in any::<i64>()) {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            prop_assert_eq!(out.len(), varint_len(value));
            prop_assert_eq!(get_varint(&out).unwrap(), (value, out.len()));
        }

        #[test]
        fn varint_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            let _ = get_varint(&bytes);
        }
    }
}
