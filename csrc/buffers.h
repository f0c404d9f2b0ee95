// Large per-call buffers of the CPU kernels (the RNN workspace, per-step outputs and gradients,
// the input projection: tens of MB at training shapes such as B=512 T=50 H=128). glibc serves
// allocations above its mmap threshold (which adapts up to 32 MB) with a fresh mmap each time,
// and the first-touch page faults on 4 KB pages then cost more than the recurrence writing the
// buffer. From kHugeMin = 32 MB, which glibc never serves from its heap, buffers are allocated
// 2 MB-aligned and advised as transparent huge pages (what torch does for all allocations under
// THP_MEM_ALLOC_ENABLE=1): one fault per 2 MB. Smaller buffers stay with at::empty: glibc reuses
// them from its heap, and huge-page mmaps of a few MB per call measured slower (B=128 T=50 H=64
// GRU forward 0.66x torch instead of 2x).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrec {

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr int64_t kHugePage = int64_t(2) << 20, kHugeMin = int64_t(32) << 20;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType()));
  if (nbytes >= kHugeMin) {
    const int64_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, bytes);
    if (data != nullptr) {
      madvise(data, bytes, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace fastrec
