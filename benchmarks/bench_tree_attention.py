"""tree_attention per backend: 4 requests, 8 query heads over 2 KV heads, 128 prompt positions
and 140 tree rows (a speculative verification level: K + gamma * N rows), 64 dims. The torch
reference (SDPA with an additive mask) is the baseline."""

import pytest
import torch

from decoding.ops import available_backends, tree_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_attention(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, P, R, D = 4, 8, 2, 128, 140, 64
    query = torch.randn(B, H, R, D, generator=g).to(DEVICE)
    key, value = (torch.randn(B, Hkv, P + R, D, generator=g).to(DEVICE) for _ in range(2))
    prefix_valid = torch.ones(B, P, dtype=torch.bool, device=DEVICE)
    tree_visible = torch.ones(R, R, dtype=torch.bool).tril().expand(B, R, R).contiguous().to(DEVICE)
    benchmark.group = f"tree_attention P={P} R={R}"
    benchmark.extra_info["bytes"] = (query.numel() * 2 + key.numel() * 2) * 4  # Q, K, V read; O written
    out = benchmark(lambda: tree_attention(query, key, value, prefix_len=P, prefix_valid=prefix_valid,
                                           tree_visible=tree_visible, backend=backend))
    assert bool(torch.isfinite(out.out).all())
