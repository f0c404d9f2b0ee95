// Philox4x32-10 (Salmon et al., SC'11) on 16 counters at once, bit-exact with fastrec/_philox.py
// and Triton's tl.philox: shared by the dropout of attention.cpp (all four output words) and the
// dropout op of dropout.cpp (the first word). GCC / Clang vector extensions (16 uint32 lanes; the 32 x 32 -> 64-bit products
// as even / odd lane pairs of 64-bit lanes), so the rounds are SIMD whatever the
// auto-vectoriser decides.
#pragma once

#include <cstdint>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "philox_mul: even lanes are the low halves");

namespace fastrec {

typedef uint32_t PhiloxU32 __attribute__((vector_size(64)));  // 16 lanes
typedef uint64_t PhiloxU64 __attribute__((vector_size(64)));  // the same bits as 8 lanes
typedef float PhiloxF32 __attribute__((vector_size(64)));     // 16 lanes

// High and low 32 bits of the 32 x 32 -> 64-bit products x[w] * m, w = 0..15. The products of
// the even lanes (the low halves of the 64-bit lanes) and of the odd lanes (shifted down) are two
// 64-bit multiplies (vpmuludq); their halves are merged back in place with masks, which costs
// fewer instructions than widening to 16 uint64 lanes and narrowing back.
inline void philox_mul(PhiloxU32 x, uint64_t m, PhiloxU32* hi, PhiloxU32* lo) {
  const PhiloxU64 low_half = PhiloxU64{} + uint64_t{0xFFFFFFFFu};
  const PhiloxU64 x64 = reinterpret_cast<const PhiloxU64&>(x);
  const PhiloxU64 even = (x64 & low_half) * m, odd = (x64 >> 32) * m;
  const PhiloxU64 h = (even >> 32) | (odd & ~low_half), l = (even & low_half) | (odd << 32);
  *hi = reinterpret_cast<const PhiloxU32&>(h);
  *lo = reinterpret_cast<const PhiloxU32&>(l);
}

// The four output words out[0..3] of Philox4x32-10 for the counters (c0 + w, c1, 0, 0), w =
// 0..15, and the key (key0, key1) (the low and high words of the int64 seed). c0 + w wraps modulo
// 2^32 as the counter word does.
inline void philox4x16(uint32_t c0, uint32_t c1, uint32_t key0, uint32_t key1, PhiloxU32 out[4]) {
  PhiloxU32 x0 = {}, x1 = {}, x2 = {}, x3 = {};
  for (int w = 0; w < 16; ++w) x0[w] = c0 + static_cast<uint32_t>(w);
  x1 += c1;
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round) {
    PhiloxU32 hi_a, lo_a, hi_b, lo_b;
    philox_mul(x0, 0xD2511F53u, &hi_a, &lo_a);
    philox_mul(x2, 0xCD9E8D57u, &hi_b, &lo_b);
    x0 = hi_b ^ x1 ^ k0;
    x2 = hi_a ^ x3 ^ k1;
    x1 = lo_b;
    x3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = x0;
  out[1] = x1;
  out[2] = x2;
  out[3] = x3;
}

// Uniform [0, 1) floats u = (word >> 8) * 2^-24 of 16 output words, exact in fp32.
inline PhiloxF32 philox_word_uniform(PhiloxU32 word) {
  return __builtin_convertvector(word >> 8, PhiloxF32) * 0x1p-24f;
}

// Uniform [0, 1) floats of the first output word for the counters (c0 + w, c1, 0, 0), w = 0..15.
inline PhiloxF32 philox_uniform16(uint32_t c0, uint32_t c1, uint32_t key0, uint32_t key1) {
  PhiloxU32 words[4];
  philox4x16(c0, c1, key0, key1, words);
  return philox_word_uniform(words[0]);
}

// The Philox key (key0, key1) of an int64 seed.
inline void philox_key(int64_t seed, uint32_t* key0, uint32_t* key1) {
  const uint64_t s = static_cast<uint64_t>(seed);
  *key0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
  *key1 = static_cast<uint32_t>(s >> 32);
}

}  // namespace fastrec
