"""compact_kv per backend: one layer's KV of 4 requests x 8 KV heads x 1,024 prompt positions x
64 dims, keeping 256 positions per head (a pruning policy's output). The torch reference is the
baseline."""

import pytest
import torch

from decoding.ops import available_backends, compact_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_kv(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(4, 8, 1024, 64, generator=g).to(DEVICE) for _ in range(2))
    index = torch.randint(0, 1024, (4, 8, 256), generator=g).sort(-1).values.to(DEVICE)
    benchmark.group = "compact_kv 4x8x1024x64 -> 256"
    benchmark.extra_info["bytes"] = 2 * 2 * 4 * 8 * 256 * 64 * 4 + index.numel() * 8  # kept rows read and written
    out = benchmark(lambda: compact_kv(keys, values, index, backend=backend))
    assert out[0].shape == (4, 8, 256, 64)
