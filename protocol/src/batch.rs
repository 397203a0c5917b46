//! Record batches: the unit a producer builds, the broker validates, stamps and stores, and a
//! consumer reads back, always as the same bytes.
//!
//! ```text
//! offset  field               type   covered by crc32c
//!      0  base_offset         u64    no   (stamped by the broker)
//!      8  batch_length        u32    no   (bytes after this field)
//!     12  leader_epoch        u32    no   (stamped by the broker)
//!     16  magic               u8     no   (format version, checked first)
//!     17  crc32c              u32    -
//!     21  attributes          u16    yes  (bits 0-2 compression, bit 3 timestamp type)
//!     23  last_offset_delta   u32    yes
//!     27  base_timestamp      i64    yes  (ms since the Unix epoch)
//!     35  max_timestamp       i64    yes
//!     43  producer_id         u64    yes  (NO_PRODUCER_ID when not idempotent)
//!     51  producer_epoch      u16    yes
//!     53  base_sequence       u64    yes
//!     61  record_count        u32    yes
//!     65  records...                 yes
//!
//! record: length varint (bytes after it), attributes u8, timestamp_delta varint,
//!         offset_delta varint, key_length varint (-1 = no key), key,
//!         value_length varint, value, header_count varint,
//!         headers: (key_length varint, UTF-8 key, value_length varint, value)*
//! ```
//!
//! All integers are big-endian; varints are zig-zag LEB128. Because the CRC leaves out
//! `base_offset` and `leader_epoch`, the broker stamps both in place ([`stamp_base_offset`],
//! [`stamp_leader_epoch`]) without touching the checksum. A flipped bit anywhere else is caught
//! by [`RecordBatchRef::validate`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::WireError;
use crate::wire::{get_varint, put_varint, unzigzag, varint_len};

/// The record-batch format version this build writes and accepts.
pub const MAGIC: u8 = 1;
/// Bytes before the first record.
pub const HEADER_BYTES: usize = 65;
/// Bytes of `base_offset` and `batch_length`: the part of the header not counted by
/// `batch_length`.
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// `producer_id` of a batch from a producer without idempotence.
pub const NO_PRODUCER_ID: u64 = u64::MAX;
/// `producer_epoch` of a batch from a producer without idempotence.
pub const NO_PRODUCER_EPOCH: u16 = u16::MAX;
/// `base_sequence` of a batch from a producer without idempotence.
pub const NO_SEQUENCE: u64 = u64::MAX;

const BASE_OFFSET_AT: usize = 0;
const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 61;
/// The CRC covers everything from here to the end of the batch.
const CRC_START: usize = ATTRIBUTES_AT;

/// Attribute bits that select a compression codec. Only `0` (none) exists so far.
pub const ATTRIBUTE_COMPRESSION_MASK: u16 = 0b111;
/// Attribute bit: timestamps were set by the broker on append, not by the producer.
pub const ATTRIBUTE_LOG_APPEND_TIME: u16 = 0b1000;

/// Smallest possible record: seven one-byte fields (length, attributes, timestamp delta,
/// offset delta, key length, value length, header count).
const MIN_RECORD_BYTES: usize = 7;

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(out)
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(out)
}

/// Reads the total size (header included) of the batch at the front of `buf` from its
/// `batch_length`, or `None` when fewer than [`LOG_OVERHEAD_BYTES`] are there.
pub fn batch_size(buf: &[u8]) -> Option<u64> {
    if buf.len() < LOG_OVERHEAD_BYTES {
        return None;
    }
    Some(u64::from(read_u32(buf, BATCH_LENGTH_AT)) + LOG_OVERHEAD_BYTES as u64)
}

/// Reads the `base_timestamp` of the batch at the front of `buf` from its header alone, or
/// `None` when fewer than [`HEADER_BYTES`] are there. Nothing else of the batch is checked.
pub fn batch_base_timestamp(buf: &[u8]) -> Option<i64> {
    let bytes = buf.get(BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8)?;
    (buf.len() >= HEADER_BYTES).then(|| i64::from_be_bytes(bytes.try_into().expect("8 bytes")))
}

