"""trie_beam_step: the reference against a plain-Python brute force, and every available backend
against the reference on randomised inputs and edge cases (Triton under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decoding import ItemTrie
from decoding.ops import available_backends, trie_beam_step

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "torch"]


def random_trie(seed, n=60, levels=3, codes=6, eos=None):
    rng = np.random.default_rng(seed)
    if eos is None:
        rows = rng.integers(0, codes, (n, levels)) + np.arange(levels) * codes
        return ItemTrie.from_sequences(rows, vocab_size=levels * codes + 2, on_duplicate="first")
    rows = {tuple(rng.integers(1, codes, rng.integers(0, levels)).tolist()) + (eos,) for _ in range(n)}
    return ItemTrie.from_sequences([list(r) for r in rows], vocab_size=codes + 1, eos_token_id=eos)


def random_inputs(trie, seed, B=3, W=4, dead=True, level=None):
    g = torch.Generator().manual_seed(seed)
    V = trie.vocab_size
    logits = torch.randn(B, W, V, generator=g) * 3
    scores = -torch.rand(B, W, generator=g) * 5
    lo = trie.level_offsets[level].item() if level is not None else 0
    hi = trie.level_offsets[level + 1].item() if level is not None else trie.num_nodes
    nodes = torch.randint(lo, hi, (B, W), generator=g)
    if dead:
        nodes[0, 0] = -1
        scores[1, 1] = float("-inf")
    return logits, scores, nodes


def brute_force(logits, scores, nodes, trie, K, normalize="full", excluded=None, bias=None, weight=1.0):
    """Plain-Python enumeration of every candidate; ties broken by (beam, child)."""
    B, W, V = logits.shape
    indptr, tok = trie.indptr.tolist(), trie.node_token.tolist()
    lo, hi = trie.item_lo.tolist(), trie.item_hi.tolist()
    out = []
    for b in range(B):
        ex = set() if excluded is None else {int(r) for r in excluded[b] if r < trie.num_items}
        cands = []
        for w in range(W):
            v, s = int(nodes[b, w]), float(scores[b, w])
            if v < 0 or s == -math.inf:
                continue
            kids = [c for c in range(indptr[v] + 1, indptr[v + 1] + 1) if any(r not in ex for r in range(lo[c], hi[c]))]
            row = logits[b, w].double()
            if normalize == "full":
                norm = torch.logsumexp(row, 0).item()
            elif normalize == "valid":
                norm = torch.logsumexp(row[[tok[c] for c in kids]], 0).item() if kids else 0.0
            else:
                norm = 0.0
            for j, c in enumerate(range(indptr[v] + 1, indptr[v + 1] + 1)):
                if c not in kids:
                    continue
                val = s + weight * (row[tok[c]].item() - norm) + (0.0 if bias is None else float(bias[b, w, j]))
                if val > -math.inf:
                    cands.append((-val, w, j, c))
        cands.sort()
        out.append([(-c[0], c[1], tok[c[3]], c[3]) for c in cands[:K]])
    return out


def assert_matches_brute(res, expected, K):
    for b, row in enumerate(expected):
        for k in range(K):
            if k < len(row):
                s, w, t, c = row[k]
                assert res.scores[b, k].item() == pytest.approx(s, abs=1e-4)
                assert (res.parent[b, k].item(), res.token[b, k].item(), res.node[b, k].item()) == (w, t, c)
            else:
                assert res.scores[b, k].item() == -math.inf
                assert (res.parent[b, k].item(), res.token[b, k].item(), res.node[b, k].item()) == (-1, -1, -1)


def assert_same(a, b, atol=1e-4):
    assert torch.allclose(a.scores, b.scores, atol=atol, equal_nan=False), (a.scores, b.scores)
    for name in ("parent", "token", "node"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (name, getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("normalize", ["full", "valid", "none"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("eos", [None, 0])
def test_reference_matches_brute_force(normalize, seed, eos):
    trie = random_trie(seed, eos=eos)
    logits, scores, nodes = random_inputs(trie, seed)
    excluded = trie.excluded_ranks([[0, 1, 2, 3], [], list(range(0, trie.num_ids, 3))], 3)
    C = int(trie.max_branch.max())
    bias = -torch.rand(3, 4, C)
    for kwargs in ({}, dict(excluded_ranks=excluded), dict(child_bias=bias, logprob_weight=0.7)):
        res = trie_beam_step(logits, scores, nodes, trie, 7, normalize=normalize, backend="torch", **kwargs)
        expected = brute_force(logits, scores, nodes, trie, 7, normalize, kwargs.get("excluded_ranks"),
                               kwargs.get("child_bias"), kwargs.get("logprob_weight", 1.0))
        assert_matches_brute(res, expected, 7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalize", ["full", "valid", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_backends_match_reference_randomised(backend, normalize, seed):
    rng = np.random.default_rng(seed)
    trie = random_trie(seed, n=int(rng.integers(5, 120)), eos=None if seed % 2 else 0)
    B, W, K = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 12))
    logits, scores, nodes = random_inputs(trie, seed, B=B, W=W, dead=B > 1 and W > 1)
    ids = [list(rng.choice(trie.num_ids, size=int(rng.integers(0, trie.num_ids)), replace=False)) for _ in range(B)]
    excluded = trie.excluded_ranks(ids, B)
    C = int(trie.max_branch.max())
    bias = torch.randn(B, W, C + 2)
    for kwargs in ({}, dict(excluded_ranks=excluded), dict(child_bias=bias, logprob_weight=0.5)):
        ref = trie_beam_step(logits, scores, nodes, trie, K, normalize=normalize, backend="torch", **kwargs)
        got = trie_beam_step(logits, scores, nodes, trie, K, normalize=normalize, backend=backend, **kwargs)
        assert_same(ref, got)


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
class TestEdgeCases:
    def test_one_item_catalog(self, backend):
        trie = ItemTrie.from_sequences([[2, 3]], vocab_size=5)
        logits = torch.randn(1, 1, 5)
        res = trie_beam_step(logits, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), trie, 3, backend=backend)
        assert res.token.tolist() == [[2, -1, -1]] and res.node.tolist() == [[1, -1, -1]]
        assert res.scores[0, 0].item() == pytest.approx(torch.log_softmax(logits[0, 0], -1)[2].item(), abs=1e-5)
        assert res.scores[0, 1:].tolist() == [-math.inf, -math.inf]

    def test_more_slots_than_candidates(self, backend):
        trie = random_trie(1)
        logits, scores, nodes = random_inputs(trie, 1, B=2, W=2, dead=False, level=1)
        res = trie_beam_step(logits, scores, nodes, trie, 50, backend=backend)
        ref = trie_beam_step(logits, scores, nodes, trie, 50, backend="torch")
        assert_same(ref, res)
        n_valid = (res.node >= 0).sum(dim=1)
        assert bool((n_valid < 50).all())
        assert bool((res.scores[res.node < 0] == -math.inf).all())
        assert bool((res.parent[res.node < 0] == -1).all())

    def test_all_beams_dead_or_at_leaves(self, backend):
        trie = random_trie(2)
        leaves = torch.nonzero(trie.is_leaf(torch.arange(trie.num_nodes))).flatten()
        nodes = torch.stack([leaves[:2], torch.tensor([-1, -1])])
        logits = torch.randn(2, 2, trie.vocab_size)
        res = trie_beam_step(logits, torch.zeros(2, 2), nodes, trie, 4, backend=backend)
        assert bool((res.node == -1).all()) and bool((res.scores == -math.inf).all())

    def test_duplicate_logits_tie_break_by_beam_then_child(self, backend):
        trie = ItemTrie.from_sequences([[1, 3], [1, 4], [2, 3], [2, 4]], vocab_size=5)
        logits = torch.zeros(1, 2, 5)  # every candidate has the same score
        nodes = torch.tensor([[1, 2]])
        res = trie_beam_step(logits, torch.zeros(1, 2), nodes, trie, 4, backend=backend)
        assert res.parent.tolist() == [[0, 0, 1, 1]]
        assert res.token.tolist() == [[3, 4, 3, 4]]

    def test_minus_inf_rows_and_entries(self, backend):
        trie = random_trie(3)
        logits, scores, nodes = random_inputs(trie, 3, B=2, W=3, dead=False)
        logits[0, 1] = float("-inf")  # whole row -inf: no finite log-prob
        logits[1, :, ::2] = float("-inf")  # some children -inf
        for normalize in ("full", "valid", "none"):
            ref = trie_beam_step(logits, scores, nodes, trie, 9, normalize=normalize, backend="torch")
            got = trie_beam_step(logits, scores, nodes, trie, 9, normalize=normalize, backend=backend)
            assert_same(ref, got)
            assert not bool((ref.parent[0] == 1).any())
            assert bool(torch.isfinite(ref.scores[ref.node >= 0]).all())

    def test_everything_excluded(self, backend):
        trie = random_trie(4)
        logits, scores, nodes = random_inputs(trie, 4, B=2, W=2, dead=False, level=1)
        excluded = trie.excluded_ranks([list(range(trie.num_ids)), []], 2)
        res = trie_beam_step(logits, scores, nodes, trie, 5, excluded_ranks=excluded, backend=backend)
        assert bool((res.node[0] == -1).all())
        assert bool((res.node[1] >= 0).any())

    def test_low_precision_logits(self, backend):
        trie = random_trie(5)
        logits, scores, nodes = random_inputs(trie, 5)
        for dtype in (torch.float16, torch.bfloat16):
            ref = trie_beam_step(logits.to(dtype).float(), scores, nodes, trie, 6, backend="torch")
            got = trie_beam_step(logits.to(dtype), scores, nodes, trie, 6, backend=backend)
            assert_same(ref, got, atol=1e-3)

    def test_padding_rows_share_a_batch_with_live_ones(self, backend):
        trie = random_trie(6)
        logits, scores, nodes = random_inputs(trie, 6, B=3, W=3, dead=False)
        nodes[1] = -1  # a whole padding request
        res = trie_beam_step(logits, scores, nodes, trie, 4, backend=backend)
        assert bool((res.node[1] == -1).all())
        assert_same(trie_beam_step(logits, scores, nodes, trie, 4, backend="torch"), res)


def test_results_never_leave_the_trie_or_reach_excluded_items():
    """Property: every returned node is a child of its parent beam's node, holds the token
    returned, and owns at least one item the request did not exclude."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        trie = random_trie(seed, n=80, eos=0 if seed % 3 == 0 else None)
        B, W = 2, 3
        logits, scores, nodes = random_inputs(trie, seed, B=B, W=W)
        ids = [list(rng.choice(trie.num_ids, size=trie.num_ids // 2, replace=False)) for _ in range(B)]
        excluded = trie.excluded_ranks(ids, B)
        for backend in ["torch", *CPU_BACKENDS]:
            res = trie_beam_step(logits, scores, nodes, trie, 8, excluded_ranks=excluded, backend=backend)
            for b in range(B):
                banned = {int(trie.rank_of_item[i]) for i in ids[b]}
                for k in range(8):
                    c = int(res.node[b, k])
                    if c < 0:
                        continue
                    parent = int(nodes[b, res.parent[b, k]])
                    assert int(trie.indptr[parent]) < c <= int(trie.indptr[parent + 1])
                    assert int(trie.node_token[c]) == int(res.token[b, k])
                    owned = set(range(int(trie.item_lo[c]), int(trie.item_hi[c])))
                    assert owned - banned


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(logits=torch.randn(2, 3)), ValueError, "logits: expected 3 dimensions"),
        (dict(logits=torch.randint(0, 3, (2, 3, 20))), TypeError, "logits: expected dtype"),
        (dict(logits=torch.randn(2, 3, 19)), ValueError, "logits: vocabulary size 19 does not match"),
        (dict(beam_scores=torch.zeros(2, 4)), ValueError, "beam_scores: expected shape"),
        (dict(beam_scores=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "beam_scores: expected dtype"),
        (dict(beam_nodes=torch.zeros(2, 3)), TypeError, "beam_nodes: expected dtype"),
        (dict(beam_nodes=torch.full((2, 3), 10_000)), ValueError, "beam_nodes: node ids must be in"),
        (dict(num_out=0), ValueError, "num_out"),
        (dict(normalize="softmax"), ValueError, "normalize"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(excluded_ranks=torch.tensor([[3, 1], [0, 0]])), ValueError, "excluded_ranks: each row must be sorted"),
        (dict(child_bias=torch.zeros(2, 3, 1)), ValueError, "child_bias: expected shape"),
        (dict(max_children=0), ValueError, "max_children"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    trie = random_trie(0)
    args = dict(logits=torch.randn(2, 3, 20), beam_scores=torch.zeros(2, 3),
                beam_nodes=torch.zeros(2, 3, dtype=torch.long), trie=trie, num_out=4)
    args.update(change)
    with pytest.raises(error, match=match):
        trie_beam_step(**args)


def test_unavailable_backend_raises_instead_of_falling_back(monkeypatch):
    trie = random_trie(0)
    args = (torch.randn(1, 1, 20), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), trie, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: 'triton' is not available"):
        trie_beam_step(*args, backend="triton")


def test_tensors_on_another_device_raise():
    trie = random_trie(0)
    logits = torch.randn(1, 1, 20)
    with pytest.raises(ValueError, match="beam_scores: expected a tensor on cpu, got one on meta"):
        trie_beam_step(logits, torch.zeros(1, 1, device="meta"), torch.zeros(1, 1, dtype=torch.long), trie, 2)
    with pytest.raises(ValueError, match="beam_nodes: expected a tensor on cpu, got one on meta"):
        trie_beam_step(logits, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long, device="meta"), trie, 2)


def test_trie_on_another_device_raises():
    trie = random_trie(0)
    fake = type("T", (), {"device": torch.device("meta"), "vocab_size": 20})()
    with pytest.raises(ValueError, match="trie: is on meta"):
        trie_beam_step(torch.randn(1, 1, 20), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), fake, 2)
    assert trie.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", ["full", "valid", "none"])
def test_triton_on_gpu_matches_reference_at_serving_shapes(normalize):
    from decoding.testing import random_semantic_ids, sid_vocab_size

    V = sid_vocab_size(4, 256)
    trie = ItemTrie.from_sequences(random_semantic_ids(100_000), vocab_size=V).to("cuda")
    B, W, K = 16, 20, 40
    logits = torch.randn(B, W, V, device="cuda") * 3
    scores = -torch.rand(B, W, device="cuda") * 5
    lo, hi = trie.level_offsets[2].item(), trie.level_offsets[3].item()
    nodes = torch.randint(lo, hi, (B, W), device="cuda")
    excluded = trie.excluded_ranks(torch.randint(0, trie.num_ids, (B, 50)), B)
    ref = trie_beam_step(logits, scores, nodes, trie, K, normalize=normalize, excluded_ranks=excluded, backend="torch")
    got = trie_beam_step(logits, scores, nodes, trie, K, normalize=normalize, excluded_ranks=excluded, backend="triton")
    assert_same(ref, got)


@pytest.mark.parametrize("W, num_out", [(64, 128), (256, 512), (300, 7)])
def test_wide_beams_segmented_selection_equals_the_reference(W, num_out):
    """W x C far above the request's top K takes the segmented Triton select (segment top-Ks in
    parallel, then a select over their union): the same candidates in the same order, ties included."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton is not installed")
    from decoding.testing import random_semantic_ids, sid_vocab_size

    V = sid_vocab_size(2, 256)
    trie = ItemTrie.from_sequences(random_semantic_ids(20_000, levels=2, codes=256, seed=W), vocab_size=V)
    g = torch.Generator().manual_seed(W)
    B = 2
    nodes = torch.randint(1, int(trie.level_offsets[2]), (B, W), generator=g)
    logits = torch.randn(B, W, V, generator=g).round(decimals=1)  # many exact ties
    scores = (-torch.rand(B, W, generator=g)).round(decimals=1)
    C = trie.max_branch_at(1)
    assert W * C > 4 * 1024  # past the interpreter's segmentation threshold
    # normalize="none": the scores are exact sums, so any difference is the selection's
    ref = trie_beam_step(logits, scores, nodes, trie, num_out, normalize="none", max_children=C, backend="torch")
    got = trie_beam_step(logits, scores, nodes, trie, num_out, normalize="none", max_children=C, backend="triton")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
