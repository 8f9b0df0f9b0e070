"""Semantic IDs for a catalog: residual k-means over item embeddings, plus a last code that makes
every identifier unique (as TIGER does), with no text model.

    emb = item_embeddings(data)                       # [items, dim] from the interactions
    sids = semantic_ids(emb, levels=3, codes=32, seed=0)
    sids.tokens                                       # [items, levels + 1] token ids
    trie = ItemTrie.from_sequences(sids.tokens, vocab_size=sids.vocab_size)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECIAL_TOKENS = 8  # pad=0, bos=1, eos=2, the rest unused: identifier tokens start after them


@dataclass(frozen=True)
class SemanticIDs:
    """codes: int64 ``[items, levels + 1]`` (the last column the disambiguation code);
    level_sizes: codes per column; tokens: codes shifted into disjoint token ranges per level,
    after ``first_token``; ``vocab_size`` covers them."""

    codes: np.ndarray
    level_sizes: tuple[int, ...]
    first_token: int = SPECIAL_TOKENS

    @property
    def offsets(self) -> np.ndarray:
        return self.first_token + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]).astype(np.int64)

    @property
    def tokens(self) -> np.ndarray:
        return self.codes + self.offsets[None, :]

    @property
    def vocab_size(self) -> int:
        return int(self.first_token + sum(self.level_sizes))

    @property
    def depth(self) -> int:
        return self.codes.shape[1]


def item_embeddings(sequences, num_items: int, dim: int = 32, genres=None, genre_weight: float = 1.0,
                    seed: int = 0) -> np.ndarray:
    """float32 ``[num_items, dim]``: a truncated SVD of the user x item interaction matrix (the
    rows of ``sequences``: pass only training histories, so test items do not leak), with
    item-genre indicators appended (scaled by ``genre_weight``) when ``genres`` (per item, a list
    of genre names) is given. Deterministic for ``seed``."""
    import torch

    users = len(sequences)
    if users == 0 or num_items <= 0 or dim <= 0:
        raise ValueError("sequences, num_items, dim: expected at least one user, one item and a positive dim")
    matrix = np.zeros((num_items, users), dtype=np.float32)
    for user, seq in enumerate(sequences):
        matrix[np.asarray(seq, dtype=np.int64), user] = 1.0
    # tf-idf-like scaling: popular items do not dominate the factors
    matrix /= np.sqrt(np.maximum(matrix.sum(axis=1, keepdims=True), 1.0))
    if genres is not None:
        names = sorted({g for gs in genres for g in gs})
        extra = np.zeros((num_items, len(names)), dtype=np.float32)
        for item, gs in enumerate(genres):
            for g in gs:
                extra[item, names.index(g)] = genre_weight / np.sqrt(len(gs))
        matrix = np.concatenate([matrix, extra], axis=1)
    gen = torch.Generator().manual_seed(seed)
    rank = min(dim, min(matrix.shape))
    q = torch.linalg.qr(torch.from_numpy(matrix.T) @ torch.randn(num_items, rank + 8, generator=gen)).Q
    # randomized SVD: project onto the range, then an exact SVD of the small matrix
    small = torch.from_numpy(matrix) @ q
    u, s, _ = torch.linalg.svd(small, full_matrices=False)
    emb = (u[:, :rank] * s[:rank]).numpy().astype(np.float32)
    if rank < dim:
        emb = np.pad(emb, ((0, 0), (0, dim - rank)))
    return emb


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: ``(assignments int64 [N], centroids [k, D])``.
    Deterministic for ``seed``; empty clusters take the point farthest from its centroid."""
    rng = np.random.default_rng(seed)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1..{n} (the number of points), got {k}")
    x = x.astype(np.float64)
    centroids = [x[rng.integers(n)]]
    dist = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = dist.sum()
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centroids.append(x[pick])
        dist = np.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    c = np.stack(centroids)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        d = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :]
        new = d.argmin(1)
        for j in range(k):
            members = new == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # refill an empty cluster with the worst-served point
                far = int(d[np.arange(n), new].argmax())
                c[j], new[far] = x[far], j
        if np.array_equal(new, assign):
            break
        assign = new
    return assign, c.astype(np.float32)


def semantic_ids(embeddings: np.ndarray, levels: int = 3, codes: int = 32, *, seed: int = 0,
                 iters: int = 30) -> SemanticIDs:
    """Residual k-means: level ``l`` clusters what the previous levels' centroids leave
    unexplained into ``codes`` clusters; items whose ``levels`` codes coincide get a last code
    ``0, 1, 2, ...`` (in item order), so every item has a unique identifier of ``levels + 1``
    tokens. Deterministic for ``seed``."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings: expected a non-empty [items, dim] array, got shape {x.shape}")
    if levels < 1 or codes < 1:
        raise ValueError(f"levels, codes: expected positive ints, got {levels}, {codes}")
    k = min(codes, len(x))
    residual = x.copy()
    columns = []
    for level in range(levels):
        assign, centroids = kmeans(residual, k, seed=seed + level, iters=iters)
        columns.append(assign)
        residual = residual - centroids[assign]
    prefix = np.stack(columns, axis=1)
    last = np.zeros(len(x), dtype=np.int64)
    seen: dict[tuple, int] = {}
    for item, row in enumerate(map(tuple, prefix)):
        last[item] = seen.get(row, 0)
        seen[row] = last[item] + 1
    all_codes = np.concatenate([prefix, last[:, None]], axis=1)
    return SemanticIDs(all_codes, tuple([codes] * levels + [int(last.max()) + 1]))
