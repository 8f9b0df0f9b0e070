"""RPG decoding: long, unordered semantic IDs whose digits are generated in parallel.

One forward gives, for each of the ``S`` digits, logits over that digit's codebook of ``C``
codes. An item's score is its mean per-digit log-probability, ``(1/S) Σ_s LP[s, code[i, s]]``.

* :func:`rpg_topk`: exhaustive and exact: every item is scored by
  :func:`decoding.ops.catalog_topk` (code slots), never materialising ``[B, N]``.
* :func:`graph_decode`: RPG's graph-constrained decoding: from ``num_beams`` start items, score
  the beam and its neighbours in an item graph, keep the best ``num_beams``, ``steps`` times.
* :func:`knn_graph`: the item graph, built in blocks: memory ``O(N·k)`` plus one block of
  similarities, where RPG's released code builds the ``N x N`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding._validate import FLOAT_DTYPES, check_positive_int, check_tensor, seeded_generator
from decoding.ops._helpers import NEG_INF, is_excluded, merge_topk, sorted_exclusions
from decoding.ops.catalog_topk import CODE_DTYPES, CatalogTopK, catalog_topk


def digit_logprobs(digit_logits: torch.Tensor) -> torch.Tensor:
    """Per-digit log-softmax over each codebook: ``[B, S, C]`` -> float32 ``[B, S, C]``."""
    check_tensor("digit_logits", digit_logits, ndim=3, dtypes=FLOAT_DTYPES)
    return torch.log_softmax(digit_logits.float(), dim=-1)


def cosine_digit_logits(digit_hidden: torch.Tensor, codebooks: torch.Tensor, temperature: float) -> torch.Tensor:
    """RPG's heads: ``cos(h_s, e_{s,c}) / temperature`` for per-digit hidden states
    ``digit_hidden [B, S, d]`` and code embeddings ``codebooks [S, C, d]`` -> ``[B, S, C]``."""
    check_tensor("digit_hidden", digit_hidden, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("codebooks", codebooks, ndim=3, dtypes=FLOAT_DTYPES, device=digit_hidden.device)
    if codebooks.shape[0] != digit_hidden.shape[1] or codebooks.shape[2] != digit_hidden.shape[2]:
        raise ValueError(f"codebooks: expected shape [{digit_hidden.shape[1]}, C, {digit_hidden.shape[2]}], "
                         f"got {tuple(codebooks.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    h = torch.nn.functional.normalize(digit_hidden.float(), dim=-1)
    e = torch.nn.functional.normalize(codebooks.float(), dim=-1)
    return torch.einsum("bsd,scd->bsc", h, e) / temperature


def rpg_topk(code_logprobs: torch.Tensor, item_codes: torch.Tensor, k: int, *, exclude_items=None,
             item_mask: torch.Tensor | None = None, backend: str = "auto") -> CatalogTopK:
    """Exhaustive RPG decoding: the ``k`` items of highest mean per-digit log-probability.
    ``code_logprobs [B, S, C]`` float32 (:func:`digit_logprobs`), ``item_codes [N, S]``."""
    return catalog_topk(k, code_logprobs=code_logprobs, item_codes=item_codes, exclude_items=exclude_items,
                        item_mask=item_mask, backend=backend)


class GraphDecodeOutput(NamedTuple):
    """items / scores ``[B, k]`` best first (-1 / -inf past the items found); visited ``[B]``
    int64: distinct items scored (RPG's ``n_visited_items``)."""

    items: torch.Tensor
    scores: torch.Tensor
    visited: torch.Tensor


def _score_items(code_logprobs, item_codes, items):
    """Mean per-digit log-prob of ``items [B, M]`` (any ids >= 0) -> float32 ``[B, M]``."""
    B, S, _ = code_logprobs.shape
    codes = item_codes[items].long()  # [B, M, S]
    picked = code_logprobs.gather(2, codes.permute(0, 2, 1))  # [B, S, M]
    return picked.sum(dim=1) / S


def _top_by_score(scores, items, width):
    """Best ``width`` (score descending, then lower id) of ``scores/items [B, M]``."""
    by_id = items.sort(dim=1, stable=True).indices
    scores, items = scores.gather(1, by_id), items.gather(1, by_id)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :width]
    return scores.gather(1, order), items.gather(1, order)


