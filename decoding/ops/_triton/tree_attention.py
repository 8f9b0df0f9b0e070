"""Triton backend of tree_attention.

One program per (request, query head, block of ``BLOCK_M`` query rows). The prompt part streams
the prompt's K/V in ``BLOCK_N`` tiles, each tile read once for the whole block of rows (every
beam of a request shares it), masked only by the prompt's padding; the tree part streams the
tree rows with the per-row visibility mask. Each part keeps its own online-softmax statistics
(running max, sum, unnormalised output) and the two are merged by log-sum-exp at the end.
Scores and accumulation are float32; ``tl.dot`` takes the inputs' dtype (tensor cores for
fp16/bf16 on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from decoding.ops._triton._lib import INTERPRET

# The interpreter's tl.dot on bfloat16 operands returns garbage (numpy has no bfloat16): there,
# bfloat16 tiles are multiplied in float32. Compiled kernels use the native dtype.


@triton.jit
def _attend_tile(q, k, v, visible, m_i, l_i, acc, scale, UPCAST: tl.constexpr):
    """One K/V tile of online softmax; ``visible [BLOCK_M, BLOCK_N]`` masks the scores.
    Returns the updated running max, sum and unnormalised output."""
    if UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - shift[:, None])
    alpha = tl.exp(m_i - shift)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _part_lse(m_i, l_i):
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))


@triton.jit
def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, pv_ptr, tv_ptr, out_ptr, lse_ptr,
                           H, HKV, M, S, P, D, scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    dim_ok = dims < D
    q = tl.load(q_ptr + ((bh * M + rows) * D)[:, None] + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    kv_base = (b * HKV + kvh) * S * D
    R = S - P
    cols = tl.arange(0, BLOCK_N)

    # prompt part: shared by every row of the block, masked by padding only
    m_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_p = tl.zeros((BLOCK_M,), tl.float32)
    acc_p = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, P, BLOCK_N):
        n = start + cols
        n_ok = n < P
        valid = tl.load(pv_ptr + b * P + n, mask=n_ok, other=0) != 0
        visible = valid[None, :] & row_ok[:, None]
        offs = kv_base + (n * D)[:, None] + dims[None, :]
        kv_mask = n_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        m_p, l_p, acc_p = _attend_tile(q, k, v, visible, m_p, l_p, acc_p, scale, UPCAST)

    # tree part: per-row visibility of the tree rows
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, R, BLOCK_N):
        r = start + cols
        r_ok = r < R
        visible = tl.load(tv_ptr + ((b * M + rows) * R)[:, None] + r[None, :],
                          mask=row_ok[:, None] & r_ok[None, :], other=0) != 0
        offs = kv_base + ((P + r) * D)[:, None] + dims[None, :]
        kv_mask = r_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        m_t, l_t, acc_t = _attend_tile(q, k, v, visible, m_t, l_t, acc_t, scale, UPCAST)

    # merge the two parts by log-sum-exp
    lse_p = _part_lse(m_p, l_p)
    lse_t = _part_lse(m_t, l_t)
    top = tl.maximum(lse_p, lse_t)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    sees = top > float("-inf")
    total = top_safe + tl.log(tl.where(sees, tl.exp(lse_p - top_safe) + tl.exp(lse_t - top_safe), 1.0))
    w_p = tl.where(sees & (l_p > 0), tl.exp(m_p - total), 0.0)
    w_t = tl.where(sees & (l_t > 0), tl.exp(m_t - total), 0.0)
    out = acc_p * w_p[:, None] + acc_t * w_t[:, None]
    tl.store(out_ptr + ((bh * M + rows) * D)[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh * M + rows, tl.where(sees, total, float("-inf")), mask=row_ok)


def _num_warps(block_m: int, block_d: int) -> int:
    # two [BLOCK_M, BLOCK_D] float32 accumulators and the query tile live in registers: more
    # warps above 2,048 elements, or they spill (checked by compiling for sm_80/90/100)
    return 4 if block_m * block_d <= 2048 else 8


def tree_attention_triton(*, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                          prefix_valid: torch.Tensor, tree_visible: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, M, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    out = torch.empty_like(query)
    lse = torch.empty((B, H, M), dtype=torch.float32, device=query.device)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # at most 4,096 accumulator elements per program (64 x 64, 32 x 128): larger tiles spill
    BLOCK_M = 16 if M <= 16 else (32 if M <= 32 or BLOCK_D > 64 else 64)
    _tree_attention_kernel[(B * H, triton.cdiv(M, BLOCK_M))](
        query, key, value, prefix_valid.view(torch.uint8), tree_visible.view(torch.uint8), out, lse,
        H, Hkv, M, S, prefix_len, D, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_D=BLOCK_D, UPCAST=INTERPRET and query.dtype == torch.bfloat16,
        num_warps=_num_warps(BLOCK_M, BLOCK_D))
    return out, lse
