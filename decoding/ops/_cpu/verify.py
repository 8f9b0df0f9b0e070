"""C++ backend of the verification ops (csrc/verify.cpp), called on NumPy views of CPU tensors."""

from __future__ import annotations

import torch

from decoding._ext import _C


def match_keys_cpu(*, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    B, Q = queries.shape
    out = torch.empty((B, Q), dtype=torch.long)
    _C.match_keys(queries.numpy(), keys.numpy(), B, Q, keys.shape[1], torch.get_num_threads(), out.numpy())
    return out


def verify_relaxed_cpu(*, p_cand: torch.Tensor, q_cand: torch.Tensor, q_draft: torch.Tensor, draft_cand: torch.Tensor,
                       num_keep: int, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, M = p_cand.shape
    kept = torch.empty((B, num_keep), dtype=torch.long)
    num_accepted = torch.empty(B, dtype=torch.long)
    _C.verify_relaxed(p_cand.numpy(), q_cand.numpy(), q_draft.numpy(), draft_cand.numpy(), B, M,
                      q_draft.shape[1], num_keep, seed, offset, torch.get_num_threads(), kept.numpy(),
                      num_accepted.numpy())
    return kept, num_accepted