@torch.no_grad()
def graph_decode(code_logprobs: torch.Tensor, item_codes: torch.Tensor, neighbors: torch.Tensor, num_beams: int,
                 steps: int, *, k: int | None = None, start_items: torch.Tensor | None = None,
                 seed: int | None = None, exclude_items=None) -> GraphDecodeOutput:
    """RPG's graph-constrained decoding.

    Args:
        code_logprobs: float32 ``[B, S, C]`` per-digit log-probabilities.
        item_codes: ``[N, S]`` uint8/int16/int32 codes.
        neighbors: int64 ``[N, E]`` item graph (e.g. :func:`knn_graph`); -1 pads.
        num_beams: items kept per step. steps: propagation steps (``>= 1``).
        k: items returned (default ``num_beams``; at most ``num_beams``).
        start_items: int64 ``[B, num_beams]`` start beams; default: uniformly random items
            (as RPG), drawn from ``seed`` (None: torch's global generator).
        exclude_items: per-request item ids never returned (as :func:`decoding.ops.catalog_topk`).
    Returns:
        :class:`GraphDecodeOutput`. Each step scores the current beam and all its neighbours
        (deduplicated), so a step never loses a better item already in the beam.
    """
    check_tensor("code_logprobs", code_logprobs, ndim=3, dtypes=(torch.float32,))
    B, S, C = code_logprobs.shape
    device = code_logprobs.device
    check_tensor("item_codes", item_codes, ndim=2, dtypes=CODE_DTYPES, device=device)
    N = item_codes.shape[0]
    if item_codes.shape[1] != S:
        raise ValueError(f"item_codes: expected shape [N, {S}], got {tuple(item_codes.shape)}")
    check_tensor("neighbors", neighbors, ndim=2, dtypes=(torch.int64,), device=device)
    if neighbors.shape[0] != N:
        raise ValueError(f"neighbors: expected {N} rows (one per item), got {neighbors.shape[0]}")
    if neighbors.numel() and bool(((neighbors < -1) | (neighbors >= N)).any()):
        raise ValueError(f"neighbors: ids must be in [-1, {N})")
    check_positive_int("num_beams", num_beams)
    check_positive_int("steps", steps)
    k = num_beams if k is None else check_positive_int("k", k)
    if k > num_beams:
        raise ValueError(f"k: must be at most num_beams ({num_beams}), got {k}")
    if start_items is None:
        g = seeded_generator(seed, device)
        start_items = torch.randint(0, N, (B, num_beams), generator=g, device=device)
    else:
        check_tensor("start_items", start_items, ndim=2, dtypes=(torch.int64,), device=device)
        if start_items.shape != (B, num_beams) or bool(((start_items < 0) | (start_items >= N)).any()):
            raise ValueError(f"start_items: expected ids in [0, {N}) of shape [{B}, {num_beams}]")
    excluded = sorted_exclusions(exclude_items, B, N, device)

    beam = start_items
    scored = []
    for _ in range(steps):
        cand = torch.cat([beam, neighbors[beam.clamp(min=0)].reshape(B, -1).masked_fill(
            (beam < 0).repeat_interleave(neighbors.shape[1], dim=1), -1)], dim=1)
        cand = cand.sort(dim=1).values
        duplicate = torch.cat([torch.zeros((B, 1), dtype=torch.bool, device=device), cand[:, 1:] == cand[:, :-1]], 1)
        cand = cand.masked_fill(duplicate, -1)
        scores = _score_items(code_logprobs, item_codes, cand.clamp(min=0))
        invalid = cand < 0
        if excluded is not None:
            invalid |= is_excluded(excluded, cand)
        scored.append(torch.where(cand >= 0, cand, -1))
        scores = scores.masked_fill(invalid, NEG_INF)
        cand = cand.masked_fill(invalid, N)  # invalid slots sort after every real id on ties
        beam_scores, beam = _top_by_score(scores, cand, num_beams)
        beam = torch.where(beam_scores > NEG_INF, beam, -1)
    items = torch.where(beam_scores[:, :k] > NEG_INF, beam[:, :k], -1)
    all_scored = torch.cat(scored, dim=1).sort(dim=1).values
    distinct = (all_scored >= 0) & torch.cat(
        [torch.ones((B, 1), dtype=torch.bool, device=device), all_scored[:, 1:] != all_scored[:, :-1]], 1)
    return GraphDecodeOutput(items=items, scores=beam_scores[:, :k], visited=distinct.sum(dim=1))


