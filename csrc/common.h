// Shared declarations for the decoding C++ extension (CPU kernels and the trie builder).
#pragma once

#include <cstdint>
#include <vector>

namespace decoding {

struct TrieArrays {
  int64_t depth = 0;
  std::vector<int64_t> level_offsets;  // [depth + 2]: nodes of level d are [lo[d], lo[d+1])
  std::vector<int32_t> indptr;         // [num_nodes + 1]; edge e leads to node e + 1
  std::vector<int32_t> node_token;     // [num_nodes]; token on the edge into the node (-1 for root)
  std::vector<int32_t> item_lo;        // [num_nodes]; sorted-rank range owned by the node
  std::vector<int32_t> item_hi;        // [num_nodes]
  std::vector<int32_t> max_branch;     // [depth]; max children of a node at level d
  std::vector<int64_t> sorted_items;   // [num_unique]; item id (row index) of each sorted rank
  std::vector<int64_t> rank_of_item;   // [num_rows]; sorted rank of each row (aliases share one)
};

TrieArrays build_trie(const int64_t* tokens, const int64_t* offsets, int64_t n_rows,
                      int64_t vocab_size, bool keep_first_duplicate);

enum class Normalize : int { kFull = 0, kValid = 1, kNone = 2 };

struct BeamStepArgs {
  // inputs
  const float* logits;        // [B, W, V] with row stride `logits_row_stride` (between beams)
  int64_t logits_row_stride;
  const float* beam_scores;   // [B, W]
  const int64_t* beam_nodes;  // [B, W]; -1 = dead beam
  const int32_t* indptr;      // [num_nodes + 1]
  const int32_t* node_token;  // [num_nodes]
  const int32_t* item_lo;     // [num_nodes]
  const int32_t* item_hi;     // [num_nodes]
  int64_t num_nodes;
  const int64_t* excluded;    // [B, X] sorted ascending ranks, padded with a value >= num_unique; may be null
  int64_t num_excluded_cols;
  const float* child_bias;    // [B, W, C] or null
  int64_t bias_cols;
  int64_t B, W, V, K;
  float logprob_weight;  // step log-probs are scaled by this before the bias is added
  Normalize normalize;
  int num_threads;
  // outputs, [B, K] each
  float* out_scores;
  int64_t* out_parent;
  int64_t* out_token;
  int64_t* out_node;
};

void trie_beam_step_cpu(const BeamStepArgs& a);

// Verification ops (csrc/verify.cpp); shapes as in decoding/ops/verify.py.
float philox_uniform(uint64_t seed, uint64_t counter);
void match_keys_cpu(const int64_t* queries, const int64_t* keys, int64_t B, int64_t Q, int64_t N,
                    int num_threads, int64_t* out);
void verify_relaxed_cpu(const float* p_cand, const float* q_cand, const float* q_draft, const int64_t* draft_cand,
                        int64_t B, int64_t M, int64_t N, int64_t K, uint64_t seed, uint64_t offset,
                        int num_threads, int64_t* kept, int64_t* num_accepted);

// catalog_topk (csrc/catalog_topk.cpp); table_dtype 0 float32, 1 float16, 2 bfloat16; code_dtype
// 0 uint8, 1 int16, 2 int32. item_mask rows have stride mask_stride (0: one mask for all).
void catalog_topk_embedding_cpu(const float* queries, const void* table, int table_dtype, int64_t B, int64_t S,
                                int64_t D, int64_t N, int64_t K, const bool* item_mask, int64_t mask_stride,
                                const int64_t* excluded, int64_t X, int num_threads, float* out_scores,
                                int64_t* out_items);
void catalog_topk_codes_cpu(const float* code_logprobs, const void* codes, int code_dtype, int64_t B, int64_t S,
                            int64_t C, int64_t N, int64_t K, const bool* item_mask, int64_t mask_stride,
                            const int64_t* excluded, int64_t X, int num_threads, float* out_scores,
                            int64_t* out_items);

// compact_kv (csrc/compact_kv.cpp): rows of row_bytes bytes, index [rows, C].
void compact_kv_cpu(const char* keys, const char* values, const int64_t* index, char* out_keys, char* out_values,
                    int64_t rows, int64_t T, int64_t C, int64_t row_bytes, int num_threads);

// Tree attention (csrc/tree_attention.cpp); shapes as in decoding/ops/tree_attention.py.
void tree_attention_cpu(const float* query, const float* key, const float* value, const bool* prefix_valid,
                        const bool* tree_visible, int64_t B, int64_t H, int64_t Hkv, int64_t M, int64_t S, int64_t D,
                        int64_t P, float scale, int num_threads, float* out, float* lse);

}  // namespace decoding