/// Writes `base_offset` into the header of the batch at the front of `buf`. The CRC stays valid.
pub fn stamp_base_offset(buf: &mut [u8], base_offset: u64) -> Result<(), WireError> {
    check_header_present(buf)?;
    buf[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
    Ok(())
}

/// Writes `leader_epoch` into the header of the batch at the front of `buf`. The CRC stays valid.
pub fn stamp_leader_epoch(buf: &mut [u8], leader_epoch: u32) -> Result<(), WireError> {
    check_header_present(buf)?;
    buf[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&leader_epoch.to_be_bytes());
    Ok(())
}

fn check_header_present(buf: &[u8]) -> Result<(), WireError> {
    if buf.len() < HEADER_BYTES {
        return Err(WireError::Truncated {
            what: "record batch header",
            needed: HEADER_BYTES - buf.len(),
        });
    }
    Ok(())
}

/// A borrowed record batch: a view over bytes that hold at least a whole header.
///
/// Header accessors read fixed positions and cannot fail. Nothing about the records is trusted
/// until [`RecordBatchRef::validate`] says so; [`RecordBatchRef::records`] checks as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordBatchRef<'a> {
    buf: &'a [u8],
}

impl<'a> RecordBatchRef<'a> {
    /// A view over exactly one batch: `buf` must hold the header and `batch_length` must match
    /// `buf`'s length. The records are not checked; call [`RecordBatchRef::validate`].
    pub fn new(buf: &'a [u8]) -> Result<Self, WireError> {
        check_header_present(buf)?;
        let size = batch_size(buf).unwrap_or(0);
        if size != buf.len() as u64 {
            return Err(WireError::CorruptBatch(format!(
                "batch_length says {size} bytes in all, buffer holds {}",
                buf.len()
            )));
        }
        Ok(RecordBatchRef { buf })
    }

