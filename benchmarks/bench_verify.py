"""The verification ops per backend at a relaxed-speculation shape: 16 requests, N=40 drafted
sequences checked against M=800 target candidates, K=20 kept (verify_relaxed), and 2,000-key
rows (match_keys). The torch reference is the baseline."""

import pytest
import torch

from decoding.ops import available_backends, match_keys, verify_relaxed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"]
B, N, M, K = 16, 40, 800, 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_relaxed(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(B, M, generator=g), -1).to(DEVICE)
    q = torch.softmax(torch.randn(B, M, generator=g), -1).to(DEVICE)
    draft_cand = torch.stack([torch.randperm(M, generator=g)[:N] for _ in range(B)]).to(DEVICE)
    q_draft = q.gather(1, draft_cand)
    benchmark.group = f"verify_relaxed B={B} N={N} M={M}"
    benchmark.extra_info["bytes"] = B * (2 * M * 4 + N * (4 + 8) + K * 8)
    out = benchmark(lambda: verify_relaxed(p, q, q_draft, draft_cand, K, seed=1, backend=backend))
    assert bool((out.kept >= 0).sum(1).ge(K).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_keys(benchmark, backend):
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 10**6, (B, 2000), generator=g).to(DEVICE)
    queries = torch.cat([keys[:, :100], torch.randint(0, 10**6, (B, 100), generator=g).to(DEVICE)], 1)
    benchmark.group = "match_keys 200 queries x 2000 keys"
    benchmark.extra_info["bytes"] = (queries.numel() * 2 + keys.numel()) * 8
    out = benchmark(lambda: match_keys(queries, keys, backend=backend))
    assert bool((out[:, :100] >= 0).all())
