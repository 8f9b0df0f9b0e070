"""tree_attention: the SDPA reference against a direct softmax formula, every backend against
the reference (random shapes, GQA, dtypes, padding, empty parts), and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from decoding.ops import available_backends, tree_attention

BACKENDS = available_backends("cpu")
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def random_case(B, H, Hkv, M, P, R, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, P + R, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, P + R, D, generator=g).to(dtype)
    pad = torch.randint(0, max(P, 1), (B,), generator=g) if P else torch.zeros(B, dtype=torch.long)
    prefix_valid = torch.arange(P)[None, :] >= pad[:, None]  # left padding
    tree_visible = torch.rand(B, M, R, generator=g) < 0.3
    for m in range(min(M, R)):  # rows see themselves (the last M tree rows are the queries)
        tree_visible[:, m, R - M + m] = True
    return q, k, v, prefix_valid, tree_visible


def direct(q, k, v, P, prefix_valid, tree_visible, scale):
    """softmax(q k^T * scale) v over the visible positions, in float64, no SDPA."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    M = q.shape[2]
    visible = torch.cat([prefix_valid[:, None, :].expand(-1, M, -1), tree_visible], 2)[:, None]
    s = torch.einsum("bhmd,bhsd->bhms", q.double(), k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhms,bhsd->bhmd", w, v), lse


SHAPES = [  # B, H, Hkv, M, P, R, D
    (2, 4, 4, 5, 9, 12, 16),
    (3, 4, 2, 20, 40, 45, 8),
    (1, 2, 1, 1, 7, 1, 24),
    (2, 2, 2, 6, 0, 10, 16),   # no prompt part
    (2, 4, 1, 3, 33, 0, 16),   # no tree part (rows see only the prompt)
    (1, 2, 2, 40, 5, 70, 32),  # more rows than a block
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_direct_formula(shape):
    B, H, Hkv, M, P, R, D = shape
    q, k, v, pv, tv = random_case(*shape, torch.float32, seed=sum(shape))
    out, lse = tree_attention(q, k, v, prefix_len=P, prefix_valid=pv, tree_visible=tv, backend="torch")
    want, want_lse = direct(q, k, v, P, pv, tv, 1 / math.sqrt(D))
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_equal_reference(backend, dtype, shape):
    B, H, Hkv, M, P, R, D = shape
    q, k, v, pv, tv = random_case(*shape, dtype, seed=sum(shape) + 1)
    kwargs = dict(prefix_len=P, prefix_valid=pv, tree_visible=tv, scale=0.3)
    ref = tree_attention(q, k, v, backend="torch", **kwargs)
    got = tree_attention(q, k, v, backend=backend, **kwargs)
    assert got.out.dtype == dtype and got.lse.dtype == torch.float32
    assert torch.allclose(got.out.float(), ref.out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse))
    finite = torch.isfinite(ref.lse)
    assert torch.allclose(got.lse[finite], ref.lse[finite], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_that_sees_nothing_gets_zero_and_minus_inf(backend):
    q, k, v, pv, tv = random_case(2, 2, 2, 3, 4, 5, 16, torch.float32, seed=3)
    pv[0] = False
    tv[0, 1] = False  # request 0, row 1: no valid prompt position, no visible tree row
    out, lse = tree_attention(q, k, v, prefix_len=4, prefix_valid=pv, tree_visible=tv, backend=backend)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 16)) and bool(torch.isneginf(lse[0, :, 1]).all())
    assert bool(torch.isfinite(lse[1]).all())


def test_arguments_are_checked():
    q, k, v, pv, tv = random_case(1, 4, 2, 3, 4, 5, 16, torch.float32, seed=0)
    ok = dict(prefix_len=4, prefix_valid=pv, tree_visible=tv)
    with pytest.raises(ValueError, match="key: 3 key/value heads"):
        tree_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], **ok)
    with pytest.raises(ValueError, match="prefix_len"):
        tree_attention(q, k, v, prefix_len=10, prefix_valid=pv, tree_visible=tv)
    with pytest.raises(ValueError, match="tree_visible"):
        tree_attention(q, k, v, prefix_len=4, prefix_valid=pv, tree_visible=tv[:, :, :4])
    with pytest.raises(TypeError, match="prefix_valid"):
        tree_attention(q, k, v, prefix_len=4, prefix_valid=pv.long(), tree_visible=tv)
    with pytest.raises(TypeError, match="key"):
        tree_attention(q, k.half(), v, **ok)
    with pytest.raises(ValueError, match="scale"):
        tree_attention(q, k, v, scale=float("nan"), **ok)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference_at_serving_shapes(dtype):
    """A 1,024-token prompt, 20 beams x 3 drafted levels of 40, GQA 32/8 heads, head dim 128."""
    shape = (8, 32, 8, 140, 1024, 160, 128)
    q, k, v, pv, tv = (t.cuda() for t in random_case(*shape, dtype, seed=0))
    kwargs = dict(prefix_len=1024, prefix_valid=pv, tree_visible=tv)
    ref = tree_attention(q, k, v, backend="torch", **kwargs)
    got = tree_attention(q, k, v, backend="triton", **kwargs)
    assert torch.allclose(got.out.float(), ref.out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(got.lse, ref.lse, atol=TOL[dtype] * 10)


@pytest.mark.gpu
def test_verify_ops_triton_on_gpu_match_reference():
    from decoding.ops import match_keys, verify_relaxed

    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5000, (16, 40), generator=g).cuda()
    queries = torch.randint(0, 5000, (16, 5120), generator=g).cuda()
    assert torch.equal(match_keys(queries, keys, backend="triton"), match_keys(queries, keys, backend="torch"))
    p = torch.softmax(torch.randn(16, 5120, generator=g), -1).cuda()
    q = torch.softmax(torch.randn(16, 5120, generator=g), -1).cuda()
    dc = torch.stack([torch.randperm(5120, generator=g)[:40] for _ in range(16)]).cuda()
    args = (p, q, q.gather(1, dc), dc, 20)
    ref = verify_relaxed(*args, seed=3, backend="torch")
    got = verify_relaxed(*args, seed=3, backend="triton")
    assert torch.equal(ref.kept, got.kept) and torch.equal(ref.num_accepted, got.num_accepted)