    /// The whole batch as bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Bytes of the batch, header included.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn base_offset(&self) -> u64 {
        read_u64(self.buf, BASE_OFFSET_AT)
    }

    /// Bytes after the `batch_length` field.
    pub fn batch_length(&self) -> u32 {
        read_u32(self.buf, BATCH_LENGTH_AT)
    }

    pub fn leader_epoch(&self) -> u32 {
        read_u32(self.buf, LEADER_EPOCH_AT)
    }

    pub fn magic(&self) -> u8 {
        self.buf[MAGIC_AT]
    }

    /// The CRC stored in the header.
    pub fn crc(&self) -> u32 {
        read_u32(self.buf, CRC_AT)
    }

    /// The CRC the bytes actually have.
    pub fn computed_crc(&self) -> u32 {
        crate::checksum::crc32c(&self.buf[CRC_START..])
    }

    pub fn attributes(&self) -> u16 {
        read_u16(self.buf, ATTRIBUTES_AT)
    }

    pub fn last_offset_delta(&self) -> u32 {
        read_u32(self.buf, LAST_OFFSET_DELTA_AT)
    }

    /// Offset of the last record: `base_offset + last_offset_delta` (saturating, so a hostile
    /// header cannot overflow; `validate` rejects it).
    pub fn last_offset(&self) -> u64 {
        self.base_offset()
            .saturating_add(u64::from(self.last_offset_delta()))
    }

    pub fn base_timestamp(&self) -> i64 {
        read_u64(self.buf, BASE_TIMESTAMP_AT) as i64
    }

    pub fn max_timestamp(&self) -> i64 {
        read_u64(self.buf, MAX_TIMESTAMP_AT) as i64
    }

    pub fn producer_id(&self) -> u64 {
        read_u64(self.buf, PRODUCER_ID_AT)
    }

    pub fn producer_epoch(&self) -> u16 {
        read_u16(self.buf, PRODUCER_EPOCH_AT)
    }

    pub fn base_sequence(&self) -> u64 {
        read_u64(self.buf, BASE_SEQUENCE_AT)
    }

    pub fn record_count(&self) -> u32 {
        read_u32(self.buf, RECORD_COUNT_AT)
    }

    /// True when the batch came from an idempotent producer.
    pub fn has_producer_id(&self) -> bool {
        self.producer_id() != NO_PRODUCER_ID
    }

    /// The records, decoded lazily and checked as they go. Zero-copy: keys, values and headers
    /// borrow from the batch.
    pub fn records(&self) -> Records<'a> {
        Records {
            rest: &self.buf[HEADER_BYTES..],
            base_timestamp: self.base_timestamp(),
            remaining: self.record_count(),
            failed: false,
        }
    }

    /// Checks everything a broker must know before storing the batch, and a consumer before
    /// trusting it: magic, CRC, attributes, that `record_count` records are present and fill the
    /// batch exactly, that offset deltas run 0, 1, 2... up to `last_offset_delta`, and that
    /// `max_timestamp` is the largest record timestamp.
    ///
    /// # Errors
    /// [`WireError::CorruptBatch`] naming the first check that failed.
    pub fn validate(&self) -> Result<(), WireError> {
        let corrupt = |detail: String| Err(WireError::CorruptBatch(detail));
        if self.magic() != MAGIC {
            return corrupt(format!("magic {} (expected {MAGIC})", self.magic()));
        }
        let (stored, computed) = (self.crc(), self.computed_crc());
        if stored != computed {
            return corrupt(format!(
                "crc32c {stored:#010x} stored, {computed:#010x} computed"
            ));
        }
        let compression = self.attributes() & ATTRIBUTE_COMPRESSION_MASK;
        if compression != 0 {
            return corrupt(format!("compression codec {compression} is not supported"));
        }
        let unknown = self.attributes() & !(ATTRIBUTE_COMPRESSION_MASK | ATTRIBUTE_LOG_APPEND_TIME);
        if unknown != 0 {
            return corrupt(format!("unknown attribute bits {unknown:#06x}"));
        }
        let count = self.record_count();
        if count == 0 {
            return corrupt("record_count is 0".to_owned());
        }
        if u64::from(count) > (self.buf.len() - HEADER_BYTES) as u64 / MIN_RECORD_BYTES as u64 {
            return corrupt(format!(
                "record_count {count} cannot fit in {} bytes",
                self.buf.len()
            ));
        }
        if self.last_offset_delta() != count - 1 {
            return corrupt(format!(
                "last_offset_delta {} with {count} records",
                self.last_offset_delta()
            ));
        }
        if self.base_offset().checked_add(u64::from(count)).is_none() {
            return corrupt(format!("base_offset {} overflows", self.base_offset()));
        }
        // The records are walked with the fast decoder; the detailed one runs only to say why
        // a record failed.
        let base_timestamp = self.base_timestamp();
        let mut rest = &self.buf[HEADER_BYTES..];
        let mut max_timestamp = i64::MIN;
        for expected_delta in 0..count {
            if rest.is_empty() {
                return corrupt(format!(
                    "{count} records declared, {expected_delta} present"
                ));
            }
            let Some((record, used)) = decode_record_fast(rest, base_timestamp) else {
                let error = refusal(rest, base_timestamp);
                return corrupt(format!("record {expected_delta}: {error}"));
            };
            if record.offset_delta != expected_delta {
                return corrupt(format!(
                    "record {expected_delta} has offset_delta {}",
                    record.offset_delta
                ));
            }
            // Header structure and UTF-8 keys were checked by the record decoder.
            max_timestamp = max_timestamp.max(record.timestamp_ms);
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return corrupt(format!("{} bytes after the last record", rest.len()));
        }
        if max_timestamp != self.max_timestamp() {
            return corrupt(format!(
                "max_timestamp {} but the records reach {max_timestamp}",
                self.max_timestamp()
            ));
        }
        Ok(())
    }
}

/// An owned record batch over shared [`Bytes`]: cloning and slicing never copy the records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBatch {
    bytes: Bytes,
}

impl RecordBatch {
    /// Wraps exactly one batch, checking its header shape (not its records: see
    /// [`RecordBatch::validate`]).
    pub fn new(bytes: Bytes) -> Result<Self, WireError> {
        RecordBatchRef::new(&bytes)?;
        Ok(RecordBatch { bytes })
    }

