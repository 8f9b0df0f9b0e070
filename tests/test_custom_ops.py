"""Every op is a PyTorch custom op (``torch.ops.decoding.*``) with a fake implementation, so
``torch.compile`` and CUDA graphs can hold it: ``torch.library.opcheck`` checks the schema, the
fake (meta) implementation against the real one, and AOT dispatch, for every CPU backend."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB
from decoding.ops import available_backends
from decoding.ops._helpers import sorted_exclusions

BACKENDS = available_backends("cpu")


def _cases(sid_catalog):
    _, trie = sid_catalog
    g = torch.Generator().manual_seed(0)
    B, W = 2, 3
    nodes = torch.randint(1, int(trie.level_offsets[2]), (B, W), generator=g)
    beam_step = (torch.randn(B, W, SID_VOCAB, generator=g), -torch.rand(B, W, generator=g), nodes, trie.indptr,
                 trie.node_token, trie.item_lo, trie.item_hi, trie.excluded_ranks([[1, 2], []], B),
                 torch.zeros(B, W, int(trie.max_branch.max())), 5, "full", int(trie.max_branch.max()), 0.7)
    N, S, d = 300, 2, 16
    embedding = (torch.randn(B, S, d, generator=g), torch.randn(S, N, d, generator=g).half(), 7,
                 sorted_exclusions([[3], [4, 5]], B, N, "cpu"), torch.rand(N, generator=g) > 0.2)
    codes = (torch.log_softmax(torch.randn(B, 4, 8, generator=g), -1),
             torch.randint(0, 8, (N, 4), generator=g, dtype=torch.uint8), 7, None, None)
    H, P, M, D = 2, 6, 4, 16
    attention = (torch.randn(B, H, M, D, generator=g), torch.randn(B, 1, P + M, D, generator=g),
                 torch.randn(B, 1, P + M, D, generator=g), P, torch.rand(B, P, generator=g) > 0.3,
                 torch.ones(M, M, dtype=torch.bool).tril().expand(B, M, M).contiguous(), 0.25)
    keys = torch.randn(B, H, 10, D, generator=g)
    compact = (keys, keys + 1, torch.randint(0, 10, (B, H, 4), generator=g))
    match = (torch.randint(0, 20, (B, 6), generator=g), torch.randint(0, 20, (B, 9), generator=g))
    p = torch.softmax(torch.randn(B, 12, generator=g), -1)
    cand = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(B)])
    relaxed = (p, p.flip(1), p.gather(1, cand), cand, 3, 11, 0)
    return {"trie_beam_step": beam_step, "catalog_topk_embedding": embedding, "catalog_topk_codes": codes,
            "tree_attention": attention, "compact_kv": compact, "match_keys": match, "verify_relaxed": relaxed}


OPS = ["trie_beam_step", "catalog_topk_embedding", "catalog_topk_codes", "tree_attention", "compact_kv", "match_keys",
       "verify_relaxed"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(sid_catalog, op, backend):
    args = _cases(sid_catalog)[op] + (backend,)
    torch.library.opcheck(getattr(torch.ops.decoding, op), args)


def test_every_op_is_registered():
    assert set(OPS) <= {n for n in dir(torch.ops.decoding) if not n.startswith("_")}
