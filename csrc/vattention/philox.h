// Counter-based Philox 4x32-10 and the mapping from random words to residual
// ranks. The counter layout matches cuRAND's curandStatePhilox4_32_10_t after
// curand_init(seed, subsequence, 4 * block): key = seed, counter = {block lo,
// block hi, subsequence lo, subsequence hi}. That is what lets the CPU sampler
// and the cuRAND-based CUDA sampler produce the same indices for the same seed.
#pragma once

#include "common.h"

namespace vattention {

struct PhiloxWords { uint32_t x, y, z, w; };

VATT_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(product >> 32);
  return uint32_t(product);
}

VATT_HD PhiloxWords philox4x32_10(PhiloxWords c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    c = PhiloxWords{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Where a draw lives in the Philox stream. Each (seed, call offset, row, draw set)
// names an independent sequence; draw j of it uses two 32-bit words of block j/2.
struct DrawSequence {
  uint64_t seed;
  uint32_t call_offset;  // < 2^30, so 4 * block fits cuRAND's 64-bit offset
  uint32_t row;
  uint32_t draw_set;     // kPilotDraws or kFinalDraws (sample.h)

  VATT_HD uint64_t subsequence() const { return uint64_t(row) | (uint64_t(draw_set) << 32); }
  VATT_HD uint64_t block(uint32_t pair) const { return uint64_t(pair) | (uint64_t(call_offset) << 32); }
};

VATT_HD uint64_t draw_word_pair(const PhiloxWords& block, uint32_t draw) {
  return (draw & 1u) ? (uint64_t(block.z) | (uint64_t(block.w) << 32))
                     : (uint64_t(block.x) | (uint64_t(block.y) << 32));
}

// Host reference of the whole draw: identical arithmetic to the CUDA path.
VATT_HD uint64_t philox_draw(const DrawSequence& s, uint32_t draw) {
  const uint64_t blk = s.block(draw >> 1);
  const uint64_t sub = s.subsequence();
  const PhiloxWords block = philox4x32_10(
      PhiloxWords{uint32_t(blk), uint32_t(blk >> 32), uint32_t(sub), uint32_t(sub >> 32)},
      uint32_t(s.seed), uint32_t(s.seed >> 32));
  return draw_word_pair(block, draw);
}

// floor(word * n / 2^64): a uniform rank in [0, n) from 64 random bits, with a
// bias below n / 2^64. Split so it is exact in 64-bit arithmetic everywhere.
VATT_HD uint64_t scale_to_range(uint64_t word, uint32_t n) {
  const uint64_t hi = (word >> 32) * n;
  const uint64_t lo = ((word & 0xffffffffull) * n) >> 32;
  return (hi + lo) >> 32;
}

}  // namespace vattention