    /// A borrowed view with every accessor.
    pub fn view(&self) -> RecordBatchRef<'_> {
        RecordBatchRef { buf: &self.bytes }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The batch's buffer, to build another batch in ([`RecordBatchBuilder::with_buffer`]),
    /// when nothing else holds its bytes; else the batch back.
    pub fn try_into_buffer(self) -> Result<BytesMut, RecordBatch> {
        self.bytes
            .try_into_mut()
            .map_err(|bytes| RecordBatch { bytes })
    }

    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn base_offset(&self) -> u64 {
        self.view().base_offset()
    }

    pub fn last_offset(&self) -> u64 {
        self.view().last_offset()
    }

    pub fn record_count(&self) -> u32 {
        self.view().record_count()
    }

    /// See [`RecordBatchRef::validate`].
    pub fn validate(&self) -> Result<(), WireError> {
        self.view().validate()
    }

    /// See [`RecordBatchRef::records`].
    pub fn records(&self) -> Records<'_> {
        self.view().records()
    }

    /// Returns the batch with `base_offset` (and `leader_epoch`) written into its header.
    ///
    /// In place when these bytes are the only reference to their buffer (the broker's case
    /// once the request frame around them is dropped); otherwise the batch is copied once.
    pub fn stamped(self, base_offset: u64, leader_epoch: u32) -> RecordBatch {
        let mut bytes = match self.bytes.try_into_mut() {
            Ok(unique) => unique,
            Err(shared) => BytesMut::from(&shared[..]),
        };
        // Both cannot fail: `new` checked that the header is present.
        let _ = stamp_base_offset(&mut bytes, base_offset);
        let _ = stamp_leader_epoch(&mut bytes, leader_epoch);
        RecordBatch {
            bytes: bytes.freeze(),
        }
    }
}

/// Splits a buffer of back-to-back batches (a fetch response, a segment read) into views.
///
/// Yields an error and stops at the first batch whose header is cut short or whose
/// `batch_length` runs past the end of the buffer.
pub fn split_batches(buf: &[u8]) -> BatchIter<'_> {
    BatchIter { rest: buf }
}

/// Iterator returned by [`split_batches`].
#[derive(Clone, Debug)]
pub struct BatchIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<RecordBatchRef<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let size = match batch_size(rest) {
            Some(size) if size >= HEADER_BYTES as u64 && size <= rest.len() as u64 => size as usize,
            _ => {
                return Some(Err(WireError::Truncated {
                    what: "record batch",
                    needed: batch_size(rest).map_or(LOG_OVERHEAD_BYTES, |size| {
                        (size as usize).saturating_sub(rest.len()).max(1)
                    }),
                }));
            }
        };
        let (batch, after) = rest.split_at(size);
        self.rest = after;
        Some(RecordBatchRef::new(batch))
    }
}

/// One record, borrowed from its batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub attributes: u8,
    /// Absolute timestamp: the batch's `base_timestamp` plus the record's delta.
    pub timestamp_ms: i64,
    pub offset_delta: u32,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    header_count: u32,
    header_bytes: &'a [u8],
}

impl<'a> Record<'a> {
    /// The record's offset in its partition.
    pub fn offset(&self, base_offset: u64) -> u64 {
        base_offset.saturating_add(u64::from(self.offset_delta))
    }

    /// Number of headers.
    pub fn header_count(&self) -> u32 {
        self.header_count
    }

    /// The headers in order, each checked as it is decoded.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            rest: self.header_bytes,
            remaining: self.header_count,
        }
    }
}

/// Iterator over a batch's records, returned by [`RecordBatchRef::records`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    rest: &'a [u8],
    base_timestamp: i64,
    remaining: u32,
    failed: bool,
}

impl Records<'_> {
    /// Stops the iteration at a record the fast decoder refused, and says why.
    #[cold]
    #[inline(never)]
    fn fail(&mut self) -> WireError {
        self.failed = true;
        refusal(self.rest, self.base_timestamp)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 || self.failed {
            return None;
        }
        // The fast decoder only says yes or no; the detailed one explains a no.
        match decode_record_fast(self.rest, self.base_timestamp) {
            Some((record, used)) => {
                self.rest = &self.rest[used..];
                self.remaining -= 1;
                Some(Ok(record))
            }
            None => Some(Err(self.fail())),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.failed {
            return (0, Some(0));
        }
        let upper = (self.remaining as usize).min(self.rest.len() / MIN_RECORD_BYTES);
        (0, Some(upper))
    }
}

