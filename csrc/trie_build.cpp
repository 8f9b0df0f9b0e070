// ItemTrie builder: O(N*L) after an LSD radix sort of the identifiers.
//
// Layout produced (see decoding/trie.py for the contract):
//   nodes are numbered level by level in lexicographic order; node 0 is the root;
//   the children of a node are a contiguous, token-sorted block of node ids, so the CSR
//   `indptr[v]..indptr[v+1]` indexes edges and edge e leads to node e + 1;
//   every node owns the contiguous range [item_lo, item_hi) of sorted (unique) item ranks.
#include "common.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace decoding {

namespace {

// Stable LSD radix sort of row ids by their token sequences. Missing positions (row shorter than
// the position) sort first, which is never observed for EOS-terminated rows except for duplicates.
std::vector<int64_t> sort_rows(const int64_t* tokens, const int64_t* offsets, int64_t n_rows,
                               int64_t max_len, int64_t vocab_size) {
  std::vector<int64_t> order(n_rows), tmp(n_rows);
  std::iota(order.begin(), order.end(), 0);
  // bucket 0 = "no token at this position", bucket t + 1 = token t
  std::vector<int64_t> count(static_cast<size_t>(vocab_size) + 2);
  for (int64_t pos = max_len - 1; pos >= 0; --pos) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t len = offsets[r + 1] - offsets[r];
      const int64_t key = pos < len ? tokens[offsets[r] + pos] + 1 : 0;
      ++count[key + 1];
    }
    for (size_t k = 1; k < count.size(); ++k) count[k] += count[k - 1];
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t r = order[i];
      const int64_t len = offsets[r + 1] - offsets[r];
      const int64_t key = pos < len ? tokens[offsets[r] + pos] + 1 : 0;
      tmp[count[key]++] = r;
    }
    order.swap(tmp);
  }
  return order;
}

}  // namespace

TrieArrays build_trie(const int64_t* tokens, const int64_t* offsets, int64_t n_rows,
                      int64_t vocab_size, bool keep_first_duplicate) {
  if (n_rows <= 0) throw std::invalid_argument("seqs: the catalog is empty");
  int64_t max_len = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t len = offsets[r + 1] - offsets[r];
    if (len <= 0) throw std::invalid_argument("seqs: row " + std::to_string(r) + " is empty");
    max_len = std::max(max_len, len);
  }
  const std::vector<int64_t> order = sort_rows(tokens, offsets, n_rows, max_len, vocab_size);

  TrieArrays out;
  out.depth = max_len;
  out.rank_of_item.assign(n_rows, -1);
  out.sorted_items.reserve(n_rows);

  // Pass 1: unique rows in sorted order, the common prefix with the previous unique row, and
  // node counts per level (a row opens one node at each level in (lcp, len]).
  std::vector<int64_t> uniq_rows;
  std::vector<int32_t> lcp;
  uniq_rows.reserve(n_rows);
  lcp.reserve(n_rows);
  std::vector<int64_t> level_count(max_len + 1, 0);
  level_count[0] = 1;
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t r = order[i];
    const int64_t len = offsets[r + 1] - offsets[r];
    const int64_t* row = tokens + offsets[r];
    int64_t common = 0;
    if (!uniq_rows.empty()) {
      const int64_t p = uniq_rows.back();
      const int64_t plen = offsets[p + 1] - offsets[p];
      const int64_t* prow = tokens + offsets[p];
      const int64_t m = std::min(len, plen);
      while (common < m && prow[common] == row[common]) ++common;
      if (common == len && common == plen) {
        if (!keep_first_duplicate) {
          throw std::invalid_argument(
              "seqs: rows " + std::to_string(p) + " and " + std::to_string(r) +
              " are the same identifier (pass on_duplicate='first' to keep the first)");
        }
        out.rank_of_item[r] = static_cast<int64_t>(uniq_rows.size()) - 1;  // alias
        continue;
      }
      if (common == len || common == plen) {
        throw std::invalid_argument(
            "seqs: identifier of row " + std::to_string(common == len ? r : p) +
            " is a prefix of row " + std::to_string(common == len ? p : r) +
            " (variable-length identifiers must end with eos_token_id)");
      }
    }
    out.rank_of_item[r] = static_cast<int64_t>(uniq_rows.size());
    uniq_rows.push_back(r);
    out.sorted_items.push_back(r);
    lcp.push_back(static_cast<int32_t>(common));
    for (int64_t d = common + 1; d <= len; ++d) ++level_count[d];
  }
  const int64_t n_uniq = static_cast<int64_t>(uniq_rows.size());

  out.level_offsets.assign(max_len + 2, 0);
  for (int64_t d = 0; d <= max_len; ++d) out.level_offsets[d + 1] = out.level_offsets[d] + level_count[d];
  const int64_t num_nodes = out.level_offsets[max_len + 1];
  if (num_nodes >= (int64_t(1) << 31)) throw std::invalid_argument("seqs: trie exceeds 2^31 nodes");

  out.node_token.assign(num_nodes, -1);
  out.item_lo.assign(num_nodes, 0);
  out.item_hi.assign(num_nodes, 0);
  std::vector<int32_t> parent(num_nodes, -1);
  out.item_hi[0] = static_cast<int32_t>(n_uniq);

  // Pass 2: assign node ids; `cur[d]` is the open node at level d.
  std::vector<int64_t> next_id(out.level_offsets.begin(), out.level_offsets.end() - 1);
  std::vector<int32_t> cur(max_len + 1, 0);
  int64_t prev_len = 0;
  for (int64_t i = 0; i < n_uniq; ++i) {
    const int64_t r = uniq_rows[i];
    const int64_t len = offsets[r + 1] - offsets[r];
    const int64_t* row = tokens + offsets[r];
    const int64_t common = lcp[i];
    for (int64_t d = common + 1; d <= prev_len; ++d) out.item_hi[cur[d]] = static_cast<int32_t>(i);
    for (int64_t d = common + 1; d <= len; ++d) {
      const int32_t v = static_cast<int32_t>(next_id[d]++);
      out.node_token[v] = static_cast<int32_t>(row[d - 1]);
      out.item_lo[v] = static_cast<int32_t>(i);
      parent[v] = cur[d - 1];
      cur[d] = v;
    }
    prev_len = len;
  }
  for (int64_t d = 1; d <= prev_len; ++d) out.item_hi[cur[d]] = static_cast<int32_t>(n_uniq);

  // CSR: children of consecutive nodes are consecutive node blocks, so indptr is the exclusive
  // prefix sum of child counts and edge e leads to node e + 1.
  out.indptr.assign(num_nodes + 1, 0);
  for (int64_t v = 1; v < num_nodes; ++v) ++out.indptr[parent[v] + 1];
  for (int64_t v = 0; v < num_nodes; ++v) out.indptr[v + 1] += out.indptr[v];

  out.max_branch.assign(max_len, 0);
  for (int64_t d = 0; d < max_len; ++d) {
    int32_t best = 0;
    for (int64_t v = out.level_offsets[d]; v < out.level_offsets[d + 1]; ++v)
      best = std::max(best, out.indptr[v + 1] - out.indptr[v]);
    out.max_branch[d] = best;
  }
  return out;
}

}  // namespace decoding
