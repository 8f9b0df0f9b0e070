// pybind11 bindings. Arrays cross as NumPy views of CPU tensors (zero copy); dtypes and shapes
// are validated in Python (decoding/ops/_cpu), so here a mismatch is a programming error.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {sizeof(T)}, heap->data(), owner);
}

template <typename T>
const T* ptr_or_null(const py::object& obj) {
  if (obj.is_none()) return nullptr;
  return static_cast<const T*>(obj.cast<CArray<T>>().data());
}

py::dict build_trie(CArray<int64_t> tokens, CArray<int64_t> offsets, int64_t vocab_size,
                    bool keep_first_duplicate) {
  const int64_t n_rows = offsets.size() - 1;
  decoding::TrieArrays t;
  {
    py::gil_scoped_release release;
    t = decoding::build_trie(tokens.data(), offsets.data(), n_rows, vocab_size, keep_first_duplicate);
  }
  py::dict d;
  d["depth"] = t.depth;
  d["level_offsets"] = to_numpy(std::move(t.level_offsets));
  d["indptr"] = to_numpy(std::move(t.indptr));
  d["node_token"] = to_numpy(std::move(t.node_token));
  d["item_lo"] = to_numpy(std::move(t.item_lo));
  d["item_hi"] = to_numpy(std::move(t.item_hi));
  d["max_branch"] = to_numpy(std::move(t.max_branch));
  d["sorted_items"] = to_numpy(std::move(t.sorted_items));
  d["rank_of_item"] = to_numpy(std::move(t.rank_of_item));
  return d;
}

void trie_beam_step(CArray<float> logits, int64_t logits_row_stride, CArray<float> beam_scores,
                    CArray<int64_t> beam_nodes, CArray<int32_t> indptr, CArray<int32_t> node_token,
                    CArray<int32_t> item_lo, CArray<int32_t> item_hi, py::object excluded,
                    int64_t num_excluded_cols, py::object child_bias, int64_t bias_cols, int64_t B,
                    int64_t W, int64_t V, int64_t K, double logprob_weight, int normalize, int num_threads,
                    CArray<float> out_scores, CArray<int64_t> out_parent, CArray<int64_t> out_token,
                    CArray<int64_t> out_node) {
  decoding::BeamStepArgs a;
  a.logits = logits.data();
  a.logits_row_stride = logits_row_stride;
  a.beam_scores = beam_scores.data();
  a.beam_nodes = beam_nodes.data();
  a.indptr = indptr.data();
  a.node_token = node_token.data();
  a.item_lo = item_lo.data();
  a.item_hi = item_hi.data();
  a.num_nodes = node_token.size();
  a.excluded = ptr_or_null<int64_t>(excluded);
  a.num_excluded_cols = num_excluded_cols;
  a.child_bias = ptr_or_null<float>(child_bias);
  a.bias_cols = bias_cols;
  a.B = B;
  a.W = W;
  a.V = V;
  a.K = K;
  a.logprob_weight = static_cast<float>(logprob_weight);
  if (normalize < 0 || normalize > 2) throw std::invalid_argument("normalize code out of range");
  a.normalize = static_cast<decoding::Normalize>(normalize);
  a.num_threads = num_threads;
  a.out_scores = out_scores.mutable_data();
  a.out_parent = out_parent.mutable_data();
  a.out_token = out_token.mutable_data();
  a.out_node = out_node.mutable_data();
  py::gil_scoped_release release;
  decoding::trie_beam_step_cpu(a);
}

void match_keys(CArray<int64_t> queries, CArray<int64_t> keys, int64_t B, int64_t Q, int64_t N, int num_threads,
                CArray<int64_t> out) {
  const int64_t* qp = queries.data();
  const int64_t* kp = keys.data();
  int64_t* op = out.mutable_data();
  py::gil_scoped_release release;
  decoding::match_keys_cpu(qp, kp, B, Q, N, num_threads, op);
}

void verify_relaxed(CArray<float> p_cand, CArray<float> q_cand, CArray<float> q_draft, CArray<int64_t> draft_cand,
                    int64_t B, int64_t M, int64_t N, int64_t K, uint64_t seed, uint64_t offset, int num_threads,
                    CArray<int64_t> kept, CArray<int64_t> num_accepted) {
  const float* pp = p_cand.data();
  const float* qp = q_cand.data();
  const float* qd = q_draft.data();
  const int64_t* dc = draft_cand.data();
  int64_t* kp = kept.mutable_data();
  int64_t* np_ = num_accepted.mutable_data();
  py::gil_scoped_release release;
  decoding::verify_relaxed_cpu(pp, qp, qd, dc, B, M, N, K, seed, offset, num_threads, kp, np_);
}

