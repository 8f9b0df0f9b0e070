"""Speculative beam search (N-to-K verification over the tree layout): the search, its loop in
phases (``speculative_loop`` over ``SpeculativeSearch``, with its ``AdmissionPolicy``),
continuous batching on the tree layout (``batching``), and the draft alignment losses and
training."""

from decoding.speculative.losses import relaxed_alignment_loss, strict_alignment_loss
from decoding.speculative.search import (
    AdmissionPolicy,
    Round,
    SpeculativeOutput,
    SpeculativeSearch,
    SpeculativeStats,
    speculative_beam_search,
    speculative_loop,
)
from decoding.speculative.train import align_draft

__all__ = ["AdmissionPolicy", "Round", "SpeculativeOutput", "SpeculativeSearch", "SpeculativeStats", "align_draft",
           "relaxed_alignment_loss", "speculative_beam_search", "speculative_loop", "strict_alignment_loss"]
