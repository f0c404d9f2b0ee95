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
//
// torch's own stream (fastrec.use_dropout_stream("torch")), the same bits as torch's CPU ops:
//   torch_stream_mask_cpp(int[] shape, float keep) -> Tensor (bool)
//   torch_stream_dropout_cpp(Tensor x, float keep, float scale) -> (Tensor out, Tensor mask)
//   masked_scale_cpp(Tensor x, Tensor mask, float scale) -> Tensor
// torch's CPU bernoulli_(keep) draws, element by element in memory order, two 32-bit words of
// the default generator's MT19937 (hi, lo), u = ((hi << 32 | lo) & (2^53 - 1)) * 2^-53 in double
// and keeps iff u < keep (at::bernoulli_distribution<double>), serially, at ~15 ns an element
// for a float tensor. These ops run the same engine on a copy of the generator's state in a
// tight loop and write the advanced state back, so the mask and every later draw are torch's.
// F.dropout(x, p) on the CPU is x * noise with noise = bernoulli_(1 - p) / (1 - p) in x's dtype:
// torch_stream_dropout_cpp takes that factor (``scale``, computed by torch) and returns the mask
// for the backward, grad * (mask ? scale : 0) = masked_scale_cpp.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "philox.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <tuple>
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

// --------------------------------------------------------------------------- torch's stream
// at::mt19937_engine on a local copy of its state (same twist, same tempering).
class TorchEngine {
 public:
  explicit TorchEngine(const at::mt19937_data_pod& data) : d_(data) {}
  const at::mt19937_data_pod& data() const { return d_; }

  // count words, as count calls of at::mt19937's operator() would return them (in blocks, so the
  // tempering and the callers' loops vectorise).
  void words(uint32_t* __restrict out, int64_t count) {
    int64_t i = 0;
    while (i < count) {
      if (d_.left_ == 1) {  // the next call twists, then reads state[0] without a decrement
        twist();
        d_.left_ = kN + 1;
      }
      const int64_t take = std::min<int64_t>(d_.left_ - 1, count - i);
      const uint32_t* s = d_.state_.data() + d_.next_;
      for (int64_t w = 0; w < take; ++w) {
        uint32_t y = s[w];
        y ^= (y >> 11);
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= (y >> 18);
        out[i + w] = y;
      }
      d_.next_ += static_cast<uint32_t>(take);
      d_.left_ -= static_cast<int>(take);
      i += take;
    }
  }

  // bernoulli_distribution<double>(keep) for count elements: u in [0, 1) from 53 bits of two words
  // (hi, lo) per element, keep iff u < keep_prob.
  void keep(bool* __restrict out, int64_t count, double keep_prob) {
    constexpr int64_t kBlock = 1024;
    uint32_t w[2 * kBlock];
    for (int64_t n0 = 0; n0 < count; n0 += kBlock) {
      const int64_t len = std::min(kBlock, count - n0);
      words(w, 2 * len);
      for (int64_t n = 0; n < len; ++n) {
        const uint64_t bits = ((uint64_t{w[2 * n]} << 32) | w[2 * n + 1]) & ((uint64_t{1} << 53) - 1);
        out[n0 + n] = static_cast<double>(bits) * 0x1.0p-53 < keep_prob;
      }
    }
  }

 private:
  static constexpr int kN = 624, kM = 397;
  static inline uint32_t mix(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
  }
  void twist() {
    uint32_t* s = d_.state_.data();
    d_.left_ = kN;
    d_.next_ = 0;
    int j = 0;
    for (; j < kN - kM; ++j) s[j] = s[j + kM] ^ mix(s[j], s[j + 1]);
    for (; j < kN - 1; ++j) s[j] = s[j + kM - kN] ^ mix(s[j], s[j + 1]);
    s[kN - 1] = s[kM - 1] ^ mix(s[kN - 1], s[0]);
  }
  at::mt19937_data_pod d_;
};

// Runs fn(engine) on the default CPU generator's state under its lock, then stores the state.
template <typename Fn>
void with_default_engine(Fn&& fn) {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  TorchEngine engine(gen->engine().data());
  fn(engine);
  at::mt19937 advanced;
  advanced.set_data(engine.data());
  gen->set_engine(advanced);
}

void check_keep(double keep, const char* op) {
  TORCH_CHECK(keep >= 0.0 && keep <= 1.0, "fastrec ", op, ": keep must be in [0, 1], got ", keep);
}

at::Tensor torch_stream_mask_cpp(at::IntArrayRef shape, double keep) {
  check_keep(keep, "torch_stream_mask_cpp");
  at::Tensor mask = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const int64_t numel = mask.numel();
  with_default_engine([&](TorchEngine& engine) { engine.keep(m, numel, keep); });
  return mask;
}

// out = x * (mask ? scale : 0), in parallel over ranges of elements.
template <typename T>
void masked_scale(const T* __restrict x, const bool* __restrict m, T* __restrict out, int64_t numel, T scale) {
  at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
    // float(m) * scale is scale or 0 exactly, so this is x * (m ? scale : 0) bit for bit (inf * 0
    // included), written so that it vectorises.
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);
    for (int64_t n = begin; n < end; ++n) out[n] = x[n] * (static_cast<T>(mb[n]) * scale);
  });
}

std::tuple<at::Tensor, at::Tensor> torch_stream_dropout_cpp(const at::Tensor& x, double keep, double scale) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "fastrec torch_stream_dropout_cpp: x must be a float32 or float64 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.is_contiguous(), "fastrec torch_stream_dropout_cpp: x must be contiguous");
  check_keep(keep, "torch_stream_dropout_cpp");
  at::Tensor out = at::empty_like(x);
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t numel = x.numel();
  bool* m = mask.data_ptr<bool>();
  with_default_engine([&](TorchEngine& engine) { engine.keep(m, numel, keep); });  // serial, as torch's
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "torch_stream_dropout_cpp", [&] {
    masked_scale(x.data_ptr<scalar_t>(), m, out.data_ptr<scalar_t>(), numel, static_cast<scalar_t>(scale));
  });
  return {out, mask};
}

at::Tensor masked_scale_cpp(const at::Tensor& x, const at::Tensor& mask, double scale) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "fastrec masked_scale_cpp: x must be a float32 or float64 CPU tensor, got ", x.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == x.sizes() && mask.is_contiguous(),
              "fastrec masked_scale_cpp: mask must be a contiguous bool tensor of x's shape ", x.sizes(),
              ", got ", mask.scalar_type(), " ", mask.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_scale_cpp", [&] {
    masked_scale(xc.data_ptr<scalar_t>(), mask.data_ptr<bool>(), out.data_ptr<scalar_t>(), xc.numel(),
                 static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def("dropout_cpp(Tensor x, Tensor seed, float p) -> Tensor");
  m.def("torch_stream_mask_cpp(int[] shape, float keep) -> Tensor");
  m.def("torch_stream_dropout_cpp(Tensor x, float keep, float scale) -> (Tensor, Tensor)");
  m.def("masked_scale_cpp(Tensor x, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("dropout_cpp", &fastrec::dropout_cpp);
  m.impl("torch_stream_dropout_cpp", &fastrec::torch_stream_dropout_cpp);
  m.impl("masked_scale_cpp", &fastrec::masked_scale_cpp);
}

// No tensor argument to dispatch on: registered for every key.
TORCH_LIBRARY_IMPL(fastrec, CompositeExplicitAutograd, m) {
  m.impl("torch_stream_mask_cpp", &fastrec::torch_stream_mask_cpp);
}
