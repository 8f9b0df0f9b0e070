"""catalog_topk: every backend against the materialised scores and torch.topk (ties aside), for
both scoring modes and every table dtype, with N not a multiple of any block, exclusions,
eligibility masks, fewer eligible items than k, and argument errors."""

from __future__ import annotations

import pytest
import torch

from decoding.ops import available_backends, catalog_topk

BACKENDS = available_backends("cpu")
NEG_INF = float("-inf")


def materialised(mode, inputs):
    """The full [B, N] score matrix in float64, the baseline the op must not build."""
    if mode == "embedding":
        h, E, w = inputs["hidden"], inputs["item_embeddings"], inputs["slot_weights"]
        return torch.einsum("bsd,snd,s->bn", h.double(), E.double(), w.double())
    lp, codes = inputs["code_logprobs"], inputs["item_codes"]
    S = codes.shape[1]
    return lp.double()[:, torch.arange(S)[None, :], codes.long()].sum(-1) / S


def make_inputs(mode, dtype, B, N, seed, S=3, d=20, C=37):
    g = torch.Generator().manual_seed(seed)
    if mode == "embedding":
        return {"hidden": torch.randn(B, S, d, generator=g),
                "item_embeddings": torch.randn(S, N, d, generator=g).to(dtype),
                "slot_weights": torch.rand(S, generator=g) + 0.1}
    return {"code_logprobs": torch.log_softmax(torch.randn(B, S, C, generator=g) * 2, -1),
            "item_codes": torch.randint(0, C, (N, S), generator=g).to(dtype)}


def assert_is_topk(got, full, k, eligible, tol):
    """got is a valid top-k of full over eligible items: right scores, sorted, distinct, eligible,
    and nothing left out beats the k-th returned score (so only ties may differ)."""
    B, N = full.shape
    n_eligible = eligible.sum(1)
    for b in range(B):
        m = min(k, int(n_eligible[b]))
        items = got.items[b].tolist()
        assert items[m:] == [-1] * (k - m) and bool((got.scores[b, m:] == NEG_INF).all())
        real = items[:m]
        assert len(set(real)) == m and all(eligible[b, i] for i in real)
        assert torch.allclose(got.scores[b, :m].double(), full[b, real], atol=tol, rtol=tol)
        assert bool((got.scores[b, :m].diff() <= 0).all())
        if m:
            rest = eligible[b].clone()
            rest[real] = False
            assert not bool((full[b][rest] > got.scores[b, m - 1].double() + tol).any())
    # against torch.topk over the materialised scores: the same scores (ties aside)
    ref = torch.topk(full.masked_fill(~eligible, NEG_INF), k, dim=1).values
    finite = ref > NEG_INF
    assert torch.allclose(got.scores.double()[finite], ref[finite], atol=tol, rtol=tol)


CASES = [("embedding", torch.float32), ("embedding", torch.float16), ("embedding", torch.bfloat16),
         ("codes", torch.uint8), ("codes", torch.int16), ("codes", torch.int32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, dtype", CASES)
@pytest.mark.parametrize("B, N, k", [(3, 2500, 10), (2, 70, 1), (4, 130, 130), (17, 300, 5)])
def test_equals_materialised_topk(backend, mode, dtype, B, N, k):
    inputs = make_inputs(mode, dtype, B, N, seed=B + N + k)
    full = materialised(mode, inputs)
    got = catalog_topk(k, backend=backend, **inputs)
    tol = 1e-4 if dtype != torch.bfloat16 else 1e-3
    assert_is_topk(got, full, k, torch.ones(B, N, dtype=torch.bool), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, dtype", [("embedding", torch.float16), ("codes", torch.uint8)])
def test_exclusions_and_masks(backend, mode, dtype):
    B, N, k = 3, 600, 20
    inputs = make_inputs(mode, dtype, B, N, seed=7)
    full = materialised(mode, inputs)
    top = full.topk(30, dim=1).indices
    exclude = [top[0, :25].tolist(), [], list(range(0, 600, 2))]
    warm = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.5
    eligible = warm.expand(B, N).clone()
    for b, row in enumerate(exclude):
        eligible[b, row] = False
    got = catalog_topk(k, exclude_items=exclude, item_mask=warm, backend=backend, **inputs)
    assert_is_topk(got, full, k, eligible, 1e-4)
    # per-request masks, exclusions as a -1 padded tensor, and fewer eligible items than k
    per_request = torch.zeros(B, N, dtype=torch.bool)
    per_request[0, :5] = True
    per_request[1] = True
    per_request[2, 100:400] = True
    padded = torch.tensor([[1, 2, -1], [-1, -1, -1], [150, 151, 399]])
    eligible = per_request.clone()
    eligible[0, [1, 2]] = False
    eligible[2, [150, 151, 399]] = False
    got = catalog_topk(k, exclude_items=padded, item_mask=per_request, backend=backend, **inputs)
    assert_is_topk(got, full, k, eligible, 1e-4)
    assert got.items[0].tolist()[3:] == [-1] * (k - 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_item_id(backend):
    codes = torch.tensor([[0], [1], [0], [1], [0]], dtype=torch.uint8)
    lp = torch.tensor([[[-1.0, -2.0]]])
    got = catalog_topk(4, code_logprobs=lp, item_codes=codes, backend=backend)
    assert got.items.tolist() == [[0, 2, 4, 1]]


def test_arguments_are_checked():
    inputs = make_inputs("embedding", torch.float32, 2, 10, seed=0)
    with pytest.raises(ValueError, match="k: 11 is larger than the catalog"):
        catalog_topk(11, **inputs)
    with pytest.raises(ValueError, match="either hidden and item_embeddings"):
        catalog_topk(1)
    with pytest.raises(ValueError, match="item_embeddings: expected shape"):
        catalog_topk(1, hidden=inputs["hidden"], item_embeddings=inputs["item_embeddings"][:2])
    with pytest.raises(ValueError, match=r"exclude_items: item ids must be in \[0, 10\)"):
        catalog_topk(1, exclude_items=[[10], []], **inputs)
    with pytest.raises(ValueError, match="exclude_items: expected 2 lists"):
        catalog_topk(1, exclude_items=[[1]], **inputs)
    with pytest.raises(ValueError, match="item_mask"):
        catalog_topk(1, item_mask=torch.ones(9, dtype=torch.bool), **inputs)
    codes = make_inputs("codes", torch.uint8, 2, 10, seed=0)
    with pytest.raises(ValueError, match="item_codes: codes must be in"):
        catalog_topk(1, code_logprobs=codes["code_logprobs"][:, :, :5], item_codes=codes["item_codes"])
    with pytest.raises(TypeError, match="item_codes"):
        catalog_topk(1, code_logprobs=codes["code_logprobs"], item_codes=codes["item_codes"].long())
    with pytest.raises(ValueError, match="slot_weights"):
        catalog_topk(1, slot_weights=torch.ones(3), **codes)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, dtype", [("embedding", torch.bfloat16), ("codes", torch.uint8)])
def test_triton_on_gpu_at_scale(mode, dtype):
    inputs = {k: v.cuda() for k, v in make_inputs(mode, dtype, 16, 1_000_003, seed=0, S=5, d=64, C=256).items()}
    ref = catalog_topk(100, backend="torch", **inputs)
    got = catalog_topk(100, backend="triton", **inputs)
    assert torch.allclose(got.scores, ref.scores, atol=1e-3)
