// Large per-call buffers of the CPU kernels (the RNN workspace, per-step outputs and gradients:
// tens of MB at training shapes). Fresh allocations that size come from mmap, and first-touch
// page faults on 4 KB pages cost more than the recurrence writing them; allocated 2 MB-aligned
// and advised as transparent huge pages (what torch does for every allocation when
// THP_MEM_ALLOC_ENABLE=1) they fault once per 2 MB. Below kHugeMin bytes, or where the kernel
// has no THP, this is at::empty.
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
  constexpr int64_t kHugePage = int64_t(2) << 20, kHugeMin = int64_t(4) << 20;
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
