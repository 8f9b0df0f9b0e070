"""Triton backend of the verification ops.

* ``_match_kernel``: one program per (request, block of queries); the keys are streamed in
  blocks and the first equal position kept (a min over positions).
* ``_relaxed_kernel``: one program per request. Acceptance draws for the N drafts, the accepted
  ones written in draft order; the accepted candidates are marked in a scratch row, then the
  residual ``max(0, p - q)`` is formed over the M candidates and the missing beams taken by
  repeated arg-max of Gumbel keys (a draw without replacement), from the residual's support
  first and then from ``p`` over the candidates left. Philox is Triton's own
  ``tl.randint`` on int64 counters, which the torch and C++ backends reproduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _uniform(seed, counter):
    x = tl.randint(seed, counter)
    return ((x >> 9).to(tl.float32) * 2.0 + 1.0) * (1.0 / 16777216.0)


@triton.jit
def _match_kernel(q_ptr, k_ptr, out_ptr, Q, N, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    qi = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = tl.load(q_ptr + b * Q + qi, mask=qi < Q, other=-1)
    best = tl.full((BLOCK_Q,), N, dtype=tl.int64)
    for start in range(0, N, BLOCK_N):
        kj = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * N + kj, mask=kj < N, other=-1)
        eq = (q[:, None] == k[None, :]) & (k[None, :] >= 0) & (q[:, None] >= 0)
        pos = tl.where(eq, kj[None, :].to(tl.int64), N)
        best = tl.minimum(best, tl.min(pos, axis=1))
    tl.store(out_ptr + b * Q + qi, tl.where(best < N, best, -1), mask=qi < Q)


def match_keys_triton(*, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    B, Q = queries.shape
    N = keys.shape[1]
    out = torch.empty((B, Q), dtype=torch.long, device=queries.device)
    BLOCK_Q, BLOCK_N = 32, max(16, min(128, triton.next_power_of_2(N)))
    _match_kernel[(B, triton.cdiv(Q, BLOCK_Q))](queries, keys, out, Q, N, BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N)
    return out


@triton.jit
def _relaxed_kernel(p_ptr, q_ptr, qd_ptr, dc_ptr, mark_ptr, kept_ptr, nacc_ptr, M, N, K, seed, offset,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    base = offset + b.to(tl.int64) * (N + M)
    # 1. acceptance of the drafts: u * q(y) <= p(y)
    j = tl.arange(0, BLOCK_N)
    jm = j < N
    cand = tl.load(dc_ptr + b * N + j, mask=jm, other=-1)
    valid = cand >= 0
    qd = tl.load(qd_ptr + b * N + j, mask=jm, other=0.0)
    pd = tl.load(p_ptr + b * M + cand, mask=valid, other=0.0)
    u = _uniform(seed, base + j.to(tl.int64))
    accept = valid & (pd > 0.0) & (u * qd <= pd)
    acc_i = accept.to(tl.int32)
    rank = tl.cumsum(acc_i, axis=0) - 1
    n_acc = tl.sum(acc_i, axis=0)
    tl.store(nacc_ptr + b, n_acc.to(tl.int64))
    tl.store(kept_ptr + b * K + rank, cand, mask=accept & (rank < K))
    tl.store(mark_ptr + b * M + cand, 1, mask=accept)
    tl.debug_barrier()  # the marks are read back below by this same program
    # 2. residual draws for the missing beams
    need = K - n_acc
    if need > 0:
        m = tl.arange(0, BLOCK_M)
        mm = m < M
        p = tl.load(p_ptr + b * M + m, mask=mm, other=0.0)
        q = tl.load(q_ptr + b * M + m, mask=mm, other=0.0)
        marked = tl.load(mark_ptr + b * M + m, mask=mm, other=1) != 0
        resid = tl.where(marked, 0.0, tl.maximum(p - q, 0.0))
        um = _uniform(seed, base + N + m.to(tl.int64))
        gumbel = -tl.log(-tl.log(um))
        # the residual's support first, then p over the candidates left (see the reference)
        key1 = tl.where(resid > 0.0, tl.log(tl.maximum(resid, 1e-38)) + gumbel, float("-inf"))
        rest = (resid <= 0.0) & ~marked & (p > 0.0)
        key2 = tl.where(rest, tl.log(tl.maximum(p, 1e-38)) + gumbel, float("-inf"))
        for t in range(0, need):
            top1 = tl.max(key1, axis=0)
            arg1 = tl.argmax(key1, axis=0, tie_break_left=True)
            top2 = tl.max(key2, axis=0)
            arg2 = tl.argmax(key2, axis=0, tie_break_left=True)
            use1 = top1 > float("-inf")
            arg = tl.where(use1, arg1, arg2)
            found = use1 | (top2 > float("-inf"))
            tl.store(kept_ptr + b * K + n_acc + t, tl.where(found, arg.to(tl.int64), -1))
            # (integer products: the interpreter cannot `&` a scalar bool with a block)
            from1 = use1.to(tl.int32)
            key1 = tl.where((m == arg1).to(tl.int32) * from1 != 0, float("-inf"), key1)
            key2 = tl.where((m == arg2).to(tl.int32) * (1 - from1) != 0, float("-inf"), key2)


def verify_relaxed_triton(*, p_cand: torch.Tensor, q_cand: torch.Tensor, q_draft: torch.Tensor,
                          draft_cand: torch.Tensor, num_keep: int, seed: int,
                          offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, M = p_cand.shape
    N = q_draft.shape[1]
    device = p_cand.device
    kept = torch.full((B, num_keep), -1, dtype=torch.long, device=device)
    num_accepted = torch.empty(B, dtype=torch.long, device=device)
    mark = torch.zeros((B, max(M, 1)), dtype=torch.int8, device=device)
    block_m = max(16, triton.next_power_of_2(M))
    _relaxed_kernel[(B,)](p_cand, q_cand, q_draft, draft_cand, mark, kept, num_accepted, M, N, num_keep, seed,
                          offset, BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(N)),
                          num_warps=max(4, min(16, block_m // 256)))  # a request's M candidates per program
    return kept, num_accepted
