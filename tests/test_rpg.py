"""RPG decoding: exhaustive top-k, graph-constrained decoding against a plain-Python loop, the
blocked k-NN graph against brute force, and its peak memory measured O(N·k)."""

from __future__ import annotations

import pytest
import torch

from decoding.setid import cosine_digit_logits, digit_logprobs, graph_decode, knn_graph, rpg_item_features, rpg_topk
from decoding.testing.baselines import knn_graph_materialised
from decoding.testing.memory import peak_memory_bytes


def catalog(N=400, S=6, C=16, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, C, (N, S), generator=g).to(torch.uint8)
    lp = digit_logprobs(torch.randn(B, S, C, generator=g) * 2)
    return lp, codes


def test_logprobs_and_exhaustive_topk():
    g = torch.Generator().manual_seed(1)
    h, books = torch.randn(2, 4, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    logits = cosine_digit_logits(h, books, 0.05)
    cos = torch.nn.functional.cosine_similarity(h[:, :, None, :], books[None], dim=-1)
    assert torch.allclose(logits, cos / 0.05, atol=1e-4)
    lp = digit_logprobs(logits)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 4), atol=1e-5)
    codes = torch.randint(0, 16, (500, 4), generator=g).to(torch.uint8)
    full = lp[:, torch.arange(4)[None, :], codes.long()].mean(-1)
    got = rpg_topk(lp, codes, 7)
    assert torch.allclose(got.scores, full.topk(7, dim=1).values, atol=1e-5)


def graph_decode_loop(lp, codes, neighbors, start, W, steps, k, exclude):
    """Plain-Python sets: beam ∪ neighbours, score, best W (ties to the lower id)."""
    B, S, _ = lp.shape
    out_items, out_scores, visited = [], [], []
    for b in range(B):
        beam, seen = [int(x) for x in start[b]], set()
        scored = {}
        for _ in range(steps):
            cand = set(beam) | {int(n) for i in beam if i >= 0 for n in neighbors[i] if n >= 0}
            cand.discard(-1)
            seen |= cand
            scores = {i: sum(float(lp[b, s, int(codes[i, s])]) for s in range(S)) / S
                      for i in cand if i not in exclude[b]}
            scored = sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:W]
            beam = [i for i, _ in scored] + [-1] * (W - len(scored))
        top = scored[:k]
        out_items.append([i for i, _ in top] + [-1] * (k - len(top)))
        out_scores.append([s for _, s in top] + [float("-inf")] * (k - len(top)))
        visited.append(len(seen))
    return torch.tensor(out_items), torch.tensor(out_scores), torch.tensor(visited)


@pytest.mark.parametrize("W, steps, k", [(5, 1, 5), (8, 3, 4), (20, 4, 20)])
def test_graph_decode_equals_loop(W, steps, k):
    lp, codes = catalog()
    neighbors, _ = knn_graph(6, codebooks=torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(2)),
                             item_codes=codes, block_size=128)
    neighbors[0, :2] = -1  # padded neighbour slots
    start = torch.randint(0, 400, (3, W), generator=torch.Generator().manual_seed(W))
    exclude = [[int(start[0, 0])], [], list(range(0, 400, 3))]
    got = graph_decode(lp, codes, neighbors, W, steps, k=k, start_items=start, exclude_items=exclude)
    items, scores, visited = graph_decode_loop(lp, codes, neighbors, start, W, steps, k, exclude)
    assert torch.equal(got.items, items)
    assert torch.allclose(got.scores, scores.float(), atol=1e-5)
    assert torch.equal(got.visited, visited)


def test_graph_decode_on_a_complete_graph_is_exhaustive():
    lp, codes = catalog(N=60)
    everyone = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, 60)]) for i in range(60)])
    got = graph_decode(lp, codes, everyone, 10, 1, seed=0)
    ref = rpg_topk(lp, codes, 10)
    assert torch.equal(got.items, ref.items) and torch.allclose(got.scores, ref.scores, atol=1e-6)
    assert got.visited.tolist() == [60, 60, 60]
    again = graph_decode(lp, codes, everyone, 10, 1, seed=0)
    assert torch.equal(again.items, got.items)
    with pytest.raises(ValueError, match="k: must be at most num_beams"):
        graph_decode(lp, codes, everyone, 10, 1, k=11)
    with pytest.raises(ValueError, match="neighbors: expected 60 rows"):
        graph_decode(lp, codes, everyone[:5], 10, 1)


def brute_force_knn(features, k):
    sims = features.double() @ features.double().T
    sims.fill_diagonal_(float("-inf"))
    return sims


@pytest.mark.parametrize("N, k, block", [(300, 5, 64), (257, 10, 100), (50, 49, 7)])
def test_knn_graph_equals_brute_force(N, k, block):
    g = torch.Generator().manual_seed(N)
    features = torch.randn(N, 12, generator=g)
    neighbors, sims = knn_graph(k, features=features, block_size=block)
    full = brute_force_knn(features, k)
    ref = full.topk(k, dim=1)
    assert torch.allclose(sims.double(), ref.values, atol=1e-4)
    # neighbours are the brute-force ones up to float ties: each has the brute-force similarity
    assert torch.allclose(full.gather(1, neighbors), ref.values, atol=1e-4)
    assert not bool((neighbors == torch.arange(N)[:, None]).any())
    # RPG's similarity from code embeddings: mean over digits of (1 + cos) / 2
    books = torch.randn(4, 8, 6, generator=g)
    codes = torch.randint(0, 8, (N, 4), generator=g).to(torch.int16)
    nb, sim = knn_graph(k, codebooks=books, item_codes=codes, block_size=block)
    e = torch.nn.functional.normalize(books.double(), dim=-1)
    per_digit = torch.stack([e[s][codes[:, s].long()] @ e[s][codes[:, s].long()].T for s in range(4)])
    rpg_sim = ((1 + per_digit) / 2).mean(0)
    rpg_sim.fill_diagonal_(float("-inf"))
    assert torch.allclose(sim.double(), rpg_sim.topk(k, dim=1).values, atol=1e-5)
    assert torch.allclose(rpg_sim.gather(1, nb), rpg_sim.topk(k, dim=1).values, atol=1e-5)
    f = rpg_item_features(books, codes)
    assert f.shape == (N, 24)


def test_knn_graph_peak_memory_is_linear_not_quadratic():
    """Measured in a child process: at N = 12,000 the N x N float matrix alone would be 576 MB;
    the blocked build needs a few MB (N·k results plus the buffers of one 256 x 256 block). The
    materialising build, measured the same way, does need the N x N matrix, so the measurement
    can tell."""
    N, k = 12_000, 10
    features = torch.randn(N, 16, generator=torch.Generator().manual_seed(0))
    blocked = peak_memory_bytes(knn_graph, k, features=features, block_size=256)
    full = peak_memory_bytes(knn_graph_materialised, k, features)
    assert full > N * N * 4 * 0.9
    assert blocked < 24 * 2**20, blocked
