"""catalog_topk: the best ``k`` catalog items per request under a per-item score, streamed over
the catalog without materialising the ``[B, N]`` score matrix.

Two scoring modes (set identifiers, ``../shared/reference/algorithms.md`` §2 and §4):

* embedding slots (SETRec): ``score(i) = Σ_s w_s · <h_s, E_s[i]>`` for query vectors
  ``h [B, S, d]``, per-slot item tables ``E [S, N, d]`` and slot weights ``w [S]``;
* code slots (RPG): ``score(i) = (1/S) Σ_s LP[b, s, code[i, s]]`` for per-request per-slot
  log-probability tables ``LP [B, S, C]`` and item codes ``code [N, S]``.

Items a request must not get (``exclude_items``, e.g. its history) and items outside the
eligible set (``item_mask``, e.g. warm or cold items only) are never returned. Results are in
descending score order; equal scores are ordered by lower item id, so every backend returns the
same items.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding._validate import check_positive_int, check_shape, check_tensor
from decoding.ops._backend import load_backend, resolve_backend

EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)


class CatalogTopK(NamedTuple):
    """scores ``[B, k]`` float32, best first (-inf past the eligible items); items ``[B, k]``
    int64 (-1 there)."""

    scores: torch.Tensor
    items: torch.Tensor


def _exclusions(exclude_items, B, N, device) -> torch.Tensor | None:
    """``[B, X]`` int64 sorted item ids, padded with ``N`` (past every id), or None."""
    if exclude_items is None:
        return None
    if isinstance(exclude_items, torch.Tensor):
        check_tensor("exclude_items", exclude_items, ndim=2, dtypes=(torch.int32, torch.int64))
        if exclude_items.shape[0] != B:
            raise ValueError(f"exclude_items: expected {B} rows, got {exclude_items.shape[0]}")
        ids = exclude_items.to(device=device, dtype=torch.long)
    else:
        rows = list(exclude_items)
        if len(rows) != B:
            raise ValueError(f"exclude_items: expected {B} lists (one per request), got {len(rows)}")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((B, width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        ids = ids.to(device)
    if ids.numel() and bool((ids >= N).any()):
        raise ValueError(f"exclude_items: item ids must be < {N} (the catalog size); pad with -1")
    if ids.numel() and bool((ids < -1).any()):
        raise ValueError("exclude_items: item ids must be >= 0 (-1 pads)")
    ids = torch.where(ids < 0, N, ids).sort(dim=1).values
    return ids if ids.shape[1] else None


def catalog_topk(
    k: int,
    *,
    hidden: torch.Tensor | None = None,
    item_embeddings: torch.Tensor | None = None,
    slot_weights: torch.Tensor | None = None,
    code_logprobs: torch.Tensor | None = None,
    item_codes: torch.Tensor | None = None,
    exclude_items=None,
    item_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> CatalogTopK:
    """Top ``k`` items per request, streamed over the catalog.

    Args:
        k: items per request (at most the catalog size ``N``).
        hidden: ``[B, S, d]`` float32/float16/bfloat16 query vectors (embedding mode).
        item_embeddings: ``[S, N, d]`` float32/float16/bfloat16 per-slot item tables.
        slot_weights: ``[S]`` float32 (default all ones).
        code_logprobs: ``[B, S, C]`` float32 per-request per-slot log-probabilities (code mode).
        item_codes: ``[N, S]`` uint8/int16/int32 codes in ``[0, C)``.
        exclude_items: per request, item ids never to return: ``B`` lists, or an int tensor
            ``[B, X]`` padded with -1.
        item_mask: bool ``[N]`` (or ``[B, N]``): the eligible items (e.g. warm-only or cold-only
            ranking); others are never returned.
        backend: ``"auto"``, ``"torch"`` (chunked reference), ``"cpu"`` (C++), ``"triton"``.
    Returns:
        :class:`CatalogTopK`. Scores are accumulated in float32.
    """
    embedding_mode = hidden is not None or item_embeddings is not None
    code_mode = code_logprobs is not None or item_codes is not None
    if embedding_mode == code_mode:
        raise ValueError("catalog_topk: give either hidden and item_embeddings (embedding slots) or "
                         "code_logprobs and item_codes (code slots)")
    if embedding_mode:
        if hidden is None or item_embeddings is None:
            raise ValueError("hidden, item_embeddings: embedding mode needs both")
        check_tensor("hidden", hidden, ndim=3, dtypes=EMBEDDING_DTYPES)
        device = hidden.device
        B, S, d = hidden.shape
        check_tensor("item_embeddings", item_embeddings, ndim=3, dtypes=EMBEDDING_DTYPES, device=device)
        if item_embeddings.shape[0] != S or item_embeddings.shape[2] != d:
            raise ValueError(f"item_embeddings: expected shape [{S}, N, {d}], got {tuple(item_embeddings.shape)}")
        N = item_embeddings.shape[1]
        if slot_weights is None:
            slot_weights = torch.ones(S, device=device)
        check_tensor("slot_weights", slot_weights, ndim=1, dtypes=(torch.float32,), device=device)
        check_shape("slot_weights", slot_weights, (S,))
    else:
        if code_logprobs is None or item_codes is None:
            raise ValueError("code_logprobs, item_codes: code mode needs both")
        if slot_weights is not None:
            raise ValueError("slot_weights: only for embedding mode")
        check_tensor("code_logprobs", code_logprobs, ndim=3, dtypes=(torch.float32,))
        device = code_logprobs.device
        B, S, C = code_logprobs.shape
        check_tensor("item_codes", item_codes, ndim=2, dtypes=CODE_DTYPES, device=device)
        if item_codes.shape[1] != S:
            raise ValueError(f"item_codes: expected shape [N, {S}], got {tuple(item_codes.shape)}")
        N = item_codes.shape[0]
        if N and (int(item_codes.min()) < 0 or int(item_codes.max()) >= C):
            raise ValueError(f"item_codes: codes must be in [0, {C}) (code_logprobs' last dimension)")
    check_positive_int("k", k)
    if k > N:
        raise ValueError(f"k: {k} is larger than the catalog ({N} items)")
    if item_mask is not None:
        check_tensor("item_mask", item_mask, dtypes=(torch.bool,), device=device)
        if tuple(item_mask.shape) not in ((N,), (B, N)):
            raise ValueError(f"item_mask: expected shape [{N}] or [{B}, {N}], got {tuple(item_mask.shape)}")
        item_mask = item_mask.contiguous()
    excluded = _exclusions(exclude_items, B, N, device)
    name = resolve_backend(backend, device)
    if embedding_mode:
        # the slot weights fold into the queries: score = <w_s h_s, E_s[i]> summed over slots
        queries = (hidden.float() * slot_weights[None, :, None]).contiguous()
        fn = load_backend("catalog_topk_embedding", name, "catalog_topk")
        return CatalogTopK(*fn(queries, item_embeddings.contiguous(), k, excluded, item_mask))
    fn = load_backend("catalog_topk_codes", name, "catalog_topk")
    return CatalogTopK(*fn(code_logprobs.contiguous(), item_codes.contiguous(), k, excluded, item_mask))
