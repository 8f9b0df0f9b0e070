// CPU backend of the speculative verification ops (decoding/ops/verify.py): key membership and
// relaxed (sampling) verification. Random numbers: Philox-4x32-10 with Triton's counter/key
// convention, so every backend draws the same numbers for a seed.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "common.h"

namespace decoding {

float philox_uniform(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return static_cast<float>((c0 >> 9) * 2u + 1u) * (1.0f / 16777216.0f);
}

void match_keys_cpu(const int64_t* queries, const int64_t* keys, int64_t B, int64_t Q, int64_t N,
                    int num_threads, int64_t* out) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<std::pair<int64_t, int64_t>> sorted;  // (key, position), for long key rows
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* k = keys + b * N;
      const int64_t* q = queries + b * Q;
      int64_t* o = out + b * Q;
      if (Q * N <= 4096) {  // small: a scan is cheaper than sorting
        for (int64_t i = 0; i < Q; ++i) {
          int64_t found = -1;
          if (q[i] >= 0)
            for (int64_t j = 0; j < N; ++j)
              if (k[j] == q[i]) {
                found = j;
                break;
              }
          o[i] = found;
        }
        continue;
      }
      // sorted by (key, position): lower_bound finds the first position of an equal key
      sorted.clear();
      for (int64_t j = 0; j < N; ++j)
        if (k[j] >= 0) sorted.emplace_back(k[j], j);
      std::sort(sorted.begin(), sorted.end());
      for (int64_t i = 0; i < Q; ++i) {
        o[i] = -1;
        if (q[i] < 0) continue;
        auto it = std::lower_bound(sorted.begin(), sorted.end(), std::make_pair(q[i], int64_t{-1}));
        if (it != sorted.end() && it->first == q[i]) o[i] = it->second;
      }
    }
  }
}

void verify_relaxed_cpu(const float* p_cand, const float* q_cand, const float* q_draft, const int64_t* draft_cand,
                        int64_t B, int64_t M, int64_t N, int64_t K, uint64_t seed, uint64_t offset,
                        int num_threads, int64_t* kept, int64_t* num_accepted) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const float* p = p_cand + b * M;
    const float* q = q_cand + b * M;
    const uint64_t base = offset + static_cast<uint64_t>(b) * static_cast<uint64_t>(N + M);
    int64_t* out = kept + b * K;
    std::fill(out, out + K, int64_t{-1});
    std::vector<char> accepted(M, 0);
    int64_t n_acc = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t c = draft_cand[b * N + j];
      if (c < 0) continue;
      const float u = philox_uniform(seed, base + j);
      if (p[c] > 0.0f && u * q_draft[b * N + j] <= p[c]) {
        if (n_acc < K) out[n_acc] = c;
        accepted[c] = 1;
        ++n_acc;
      }
    }
    num_accepted[b] = n_acc;
    if (n_acc >= K) continue;
    // draws come from the residual first; once its support is used up (or it is zero), from p
    // over the candidates left, so K beams are returned whenever K candidates have p > 0
    std::vector<std::pair<float, int64_t>> first, second;  // (Gumbel key, candidate)
    for (int64_t m = 0; m < M; ++m) {
      if (accepted[m]) continue;
      const float r = std::max(p[m] - q[m], 0.0f);
      const float gumbel = -std::log(-std::log(philox_uniform(seed, base + N + m)));
      if (r > 0.0f) first.emplace_back(std::log(std::max(r, 1e-38f)) + gumbel, m);
      else if (p[m] > 0.0f) second.emplace_back(std::log(std::max(p[m], 1e-38f)) + gumbel, m);
    }
    auto by_key = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    int64_t need = K - n_acc;
    for (auto* tier : {&first, &second}) {
      const int64_t take = std::min<int64_t>(need, static_cast<int64_t>(tier->size()));
      std::partial_sort(tier->begin(), tier->begin() + take, tier->end(), by_key);
      for (int64_t t = 0; t < take; ++t) out[K - need + t] = (*tier)[t].second;
      need -= take;
    }
  }
}

}  // namespace decoding
