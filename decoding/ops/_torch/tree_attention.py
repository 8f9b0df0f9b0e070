"""Reference backend of tree_attention: one SDPA call with the additive mask built from the
prompt padding and the tree visibility; the log-sum-exp from the same scores in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_attention_torch(*, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                         prefix_valid: torch.Tensor, tree_visible: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, M, D = query.shape
    groups = H // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    visible = torch.cat([prefix_valid[:, None, :].expand(B, M, prefix_len), tree_visible], dim=2)[:, None]
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=query.device).masked_fill(~visible, float("-inf"))
    q = query.float()
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * scale + mask, dim=-1)
    sees = lse > float("-inf")
    # a row that sees nothing would make SDPA return NaN: give it one visible (ignored) position
    safe_mask = torch.where(sees[..., None], mask, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask, scale=scale)
    out = torch.where(sees[..., None], out, 0.0)
    return out.to(query.dtype), lse
