"""Top-K recommendation metrics with one held-out target per user (leave-one-out)."""

from __future__ import annotations

import numpy as np


def _ranks(ranked, targets) -> np.ndarray:
    """0-based position of each user's target in their ranked list; -1 when absent."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"ranked, targets: expected [users, K] and [users], got {ranked.shape} and {targets.shape}")
    hit = ranked == targets[:, None]
    return np.where(hit.any(1), hit.argmax(1), -1)


def recall_at_k(ranked, targets, k: int) -> float:
    """Share of users whose target is among their first ``k`` items (= HR@k with one target).
    ``ranked``: int ``[users, >= k]`` best first (-1 = no item); ``targets``: int ``[users]``."""
    ranks = _ranks(np.asarray(ranked)[:, :k], targets)
    return float((ranks >= 0).mean()) if len(ranks) else 0.0


def ndcg_at_k(ranked, targets, k: int) -> float:
    """Mean ``1 / log2(rank + 2)`` over users whose target is at 0-based ``rank < k``, 0 otherwise
    (one relevant item, so the ideal DCG is 1)."""
    ranks = _ranks(np.asarray(ranked)[:, :k], targets)
    gains = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return float(gains.mean()) if len(ranks) else 0.0
