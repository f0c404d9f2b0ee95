// Philox4x32-10 (Salmon et al., SC'11) on 16 counters at once, bit-exact with fastrec/_philox.py
// and Triton's tl.philox: shared by the dropout of attention.cpp and the dropout op of
// dropout.cpp. GCC / Clang vector extensions (16 uint32 lanes; the 32 x 32 -> 64-bit products
// in 16 uint64 lanes), so the rounds are SIMD whatever the auto-vectoriser decides.
#pragma once

#include <cstdint>

namespace fastrec {

typedef uint32_t PhiloxU32 __attribute__((vector_size(64)));   // 16 lanes
typedef uint64_t PhiloxU64 __attribute__((vector_size(128)));  // 16 lanes
typedef float PhiloxF32 __attribute__((vector_size(64)));      // 16 lanes

// Uniform [0, 1) floats for the counters (c0 + w, c1, 0, 0), w = 0..15, and the key (key0,
// key1) (the low and high words of the int64 seed): u = (out0 >> 8) * 2^-24, exact in fp32.
// c0 + w wraps modulo 2^32 as the counter word does.
inline PhiloxF32 philox_uniform16(uint32_t c0, uint32_t c1, uint32_t key0, uint32_t key1) {
  PhiloxU32 x0 = {}, x1 = {}, x2 = {}, x3 = {};
  for (int w = 0; w < 16; ++w) x0[w] = c0 + static_cast<uint32_t>(w);
  x1 += c1;
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    const PhiloxU64 pa = __builtin_convertvector(x0, PhiloxU64) * uint64_t{0xD2511F53u};
    const PhiloxU64 pb = __builtin_convertvector(x2, PhiloxU64) * uint64_t{0xCD9E8D57u};
    const PhiloxU32 n0 = __builtin_convertvector(pb >> 32, PhiloxU32) ^ x1 ^ k0;
    const PhiloxU32 n2 = __builtin_convertvector(pa >> 32, PhiloxU32) ^ x3 ^ k1;
    x1 = __builtin_convertvector(pb, PhiloxU32);  // low 32 bits
    x3 = __builtin_convertvector(pa, PhiloxU32);
    x0 = n0;
    x2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return __builtin_convertvector(x0 >> 8, PhiloxF32) * 0x1p-24f;
}

// The Philox key (key0, key1) of an int64 seed.
inline void philox_key(int64_t seed, uint32_t* key0, uint32_t* key1) {
  const uint64_t s = static_cast<uint64_t>(seed);
  *key0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
  *key1 = static_cast<uint32_t>(s >> 32);
}

}  // namespace fastrec
