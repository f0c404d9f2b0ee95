// Catalogue scoring without the score matrix: top-k items and target ranks of h (B, d) against
// every row of W (V, d), in item tiles.
//
// Contract: the docstring of fastrec/ops/scoring.py. Each task takes a block of rows and a range
// of items, packs one tile of W transposed ((d, kTile), zero-padded to whole vectors) and computes
// the tile's scores with one FMA chain per score, k = 0..d-1 in order, starting from 0; a call
// with fewer than kDotRows rows reads W's rows in place instead (dot_row: an FMA chain over d per
// lane, then a fixed tree over the lanes). Within a call every score (the tile's, a target's, an
// excluded item's) goes through the same path, so a target's own score and the scores it is
// compared with are bitwise consistent. Work splits over (row block,
// item chunk) with at::parallel_for; the per-chunk top-k lists are merged and the per-chunk counts
// added in chunk order, so results do not depend on the thread count.
//
// Order of the top-k: higher score first; equal scores: lower item index first; NaN above +inf
// (torch.sort's order, descending and stable).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastrec {
namespace {

constexpr int64_t kTile = 512;  // items per tile: the packed tile (d x 512 fp32) stays in L2
constexpr int64_t kRowBlock = 64;  // rows of h per task
constexpr int kRegRows = 4;  // rows per register tile

template <typename T>
inline Vec<T> vfma(Vec<T> a, Vec<T> b, Vec<T> c) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 r = _mm512_fmadd_ps(reinterpret_cast<__m512&>(a), reinterpret_cast<__m512&>(b), reinterpret_cast<__m512&>(c));
    return reinterpret_cast<Vec<T>&>(r);
  } else {
    __m512d r = _mm512_fmadd_pd(reinterpret_cast<__m512d&>(a), reinterpret_cast<__m512d&>(b), reinterpret_cast<__m512d&>(c));
    return reinterpret_cast<Vec<T>&>(r);
  }
#else
  Vec<T> r;
  for (int64_t i = 0; i < kN<T>; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// Pack rows `ids[0..n)` of W (V, d) transposed into `packed` (d, width), width a multiple of
// kN<T>, the columns past n zero.
template <typename T>
void pack_rows(const T* W, int64_t d, const int64_t* ids, int64_t first, int64_t n, int64_t width, T* packed) {
  for (int64_t k = 0; k < d; ++k) std::fill(packed + k * width + n, packed + (k + 1) * width, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* w = W + (ids ? ids[j] : first + j) * d;
    for (int64_t k = 0; k < d; ++k) packed[k * width + j] = w[k];
  }
}

// scores (rows, width) = h[rows] (rows, d) @ packed (d, width): one FMA chain per score.
template <typename T, int R>
inline void score_rows(const T* h, int64_t d, const T* packed, int64_t width, T* out) {
  constexpr int64_t N = kN<T>;
  for (int64_t j = 0; j < width; j += N) {
    Vec<T> acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vsplat<T>(T(0));
    for (int64_t k = 0; k < d; ++k) {
      const Vec<T> w = vload<T>(packed + k * width + j);
      for (int r = 0; r < R; ++r) acc[r] = vfma<T>(vsplat<T>(h[r * d + k]), w, acc[r]);
    }
    for (int r = 0; r < R; ++r) vstore<T>(out + r * width + j, acc[r]);
  }
}

template <typename T>
void score_block(const T* h, int64_t rows, int64_t d, const T* packed, int64_t width, T* out) {
  int64_t r = 0;
  for (; r + kRegRows <= rows; r += kRegRows) score_rows<T, kRegRows>(h + r * d, d, packed, width, out + r * width);
  for (; r < rows; ++r) score_rows<T, 1>(h + r * d, d, packed, width, out + r * width);
}

// The few-rows path: one score as a vector FMA chain over d (16 lanes), then the lanes added
// pairwise in a fixed tree. No packing, so a batch of one reads W once, in order.
template <typename T>
inline T dot_row(const T* h, const T* w, int64_t d) {
  constexpr int64_t N = kN<T>;
  Vec<T> acc = vsplat<T>(T(0));
  int64_t k = 0;
  for (; k + N <= d; k += N) acc = vfma<T>(vload<T>(h + k), vload<T>(w + k), acc);
  if (k < d) {
    Vec<T> a = vsplat<T>(T(0)), b = vsplat<T>(T(0));
    std::memcpy(&a, h + k, (d - k) * sizeof(T));
    std::memcpy(&b, w + k, (d - k) * sizeof(T));
    acc = vfma<T>(a, b, acc);
  }
  T lanes[N];
  vstore<T>(lanes, acc);
  for (int64_t half = N / 2; half >= 1; half /= 2)
    for (int64_t i = 0; i < half; ++i) lanes[i] += lanes[i + half];
  return lanes[0];
}

// Calls with fewer rows than this score by dot_row, the others by packed tiles (score_block).
constexpr int64_t kDotRows = 8;

// scores (rows, width) of items t0 .. t0 + n - 1 for rows h (rows, d), by the call's path.
template <typename T>
void score_tile(const T* h, int64_t rows, int64_t d, const T* W, int64_t t0, int64_t n, int64_t width, bool dot_path,
                T* packed, T* out) {
  if (dot_path) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * width + j] = dot_row<T>(h + r * d, W + (t0 + j) * d, d);
    return;
  }
  pack_rows<T>(W, d, nullptr, t0, n, width, packed);
  score_block<T>(h, rows, d, packed, width, out);
}

