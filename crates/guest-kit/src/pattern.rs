//! The data pattern the guest kit's `blk` verify/check workloads write and expect, so host-side
//! tests can check (or prepare) a disk image without booting anything.
//! Mirrors guest/src/drivers/virtio/mod.rs (SplitMix64) and guest/src/workloads/blk.rs (word
//! placement), which virtio-blk and NVMe share.

/// SplitMix64, as the guest computes it.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The little-endian 64-bit word at byte `position` of the disk for `seed`.
pub fn verify_pattern_word(seed: u64, position: u64) -> u64 {
    splitmix64(seed ^ (position / 8).wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// Checks that `bytes`, read from disk offset `offset`, hold the pattern; returns the first
/// mismatching byte position.
pub fn check_pattern(seed: u64, offset: u64, bytes: &[u8]) -> Result<(), u64> {
    for (index, word) in bytes.chunks_exact(8).enumerate() {
        let position = offset + 8 * index as u64;
        let found = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
        if found != verify_pattern_word(seed, position) {
            return Err(position);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finds_the_first_wrong_word() {
        let mut bytes: Vec<u8> = (0..4u64)
            .flat_map(|i| verify_pattern_word(7, 4096 + 8 * i).to_le_bytes())
            .collect();
        assert_eq!(check_pattern(7, 4096, &bytes), Ok(()));

        bytes[17] ^= 1;

        assert_eq!(check_pattern(7, 4096, &bytes), Err(4096 + 16));
    }
}
