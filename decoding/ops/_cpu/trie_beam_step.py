"""C++ backend of trie_beam_step (csrc/trie_beam_step.cpp), called on NumPy views of CPU tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from decoding.trie import ItemTrie

from decoding._ext import _C
from decoding.ops._helpers import NORMALIZE_CODES


def trie_beam_step_cpu(*, logits: torch.Tensor, beam_scores: torch.Tensor, beam_nodes: torch.Tensor, trie: ItemTrie,
                       num_out: int, normalize: str, excluded_ranks: torch.Tensor | None,
                       child_bias: torch.Tensor | None, max_children: int,
                       logprob_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, W, V = logits.shape
    logits = logits.float().contiguous()
    scores_in = beam_scores.float().contiguous()
    nodes_in = beam_nodes.long().contiguous()
    out_scores = torch.empty((B, num_out), dtype=torch.float32)
    out_parent = torch.empty((B, num_out), dtype=torch.long)
    out_token = torch.empty((B, num_out), dtype=torch.long)
    out_node = torch.empty((B, num_out), dtype=torch.long)
    excl = None if excluded_ranks is None else excluded_ranks.long().contiguous()
    bias = None if child_bias is None else child_bias.float().contiguous()
    _C.trie_beam_step(
        logits.reshape(-1).numpy(),
        V,
        scores_in.numpy(),
        nodes_in.numpy(),
        trie.indptr.numpy(),
        trie.node_token.numpy(),
        trie.item_lo.numpy(),
        trie.item_hi.numpy(),
        None if excl is None else excl.numpy(),
        0 if excl is None else excl.shape[1],
        None if bias is None else bias.numpy(),
        0 if bias is None else bias.shape[-1],
        B, W, V, num_out, float(logprob_weight),
        NORMALIZE_CODES[normalize],
        torch.get_num_threads(),
        out_scores.numpy(), out_parent.numpy(), out_token.numpy(), out_node.numpy(),
    )
    return out_scores, out_parent, out_token, out_node
