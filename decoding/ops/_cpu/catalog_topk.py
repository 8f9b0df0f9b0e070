"""C++ backend of catalog_topk (csrc/catalog_topk.cpp)."""

from __future__ import annotations

import torch

from decoding._ext import _C

TABLE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES = {torch.uint8: 0, torch.int16: 1, torch.int32: 2}


def _common(B, k, item_mask, excluded):
    scores = torch.empty((B, k), dtype=torch.float32)
    items = torch.empty((B, k), dtype=torch.long)
    mask = None if item_mask is None else item_mask.numpy()
    stride = 0 if item_mask is None or item_mask.dim() == 1 else item_mask.shape[1]
    ex = None if excluded is None else excluded.numpy()
    X = 0 if excluded is None else excluded.shape[1]
    return scores, items, mask, stride, ex, X


def catalog_topk_embedding_cpu(*, queries: torch.Tensor, item_embeddings: torch.Tensor, k: int,
                               excluded: torch.Tensor | None,
                               item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, d = queries.shape
    N = item_embeddings.shape[1]
    scores, items, mask, stride, ex, X = _common(B, k, item_mask, excluded)
    _C.catalog_topk_embedding(queries.numpy(), item_embeddings.data_ptr(), TABLE_DTYPES[item_embeddings.dtype],
                              B, S, d, N, k, mask, stride, ex, X, torch.get_num_threads(), scores.numpy(),
                              items.numpy())
    return scores, items


def catalog_topk_codes_cpu(*, code_logprobs: torch.Tensor, item_codes: torch.Tensor, k: int,
                           excluded: torch.Tensor | None,
                           item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, C = code_logprobs.shape
    N = item_codes.shape[0]
    scores, items, mask, stride, ex, X = _common(B, k, item_mask, excluded)
    _C.catalog_topk_codes(code_logprobs.numpy(), item_codes.data_ptr(), CODE_DTYPES[item_codes.dtype], B, S, C, N,
                          k, mask, stride, ex, X, torch.get_num_threads(), scores.numpy(), items.numpy())
    return scores, items
