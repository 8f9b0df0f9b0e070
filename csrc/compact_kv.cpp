// CPU backend of compact_kv (decoding/ops/compact_kv.py): for each (request, head) row, copy the
// kept positions' key and value rows (any dtype: rows are copied as bytes).
#include <omp.h>

#include <cstring>

#include "common.h"

namespace decoding {

void compact_kv_cpu(const char* keys, const char* values, const int64_t* index, char* out_keys, char* out_values,
                    int64_t rows, int64_t T, int64_t C, int64_t row_bytes, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t t = index[r * C + c];
      std::memcpy(out_keys + (r * C + c) * row_bytes, keys + (r * T + t) * row_bytes, row_bytes);
      std::memcpy(out_values + (r * C + c) * row_bytes, values + (r * T + t) * row_bytes, row_bytes);
    }
  }
}

}  // namespace decoding
