"""catalog_topk: the best ``k`` catalog items per request under a per-item score, streamed over
the catalog without materialising the ``[B, N]`` score matrix.

Two scoring modes (set identifiers):

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
from decoding.ops._backend import resolve_backend, triton_launcher
from decoding.ops._helpers import sorted_exclusions

EMBEDDING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)


class CatalogTopK(NamedTuple):
    """scores ``[B, k]`` float32, best first (-inf past the eligible items); items ``[B, k]``
    int64 (-1 there)."""

    scores: torch.Tensor
    items: torch.Tensor


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

    Memory traffic: one read of the catalog tables (``S·N·d`` table elements, or ``N·S`` codes)
    and of the queries; writes ``12·B·k`` bytes (the Triton backend also writes and reads a
    per-block candidate buffer of ``12·B·k·N/256`` bytes). Never the ``[B, N]`` scores.
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
    excluded = sorted_exclusions(exclude_items, B, N, device)
    name = resolve_backend(backend, device)
    if embedding_mode:
        # the slot weights fold into the queries: score = <w_s h_s, E_s[i]> summed over slots
        queries = (hidden.float() * slot_weights[None, :, None]).contiguous()
        return run_catalog_topk_embedding(queries, item_embeddings, k, excluded, item_mask, name)
    return run_catalog_topk_codes(code_logprobs, item_codes, k, excluded, item_mask, name)


def run_catalog_topk_embedding(queries, item_embeddings, k, excluded, item_mask, backend) -> CatalogTopK:
    """Dispatch without validation: slot-weighted ``queries [B, S, d]`` float32, sorted exclusions."""
    return CatalogTopK(*torch.ops.decoding.catalog_topk_embedding(queries, item_embeddings, k, excluded, item_mask,
                                                                  backend))


def run_catalog_topk_codes(code_logprobs, item_codes, k, excluded, item_mask, backend) -> CatalogTopK:
    """Dispatch without validation: ``code_logprobs [B, S, C]`` float32, sorted exclusions."""
    return CatalogTopK(*torch.ops.decoding.catalog_topk_codes(code_logprobs, item_codes, k, excluded, item_mask,
                                                              backend))


@torch.library.custom_op("decoding::catalog_topk_embedding", mutates_args=())
def _catalog_topk_embedding_op(queries: torch.Tensor, item_embeddings: torch.Tensor, k: int,
                               excluded: torch.Tensor | None, item_mask: torch.Tensor | None,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        from decoding.ops._torch.catalog_topk import catalog_topk_embedding_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.catalog_topk import catalog_topk_embedding_cpu as impl
    else:
        from decoding.ops._triton.catalog_topk import catalog_topk_embedding_triton

        impl = triton_launcher(catalog_topk_embedding_triton)
    return tuple(t.contiguous() for t in impl(queries=queries.contiguous(),
                                              item_embeddings=item_embeddings.contiguous(), k=k, excluded=excluded,
                                              item_mask=item_mask))


@torch.library.custom_op("decoding::catalog_topk_codes", mutates_args=())
def _catalog_topk_codes_op(code_logprobs: torch.Tensor, item_codes: torch.Tensor, k: int,
                           excluded: torch.Tensor | None, item_mask: torch.Tensor | None,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        from decoding.ops._torch.catalog_topk import catalog_topk_codes_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.catalog_topk import catalog_topk_codes_cpu as impl
    else:
        from decoding.ops._triton.catalog_topk import catalog_topk_codes_triton

        impl = triton_launcher(catalog_topk_codes_triton)
    return tuple(t.contiguous() for t in impl(code_logprobs=code_logprobs.contiguous(),
                                              item_codes=item_codes.contiguous(), k=k, excluded=excluded,
                                              item_mask=item_mask))


def _catalog_topk_fake(a, table, k, excluded, item_mask, backend):
    return a.new_empty((a.shape[0], k), dtype=torch.float32), a.new_empty((a.shape[0], k), dtype=torch.long)


_catalog_topk_embedding_op.register_fake(_catalog_topk_fake)
_catalog_topk_codes_op.register_fake(_catalog_topk_fake)
