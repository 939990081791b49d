// Emulator stand-in for curand_kernel.h, Philox4_32_10 only. The generator
// itself (counter increments and the 10 rounds) is cuRAND's own
// curand_philox4x32_x.h compiled as host code; curand_init / skipahead /
// curand4 below follow the documented cuRAND semantics for this generator
// (subsequence = the upper 64 counter bits, offset = element index in the
// subsequence, 4 elements per counter value).
#pragma once
#include "../emu_runtime.h"
#ifndef QUALIFIERS
#define QUALIFIERS static inline
#endif
#include <curand_philox4x32_x.h>

QUALIFIERS void skipahead(unsigned long long n, curandStatePhilox4_32_10_t* state) {
  state->STATE += unsigned(n & 3);
  n /= 4;
  if (state->STATE > 3) {
    n += 1;
    state->STATE -= 4;
  }
  Philox_State_Incr(state, n);
  state->output = curand_Philox4x32_10(state->ctr, state->key);
}

QUALIFIERS void skipahead_sequence(unsigned long long n, curandStatePhilox4_32_10_t* state) {
  Philox_State_Incr_hi(state, n);
  state->output = curand_Philox4x32_10(state->ctr, state->key);
}

QUALIFIERS void curand_init(unsigned long long seed, unsigned long long subsequence,
                            unsigned long long offset, curandStatePhilox4_32_10_t* state) {
  state->ctr = make_uint4(0, 0, 0, 0);
  state->key.x = unsigned(seed);
  state->key.y = unsigned(seed >> 32);
  state->STATE = 0;
  state->boxmuller_flag = 0;
  state->boxmuller_flag_double = 0;
  state->boxmuller_extra = 0.f;
  state->boxmuller_extra_double = 0.;
  skipahead_sequence(subsequence, state);
  skipahead(offset, state);
}

// The next four 32-bit values of the stream.
QUALIFIERS uint4 curand4(curandStatePhilox4_32_10_t* state) {
  const uint4 previous = state->output;
  Philox_State_Incr(state);
  state->output = curand_Philox4x32_10(state->ctr, state->key);
  const unsigned words[8] = {previous.x, previous.y, previous.z, previous.w,
                             state->output.x, state->output.y, state->output.z, state->output.w};
  const unsigned s = state->STATE & 3u;
  return make_uint4(words[s], words[s + 1], words[s + 2], words[s + 3]);
}
