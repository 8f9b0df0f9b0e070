"""compact_kv: each backend against the reference and against direct indexing, every dtype."""

from __future__ import annotations

import pytest
import torch

from decoding.ops import available_backends, compact_kv

BACKENDS = available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, C, per_head", [((2, 4, 30, 16), 7, True), ((3, 2, 50, 40), 50, False),
                                                ((1, 1, 5, 8), 0, True)])
def test_compact_kv_equals_reference(backend, dtype, shape, C, per_head):
    g = torch.Generator().manual_seed(C)
    k, v = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    B, H, T, D = shape
    index = torch.randint(0, T, (B, H if per_head else 1, C), generator=g)
    got = compact_kv(k, v, index, backend=backend)
    ref = compact_kv(k, v, index, backend="torch")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    full = index.expand(B, H, C)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                assert torch.equal(got[0][b, h, c], k[b, h, full[b, h, c]])
    with pytest.raises(ValueError, match="index: positions"):
        compact_kv(k, v, torch.full((B, 1, 1), T), backend=backend)
