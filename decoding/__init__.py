"""decoding: decoding kernels for LLM-based generative recommendation.

Public API: :class:`ItemTrie` (the catalog index), :func:`beam_search` (trie-constrained beam
search for Hugging Face or protocol models), :func:`speculative_beam_search`,
:func:`setid_generate` (SETRec set identifiers; RPG decoding is in :mod:`decoding.rpg`), and the
ops in :mod:`decoding.ops`.
"""

from decoding.ops import trie_beam_step
from decoding.search import BeamModel, BeamSearchOutput, beam_search
from decoding.search.speculative import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.setid import SetIdCatalog, setid_generate
from decoding.trie import ItemTrie

__all__ = ["BeamModel", "BeamSearchOutput", "ItemTrie", "SetIdCatalog", "SpeculativeOutput", "SpeculativeStats",
           "beam_search", "setid_generate", "speculative_beam_search", "trie_beam_step"]
__version__ = "0.1.0"