// The score of (row, item) by the call's path (packed: lane 0 of a one-item tile).
template <typename T>
T pair_score(const T* h_row, const T* W, int64_t d, int64_t item, bool dot_path, std::vector<T>& packed,
             std::vector<T>& out) {
  if (dot_path) return dot_row<T>(h_row, W + item * d, d);
  const int64_t width = kN<T>;
  packed.resize(d * width);
  out.resize(width);
  pack_rows<T>(W, d, &item, 0, 1, width, packed.data());
  score_rows<T, 1>(h_row, d, packed.data(), width, out.data());
  return out[0];
}

// a ranks before b: higher score, NaN above everything, equal scores by lower index.
template <typename T>
inline bool before(T as, int64_t ai, T bs, int64_t bi) {
  const bool an = std::isnan(as), bn = std::isnan(bs);
  if (an || bn) return an && (!bn || ai < bi);
  return as > bs || (as == bs && ai < bi);
}

// A row's best k of the items seen so far, as a heap whose front is the worst kept.
template <typename T>
struct TopK {
  std::vector<std::pair<T, int64_t>> items;
  int64_t k;
  static bool worse_first(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return before<T>(a.first, a.second, b.first, b.second);
  }
  // Items arrive in increasing index order, so an equal score never displaces the worst kept.
  inline void push(T s, int64_t i) {
    if ((int64_t)items.size() < k) {
      items.emplace_back(s, i);
      std::push_heap(items.begin(), items.end(), worse_first);
    } else if (before<T>(s, i, items.front().first, items.front().second)) {
      std::pop_heap(items.begin(), items.end(), worse_first);
      items.back() = {s, i};
      std::push_heap(items.begin(), items.end(), worse_first);
    }
  }
  // push(s[j], base + j) for j in [0, n): most scores fall below the worst kept, one compare each.
  void scan(const T* s, int64_t n, int64_t base) {
    int64_t j = 0;
    for (; j < n && (int64_t)items.size() < k; ++j) push(s[j], base + j);
    if (j == n) return;
    T worst = items.front().first;
    for (; j < n; ++j) {
      const T v = s[j];
      if (!(v > worst) && v == v) continue;
      push(v, base + j);
      worst = items.front().first;
    }
  }
};

// Each row's excluded items, sorted and without repeats, from the CSR pair (offsets (B+1,), ids).
std::vector<std::vector<int64_t>> sorted_exclusions(const at::Tensor& offsets, const at::Tensor& ids, int64_t B) {
  std::vector<std::vector<int64_t>> rows(B);
  if (offsets.numel() == 0) return rows;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    rows[b].assign(id + off[b], id + off[b + 1]);
    std::sort(rows[b].begin(), rows[b].end());
    rows[b].erase(std::unique(rows[b].begin(), rows[b].end()), rows[b].end());
  }
  return rows;
}

