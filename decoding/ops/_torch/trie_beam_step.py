"""Reference backend of trie_beam_step: vectorised torch, no loop over beams or items."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from decoding.ops._helpers import NEG_INF, count_excluded, gather_children

if TYPE_CHECKING:
    from decoding.trie import ItemTrie

def trie_beam_step_torch(*, logits: torch.Tensor, beam_scores: torch.Tensor, beam_nodes: torch.Tensor, trie: ItemTrie,
                         num_out: int, normalize: str, excluded_ranks: torch.Tensor | None,
                         child_bias: torch.Tensor | None, max_children: int,
                         logprob_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
