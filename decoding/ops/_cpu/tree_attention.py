"""C++ backend of tree_attention (csrc/tree_attention.cpp): float32 math, any input dtype."""

from __future__ import annotations

import torch

from decoding._ext import _C


def tree_attention_cpu(*, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                       prefix_valid: torch.Tensor, tree_visible: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, M, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    q, k, v = (t.float().contiguous() for t in (query, key, value))
    out = torch.empty((B, H, M, D), dtype=torch.float32)
    lse = torch.empty((B, H, M), dtype=torch.float32)
    _C.tree_attention(q.numpy(), k.numpy(), v.numpy(), prefix_valid.numpy(), tree_visible.numpy(), B, H, Hkv, M,
                      S, D, prefix_len, scale, torch.get_num_threads(), out.numpy(), lse.numpy())
    return out.to(query.dtype), lse
