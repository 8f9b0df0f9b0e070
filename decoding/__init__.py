"""decoding: decoding kernels for LLM-based generative recommendation."""

from decoding.trie import ItemTrie

__all__ = ["ItemTrie"]
__version__ = "0.1.0"