def rpg_item_features(codebooks: torch.Tensor, item_codes: torch.Tensor) -> torch.Tensor:
    """``[n, S * d]`` float32: each item's per-digit code embeddings, L2-normalised and
    concatenated, so that RPG's similarity ``mean_s (1 + cos(e_{s,a_s}, e_{s,b_s})) / 2`` equals
    ``0.5 + 0.5 / S * <f_a, f_b>``. ``codebooks [S, C, d]``, ``item_codes [n, S]``."""
    S = codebooks.shape[0]
    e = torch.nn.functional.normalize(codebooks.float(), dim=-1)
    return e[torch.arange(S, device=e.device)[None, :], item_codes.long()].reshape(item_codes.shape[0], -1)


@torch.no_grad()
def knn_graph(k: int, *, features: torch.Tensor | None = None, codebooks: torch.Tensor | None = None,
              item_codes: torch.Tensor | None = None, block_size: int = 1024):
    """The ``k`` most similar other items of every item, in blocks of ``block_size`` rows and
    columns: peak memory ``O(N·k + block_size² + block_size·F)``, never ``N x N``.

    Args:
        k: neighbours per item (``< N``).
        features: float ``[N, F]``: similarity is the dot product (normalise rows for cosine).
        codebooks, item_codes: RPG's similarity from code embeddings ``[S, C, d]`` and codes
            ``[N, S]`` (features are gathered per block, :func:`rpg_item_features`).
        block_size: rows and columns per block.
    Returns:
        ``(neighbors [N, k] int64, similarity [N, k] float32)``, most similar first, ties to the
        lower id; an item is never its own neighbour. With codebooks, similarity is RPG's.
    """
    if (features is None) == (codebooks is None or item_codes is None):
        raise ValueError("knn_graph: give either features or codebooks and item_codes")
    if features is not None:
        check_tensor("features", features, ndim=2, dtypes=FLOAT_DTYPES)
        N = features.shape[0]
        device = features.device

        def block(start, end):
            return features[start:end].float()
        scale, shift = 1.0, 0.0
    else:
        check_tensor("codebooks", codebooks, ndim=3, dtypes=FLOAT_DTYPES)
        check_tensor("item_codes", item_codes, ndim=2, dtypes=CODE_DTYPES, device=codebooks.device)
        N, S = item_codes.shape
        device = codebooks.device

        def block(start, end):
            return rpg_item_features(codebooks, item_codes[start:end])
        scale, shift = 0.5 / S, 0.5
    check_positive_int("k", k)
    check_positive_int("block_size", block_size)
    if k >= N:
        raise ValueError(f"k: must be below the number of items ({N}), got {k}")
    neighbors = torch.empty((N, k), dtype=torch.long, device=device)
    similarity = torch.empty((N, k), dtype=torch.float32, device=device)
    for r0 in range(0, N, block_size):
        r1 = min(r0 + block_size, N)
        rows = block(r0, r1)
        row_ids = torch.arange(r0, r1, device=device)
        best_s = torch.full((r1 - r0, 0), NEG_INF, device=device)
        best_i = torch.full((r1 - r0, 0), -1, dtype=torch.long, device=device)
        for c0 in range(0, N, block_size):
            c1 = min(c0 + block_size, N)
            sims = rows @ block(c0, c1).T
            col_ids = torch.arange(c0, c1, device=device)
            sims = sims.masked_fill(row_ids[:, None] == col_ids[None, :], NEG_INF)
            best_s, best_i = merge_topk(best_s, best_i, sims, col_ids.expand(r1 - r0, -1), k)
        neighbors[r0:r1] = best_i
        similarity[r0:r1] = best_s * scale + shift
    return neighbors, similarity