void check_inputs(const at::Tensor& h, const at::Tensor& W, const at::Tensor& offsets, const at::Tensor& ids) {
  TORCH_CHECK(h.dim() == 2 && W.dim() == 2 && h.size(1) == W.size(1), "h must be (B, d) and W (V, d)");
  TORCH_CHECK(h.scalar_type() == W.scalar_type(), "h and W must share a dtype");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, "scoring_cpp takes float32 / float64");
  TORCH_CHECK(offsets.numel() == 0 || offsets.numel() == h.size(0) + 1, "exclude offsets must be (B + 1,) or empty");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kLong, "exclude must be int64");
}

// Split V items into chunks so that (row blocks x chunks) gives every thread work, each chunk at
// least kChunkWork multiply-adds (below that, waking a thread costs more than the chunk).
constexpr int64_t kChunkWork = int64_t(1) << 22;
int64_t item_chunks(int64_t B, int64_t V, int64_t d) {
  const int64_t row_blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, B * V * d / kChunkWork));
  const int64_t wanted = row_blocks >= threads ? 1 : (threads + row_blocks - 1) / row_blocks;
  return std::max<int64_t>(1, std::min(wanted, (V + kTile - 1) / kTile));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& h_, const at::Tensor& W_, int64_t k,
                                             const at::Tensor& offsets, const at::Tensor& ids) {
  const at::Tensor h = h_.contiguous(), W = W_.contiguous();
  const int64_t B = h.size(0), d = h.size(1), V = W.size(0);
  const auto excluded = sorted_exclusions(offsets, ids, B);
  const bool dot_path = B < kDotRows;
  const int64_t chunks = item_chunks(B, V, d), row_blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t per_chunk = (V + chunks - 1) / chunks;
  // Per (chunk, row): the chunk's best k, merged below.
  std::vector<std::vector<std::pair<T, int64_t>>> found(chunks * B);
  const T* hp = h.data_ptr<T>();
  const T* Wp = W.data_ptr<T>();
  at::parallel_for(0, row_blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> packed(d * kTile), scores(kRowBlock * kTile);
    std::vector<TopK<T>> best(kRowBlock);
    std::vector<size_t> cursor(kRowBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / chunks, chunk = task % chunks;
      const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, B - r0);
      const int64_t i0 = chunk * per_chunk, i1 = std::min(V, i0 + per_chunk);
      for (int64_t r = 0; r < rows; ++r) {
        best[r].items.clear();
        best[r].k = k;
        const auto& ex = excluded[r0 + r];
        cursor[r] = std::lower_bound(ex.begin(), ex.end(), i0) - ex.begin();
      }
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t n = std::min(kTile, i1 - t0), width = round_up(n, kN<T>);
        score_tile<T>(hp + r0 * d, rows, d, Wp, t0, n, width, dot_path, packed.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* s = scores.data() + r * width;
          const auto& ex = excluded[r0 + r];
          for (size_t& c = cursor[r]; c < ex.size() && ex[c] < t0 + n; ++c) s[ex[c] - t0] = -std::numeric_limits<T>::infinity();
          best[r].scan(s, n, t0);
        }
      }
      for (int64_t r = 0; r < rows; ++r) found[chunk * B + r0 + r] = best[r].items;
    }
  });
  at::Tensor values = at::empty({B, k}, h.options());
  at::Tensor indices = at::empty({B, k}, h.options().dtype(at::kLong));
  T* vp = values.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<T, int64_t>> all;
    for (int64_t b = begin; b < end; ++b) {
      all.clear();
      for (int64_t c = 0; c < chunks; ++c) all.insert(all.end(), found[c * B + b].begin(), found[c * B + b].end());
      std::sort(all.begin(), all.end(), TopK<T>::worse_first);
      for (int64_t j = 0; j < k; ++j) {
        vp[b * k + j] = all[j].first;
        ip[b * k + j] = all[j].second;
      }
    }
  });
  return {values, indices};
}