/// A cursor over one record's bytes.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn varint(&mut self) -> Result<i64, WireError> {
        let (value, used) = get_varint(self.rest)?;
        self.rest = &self.rest[used..];
        Ok(value)
    }

    fn length(&mut self, what: &'static str) -> Result<Option<usize>, WireError> {
        match self.varint()? {
            -1 => Ok(None),
            length if length < 0 => Err(WireError::invalid(what, format!("length {length}"))),
            length => Ok(Some(usize::try_from(length).unwrap_or(usize::MAX))),
        }
    }

    fn take(&mut self, length: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if length > self.rest.len() {
            return Err(WireError::Truncated {
                what,
                needed: length - self.rest.len(),
            });
        }
        let (taken, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
}

/// Reads a varint at `*at`, advancing it; `None` when it is cut short or malformed. One- and
/// two-byte varints, nearly every field of a record, are read inline: the same fast path as
/// [`get_varint`]'s, written again over the position because sharing one (on a subslice, or
/// returning the length) cost 3-5 % more instructions per record in `batch_work`.
#[inline(always)]
fn varint_at(src: &[u8], at: &mut usize) -> Option<i64> {
    let start = *at;
    let first = *src.get(start)?;
    if first < 0x80 {
        *at = start + 1;
        return Some(unzigzag(u64::from(first)));
    }
    let second = *src.get(start + 1)?;
    if second < 0x80 {
        *at = start + 2;
        return Some(unzigzag(u64::from(first & 0x7f) | (u64::from(second) << 7)));
    }
    // Out of line, and handed the position rather than `at` itself, so `at` stays in a
    // register on the inline path.
    let (value, used) = long_varint(src, start)?;
    *at = start + used;
    Some(value)
}

/// [`varint_at`] for varints of three bytes and more: the value and the bytes it took.
#[cold]
#[inline(never)]
fn long_varint(src: &[u8], start: usize) -> Option<(i64, usize)> {
    get_varint(src.get(start..)?).ok()
}

/// Takes `length` bytes at `*at`, advancing it; `None` for a negative length or one that runs
/// past `src`.
#[inline(always)]
fn take_at<'a>(src: &'a [u8], at: &mut usize, length: i64) -> Option<&'a [u8]> {
    let length = usize::try_from(length).ok()?;
    let end = at.checked_add(length)?;
    let taken = src.get(*at..end)?;
    *at = end;
    Some(taken)
}

/// The hot path of record decoding: the same checks as [`decode_record`], without building
/// error messages. `None` means the record is invalid; `decode_record` then says why.
///
/// One index runs over `src`; the record's end, from its length, bounds every field, so a
/// field that runs past it fails as it would in a slice of the record alone.
#[inline(always)]
fn decode_record_fast(src: &[u8], base_timestamp: i64) -> Option<(Record<'_>, usize)> {
    let mut at = 0;
    let length = varint_at(src, &mut at)?;
    let body = take_at(src, &mut at, length)?;
    let used = at;
    let (&attributes, fields) = body.split_first()?;
    let mut at = 0;
    let timestamp_ms = base_timestamp.checked_add(varint_at(fields, &mut at)?)?;
    let offset_delta = u32::try_from(varint_at(fields, &mut at)?).ok()?;
    let key = match varint_at(fields, &mut at)? {
        -1 => None,
        length => Some(take_at(fields, &mut at, length)?),
    };
    let value_length = varint_at(fields, &mut at)?;
    let value = take_at(fields, &mut at, value_length)?;
    let header_count = u32::try_from(varint_at(fields, &mut at)?).ok()?;
    let header_bytes = &fields[at..];
    if header_count == 0 {
        if !header_bytes.is_empty() {
            return None;
        }
    } else if !headers_fill(header_bytes, header_count) {
        return None;
    }
    Some((
        Record {
            attributes,
            timestamp_ms,
            offset_delta,
            key,
            value,
            header_count,
            header_bytes,
        },
        used,
    ))
}

