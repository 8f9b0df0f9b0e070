"""Trie-constrained beam search and the model side it drives: the BeamModel protocol, its
transformers adapter, and the tree layout."""

from decoding.search.beam import BeamSearchOutput, beam_search
from decoding.search.model import BeamModel, HFBeamModel, as_beam_model
from decoding.search.tree import TreeModel

__all__ = ["BeamModel", "BeamSearchOutput", "HFBeamModel", "TreeModel", "as_beam_model", "beam_search"]
