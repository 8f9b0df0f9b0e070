"""C++ backend of trie_beam_step (csrc/beam_step.cpp), called on NumPy views of CPU tensors."""

from __future__ import annotations

import torch

from decoding._ext import _C

NORMALIZE_CODES = {"full": 0, "valid": 1, "none": 2}


def trie_beam_step_cpu(logits, beam_scores, beam_nodes, trie, num_out, normalize, excluded_ranks, child_bias, max_children, logprob_weight):
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
