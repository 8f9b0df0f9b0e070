"""Triton backend of compact_kv: one program per (request·head, block of kept positions)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_kernel(k_ptr, v_ptr, idx_ptr, ok_ptr, ov_ptr, T, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    c_ok = c < C
    t = tl.load(idx_ptr + row * C + c, mask=c_ok, other=0)
    for d0 in range(0, D, BLOCK_D):
        m = c_ok[:, None] & (d0 + d < D)[None, :]
        src = (row * T + t)[:, None] * D + d0 + d[None, :]
        dst = (row * C + c)[:, None] * D + d0 + d[None, :]
        tl.store(ok_ptr + dst, tl.load(k_ptr + src, mask=m), mask=m)
        tl.store(ov_ptr + dst, tl.load(v_ptr + src, mask=m), mask=m)


def compact_kv_triton(*, keys: torch.Tensor, values: torch.Tensor,
                      index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = keys.shape
    C = index.shape[2]
    out_k = torch.empty((B, H, C, D), dtype=keys.dtype, device=keys.device)
    out_v = torch.empty_like(out_k)
    if C:
        BLOCK_C = 32
        BLOCK_D = max(16, min(64, triton.next_power_of_2(D)))  # 128-wide rows spill on sm_80/90/100
        _compact_kernel[(B * H, triton.cdiv(C, BLOCK_C))](keys, values, index, out_k, out_v, T, C, D, BLOCK_C=BLOCK_C,
                                                         BLOCK_D=BLOCK_D)
    return out_k, out_v
