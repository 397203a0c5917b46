//! CRC-32C (Castagnoli): the checksum of every record batch, and of the broker's small files
//! (indexes, snapshots, checkpoints).
//!
//! Every byte produced and consumed is checksummed three or four times: the producer seals its
//! batch, the broker checks it on the way in and again as it leaves the disk, and the consumer
//! checks it once more. This is the `crc32c` crate: three interleaved `crc32q` streams, about
//! 25 GB/s on a 1 MiB batch in cache on the development machine.
//!
//! `crc-fast`, which folds 64 bytes at a time with VPCLMULQDQ and AVX-512, checksums the same
//! batch at about 90 GB/s (`cargo bench -p sluice-benches --bench protocol crc32c` compares
//! the two), but it did not make the pipeline faster. Three A/B runs of 1 KiB consume on this
//! 2-core VM, 5 to 8 interleaved pairs each, came out 1.25 x, 0.93 x and 0.82 x (medians).
//! With it the processes spent more time in the kernel (system time +15 % over 4 pairs),
//! plausibly the 512-bit register state saved at every context switch, and the cores' lower
//! clock under 512-bit work, which the socket and page-cache copies on the same cores pay.
//! Data that comes from memory is bound by memory either way. Hosts of the development machine
//! type differ: on one without AVX-512 (AMD family 25 model 1, 2026-11-23) `crc-fast` falls
//! back to 128-bit folding and is the slower of the two, 15-16 GiB/s against 18-19 GiB/s on
//! 100 B and 1 KiB record batches, so `crc32c` is the choice on both. One function here, so the
//! choice stays one line.

/// The CRC-32C of `bytes` (initial value all ones, reflected, final XOR all ones: the iSCSI
/// checksum, check value `0xe3069283`).
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[cfg(test)]
mod tests {
    use super::crc32c;
    use proptest::prelude::*;

    /// The definition, a bit at a time: slow, and independent of any table or instruction.
    fn bitwise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn check_value() {
        // The standard CRC-32C check value pins the algorithm, not just the crate.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(bitwise(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn agrees_with_the_definition_across_lengths_and_alignments() {
        // Every length to 1 KiB and a few past the implementation's block sizes, at every
        // alignment of the start.
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let lengths = (0..=1024).chain([4095, 4096, 4097, 8191, 65_536 + 7]);
        for len in lengths {
            for start in 0..8 {
                let slice = &data[start..start + len];
                assert_eq!(crc32c(slice), bitwise(slice), "start {start} len {len}");
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_definition(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
            prop_assert_eq!(crc32c(&bytes), bitwise(&bytes));
        }
    }
}
