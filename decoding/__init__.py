"""decoding: decoding kernels for LLM-based generative recommendation.

Public API: :class:`ItemTrie` (the catalog index), :func:`beam_search` (trie-constrained beam
search for Hugging Face or protocol models), and the ops in :mod:`decoding.ops`.
"""

from decoding.ops import trie_beam_step
from decoding.search import BeamModel, BeamSearchOutput, beam_search
from decoding.search.speculative import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.trie import ItemTrie

__all__ = ["BeamModel", "BeamSearchOutput", "ItemTrie", "SpeculativeOutput", "SpeculativeStats", "beam_search",
           "speculative_beam_search", "trie_beam_step"]
__version__ = "0.1.0"
