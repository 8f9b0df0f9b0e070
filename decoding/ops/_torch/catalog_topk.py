"""Reference backend of catalog_topk: scores a chunk of items at a time and merges it into a
running top-k, so memory is ``O(B * (chunk + k))``, never ``[B, N]``."""

from __future__ import annotations

import torch

from decoding.ops._helpers import NEG_INF, is_excluded, merge_topk

CHUNK = 65536


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


def catalog_topk_embedding_torch(*, queries: torch.Tensor, item_embeddings: torch.Tensor, k: int,
                                 excluded: torch.Tensor | None,
                                 item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, d = queries.shape
    N = item_embeddings.shape[1]

    def score_chunk(start, end):
        table = item_embeddings[:, start:end].float()  # [S, n, d]
        return torch.einsum("bsd,snd->bn", queries, table)

    return _stream(score_chunk, N, B, k, excluded, item_mask, queries.device)


def catalog_topk_codes_torch(*, code_logprobs: torch.Tensor, item_codes: torch.Tensor, k: int,
                             excluded: torch.Tensor | None,
                             item_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, C = code_logprobs.shape
    N = item_codes.shape[0]
    slot = torch.arange(S, device=code_logprobs.device)

    def score_chunk(start, end):
        codes = item_codes[start:end].long()  # [n, S]
        picked = code_logprobs[:, slot[None, :], codes]  # [B, n, S]
        return picked.sum(dim=2) / S

    return _stream(score_chunk, N, B, k, excluded, item_mask, code_logprobs.device)
