"""Pieces shared by the ops, their backends and the decoders above them. Backends import from
here (and from the extension), never from each other, so each backend is a leaf."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from decoding._validate import exclusion_ids

if TYPE_CHECKING:
    from decoding.trie import ItemTrie

NEG_INF = float("-inf")


class TrieArrays(NamedTuple):
    """The CSR arrays of an :class:`decoding.ItemTrie` a kernel reads: what a custom op can take
    (tensors, not the Python object)."""

    indptr: torch.Tensor
    node_token: torch.Tensor
    item_lo: torch.Tensor
    item_hi: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.indptr.shape[0] - 1
NORMALIZE_MODES = ("full", "valid", "none")
NORMALIZE_CODES = {"full": 0, "valid": 1, "none": 2}  # the compiled backends' encoding of NORMALIZE_MODES


def gather_children(trie: ItemTrie, beam_nodes: torch.Tensor, beam_alive: torch.Tensor, max_children: int):
    """The children of each beam's node, padded to ``max_children``.

    Returns ``child [B, W, C]`` node ids (clamped, only meaningful where ``in_node``),
    ``token [B, W, C]`` int64 and ``in_node [B, W, C]`` bool.
    """
    C = max(int(max_children), 1)
    node = beam_nodes.clamp(min=0).long()
    start = trie.indptr[node].long()
    count = (trie.indptr[node + 1].long() - start) * beam_alive
    j = torch.arange(C, device=beam_nodes.device)
    in_node = j < count[..., None]
    child = (start[..., None] + j + 1).clamp(max=trie.num_nodes - 1)
    token = trie.node_token[child].long().clamp(min=0)
    return child, token, in_node


def count_excluded(excluded_ranks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Excluded ranks of each request inside ``[lo, hi)``; ``lo, hi [B, ...]``."""
    B = lo.shape[0]
    flat_lo = lo.reshape(B, -1).contiguous().long()
    flat_hi = hi.reshape(B, -1).contiguous().long()
    n = torch.searchsorted(excluded_ranks, flat_hi) - torch.searchsorted(excluded_ranks, flat_lo)
    return n.reshape(lo.shape)


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


def sorted_exclusions(exclude_items, batch_size: int, num_items: int, device) -> torch.Tensor | None:
    """Item ids to exclude (as :func:`decoding._validate.exclusion_ids` takes them) as int64
    ``[B, X]`` sorted ascending and padded with ``num_items`` (past every id), or None."""
    ids = exclusion_ids(exclude_items, batch_size, num_items, device)
    return None if ids is None else torch.where(ids < 0, num_items, ids).sort(dim=1).values