/// Whether `header_count` headers, each with a UTF-8 key, fill `header_bytes` exactly.
#[inline(never)]
fn headers_fill(header_bytes: &[u8], header_count: u32) -> bool {
    let mut at = 0;
    for _ in 0..header_count {
        let Some(key) = varint_at(header_bytes, &mut at)
            .and_then(|length| take_at(header_bytes, &mut at, length))
        else {
            return false;
        };
        if std::str::from_utf8(key).is_err() {
            return false;
        }
        if varint_at(header_bytes, &mut at)
            .and_then(|length| take_at(header_bytes, &mut at, length))
            .is_none()
        {
            return false;
        }
    }
    at == header_bytes.len()
}

/// Why [`decode_record_fast`] refused the record at the front of `src`, from the detailed
/// decoder (the two agree; a test holds them to it).
#[cold]
#[inline(never)]
fn refusal(src: &[u8], base_timestamp: i64) -> WireError {
    decode_record(src, base_timestamp)
        .err()
        .unwrap_or(WireError::invalid("record", "rejected"))
}

fn decode_record(src: &[u8], base_timestamp: i64) -> Result<(Record<'_>, usize), WireError> {
    let mut outer = Cursor { rest: src };
    let length = outer
        .length("record length")?
        .ok_or_else(|| WireError::invalid("record length", "-1"))?;
    let body = outer.take(length, "record")?;
    let used = src.len() - outer.rest.len();

    let mut cursor = Cursor { rest: body };
    let attributes = cursor.u8("record attributes")?;
    let timestamp_delta = cursor.varint()?;
    let timestamp_ms = base_timestamp
        .checked_add(timestamp_delta)
        .ok_or_else(|| WireError::invalid("timestamp_delta", "overflows"))?;
    let offset_delta = cursor.varint()?;
    let offset_delta = u32::try_from(offset_delta)
        .map_err(|_| WireError::invalid("offset_delta", offset_delta.to_string()))?;
    let key = match cursor.length("key length")? {
        None => None,
        Some(length) => Some(cursor.take(length, "key")?),
    };
    let value_length = cursor
        .length("value length")?
        .ok_or_else(|| WireError::invalid("value length", "-1"))?;
    let value = cursor.take(value_length, "value")?;
    let header_count = cursor.varint()?;
    let header_count = u32::try_from(header_count)
        .map_err(|_| WireError::invalid("header count", header_count.to_string()))?;
    // Each header takes at least two bytes (two one-byte lengths).
    if header_count as usize > cursor.rest.len() / 2 {
        return Err(WireError::invalid(
            "header count",
            format!("{header_count} headers in {} bytes", cursor.rest.len()),
        ));
    }
    let header_bytes = cursor.rest;
    // Walk the headers once so that a record's length must match its contents exactly.
    let mut headers = Headers {
        rest: header_bytes,
        remaining: header_count,
    };
    for header in headers.by_ref() {
        header?;
    }
    if !headers.rest.is_empty() {
        return Err(WireError::invalid(
            "record",
            format!("{} bytes after the last header", headers.rest.len()),
        ));
    }
    Ok((
        Record {
            attributes,
            timestamp_ms,
            offset_delta,
            key,
            value,
            header_count,
            header_bytes,
        },
        used,
    ))
}

/// Iterator over a record's headers, returned by [`Record::headers`].
#[derive(Clone, Debug)]
pub struct Headers<'a> {
    rest: &'a [u8],
    remaining: u32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = Result<(&'a str, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let mut cursor = Cursor { rest: self.rest };
        let result = (|| {
            let key_length = cursor
                .length("header key length")?
                .ok_or_else(|| WireError::invalid("header key length", "-1"))?;
            let key = cursor.take(key_length, "header key")?;
            let key = std::str::from_utf8(key)
                .map_err(|_| WireError::invalid("header key", "not UTF-8"))?;
            let value_length = cursor
                .length("header value length")?
                .ok_or_else(|| WireError::invalid("header value length", "-1"))?;
            let value = cursor.take(value_length, "header value")?;
            Ok((key, value))
        })();
        match result {
            Ok(header) => {
                self.rest = cursor.rest;
                Some(Ok(header))
            }
            Err(error) => {
                self.remaining = 0;
                Some(Err(error))
            }
        }
    }
}