// ranks (B,): 1 + #{j != t : s_j >= s_t}; ranks_excluded (B,): the same without the row's
// excluded items (never the target). Both 0 in a row where some score is NaN.
template <typename T>
std::tuple<at::Tensor, at::Tensor> ranks_impl(const at::Tensor& h_, const at::Tensor& W_, const at::Tensor& target_,
                                              const at::Tensor& offsets, const at::Tensor& ids) {
  const at::Tensor h = h_.contiguous(), W = W_.contiguous(), target = target_.contiguous();
  const int64_t B = h.size(0), d = h.size(1), V = W.size(0);
  const auto excluded = sorted_exclusions(offsets, ids, B);
  const bool dot_path = B < kDotRows;
  const T* hp = h.data_ptr<T>();
  const T* Wp = W.data_ptr<T>();
  const int64_t* tp = target.data_ptr<int64_t>();
  // The targets' scores, and per row how many of its excluded items (not the target) score at
  // least the target's; NaN anywhere marks the row.
  std::vector<T> target_score(B);
  std::vector<int64_t> excluded_at_least(B, 0);
  std::vector<char> saw_nan(B, 0);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> packed, out;
    for (int64_t b = begin; b < end; ++b) {
      const T st = pair_score<T>(hp + b * d, Wp, d, tp[b], dot_path, packed, out);
      target_score[b] = st;
      for (int64_t item : excluded[b]) {
        if (item == tp[b]) continue;
        const T s = pair_score<T>(hp + b * d, Wp, d, item, dot_path, packed, out);
        excluded_at_least[b] += s >= st;
      }
    }
  });
  const int64_t chunks = item_chunks(B, V, d), row_blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t per_chunk = (V + chunks - 1) / chunks;
  std::vector<int64_t> counts(chunks * B, 0);
  std::vector<char> nans(chunks * B, 0);
  at::parallel_for(0, row_blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> packed(d * kTile), scores(kRowBlock * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / chunks, chunk = task % chunks;
      const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, B - r0);
      const int64_t i0 = chunk * per_chunk, i1 = std::min(V, i0 + per_chunk);
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t n = std::min(kTile, i1 - t0), width = round_up(n, kN<T>);
        score_tile<T>(hp + r0 * d, rows, d, Wp, t0, n, width, dot_path, packed.data(), scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          const T* s = scores.data() + r * width;
          const T st = target_score[r0 + r];
          int64_t count = 0, nan = 0;
          for (int64_t j = 0; j < n; ++j) {
            count += s[j] >= st;
            nan += s[j] != s[j];
          }
          counts[chunk * B + r0 + r] += count;
          nans[chunk * B + r0 + r] |= nan > 0;
        }
      }
    }
  });
  at::Tensor ranks = at::empty({B}, target.options());
  at::Tensor ranks_excluded = at::empty({B}, target.options());
  int64_t* rp = ranks.data_ptr<int64_t>();
  int64_t* ep = ranks_excluded.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t count = 0;
    bool nan = saw_nan[b] || std::isnan(target_score[b]);
    for (int64_t c = 0; c < chunks; ++c) {
      count += counts[c * B + b];
      nan = nan || nans[c * B + b];
    }
    // The target meets s_t >= s_t once, which makes the count 1-based.
    rp[b] = nan ? 0 : count;
    ep[b] = nan ? 0 : count - excluded_at_least[b];
  }
  return {ranks, ranks_excluded};
}

std::tuple<at::Tensor, at::Tensor> scoring_topk_cpp(const at::Tensor& h, const at::Tensor& W, int64_t k,
                                                    const at::Tensor& offsets, const at::Tensor& ids) {
  check_inputs(h, W, offsets, ids);
  TORCH_CHECK(k >= 1 && k <= W.size(0), "k must be in 1..V");
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "scoring_topk_cpp", [&] { out = topk_impl<scalar_t>(h, W, k, offsets, ids); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scoring_ranks_cpp(const at::Tensor& h, const at::Tensor& W, const at::Tensor& target,
                                                     const at::Tensor& offsets, const at::Tensor& ids) {
  check_inputs(h, W, offsets, ids);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == h.size(0) && target.scalar_type() == at::kLong,
              "target must be int64 (B,)");
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "scoring_ranks_cpp",
                             [&] { out = ranks_impl<scalar_t>(h, W, target, offsets, ids); });
  return out;
}

}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def("scoring_topk_cpp(Tensor h, Tensor W, int k, Tensor exclude_offsets, Tensor exclude_ids) -> (Tensor, Tensor)");
  m.def(
      "scoring_ranks_cpp(Tensor h, Tensor W, Tensor target, Tensor exclude_offsets, Tensor exclude_ids) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("scoring_topk_cpp", &fastrec::scoring_topk_cpp);
  m.impl("scoring_ranks_cpp", &fastrec::scoring_ranks_cpp);
}
