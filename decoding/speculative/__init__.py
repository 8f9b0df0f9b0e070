"""Speculative beam search (N-to-K verification over the tree layout) and the draft alignment
losses and training."""

from decoding.speculative.losses import relaxed_alignment_loss, strict_alignment_loss
from decoding.speculative.search import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.speculative.train import align_draft

__all__ = ["SpeculativeOutput", "SpeculativeStats", "align_draft", "relaxed_alignment_loss", "speculative_beam_search",
           "strict_alignment_loss"]
