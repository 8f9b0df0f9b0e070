// CPU backend of catalog_topk (decoding/ops/catalog_topk.py). Threads split the catalog into
// contiguous item ranges; each keeps, per request, a bounded heap of its k best (score, item)
// and the heaps are merged at the end, so memory is O(threads * B * k), never [B, N]. The order
// (score descending, then item id ascending) is total, so the result does not depend on the
// thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace decoding {

namespace {

using Entry = std::pair<float, int64_t>;  // (score, item)

// a better than b: higher score, then lower item id
inline bool better(const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

float half_to_float_slow(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float16 -> float32 through a 65,536-entry table (256 KiB, built once): faster than bit
// manipulation per element and portable (no F16C needed)
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_to_float_slow(static_cast<uint16_t>(i));
    return t;
  }();
  return table.data();
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Dot product with 8 independent lanes (GCC/Clang vector extensions): a plain loop is not
// vectorised without -ffast-math, because float addition order is fixed.
typedef float v8f __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
float dot(const float* a, const float* b, int64_t n) {
  v8f acc = v8f{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f x, y;
    std::memcpy(&x, a + j, sizeof(x));
    std::memcpy(&y, b + j, sizeof(y));
    acc += x * y;
  }
  float total = 0.0f;
  for (int k = 0; k < 8; ++k) total += acc[k];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

struct Filter {
  const bool* item_mask;  // [B or 1, N] rows with stride mask_stride, or null
  int64_t mask_stride;
  const int64_t* excluded;  // [B, X] sorted, padded with N, or null
  int64_t X;
  bool ok(int64_t b, int64_t i) const {
    if (item_mask && !item_mask[b * mask_stride + i]) return false;
    if (excluded) {
      const int64_t* row = excluded + b * X;
      if (std::binary_search(row, row + X, i)) return false;
    }
    return true;
  }
};

// Streams items [0, N) with score(b, i, scratch) over `threads` ranges; writes the top k.
template <typename Scratch, typename Prepare, typename Score>
void stream_topk(int64_t B, int64_t N, int64_t K, const Filter& filter, int num_threads, int64_t scratch_size,
                 Prepare prepare, Score score, float* out_scores, int64_t* out_items) {
  std::vector<std::vector<Entry>> heaps(static_cast<size_t>(num_threads) * B);
  auto worse = [](const Entry& a, const Entry& b) { return better(a, b); };  // heap top = worst kept
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = N * t / T, hi = N * (t + 1) / T;
    std::vector<Scratch> scratch(std::max<int64_t>(scratch_size, 1));
    std::vector<Entry>* mine = &heaps[static_cast<size_t>(t) * B];
    for (int64_t i = lo; i < hi; ++i) {
      prepare(i, scratch.data());
      for (int64_t b = 0; b < B; ++b) {
        const float s = score(b, i, scratch.data());
        if (!(s > -std::numeric_limits<float>::infinity())) continue;  // -inf and NaN never kept
        std::vector<Entry>& h = mine[b];
        const Entry e{s, i};
        if (static_cast<int64_t>(h.size()) < K) {
          if (!filter.ok(b, i)) continue;
          h.push_back(e);
          std::push_heap(h.begin(), h.end(), worse);
        } else if (better(e, h.front())) {
          if (!filter.ok(b, i)) continue;
          std::pop_heap(h.begin(), h.end(), worse);
          h.back() = e;
          std::push_heap(h.begin(), h.end(), worse);
        }
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    std::vector<Entry> all;
    for (int t = 0; t < num_threads; ++t) {
      const auto& h = heaps[static_cast<size_t>(t) * B + b];
      all.insert(all.end(), h.begin(), h.end());
    }
    const int64_t n = std::min<int64_t>(K, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + n, all.end(), better);
    for (int64_t j = 0; j < K; ++j) {
      out_scores[b * K + j] = j < n ? all[j].first : -std::numeric_limits<float>::infinity();
      out_items[b * K + j] = j < n ? all[j].second : -1;
    }
  }
}

}  // namespace

void catalog_topk_embedding_cpu(const float* queries, const void* table, int table_dtype, int64_t B, int64_t S,
                                int64_t D, int64_t N, int64_t K, const bool* item_mask, int64_t mask_stride,
                                const int64_t* excluded, int64_t X, int num_threads, float* out_scores,
                                int64_t* out_items) {
  const Filter filter{item_mask, mask_stride, excluded, X};
  // the item's S x D row, converted to float32 once and reused by every request
  const float* f16 = half_table();
  auto prepare = [&](int64_t i, float* row) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t off = (s * N + i) * D;
      float* dst = row + s * D;
      if (table_dtype == 0) {
        std::memcpy(dst, static_cast<const float*>(table) + off, D * sizeof(float));
      } else {
        const uint16_t* src = static_cast<const uint16_t*>(table) + off;
        if (table_dtype == 1) {
          for (int64_t d = 0; d < D; ++d) dst[d] = f16[src[d]];
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(src[d]);
        }
      }
    }
  };
  auto score = [&](int64_t b, int64_t, const float* row) { return dot(queries + b * S * D, row, S * D); };
  stream_topk<float>(B, N, K, filter, num_threads, S * D, prepare, score, out_scores, out_items);
}

void catalog_topk_codes_cpu(const float* code_logprobs, const void* codes, int code_dtype, int64_t B, int64_t S,
                            int64_t C, int64_t N, int64_t K, const bool* item_mask, int64_t mask_stride,
                            const int64_t* excluded, int64_t X, int num_threads, float* out_scores,
                            int64_t* out_items) {
  const Filter filter{item_mask, mask_stride, excluded, X};
  // the item's codes as table offsets s * C + code, shared by every request
  auto prepare = [&](int64_t i, int64_t* offsets) {
    for (int64_t s = 0; s < S; ++s) {
      int64_t c;
      if (code_dtype == 0) c = static_cast<const uint8_t*>(codes)[i * S + s];
      else if (code_dtype == 1) c = static_cast<const int16_t*>(codes)[i * S + s];
      else c = static_cast<const int32_t*>(codes)[i * S + s];
      offsets[s] = s * C + c;
    }
  };
  auto score = [&](int64_t b, int64_t, const int64_t* offsets) {
    const float* lp = code_logprobs + b * S * C;
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) acc += lp[offsets[s]];
    return acc / static_cast<float>(S);
  };
  stream_topk<int64_t>(B, N, K, filter, num_threads, S, prepare, score, out_scores, out_items);
}

}  // namespace decoding
