"""Speculative beam search (N-to-K verification) and the draft alignment losses."""

from decoding.search.speculative import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.speculative.losses import strict_alignment_loss, relaxed_alignment_loss

__all__ = ["SpeculativeOutput", "SpeculativeStats", "relaxed_alignment_loss", "speculative_beam_search",
           "strict_alignment_loss"]
