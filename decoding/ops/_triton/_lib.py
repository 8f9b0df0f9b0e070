"""Triton helpers shared by the Triton backends (jit functions inlined into their kernels)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# the interpreter runs kernels on CPU tensors; it needs smaller blocks to stay fast
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _lower_bound(row_ptr, n, target, STEPS: tl.constexpr):
    """Vectorised lower_bound of ``target`` in the sorted int64 array ``row_ptr[0:n]``."""
    lo = tl.zeros(target.shape, dtype=tl.int64)
    hi = tl.zeros(target.shape, dtype=tl.int64) + n
    for _ in tl.static_range(STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(row_ptr + mid, mask=open_, other=0)
        go_right = open_ & (v < target)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(open_ & ~go_right, mid, hi)
    return lo


@triton.jit
def _lse_update(m, s, x):
    """One block of an online log-sum-exp: running max ``m`` and sum ``s`` of exp(x - m)."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return new_m, s
