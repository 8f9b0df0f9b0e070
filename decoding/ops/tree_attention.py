"""tree_attention: attention of beam-tree rows over a shared prompt plus their own ancestors.

In the tree layout (:mod:`decoding.search.tree`) a request's KV holds ``[prompt (P) | tree rows
(R)]`` once. Each of the ``M`` query rows attends to every valid prompt position and to the tree
rows it may see (its ancestors and itself). The op computes the two parts separately, each with
its own softmax statistics, and merges them by log-sum-exp (cascade attention):

    out = (exp(lse_prefix) * out_prefix + exp(lse_tree) * out_tree) / exp(lse)
    lse = logaddexp(lse_prefix, lse_tree)

so the prompt part needs no dense ``[M, P]`` mask (only the prompt's padding) and, in the Triton
kernel, a block of query rows reads each prompt K/V tile once for all of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from decoding._validate import check_shape, check_tensor
from decoding.ops._backend import resolve_backend, triton_launcher

ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TreeAttentionOutput(NamedTuple):
    """out ``[B, H, M, D]`` in the query's dtype (0 for a row that sees nothing); lse ``[B, H, M]``
    float32, the log of the softmax denominator over the scaled scores (-inf for such a row)."""

    out: torch.Tensor
    lse: torch.Tensor


def tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    prefix_len: int,
    prefix_valid: torch.Tensor,
    tree_visible: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> TreeAttentionOutput:
    """Attention of tree rows over a shared prompt and their visible tree rows.

    Args:
        query: ``[B, H, M, D]`` float32/float16/bfloat16, the ``M`` rows being run.
        key, value: ``[B, Hkv, P + R, D]``, same dtype: the prompt's ``P`` positions, then the
            ``R`` tree rows (the running ones included); ``H`` a multiple of ``Hkv`` (GQA).
        prefix_len: ``P``.
        prefix_valid: ``[B, P]`` bool: real prompt positions (False for left padding).
        tree_visible: ``[B, M, R]`` bool: the tree rows each query row sees.
        scale: score scale (default ``1 / sqrt(D)``).
        backend: ``"auto"``, ``"torch"`` (reference: SDPA with an additive mask), ``"cpu"``
            (C++), ``"triton"``.
    Returns:
        :class:`TreeAttentionOutput`.

    Memory traffic: reads the queries (``B·H·M·D`` elements) and the keys and values once per
    block of query rows (``2·B·Hkv·S·D`` elements per block: the prompt part is read once for
    all of a request's beams), the masks (``B·P + B·M·R`` bytes); writes ``B·H·M·D`` elements and
    ``4·B·H·M`` bytes of log-sum-exp.
    """
    check_tensor("query", query, ndim=4, dtypes=ATTN_DTYPES)
    B, H, M, D = query.shape
    device = query.device
    check_tensor("key", key, ndim=4, dtypes=(query.dtype,), device=device)
    check_tensor("value", value, ndim=4, dtypes=(query.dtype,), device=device)
    if key.shape != value.shape:
        raise ValueError(f"value: expected the key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    Hkv, S = key.shape[1], key.shape[2]
    if key.shape[0] != B or key.shape[3] != D:
        raise ValueError(f"key: expected shape [{B}, Hkv, S, {D}], got {tuple(key.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"key: {Hkv} key/value heads do not divide the query's {H} heads")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 0 <= prefix_len <= S:
        raise ValueError(f"prefix_len: expected an int in [0, {S}], got {prefix_len!r}")
    R = S - prefix_len
    check_tensor("prefix_valid", prefix_valid, ndim=2, dtypes=(torch.bool,), device=device)
    check_shape("prefix_valid", prefix_valid, (B, prefix_len))
    check_tensor("tree_visible", tree_visible, ndim=3, dtypes=(torch.bool,), device=device)
    check_shape("tree_visible", tree_visible, (B, M, R))
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale!r}")
    name = resolve_backend(backend, device)
    return run_tree_attention(query, key, value, prefix_len, prefix_valid, tree_visible, float(scale), name)


def run_tree_attention(query, key, value, prefix_len, prefix_valid, tree_visible, scale, backend):
    """Dispatch without validation (the attention hook of the tree layout validates once)."""
    return TreeAttentionOutput(*torch.ops.decoding.tree_attention(query, key, value, prefix_len, prefix_valid,
                                                                  tree_visible, float(scale), backend))


@torch.library.custom_op("decoding::tree_attention", mutates_args=())
def _tree_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                       prefix_valid: torch.Tensor, tree_visible: torch.Tensor, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        from decoding.ops._torch.tree_attention import tree_attention_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.tree_attention import tree_attention_cpu as impl
    else:
        from decoding.ops._triton.tree_attention import tree_attention_triton

        impl = triton_launcher(tree_attention_triton)
    out, lse = impl(query=query.contiguous(), key=key.contiguous(), value=value.contiguous(), prefix_len=prefix_len,
                    prefix_valid=prefix_valid.contiguous(), tree_visible=tree_visible.contiguous(), scale=scale)
    return out.contiguous(), lse.contiguous()


@_tree_attention_op.register_fake
def _(query, key, value, prefix_len, prefix_valid, tree_visible, scale, backend):
    return torch.empty_like(query, memory_format=torch.contiguous_format), query.new_empty(query.shape[:3],
                                                                                           dtype=torch.float32)
