//! Lowe's memo: the configurations (linearized operations, register state)
//! already explored, with the linearized acknowledged operations as a
//! bitset.
//!
//! Acknowledged operations have bits `0..known` in call order, so the set is
//! mostly a run of ones followed by a short ragged window (the operations
//! still concurrent with the search's position). A key stores the state, the
//! number of leading all-ones words, the window up to its last non-zero word
//! and the unknown operations' part (built by the search): a few words, not
//! the whole bitset.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use crate::model::StateId;

/// An FxHash-style word hasher with a final avalanche (MurmurHash3's fmix64),
/// so that the low bits a hash table uses depend on every input bit.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

impl WordHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.add(word);
    }

    fn write_usize(&mut self, word: usize) {
        self.add(word as u64);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// The linearized acknowledged operations as a bitset, and the
/// configurations explored so far.
#[derive(Debug)]
pub(crate) struct Memo {
    words: Vec<u64>,
    /// Acknowledged operations (bits `0..known`).
    known: usize,
    /// Every word below this one is all ones.
    full: usize,
    seen: HashSet<Box<[u64]>, BuildHasherDefault<WordHasher>>,
    key: Vec<u64>,
    /// Roughly how much memory `seen` takes.
    bytes: usize,
}

impl Memo {
    /// An empty set over `known` acknowledged operations; bit `i` is
    /// operation `i` of the prepared history.
    pub(crate) fn new(known: usize) -> Memo {
        Memo {
            words: vec![0; known.div_ceil(64)],
            known,
            full: 0,
            seen: HashSet::default(),
            key: Vec::new(),
            bytes: 0,
        }
    }

    /// The value of word `w` when all its operations are linearized.
    fn all_ones(&self, w: usize) -> u64 {
        match self.known % 64 {
            bits if bits != 0 && w + 1 == self.words.len() => (1 << bits) - 1,
            _ => u64::MAX,
        }
    }

    /// Adds acknowledged operation `op` to the linearized set.
    pub(crate) fn set(&mut self, op: usize) {
        self.words[op / 64] |= 1 << (op % 64);
        while self.full < self.words.len() && self.words[self.full] == self.all_ones(self.full) {
            self.full += 1;
        }
    }

    /// Takes acknowledged operation `op` out of the linearized set.
    pub(crate) fn clear(&mut self, op: usize) {
        self.words[op / 64] &= !(1 << (op % 64));
        self.full = self.full.min(op / 64);
    }

    /// Records the configuration made of the current set, `state` and
    /// `rest` (the unknown operations' part, of a fixed length): `true` if
    /// it is new, `false` if it was explored already.
    pub(crate) fn visit(&mut self, state: StateId, rest: &[u64]) -> bool {
        self.key.clear();
        self.key.push(((self.full as u64) << 32) | u64::from(state));
        let window = &self.words[self.full..];
        let len = window.iter().rposition(|&w| w != 0).map_or(0, |i| i + 1);
        self.key.extend_from_slice(&window[..len]);
        self.key.extend_from_slice(rest);
        if self.seen.contains(self.key.as_slice()) {
            false
        } else {
            self.seen.insert(self.key.clone().into_boxed_slice());
            // The words, the box, the allocator's header, the table's slot.
            self.bytes += 8 * self.key.len() + 16 + 16 + 24;
            true
        }
    }

    /// Roughly how many bytes the explored configurations take.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many distinct configurations have been explored.
    pub(crate) fn explored(&self) -> u64 {
        self.seen.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn same_set_and_state_is_seen_once() {
        let mut memo = Memo::new(130);
        memo.set(0);
        assert!(memo.visit(7, &[]));
        memo.set(129);
        assert!(memo.visit(7, &[]));
        memo.clear(129);
        memo.clear(0);
        // The same set, reached in another order: explored already.
        memo.set(129);
        assert!(memo.visit(7, &[]));
        memo.set(0);
        assert!(!memo.visit(7, &[]));
        // Another state, or another unknown part, is another configuration.
        assert!(memo.visit(8, &[]));
        assert!(memo.visit(7, &[1]));
        assert!(!memo.visit(7, &[1]));
        assert_eq!(memo.explored(), 5);
    }

    #[test]
    fn full_words_are_compressed_consistently() {
        let mut memo = Memo::new(200);
        for op in 0..200 {
            memo.set(op);
            assert!(memo.visit(1, &[]));
        }
        assert_eq!(memo.full, memo.words.len());
        for op in (0..200).rev() {
            memo.clear(op);
        }
        assert_eq!(memo.full, 0);
        // Descending, every set is new until the last makes the full set.
        for op in (1..200).rev() {
            memo.set(op);
            assert!(memo.visit(1, &[]), "op {op}");
        }
        memo.set(0);
        assert!(!memo.visit(1, &[]));
    }

    #[test]
    fn hasher_spreads_small_keys() {
        let build = BuildHasherDefault::<WordHasher>::default();
        let mut low_bits = HashSet::new();
        for i in 0..1024u64 {
            let key: Box<[u64]> = vec![i << 32, 0xff].into_boxed_slice();
            low_bits.insert(build.hash_one(&key) & 1023);
        }
        assert!(low_bits.len() > 600, "{}", low_bits.len());
    }
}