/// Builds one record batch in a single buffer: records are encoded straight into place and the
/// header is filled in by [`RecordBatchBuilder::build`], which computes the CRC once.
#[derive(Debug)]
pub struct RecordBatchBuilder {
    buf: BytesMut,
    record_count: u32,
    base_timestamp: Option<i64>,
    max_timestamp: i64,
    producer_id: u64,
    producer_epoch: u16,
    base_sequence: u64,
    log_append_time: bool,
}

impl Default for RecordBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordBatchBuilder {
    /// An empty batch without a producer id.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty batch whose buffer has room for `capacity_bytes` of records.
    pub fn with_capacity(capacity_bytes: usize) -> Self {
        Self::with_buffer(BytesMut::new(), capacity_bytes)
    }

    /// An empty batch built in `buf` (emptied first; a buffer given back by
    /// [`RecordBatch::try_into_buffer`] is reused without allocating), with room for
    /// `capacity_bytes` of records.
    pub fn with_buffer(mut buf: BytesMut, capacity_bytes: usize) -> Self {
        buf.clear();
        buf.reserve(HEADER_BYTES + capacity_bytes);
        buf.put_bytes(0, HEADER_BYTES);
        RecordBatchBuilder {
            buf,
            record_count: 0,
            base_timestamp: None,
            max_timestamp: i64::MIN,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            base_sequence: NO_SEQUENCE,
            log_append_time: false,
        }
    }

    /// Marks the batch as coming from an idempotent producer.
    pub fn producer(mut self, producer_id: u64, producer_epoch: u16, base_sequence: u64) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Sets the timestamp-type attribute to log-append time.
    pub fn log_append_time(mut self, log_append_time: bool) -> Self {
        self.log_append_time = log_append_time;
        self
    }

