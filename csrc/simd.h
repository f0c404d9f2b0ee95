// SIMD building blocks shared by the CPU kernels: vectors as GCC / Clang vector extensions, 64
// bytes unless a kernel asks for another width (16 floats or 8 doubles; -march=native picks the
// instruction set), loads and stores, and a vectorised exp. Explicit vectors give one FMA per
// vector where GCC's loop vectoriser would emit shuffles for the row-blocked kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastrec {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T, int Bytes = 64>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T, int Bytes = 64>
using Vec = typename VecOf<T, Bytes>::type;  // 64 bytes: 16 floats or 8 doubles
template <typename T, int Bytes = 64>
constexpr int64_t kN = Bytes / sizeof(T);  // lanes of Vec<T, Bytes>

template <typename T, int Bytes = 64>
inline Vec<T, Bytes> vload(const T* p) {
  Vec<T, Bytes> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename T, int Bytes = 64>
inline void vstore(T* p, const Vec<T, Bytes>& x) {
  std::memcpy(p, &x, sizeof(x));
}
template <typename T, int Bytes = 64>
inline Vec<T, Bytes> vsplat(T a) {
  return Vec<T, Bytes>{} + a;
}

// exp(x) on 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes degree-6
// polynomial, 2^n built in the exponent bits. Max error ~1 ulp for x in [-87, 88.7]; returns 0
// below -87 (exp(-87) = 1.6e-38: softmax sums lose nothing) and for x = -inf.
inline Vec<float> vexp(Vec<float> x) {
  using VI = int32_t __attribute__((vector_size(64)));
  const Vec<float> lo = vsplat(-87.0f), hi = vsplat(88.7f);
  const Vec<float> round = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec<float> xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const Vec<float> n = (xc * 1.44269504088896341f + round) - round;  // round(x / ln2)
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;  // 2^n, n in [-126, 128)
  const Vec<float> two_n = reinterpret_cast<const Vec<float>&>(bits);
  return x < lo ? Vec<float>{} : p * two_n;
}

// Sum of the lanes of v.
template <typename T>
inline T vhsum(const Vec<T>& v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
  } else {
    return _mm512_reduce_add_pd(reinterpret_cast<const __m512d&>(v));
  }
#else
  T s = 0;
  for (int w = 0; w < kN<T>; ++w) s += v[w];
  return s;
#endif
}

// fp64 is the gradcheck path: accuracy over speed.
inline Vec<double> vexp(Vec<double> x) {
  for (int w = 0; w < kN<double>; ++w) x[w] = std::exp(x[w]);
  return x;
}

}  // namespace fastrec
