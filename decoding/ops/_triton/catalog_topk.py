"""Triton backend of catalog_topk, two stages.

1. ``_block_topk_kernel``: one program per (block of requests, block of ``BLOCK_N`` items)
   scores the tile ``[BLOCK_B, BLOCK_N]`` (embedding slots: a float32 ``tl.dot`` of the queries
   against each slot's item tile, so a table tile is read once for all requests of the block;
   code slots: a gather from the per-request log-prob tables), masks ineligible and excluded
   items, and writes the tile's best ``min(k, BLOCK_N)`` per request (repeated arg-max, lowest
   item id on ties) to a buffer of ``N / BLOCK_N * k`` entries per request.
2. a stable sort of that buffer keeps the best ``k`` (blocks are in item order, so ties still
   go to the lower id).

Nothing of size ``[B, N]`` is allocated. Scores are float32 (``input_precision="ieee"``: no
TF32 rounding on GPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decoding.ops._triton._lib import INTERPRET, _lower_bound


@triton.jit
def _excluded(ex_ptr, X, b_idx, items, STEPS: tl.constexpr):
    """Whether each ``items [BLOCK_B, BLOCK_N]`` is in its request's sorted exclusion row."""
    row = ex_ptr + b_idx[:, None] * X
    lo = _lower_bound(row, X, items, STEPS)
    found = tl.load(row + lo, mask=lo < X, other=-1)
    return (lo < X) & (found == items)


@triton.jit
def _block_topk_kernel(a_ptr, t_ptr, mask_ptr, ex_ptr, buf_s_ptr, buf_i_ptr,
                       B, N, S, D, C, X, mask_stride, n_blocks, KB,
                       CODE_MODE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_EX: tl.constexpr,
                       EX_STEPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pb = tl.program_id(0)
    pn = tl.program_id(1)
    b_idx = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    n_idx = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = b_idx < B
    n_ok = n_idx < N
    scores = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if CODE_MODE:
        # a_ptr: log-probs [B, S, C] float32; t_ptr: codes [N, S]
        for s in range(0, S):
            code = tl.load(t_ptr + n_idx * S + s, mask=n_ok, other=0).to(tl.int64)
            lp = tl.load(a_ptr + (b_idx * S * C + s * C)[:, None] + code[None, :],
                         mask=b_ok[:, None] & n_ok[None, :], other=0.0)
            scores += lp
        scores = scores / S
    else:
        # a_ptr: weighted queries [B, S, D] float32; t_ptr: item tables [S, N, D]
        dims = tl.arange(0, BLOCK_D)
        for s in range(0, S):
            for d0 in range(0, D, BLOCK_D):
                d_ok = d0 + dims < D
                q = tl.load(a_ptr + (b_idx * S * D + s * D + d0)[:, None] + dims[None, :],
                            mask=b_ok[:, None] & d_ok[None, :], other=0.0)
                e = tl.load(t_ptr + ((s * N + n_idx) * D + d0)[:, None] + dims[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                scores += tl.dot(q, tl.trans(e), input_precision="ieee")
    ok = b_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        ok &= tl.load(mask_ptr + b_idx[:, None] * mask_stride + n_idx[None, :], mask=ok, other=0) != 0
    if HAS_EX:
        ok &= ~_excluded(ex_ptr, X, b_idx, n_idx[None, :].to(tl.int64) + tl.zeros((BLOCK_B, BLOCK_N), tl.int64),
                         EX_STEPS)
    # literal -inf: a jit function cannot read a Python global (only the interpreter can)
    scores = tl.where(ok & (scores == scores), scores, float("-inf"))  # NaN never kept
    out = (b_idx * n_blocks + pn) * KB
    cols = tl.arange(0, BLOCK_N)
    for j in range(0, KB):
        best = tl.max(scores, axis=1)
        arg = tl.argmax(scores, axis=1, tie_break_left=True)
        item = tl.where(best > float("-inf"), pn * BLOCK_N + arg.to(tl.int64), -1)
        tl.store(buf_s_ptr + out + j, best, mask=b_ok)
        tl.store(buf_i_ptr + out + j, item, mask=b_ok)
        scores = tl.where(cols[None, :] == arg[:, None], float("-inf"), scores)


def _run(a, table, k, excluded, item_mask, *, code_mode, S, D, C, N):
    B = a.shape[0]
    device = a.device
    # GPU blocks (compiled for sm_80/90/100 without spills): a [16, 256] score tile over 8 warps,
    # and 16-wide slices of the embedding dimension for the FMA dot; the interpreter favours
    # fewer, larger blocks
    BLOCK_N = max(64, min(1024 if INTERPRET else 256, triton.next_power_of_2(N)))
    BLOCK_D = max(16, min(64, triton.next_power_of_2(max(D, 1)))) if INTERPRET else 16
    BLOCK_B = 16
    KB = min(k, BLOCK_N)
    n_blocks = triton.cdiv(N, BLOCK_N)
    buf_s = torch.empty((B, n_blocks * KB), dtype=torch.float32, device=device)
    buf_i = torch.empty((B, n_blocks * KB), dtype=torch.long, device=device)
    X = 0 if excluded is None else excluded.shape[1]
    dummy = torch.zeros(1, dtype=torch.long, device=device)
    mask = dummy if item_mask is None else item_mask.view(torch.uint8)
    stride = 0 if item_mask is None or item_mask.dim() == 1 else item_mask.shape[1]
    _block_topk_kernel[(triton.cdiv(B, BLOCK_B), n_blocks)](
        a, table, mask, dummy if excluded is None else excluded, buf_s, buf_i,
        B, N, S, D, C, X, stride, n_blocks, KB,
        CODE_MODE=code_mode, HAS_MASK=item_mask is not None, HAS_EX=excluded is not None,
        EX_STEPS=max(1, int(X).bit_length()), BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=4 if INTERPRET else 8)
    order = buf_s.sort(dim=1, descending=True, stable=True).indices[:, :k]
    scores, items = buf_s.gather(1, order), buf_i.gather(1, order)
    return scores, torch.where(scores > float("-inf"), items, -1)


def catalog_topk_embedding_triton(*, queries: torch.Tensor, item_embeddings: torch.Tensor, k: int,
                                  excluded: torch.Tensor | None,
                                  item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    S, N, D = item_embeddings.shape
    return _run(queries, item_embeddings, k, excluded, item_mask, code_mode=False, S=S, D=D, C=0, N=N)


def catalog_topk_codes_triton(*, code_logprobs: torch.Tensor, item_codes: torch.Tensor, k: int,
                              excluded: torch.Tensor | None,
                              item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, C = code_logprobs.shape
    return _run(code_logprobs, item_codes, k, excluded, item_mask, code_mode=True, S=S, D=0, C=C, N=item_codes.shape[0])
