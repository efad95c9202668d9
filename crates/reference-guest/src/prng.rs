//! Tiny deterministic generators: the splitmix64 finaliser for hashing ids together and wyrand
//! for streams of bytes. Both are pure functions of their state, so a guest's contents and its
//! writers' choices replay exactly from a seed.

/// The splitmix64 finaliser: a bijective mix of all 64 bits.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The wyrand generator: one `u64` of state, fast and good enough for test data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WyRand(pub(crate) u64);

impl WyRand {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A value in `0..n` (`n > 0`), by multiply-shift; the bias is below 2^-32 for our sizes.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = WyRand(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = rng.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn mix_separates_neighbours() {
        assert_ne!(mix64(0), mix64(1));
        assert_ne!(mix64(1) & 0xffff, mix64(2) & 0xffff);
    }
}
