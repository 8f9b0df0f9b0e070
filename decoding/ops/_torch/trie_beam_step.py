"""Reference backend of trie_beam_step: vectorised torch, no loop over beams or items."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def gather_children(trie, beam_nodes: torch.Tensor, beam_alive: torch.Tensor, max_children: int):
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


def trie_beam_step_torch(logits, beam_scores, beam_nodes, trie, num_out, normalize, excluded_ranks, child_bias, max_children, logprob_weight):
    B, W, V = logits.shape
    logits = logits.float()
    alive = (beam_nodes >= 0) & (beam_scores > NEG_INF)
    child, token, valid = gather_children(trie, beam_nodes, alive, max_children)
    C = child.shape[-1]
    picked = logits.gather(2, token)
    if excluded_ranks is not None:
        lo, hi = trie.item_lo[child].long(), trie.item_hi[child].long()
        valid &= count_excluded(excluded_ranks, lo, hi) < hi - lo
    if normalize == "full":
        norm = torch.logsumexp(logits, dim=-1)
    elif normalize == "valid":
        norm = torch.logsumexp(picked.masked_fill(~valid, NEG_INF), dim=-1)
    else:
        norm = torch.zeros_like(beam_scores)
    # same association as the compiled backends: (score - wt * norm) + wt * logit + bias
    wt = float(logprob_weight)
    scores = (beam_scores - wt * norm)[..., None] + wt * picked
    if child_bias is not None:
        scores = scores + child_bias[..., :C].float()
    valid &= scores > NEG_INF  # also drops NaN
    flat = scores.masked_fill(~valid, NEG_INF).reshape(B, W * C)
    take = min(num_out, W * C)
    # stable sort: equal scores keep (beam, child) order, as the compiled backends do
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :take]
    top = flat.gather(1, order)
    ok = valid.reshape(B, W * C).gather(1, order)
    parent = order // C
    out_node = child.reshape(B, -1).gather(1, order)
    out_token = token.reshape(B, -1).gather(1, order)
    minus = torch.full_like(order, -1)
    out = (
        top.masked_fill(~ok, NEG_INF),
        torch.where(ok, parent, minus),
        torch.where(ok, out_token, minus),
        torch.where(ok, out_node.long(), minus),
    )
    if take < num_out:  # fewer candidates than slots
        pad = num_out - take
        out = (
            torch.nn.functional.pad(out[0], (0, pad), value=NEG_INF),
            *(torch.nn.functional.pad(t, (0, pad), value=-1) for t in out[1:]),
        )
    return out
