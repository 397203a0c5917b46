//! Which partition a record goes to.
//!
//! 1. An explicit partition ([`Record::partition`](super::Record::partition)) wins.
//! 2. A record with a key goes to `(murmur2(key) & 0x7fff_ffff) % partition_count`, where
//!    [`murmur2`] is Kafka's variant of MurmurHash2 (seed `0x9747b28c`). The hash is stable
//!    across runs, builds and platforms, and equal to the Java Kafka client's
//!    `Utils.toPositive(Utils.murmur2(key)) % numPartitions`, so keyed records land where a
//!    Kafka producer would put them. Records with one key keep their order because they all go
//!    to one partition (while the partition count stays the same).
//! 3. A record without a key is *sticky*: it joins the partition the previous keyless record of
//!    its topic went to, until that partition's batch is closed (full, lingered out, flushed);
//!    the next keyless record then moves on to the next partition, round-robin. Batches fill up
//!    instead of spreading one record over every partition, and over time every partition gets
//!    its share.

/// The seed of Kafka's murmur2.
pub const MURMUR2_SEED: u32 = 0x9747_b28c;

/// Kafka's MurmurHash2 of `data`: 32-bit, seed [`MURMUR2_SEED`], little-endian 4-byte blocks.
/// The result is the bit pattern Java's `Utils.murmur2` returns as an `int`
/// (`murmur2(b"21") as i32 == -973_932_308`).
pub fn murmur2(data: &[u8]) -> u32 {
    const MULTIPLIER: u32 = 0x5bd1_e995;
    const SHIFT: u32 = 24;
    // Java takes the length as an int; keys over 4 GiB wrap the same way there.
    let mut hash = MURMUR2_SEED ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(MULTIPLIER);
        k ^= k >> SHIFT;
        k = k.wrapping_mul(MULTIPLIER);
        hash = hash.wrapping_mul(MULTIPLIER);
        hash ^= k;
    }
    // The tail falls through like the C switch it comes from.
    let tail = blocks.remainder();
    if tail.len() >= 3 {
        hash ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        hash ^= u32::from(tail[1]) << 8;
    }
    if let Some(&first) = tail.first() {
        hash ^= u32::from(first);
        hash = hash.wrapping_mul(MULTIPLIER);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(MULTIPLIER);
    hash ^= hash >> 15;
    hash
}

/// The partition of a record with `key`: `(murmur2(key) & 0x7fff_ffff) % partition_count`.
///
/// # Panics
/// When `partition_count` is 0 (a topic always has a partition; the producer checks).
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    assert!(partition_count > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partition_count
}

/// The sticky choice for keyless records of one topic.
#[derive(Clone, Debug)]
pub(crate) struct StickyPartitioner {
    /// Where keyless records go until that partition's batch closes.
    current: Option<u32>,
    /// Where the next round starts.
    next: u32,
}

impl StickyPartitioner {
    /// Starts the rotation at `start`, so that many producers do not all begin on partition 0.
    pub(crate) fn new(start: u32) -> StickyPartitioner {
        StickyPartitioner {
            current: None,
            next: start,
        }
    }

    /// The partition for the next keyless record.
    pub(crate) fn partition(&mut self, partition_count: u32) -> u32 {
        assert!(partition_count > 0, "a topic has at least one partition");
        if let Some(current) = self.current.filter(|current| *current < partition_count) {
            return current;
        }
        let chosen = self.next % partition_count;
        self.next = chosen.wrapping_add(1);
        self.current = Some(chosen);
        chosen
    }

    /// The batch of `partition` closed: keyless records move on if they were sticking to it.
    pub(crate) fn batch_closed(&mut self, partition: u32) {
        if self.current == Some(partition) {
            self.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own test, `UtilsTest.testMurmur2` in the Java client
    /// (clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java), as signed ints.
    const KAFKA_VECTORS: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];

    #[test]
    fn murmur2_matches_the_kafka_java_client() {
        for (key, expected) in KAFKA_VECTORS {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "murmur2({:?})",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn murmur2_covers_every_tail_length() {
        // 0 to 3 bytes after the last 4-byte block. The empty key, "42" and "hello" are values
        // another Kafka-compatible implementation pins; "a", "abcd" and "abcdefg" were computed
        // with a line-by-line Python transliteration of Kafka's Java `Utils.murmur2`. Any change
        // here moves keys to other partitions.
        let pinned: [(&[u8], u32); 6] = [
            (b"", 275_646_681),
            (b"42", 417_700_972),
            (b"hello", 2_132_663_229),
            (b"a", 0xa2d0_b27c),
            (b"abcd", 0xb11a_b5f4),
            (b"abcdefg", 0xeb59_5499),
        ];
        for (key, hash) in pinned {
            assert_eq!(
                murmur2(key),
                hash,
                "murmur2({:?})",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn keys_map_to_kafka_partitions() {
        // toPositive(-973932308) = 1173551340; % 16 = 12, % 7 = 5.
        assert_eq!(partition_for_key(b"21", 16), 1_173_551_340 % 16);
        assert_eq!(partition_for_key(b"21", 7), 1_173_551_340 % 7);
        assert_eq!(partition_for_key(b"abc", 10), 479_470_107 % 10);
        for count in 1..=64 {
            for (key, _) in KAFKA_VECTORS {
                assert!(partition_for_key(key, count) < count);
            }
        }
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for index in 0..8_000 {
            counts[partition_for_key(format!("key-{index}").as_bytes(), 8) as usize] += 1;
        }
        for (partition, count) in counts.iter().enumerate() {
            assert!(
                (800..1_200).contains(count),
                "partition {partition} got {count} of 8000 keys"
            );
        }
    }

    #[test]
    fn sticky_stays_until_the_batch_closes_then_rotates() {
        let mut sticky = StickyPartitioner::new(2);
        assert_eq!(sticky.partition(4), 2);
        assert_eq!(sticky.partition(4), 2);
        sticky.batch_closed(1); // another partition's batch: no effect
        assert_eq!(sticky.partition(4), 2);
        sticky.batch_closed(2);
        assert_eq!(sticky.partition(4), 3);
        sticky.batch_closed(3);
        assert_eq!(sticky.partition(4), 0);
        // A shrunk partition count never yields an out-of-range partition.
        let mut sticky = StickyPartitioner::new(7);
        assert_eq!(sticky.partition(8), 7);
        assert_eq!(sticky.partition(3), 8 % 3);
    }
}
