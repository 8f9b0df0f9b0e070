// CPU backend of tree_attention (decoding/ops/tree_attention.py), float32. Per query row: the
// prompt part (valid prompt positions) and the tree part (visible tree rows) each get their own
// softmax statistics, then the two are merged by log-sum-exp, as in the Triton kernel.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace decoding {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Softmax-weighted sum of value rows over the positions `pos`: writes the unnormalised output
// (sum of exp(s - max) * v) to `acc` and returns {max, sum of exp(s - max)}.
struct Partial {
  float max = kNegInf;
  float sum = 0.0f;
};

Partial attend(const float* q, const float* k, const float* v, const int64_t* pos, int64_t n, int64_t D, float scale,
               float* scores, float* acc) {
  Partial p;
  std::fill(acc, acc + D, 0.0f);
  if (n == 0) return p;
  for (int64_t i = 0; i < n; ++i) {
    const float* kr = k + pos[i] * D;
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * kr[d];
    scores[i] = s * scale;
    p.max = std::max(p.max, scores[i]);
  }
  for (int64_t i = 0; i < n; ++i) {
    const float w = std::exp(scores[i] - p.max);
    p.sum += w;
    const float* vr = v + pos[i] * D;
    for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
  }
  return p;
}

}  // namespace

void tree_attention_cpu(const float* query, const float* key, const float* value, const bool* prefix_valid,
                        const bool* tree_visible, int64_t B, int64_t H, int64_t Hkv, int64_t M, int64_t S, int64_t D,
                        int64_t P, float scale, int num_threads, float* out, float* lse) {
  const int64_t R = S - P;
  const int64_t groups = H / Hkv;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t> pos(std::max<int64_t>(S, 1));
    std::vector<float> scores(std::max<int64_t>(S, 1)), acc_p(D), acc_t(D);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * H * M; ++row) {
      const int64_t b = row / (H * M), h = (row / M) % H, m = row % M;
      const float* q = query + row * D;
      const int64_t kv = (b * Hkv + h / groups) * S * D;
      const float* k = key + kv;
      const float* v = value + kv;
      int64_t n = 0;
      for (int64_t j = 0; j < P; ++j)
        if (prefix_valid[b * P + j]) pos[n++] = j;
      const Partial pp = attend(q, k, v, pos.data(), n, D, scale, scores.data(), acc_p.data());
      n = 0;
      const bool* vis = tree_visible + (b * M + m) * R;
      for (int64_t j = 0; j < R; ++j)
        if (vis[j]) pos[n++] = P + j;
      const Partial pt = attend(q, k, v, pos.data(), n, D, scale, scores.data(), acc_t.data());
      // merge: each part's weight is its share of the total softmax denominator
      const float lse_p = pp.sum > 0 ? pp.max + std::log(pp.sum) : kNegInf;
      const float lse_t = pt.sum > 0 ? pt.max + std::log(pt.sum) : kNegInf;
      const float top = std::max(lse_p, lse_t);
      float* o = out + row * D;
      if (top == kNegInf) {
        std::fill(o, o + D, 0.0f);
        lse[row] = kNegInf;
        continue;
      }
      const float total = std::log(std::exp(lse_p - top) + std::exp(lse_t - top)) + top;
      const float wp = pp.sum > 0 ? std::exp(pp.max - total) : 0.0f;  // = exp(lse_p - total) / sum_p
      const float wt = pt.sum > 0 ? std::exp(pt.max - total) : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[d] = wp * acc_p[d] + wt * acc_t[d];
      lse[row] = total;
    }
  }
}

}  // namespace decoding
