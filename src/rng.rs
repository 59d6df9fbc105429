//! A small seeded random generator whose whole state is two numbers, so a checkpoint can store it
//! and a resumed run draws exactly what the uninterrupted run would have (candle's CPU RNG cannot
//! be seeded). SplitMix64 seeding, xoshiro128++-style mixing on 64-bit words.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    seed: u64,
    counter: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }

    /// An independent stream for one purpose (`"shuffle"`, `"dropout"`...), stable across runs.
    pub fn derive(seed: u64, purpose: &str) -> Self {
        let mixed = purpose.bytes().fold(seed ^ 0x51_7c_c1_b7_27_22_0a_95, |h, b| splitmix64(h ^ u64::from(b), 0));
        Self::new(mixed)
    }

    /// The next 64 random bits (counter-based SplitMix64: draw k depends only on seed and k).
    pub fn next_u64(&mut self) -> u64 {
        let value = splitmix64(self.seed, self.counter);
        self.counter += 1;
        value
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for shuffling training data.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Draw `k` of the SplitMix64 stream seeded with `seed` (also the perf harness's data generator).
pub fn splitmix64(seed: u64, k: u64) -> u64 {
    let mut z = seed.wrapping_add((k + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_vectors() {
        // From shared/perf/README.md.
        assert_eq!(splitmix64(0, 0), 0xe220a8397b1dcdaf);
        assert_eq!(splitmix64(0, 1), 0x6e789e6aa1b965f4);
        assert_eq!(splitmix64(0, 3), 0xf88bb8a8724c81ec);
    }

    #[test]
    fn a_restored_generator_continues_the_same_stream() {
        let mut a = Rng::derive(7, "dropout");
        a.next_u64();
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: Rng = serde_json::from_str(&saved).unwrap();
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Rng::derive(7, "dropout").next_u64(), Rng::derive(7, "shuffle").next_u64());
    }
}
