"""compact_kv: gather the kept positions of a KV cache into a dense layout.

After a pruning policy (:mod:`decoding.kv`) picks, per request and per KV head, which prompt
positions to keep, ``compact_kv`` copies those keys and values into ``[B, H, C, D]`` tensors,
so that decode attention reads only ``C`` positions. Positions keep their keys as computed at
prefill (rotary embeddings already applied at the original positions).
"""

from __future__ import annotations

import torch

from decoding._validate import check_tensor
from decoding.ops._backend import resolve_backend, triton_launcher

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compact_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, *, backend: str = "auto"):
    """Gather kept positions.

    Args:
        keys, values: ``[B, H, T, D]`` float32/float16/bfloat16 (one layer's cache).
        index: int64 ``[B, H, C]`` positions in ``[0, T)`` to keep, in the order wanted
            (``[B, 1, C]`` keeps the same positions for every head).
        backend: ``"auto"``, ``"torch"`` (reference), ``"cpu"`` (C++), ``"triton"``.
    Returns:
        ``(keys [B, H, C, D], values [B, H, C, D])``, new contiguous tensors.

    Memory traffic: reads the kept rows (``2·B·H·C·D`` elements) and the index (``8·B·H·C``
    bytes), writes ``2·B·H·C·D`` elements.
    """
    check_tensor("keys", keys, ndim=4, dtypes=KV_DTYPES)
    check_tensor("values", values, ndim=4, dtypes=(keys.dtype,), device=keys.device)
    if values.shape != keys.shape:
        raise ValueError(f"values: expected the keys' shape {tuple(keys.shape)}, got {tuple(values.shape)}")
    B, H, T, D = keys.shape
    check_tensor("index", index, ndim=3, dtypes=(torch.int64,), device=keys.device)
    if index.shape[0] != B or index.shape[1] not in (1, H):
        raise ValueError(f"index: expected shape [{B}, {H} or 1, C], got {tuple(index.shape)}")
    if index.numel() and bool(((index < 0) | (index >= T)).any()):
        raise ValueError(f"index: positions must be in [0, {T})")
    index = index.expand(B, H, index.shape[2]).contiguous()
    return run_compact_kv(keys, values, index, resolve_backend(backend, keys.device))


def run_compact_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, backend: str):
    """Dispatch without validation: ``index [B, H, C]`` (heads expanded), a resolved backend."""
    return torch.ops.decoding.compact_kv(keys, values, index, backend)


@torch.library.custom_op("decoding::compact_kv", mutates_args=())
def _compact_kv_op(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        from decoding.ops._torch.compact_kv import compact_kv_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.compact_kv import compact_kv_cpu as impl
    else:
        from decoding.ops._triton.compact_kv import compact_kv_triton

        impl = triton_launcher(compact_kv_triton)
    out_k, out_v = impl(keys=keys.contiguous(), values=values.contiguous(), index=index.contiguous())
    return out_k.contiguous(), out_v.contiguous()


@_compact_kv_op.register_fake
def _(keys, values, index, backend):
    shape = (*index.shape, keys.shape[3])
    return keys.new_empty(shape), values.new_empty(shape)
