"""Reference backend of compact_kv: one gather per tensor."""

from __future__ import annotations

import torch


def compact_kv_torch(*, keys: torch.Tensor, values: torch.Tensor,
                     index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = index[..., None].expand(-1, -1, -1, keys.shape[3])
    return keys.gather(2, idx), values.gather(2, idx)
