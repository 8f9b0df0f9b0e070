"""Speculative beam search (N-to-K verification) and the draft alignment losses."""

from decoding.search.speculative import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.speculative.losses import relaxed_alignment_loss, strict_alignment_loss
from decoding.speculative.train import align_draft

__all__ = ["SpeculativeOutput", "align_draft", "SpeculativeStats", "relaxed_alignment_loss", "speculative_beam_search",
           "strict_alignment_loss"]
