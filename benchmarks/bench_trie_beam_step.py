"""trie_beam_step per backend at a serving shape: B=16 requests x W=20 beams, 100k semantic IDs
(4 x 256 codes), at each trie level. Group by level: the torch reference is the baseline."""

import pytest
import torch

from decoding import ItemTrie
from decoding import testing as bm
from decoding.ops import available_backends, trie_beam_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the Triton interpreter is a correctness tool: time Triton only on a GPU
BACKENDS = [b for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"]


@pytest.fixture(scope="module")
def trie():
    V = bm.sid_vocab_size(4, 256)
    return ItemTrie.from_sequences(bm.random_semantic_ids(100_000), vocab_size=V).to(DEVICE)


@pytest.mark.parametrize("normalize", ["full", "none"])
@pytest.mark.parametrize("level", [0, 1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_trie_beam_step(benchmark, trie, backend, level, normalize):
    B, W = 16, 20 if level else 1
    g = torch.Generator().manual_seed(level)
    lo, hi = int(trie.level_offsets[level]), int(trie.level_offsets[level + 1])
    nodes = torch.randint(lo, hi, (B, W), generator=g).to(DEVICE)
    logits = torch.randn(B, W, trie.vocab_size, generator=g).to(DEVICE)
    scores = (-torch.rand(B, W, generator=g) * 5).to(DEVICE)
    C = trie.max_branch_at(level)
    benchmark.group = f"trie_beam_step level={level} normalize={normalize}"

    def step():
        out = trie_beam_step(logits, scores, nodes, trie, 20, normalize=normalize, max_children=C, backend=backend)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    # the bytes the op must move (its docstring): the logits rows (full normalisation reads all
    # of them; otherwise only the children), the beams' state and the CSR entries it reads
    row = trie.vocab_size if normalize == "full" else C
    benchmark.extra_info["bytes"] = (B * W * row * logits.element_size() + B * W * (4 + 8)
                                     + B * W * C * (4 + 4 + 8) + B * 20 * (4 + 8 * 3))
    out = benchmark(step)
    assert bool((out.node[:, 0] >= 0).all())
