// CPU backend of trie_beam_step: reads only the valid children of each beam's trie node,
// never a V-wide mask. One pass over the logits row for the full log-sum-exp.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace decoding {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Log-sum-exp over a logits row, 8 lanes at a time with GCC/Clang vector extensions (SSE pairs on
// baseline x86-64, one AVX2 register in the avx2 clone): auto-vectorisation of the polynomial
// exp does not happen reliably. exp(x) for x <= 0 (the argument is always x - max): Cody-Waite
// range reduction and the Cephes polynomial, relative error ~1e-7; inputs below -87 are clamped
// (exp ~ 1e-38), negligible next to the max term exp(0) = 1.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static inline __attribute__((always_inline)) v8f exp8_nonpositive(v8f x) {
  const v8f lo = v8f{} - 87.0f;
  x = x > lo ? x : lo;
  const v8f magic = v8f{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  v8f k = (x * 1.44269504088896341f + magic) - magic;
  v8f r = x - k * 0.693359375f + k * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DECODING_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DECODING_MULTIVERSION
#endif

DECODING_MULTIVERSION
float log_sum_exp(const float* x, int64_t n) {
  v8f vm = v8f{} + kNegInf;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    vm = v > vm ? v : vm;
  }
  float m = kNegInf;
  for (int j = 0; j < 8; ++j) m = vm[j] > m ? vm[j] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  if (!(m > kNegInf)) return m;  // all -inf (or NaN): no finite log-prob
  if (std::isinf(m)) return m;   // +inf dominates
  const v8f vmax = v8f{} + m;
  v8f vs = v8f{};
  for (i = 0; i + 8 <= n; i += 8) vs += exp8_nonpositive(load8(x + i) - vmax);
  if (i < n) {  // tail: pad with a value whose exp is negligible, then drop the padded lanes
    float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = i + j < n ? x[i + j] - m : -100.0f;
    const v8f e = exp8_nonpositive(load8(tail));
    for (int j = 0; j < 8; ++j) vs[j] += i + j < n ? e[j] : 0.0f;
  }
  float s = 0.0f;
  for (int j = 0; j < 8; ++j) s += vs[j];
  return m + std::log(s);
}

struct Candidate {
  float score;
  int32_t beam;
  int32_t child;  // position among the node's children
};

inline bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.beam != b.beam) return a.beam < b.beam;
  return a.child < b.child;
}

// Number of excluded ranks in [lo, hi): two binary searches in the request's sorted ranks.
inline int64_t excluded_in(const int64_t* row, int64_t n, int64_t lo, int64_t hi) {
  return std::lower_bound(row, row + n, hi) - std::lower_bound(row, row + n, lo);
}

}  // namespace

void trie_beam_step_cpu(const BeamStepArgs& a) {
  const int64_t rows = a.B * a.W;
  std::vector<float> lse(rows, 0.0f);
  const int threads = std::max(1, a.num_threads);

  auto node_alive = [&](int64_t r) {
    const int64_t node = a.beam_nodes[r];
    return node >= 0 && node < a.num_nodes && a.beam_scores[r] > kNegInf;
  };
  auto child_allowed = [&](int64_t b, int32_t child_node) {
    if (a.excluded == nullptr) return true;
    const int64_t lo = a.item_lo[child_node], hi = a.item_hi[child_node];
    return excluded_in(a.excluded + b * a.num_excluded_cols, a.num_excluded_cols, lo, hi) < hi - lo;
  };

  if (a.normalize == Normalize::kFull) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1 && rows * a.V >= (int64_t(1) << 17))
    for (int64_t r = 0; r < rows; ++r) {
      if (node_alive(r)) lse[r] = log_sum_exp(a.logits + r * a.logits_row_stride, a.V);
    }
  }

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (a.B > 1)
  for (int64_t b = 0; b < a.B; ++b) {
    std::vector<Candidate> cands;
    std::vector<float> valid_logits;
    for (int64_t w = 0; w < a.W; ++w) {
      const int64_t r = b * a.W + w;
      if (!node_alive(r)) continue;
      const int64_t node = a.beam_nodes[r];
      const int32_t e0 = a.indptr[node], e1 = a.indptr[node + 1];
      const float* row = a.logits + r * a.logits_row_stride;
      float norm = lse[r];
      if (a.normalize == Normalize::kValid) {
        valid_logits.clear();
        for (int32_t e = e0; e < e1; ++e) {
          if (child_allowed(b, e + 1)) valid_logits.push_back(row[a.node_token[e + 1]]);
        }
        norm = valid_logits.empty() ? 0.0f
                                    : log_sum_exp(valid_logits.data(), valid_logits.size());
      }
      const float wt = a.logprob_weight;
      const float base = a.beam_scores[r] - wt * norm;
      const float* bias = a.child_bias ? a.child_bias + r * a.bias_cols : nullptr;
      for (int32_t e = e0; e < e1; ++e) {
        const int32_t child = e + 1;
        if (!child_allowed(b, child)) continue;
        float s = base + wt * row[a.node_token[child]];
        if (bias) s += bias[e - e0];
        if (!(s > kNegInf)) continue;  // -inf or NaN: never a candidate
        cands.push_back({s, static_cast<int32_t>(w), e - e0});
      }
    }
    const int64_t take = std::min<int64_t>(a.K, cands.size());
    if (static_cast<int64_t>(cands.size()) > take) {
      std::nth_element(cands.begin(), cands.begin() + take, cands.end(), better);
    }
    std::sort(cands.begin(), cands.begin() + take, better);
    for (int64_t k = 0; k < a.K; ++k) {
      const int64_t o = b * a.K + k;
      if (k < take) {
        const Candidate& c = cands[k];
        const int64_t node = a.beam_nodes[b * a.W + c.beam];
        const int32_t child = a.indptr[node] + c.child + 1;
        a.out_scores[o] = c.score;
        a.out_parent[o] = c.beam;
        a.out_token[o] = a.node_token[child];
        a.out_node[o] = child;
      } else {
        a.out_scores[o] = kNegInf;
        a.out_parent[o] = -1;
        a.out_token[o] = -1;
        a.out_node[o] = -1;
      }
    }
  }
}

}  // namespace decoding
