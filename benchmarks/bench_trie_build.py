"""ItemTrie build time from random 4-token identifiers (C++ radix sort + level-order layout)."""

import numpy as np
import pytest

from decoding import ItemTrie


@pytest.mark.parametrize("num_items", [100_000, 1_000_000])
def test_trie_build(benchmark, num_items):
    rows = np.random.default_rng(0).integers(0, 256, size=(num_items, 4))
    benchmark.group = "ItemTrie.from_sequences"
    trie = benchmark.pedantic(
        ItemTrie.from_sequences, args=(rows,), kwargs=dict(vocab_size=256, on_duplicate="first"), rounds=3
    )
    assert trie.num_items <= num_items
