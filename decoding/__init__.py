"""decoding: decoding kernels for LLM-based generative recommendation.

Public API: :class:`ItemTrie` (the catalog index), :func:`beam_search` (trie-constrained beam
search for Hugging Face or protocol models), :func:`speculative_beam_search`,
:func:`setid_generate` (SETRec set identifiers; RPG decoding is in :mod:`decoding.setid`), the
KV cache and pruning policies in :mod:`decoding.kv`, and the ops in :mod:`decoding.ops`.
"""

from importlib.metadata import PackageNotFoundError, version

from decoding.ops import trie_beam_step
from decoding.search import BeamModel, BeamSearchOutput, beam_search
from decoding.setid import SetIdCatalog, setid_generate
from decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_beam_search
from decoding.trie import ItemTrie

try:
    __version__ = version("genrec-decoding")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "unknown"

__all__ = ["BeamModel", "BeamSearchOutput", "ItemTrie", "SetIdCatalog", "SpeculativeOutput", "SpeculativeStats",
           "beam_search", "setid_generate", "speculative_beam_search", "trie_beam_step"]
