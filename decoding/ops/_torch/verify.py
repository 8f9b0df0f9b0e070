"""Reference backend of the verification ops: vectorised torch, Philox in int64 arithmetic."""

from __future__ import annotations

import torch

from decoding.ops._helpers import NEG_INF

MASK32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon et al. 2011), as in triton.language.random
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: torch.Tensor, b: int):
    """High and low 32-bit words of ``a * b`` for ``a`` int64 tensors < 2**32 and ``b`` < 2**32,
    via 16-bit halves (the full product overflows int64)."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    low = a0 * b0
    mid = a1 * b0 + a0 * b1 + (low >> 16)
    hi = a1 * b1 + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    return hi & MASK32, lo


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """See :func:`decoding.ops.verify.philox_uniform`."""
    c0 = offsets & MASK32
    c1 = (offsets >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, ROUND_B)
        hi_a, lo_a = _mul32(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return ((c0 >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def match_keys_torch(*, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    N = keys.shape[1]
    eq = (queries[:, :, None] == keys[:, None, :]) & (keys >= 0)[:, None, :] & (queries >= 0)[:, :, None]
    position = torch.arange(N, device=keys.device).expand_as(eq)
    first = torch.where(eq, position, N).min(dim=2).values
    return torch.where(first < N, first, -1)


def verify_relaxed_torch(*, p_cand: torch.Tensor, q_cand: torch.Tensor, q_draft: torch.Tensor, draft_cand: torch.Tensor,
                         num_keep: int, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, M = p_cand.shape
    N = q_draft.shape[1]
    K = num_keep
    device = p_cand.device
    base = offset + torch.arange(B, device=device)[:, None] * (N + M)
    u_accept = philox_uniform(seed, base + torch.arange(N, device=device))
    u_resid = philox_uniform(seed, base + N + torch.arange(M, device=device))

    valid = draft_cand >= 0
    p_draft = torch.where(valid, p_cand.gather(1, draft_cand.clamp(min=0)), 0.0)
    accept = valid & (p_draft > 0) & (u_accept * q_draft <= p_draft)
    num_accepted = accept.sum(dim=1)
    kept = torch.full((B, K + N), -1, dtype=torch.long, device=device)
    rank = accept.long().cumsum(dim=1) - 1
    slot = torch.where(accept & (rank < K), rank, K + torch.arange(N, device=device))  # spill past K
    kept.scatter_(1, slot, torch.where(accept, draft_cand, -1))
    kept = kept[:, :K]

    accepted_cand = torch.zeros((B, M + 1), dtype=torch.bool, device=device)
    accepted_cand.scatter_(1, torch.where(accept, draft_cand, M), True)
    accepted_cand = accepted_cand[:, :M]
    residual = torch.where(accepted_cand, 0.0, (p_cand - q_cand).clamp(min=0))
    # draws come from the residual first; once its support is used up (or it is zero), from p over
    # the candidates left, so K beams are returned whenever K candidates have p > 0
    gumbel = -(-u_resid.log()).log()
    key_residual = torch.where(residual > 0, residual.clamp(min=1e-38).log() + gumbel, NEG_INF)
    rest = (residual <= 0) & ~accepted_cand & (p_cand > 0)
    key_rest = torch.where(rest, p_cand.clamp(min=1e-38).log() + gumbel, NEG_INF)
    first = key_residual.sort(dim=1, descending=True, stable=True)
    second = key_rest.sort(dim=1, descending=True, stable=True)
    n_first = (residual > 0).sum(dim=1, keepdim=True)
    j_all = torch.arange(M, device=device).expand(B, M)
    from_second = second.indices.gather(1, (j_all - n_first).clamp(min=0))
    valid_second = second.values.gather(1, (j_all - n_first).clamp(min=0)) > NEG_INF
    draws = torch.where(j_all < n_first, first.indices, torch.where(valid_second, from_second, -1))
    need = (K - num_accepted).clamp(min=0)
    j = torch.arange(K, device=device)
    # slot j >= num_accepted takes draw j - num_accepted
    from_draw = draws.gather(1, (j - num_accepted[:, None]).clamp(min=0, max=max(M - 1, 0))) if M else \
        torch.full((B, K), -1, dtype=torch.long, device=device)
    fill = (j >= num_accepted[:, None]) & ((j - num_accepted[:, None]) < need[:, None])
    fill &= (j - num_accepted[:, None]) < M
    kept = torch.where(fill, from_draw, kept)
    return kept, num_accepted
