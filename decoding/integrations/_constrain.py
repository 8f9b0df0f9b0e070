"""Masking logits rows to the valid children of trie nodes (shared by the logits processors)."""

from __future__ import annotations

import torch

from decoding.ops._helpers import gather_children
from decoding.ops.trie_beam_step import max_children_of


def mask_to_children(scores: torch.Tensor, trie, nodes: torch.Tensor, *,
                     fallback_token: int | None = None) -> torch.Tensor:
    """Scores of the valid children of each row's node, -inf elsewhere.

    Args:
        scores: float ``[R, V]`` logits or log-probs.
        trie: :class:`decoding.ItemTrie` on ``scores``' device.
        nodes: int ``[R]`` trie node of each row; -1 = the row's tokens left the trie.
        fallback_token: for rows with no child (a finished identifier, or -1), allow only this
            token with score 0 (an engine must be able to sample something); None leaves such
            rows all -inf.
    Returns:
        a new float ``[R, V]`` tensor.
    """
    if nodes.numel() == 0:
        return torch.full_like(scores, float("-inf"))
    _, tokens, in_node = gather_children(trie, nodes, nodes >= 0, max_children_of(trie, nodes))
    has_child = in_node.any(dim=1, keepdim=True)
    # padding slots repeat the first child so that every scatter to an index writes one value;
    # childless rows index token 0, never a token of the trie (which may lie past scores' width)
    tokens = torch.where(in_node, tokens, tokens[:, :1]).masked_fill(~has_child, 0)
    values = scores.gather(1, tokens).masked_fill(~has_child, float("-inf"))
    out = torch.full_like(scores, float("-inf")).scatter_(1, tokens, values)
    if fallback_token is not None:
        out[:, fallback_token] = torch.where(has_child[:, 0], out[:, fallback_token], torch.zeros_like(out[:, 0]))
    return out
