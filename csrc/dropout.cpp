// Fused dropout on the CPU, one pass (read x, write out; no mask tensor):
//   torch.ops.fastrec.dropout_cpp(Tensor x, Tensor seed, float p) -> Tensor
// out[n] = x[n] * (keep(n) ? 1 / (1 - p) : 0) over the flat index n of the contiguous x, where
// keep(n) draws Philox4x32-10 with counter (n & 0xffffffff, n >> 32, 0, 0) and the key of the
// int64 seed: u = (out0 >> 8) * 2^-24, keep iff u >= p (p in fp32). The readable reference is
// dropout_torch in fastrec/ops/dropout.py; the Triton kernel (kernels/dropout.py) draws the same
// bits. The backward is this op on grad_out with the same seed and p (the mask is recomputed).
//
// Work: chunks of 16 elements aligned to multiples of 16 (so one chunk never straddles a 2^32
// boundary of n and its counters are (c0 + w, c1)), one Philox vector per chunk, in parallel
// over ranges of chunks with at::parallel_for (parallel only when built with -fopenmp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "philox.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastrec {
namespace {

constexpr int64_t kChunk = 16;     // elements per Philox vector
constexpr int64_t kGrain = 2048;   // chunks per parallel task at least (32K elements)

struct DropoutParams {
  uint32_t key0 = 0, key1 = 0;
  float threshold = 0;  // p in fp32, as the reference compares a float32 tensor with p
};

// out[n] = x[n] * z[n] for the chunks [c_begin, c_end) of x (numel elements).
template <typename T>
void dropout_chunks(const T* __restrict x, T* __restrict out, int64_t numel, int64_t c_begin,
                    int64_t c_end, const DropoutParams& d, T inv_keep) {
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t n0 = c * kChunk;
    const PhiloxF32 u = philox_uniform16(static_cast<uint32_t>(n0),
                                         static_cast<uint32_t>(static_cast<uint64_t>(n0) >> 32),
                                         d.key0, d.key1);
    const int64_t count = std::min(kChunk, numel - n0);
    if constexpr (std::is_same_v<T, float>) {
      if (count == kChunk) {
        const Vec<float> z = u >= d.threshold ? vsplat(inv_keep) : Vec<float>{};
        vstore(out + n0, vload(x + n0) * z);
        continue;
      }
    }
    for (int64_t w = 0; w < count; ++w) out[n0 + w] = x[n0 + w] * (u[w] >= d.threshold ? inv_keep : T(0));
  }
}

at::Tensor dropout_cpp(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "fastrec dropout (cpp): x must be a float32 or float64 CPU tensor, got ", x.scalar_type(),
              " on ", x.device());
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() >= 1,
              "fastrec dropout (cpp): seed must be a CPU int64 tensor of shape (1,), got ",
              seed.scalar_type(), " ", seed.sizes(), " on ", seed.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastrec dropout (cpp): p must be in [0, 1), got ", p);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = xc.numel();
  if (numel == 0) return out;
  DropoutParams d;
  philox_key(seed.contiguous().data_ptr<int64_t>()[0], &d.key0, &d.key1);
  d.threshold = static_cast<float>(p);
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  if (x.scalar_type() == at::kFloat) {
    const float* xp = xc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
    at::parallel_for(0, chunks, kGrain, [&](int64_t begin, int64_t end) {
      dropout_chunks(xp, op, numel, begin, end, d, inv_keep);
    });
  } else {
    const double* xp = xc.data_ptr<double>();
    double* op = out.data_ptr<double>();
    const double inv_keep = 1.0 / (1.0 - p);
    at::parallel_for(0, chunks, kGrain, [&](int64_t begin, int64_t end) {
      dropout_chunks(xp, op, numel, begin, end, d, inv_keep);
    });
  }
  return out;
}

}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) { m.def("dropout_cpp(Tensor x, Tensor seed, float p) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastrec, CPU, m) { m.impl("dropout_cpp", &fastrec::dropout_cpp); }
