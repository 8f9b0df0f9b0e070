"""catalog_topk per backend: SETRec-style embedding slots (3 x 64, float16 tables) and RPG-style
code slots (16 digits x 256 codes) over 200k items, 16 requests, k=20. Group by mode: the torch
reference is the baseline."""

import pytest
import torch

from decoding.ops import available_backends, catalog_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"]
N, B = 200_000, 16


def inputs(mode):
    g = torch.Generator().manual_seed(0)
    if mode == "embedding":
        return {"hidden": torch.randn(B, 3, 64, generator=g).to(DEVICE),
                "item_embeddings": torch.randn(3, N, 64, generator=g).half().to(DEVICE)}
    return {"code_logprobs": torch.log_softmax(torch.randn(B, 16, 256, generator=g), -1).to(DEVICE),
            "item_codes": torch.randint(0, 256, (N, 16), generator=g, dtype=torch.uint8).to(DEVICE)}


@pytest.mark.parametrize("mode", ["embedding", "codes"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_catalog_topk(benchmark, backend, mode):
    kwargs = inputs(mode)
    benchmark.group = f"catalog_topk {mode} N={N}"
    tables = kwargs.get("item_embeddings", kwargs.get("item_codes"))
    benchmark.extra_info["bytes"] = tables.numel() * tables.element_size()  # one read of the catalog
    out = benchmark(lambda: catalog_topk(20, backend=backend, **kwargs))
    assert bool((out.items >= 0).all())
