"""Reference backend of catalog_topk: scores a chunk of items at a time and merges it into a
running top-k, so memory is ``O(B * (chunk + k))``, never ``[B, N]``."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
CHUNK = 65536


def is_excluded(excluded: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool like ``ids [B, M]``: whether each id is in its row of the sorted ``excluded [B, X]``
    (an id is excluded iff it equals the entry at its insertion point)."""
    at = torch.searchsorted(excluded, ids.contiguous()).clamp(max=excluded.shape[1] - 1)
    return excluded.gather(1, at) == ids


def merge_topk(best_scores, best_ids, scores, ids, k):
    """Running top-k: merge a new chunk ``scores/ids [R, n]`` into the best so far, keeping
    ``k``. Ties go to the earlier entry, so with chunks in id order (the running best, all of
    lower ids, first) ties go to the lower id."""
    scores = torch.cat([best_scores, scores], dim=1)
    ids = torch.cat([best_ids, ids], dim=1)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def _eligible(start, end, B, excluded, item_mask, device):
    """bool ``[B, end - start]``: items of the chunk a request may get."""
    ids = torch.arange(start, end, device=device)
    ok = torch.ones((B, end - start), dtype=torch.bool, device=device)
    if item_mask is not None:
        ok &= item_mask[..., start:end] if item_mask.dim() == 2 else item_mask[start:end][None, :]
    if excluded is not None:
        ok &= ~is_excluded(excluded, ids.expand(B, -1))
    return ok


def _stream(score_chunk, N, B, k, excluded, item_mask, device):
    """Running top-k over chunks; ties go to the lower item id (stable sort, chunks in id order,
    and the running buffer, whose ids are all lower, first)."""
    best_scores = torch.full((B, 0), NEG_INF, device=device)
    best_items = torch.full((B, 0), -1, dtype=torch.long, device=device)
    for start in range(0, N, CHUNK):
        end = min(start + CHUNK, N)
        scores = score_chunk(start, end)
        scores = scores.masked_fill(scores.isnan() | ~_eligible(start, end, B, excluded, item_mask, device), NEG_INF)
        items = torch.arange(start, end, device=device).expand(B, -1)
        best_scores, best_items = merge_topk(best_scores, best_items, scores, items, k)
    best_items = torch.where(best_scores > NEG_INF, best_items, -1)
    return best_scores, best_items


def catalog_topk_embedding_torch(queries, item_embeddings, k, excluded, item_mask):
    B, S, d = queries.shape
    N = item_embeddings.shape[1]

    def score_chunk(start, end):
        table = item_embeddings[:, start:end].float()  # [S, n, d]
        return torch.einsum("bsd,snd->bn", queries, table)

    return _stream(score_chunk, N, B, k, excluded, item_mask, queries.device)


def catalog_topk_codes_torch(code_logprobs, item_codes, k, excluded, item_mask):
    B, S, C = code_logprobs.shape
    N = item_codes.shape[0]
    slot = torch.arange(S, device=code_logprobs.device)

    def score_chunk(start, end):
        codes = item_codes[start:end].long()  # [n, S]
        picked = code_logprobs[:, slot[None, :], codes]  # [B, n, S]
        return picked.sum(dim=2) / S

    return _stream(score_chunk, N, B, k, excluded, item_mask, code_logprobs.device)