void tree_attention(CArray<float> query, CArray<float> key, CArray<float> value, CArray<bool> prefix_valid,
                    CArray<bool> tree_visible, int64_t B, int64_t H, int64_t Hkv, int64_t M, int64_t S, int64_t D,
                    int64_t P, double scale, int num_threads, CArray<float> out, CArray<float> lse) {
  const float* q = query.data();
  const float* k = key.data();
  const float* v = value.data();
  const bool* pv = prefix_valid.data();
  const bool* tv = tree_visible.data();
  float* o = out.mutable_data();
  float* l = lse.mutable_data();
  py::gil_scoped_release release;
  decoding::tree_attention_cpu(q, k, v, pv, tv, B, H, Hkv, M, S, D, P, static_cast<float>(scale), num_threads, o, l);
}

// catalog_topk: tables of any dtype cross as raw addresses of contiguous CPU tensors (NumPy has
// no bfloat16); the Python wrapper checks shapes and keeps the tensors alive during the call.
void catalog_topk_embedding(CArray<float> queries, uintptr_t table, int table_dtype, int64_t B, int64_t S,
                            int64_t D, int64_t N, int64_t K, py::object item_mask, int64_t mask_stride,
                            py::object excluded, int64_t X, int num_threads, CArray<float> out_scores,
                            CArray<int64_t> out_items) {
  const float* q = queries.data();
  const bool* mask = ptr_or_null<bool>(item_mask);
  const int64_t* ex = ptr_or_null<int64_t>(excluded);
  float* os = out_scores.mutable_data();
  int64_t* oi = out_items.mutable_data();
  py::gil_scoped_release release;
  decoding::catalog_topk_embedding_cpu(q, reinterpret_cast<const void*>(table), table_dtype, B, S, D, N, K, mask,
                                       mask_stride, ex, X, num_threads, os, oi);
}

void catalog_topk_codes(CArray<float> code_logprobs, uintptr_t codes, int code_dtype, int64_t B, int64_t S,
                        int64_t C, int64_t N, int64_t K, py::object item_mask, int64_t mask_stride,
                        py::object excluded, int64_t X, int num_threads, CArray<float> out_scores,
                        CArray<int64_t> out_items) {
  const float* lp = code_logprobs.data();
  const bool* mask = ptr_or_null<bool>(item_mask);
  const int64_t* ex = ptr_or_null<int64_t>(excluded);
  float* os = out_scores.mutable_data();
  int64_t* oi = out_items.mutable_data();
  py::gil_scoped_release release;
  decoding::catalog_topk_codes_cpu(lp, reinterpret_cast<const void*>(codes), code_dtype, B, S, C, N, K, mask,
                                   mask_stride, ex, X, num_threads, os, oi);
}

void compact_kv(uintptr_t keys, uintptr_t values, CArray<int64_t> index, uintptr_t out_keys, uintptr_t out_values,
                int64_t rows, int64_t T, int64_t C, int64_t row_bytes, int num_threads) {
  const int64_t* idx = index.data();
  py::gil_scoped_release release;
  decoding::compact_kv_cpu(reinterpret_cast<const char*>(keys), reinterpret_cast<const char*>(values), idx,
                           reinterpret_cast<char*>(out_keys), reinterpret_cast<char*>(out_values), rows, T, C,
                           row_bytes, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "decoding: C++ CPU kernels and the ItemTrie builder";
  m.def("build_trie", &build_trie, py::arg("tokens"), py::arg("offsets"), py::arg("vocab_size"),
        py::arg("keep_first_duplicate"));
  m.def("trie_beam_step", &trie_beam_step);
  m.def("match_keys", &match_keys);
  m.def("verify_relaxed", &verify_relaxed);
  m.def("tree_attention", &tree_attention);
  m.def("catalog_topk_embedding", &catalog_topk_embedding);
  m.def("catalog_topk_codes", &catalog_topk_codes);
  m.def("compact_kv", &compact_kv);
}