    /// Records appended so far.
    pub fn len(&self) -> u32 {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Bytes the batch takes if built now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes that appending this record would add, so a producer can decide to start a new
    /// batch first.
    pub fn record_size_bytes(
        &self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> usize {
        let timestamp_delta =
            timestamp_ms.wrapping_sub(self.base_timestamp.unwrap_or(timestamp_ms));
        let body = self.record_body_bytes(timestamp_delta, key, value, headers);
        varint_len(body as i64) + body
    }

    /// Bytes of a record's body (everything after its length) at the next offset delta.
    #[inline]
    fn record_body_bytes(
        &self,
        timestamp_delta: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> usize {
        let key_bytes = match key {
            None => varint_len(-1),
            Some(key) => varint_len(key.len() as i64) + key.len(),
        };
        let mut header_bytes = varint_len(headers.len() as i64);
        for (name, value) in headers {
            header_bytes += varint_len(name.len() as i64)
                + name.len()
                + varint_len(value.len() as i64)
                + value.len();
        }
        1 + varint_len(timestamp_delta)
            + varint_len(i64::from(self.record_count))
            + key_bytes
            + varint_len(value.len() as i64)
            + value.len()
            + header_bytes
    }

    /// The distance of `timestamp_ms` from the batch's first timestamp (0 for the first
    /// record); `None` when it does not fit the format.
    #[inline]
    fn timestamp_delta(&self, timestamp_ms: i64) -> Option<i64> {
        match self.base_timestamp {
            None => Some(0),
            Some(base) => timestamp_ms.checked_sub(base),
        }
    }

    /// Appends a record. The first record's timestamp becomes the batch's `base_timestamp`.
    ///
    /// # Panics
    /// When a timestamp is so far from the first that the delta overflows `i64`, or the batch
    /// passes `u32::MAX` records: both are caller bugs that limits rule out long before.
    pub fn append(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) {
        let timestamp_delta = self
            .timestamp_delta(timestamp_ms)
            .expect("record timestamp too far from the batch's first");
        let body = self.record_body_bytes(timestamp_delta, key, value, headers);
        self.append_sized(body, timestamp_delta, timestamp_ms, key, value, headers);
    }

    /// Appends a record if the batch then takes at most `max_size_bytes`, and its timestamp's
    /// distance from the batch's first fits the format; returns whether it did. The same as
    /// [`record_size_bytes`](Self::record_size_bytes) followed by [`append`](Self::append),
    /// with the record sized once: the producer's per-record path. A record refused for its
    /// timestamp fits a new batch, whose first it is.
    ///
    /// # Panics
    /// When the batch passes `u32::MAX` records.
    pub fn try_append(
        &mut self,
        max_size_bytes: usize,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> bool {
        let Some(timestamp_delta) = self.timestamp_delta(timestamp_ms) else {
            return false;
        };
        let body = self.record_body_bytes(timestamp_delta, key, value, headers);
        if self.buf.len() + varint_len(body as i64) + body > max_size_bytes {
            return false;
        }
        self.append_sized(body, timestamp_delta, timestamp_ms, key, value, headers);
        true
    }

    /// Appends a record whose body (as [`record_body_bytes`](Self::record_body_bytes) counts
    /// it) takes `body` bytes, `timestamp_delta` from the batch's first.
    #[inline(always)]
    fn append_sized(
        &mut self,
        body: usize,
        timestamp_delta: i64,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) {
        self.base_timestamp.get_or_insert(timestamp_ms);
        self.buf.reserve(varint_len(body as i64) + body);
        let buf = &mut self.buf;
        put_varint(buf, body as i64);
        buf.put_u8(0);
        put_varint(buf, timestamp_delta);
        put_varint(buf, i64::from(self.record_count));
        match key {
            None => put_varint(buf, -1),
            Some(key) => {
                put_varint(buf, key.len() as i64);
                buf.extend_from_slice(key);
            }
        }
        put_varint(buf, value.len() as i64);
        buf.extend_from_slice(value);
        put_varint(buf, headers.len() as i64);
        for (name, value) in headers {
            put_varint(buf, name.len() as i64);
            buf.extend_from_slice(name.as_bytes());
            put_varint(buf, value.len() as i64);
            buf.extend_from_slice(value);
        }
        self.record_count = self
            .record_count
            .checked_add(1)
            .expect("over u32::MAX records");
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
    }

    /// Fills in the header and CRC and returns the batch (`base_offset` 0, `leader_epoch` 0).
    ///
    /// # Panics
    /// When no record was appended (an empty batch is invalid) or the batch is over 4 GiB.
    pub fn build(mut self) -> RecordBatch {
        assert!(
            self.record_count > 0,
            "a record batch needs at least one record"
        );
        let batch_length =
            u32::try_from(self.buf.len() - LOG_OVERHEAD_BYTES).expect("record batch over 4 GiB");
        let attributes = if self.log_append_time {
            ATTRIBUTE_LOG_APPEND_TIME
        } else {
            0
        };
        let header = &mut self.buf[..HEADER_BYTES];
        header[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&batch_length.to_be_bytes());
        header[MAGIC_AT] = MAGIC;
        header[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&attributes.to_be_bytes());
        header[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
            .copy_from_slice(&(self.record_count - 1).to_be_bytes());
        let base_timestamp = self.base_timestamp.unwrap_or(0);
        header[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8]
            .copy_from_slice(&base_timestamp.to_be_bytes());
        header[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8]
            .copy_from_slice(&self.max_timestamp.to_be_bytes());
        header[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        header[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2]
            .copy_from_slice(&self.producer_epoch.to_be_bytes());
        header[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 8]
            .copy_from_slice(&self.base_sequence.to_be_bytes());
        header[RECORD_COUNT_AT..RECORD_COUNT_AT + 4]
            .copy_from_slice(&self.record_count.to_be_bytes());
        let crc = crate::checksum::crc32c(&self.buf[CRC_START..]);
        self.buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        RecordBatch {
            bytes: self.buf.freeze(),
        }
    }
}

#[cfg(test)]
#[path = "batch_test.rs"]
mod tests;
