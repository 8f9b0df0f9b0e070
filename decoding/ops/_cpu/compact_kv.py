"""C++ backend of compact_kv (csrc/compact_kv.cpp): a row copy per kept position."""

from __future__ import annotations

import torch

from decoding._ext import _C


def compact_kv_cpu(*, keys: torch.Tensor, values: torch.Tensor,
                   index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = keys.shape
    C = index.shape[2]
    out_k = torch.empty((B, H, C, D), dtype=keys.dtype)
    out_v = torch.empty((B, H, C, D), dtype=values.dtype)
    _C.compact_kv(keys.data_ptr(), values.data_ptr(), index.numpy(), out_k.data_ptr(), out_v.data_ptr(), B * H, T, C,
                  D * keys.element_size(), torch.get_num_threads())
    return out_k, out_v
