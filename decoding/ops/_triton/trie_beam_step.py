"""Triton backend of trie_beam_step.

Two launches per step:

1. ``_candidates_kernel`` (one program per beam): the log-sum-exp of the beam's logits row
   (online, one read of the row), then the beam's valid children read from the CSR, scored and
   written as packed int64 keys into a ``[B, W * C]`` buffer (0 = no candidate).
2. ``_select_kernel`` (one program per request): exact top-K of the request's keys by a bitwise
   radix select (keys are unique because the candidate index is packed into the low bits), a
   compaction of the K winners, a sort, and the decode into scores / parent / token / node. For
   wide beams, ``_segment_select_kernel`` first keeps each segment's top-K, segments in parallel,
   so the final select reads only their union.

Key layout: ``key = order32(score) << 31 | (2^31 - 1 - (w * C + j))``, where ``order32`` maps
float32 to an order-preserving unsigned 32-bit integer; so larger keys are larger scores and,
among equal scores, lower (beam, child) indices, the reference's stable order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from decoding.trie import ItemTrie

from decoding.ops._helpers import NORMALIZE_CODES
from decoding.ops._triton._lib import INTERPRET, _lower_bound, _lse_update


@triton.jit
def _allowed_children(row, node_token_ptr, item_lo_ptr, item_hi_ptr, excl_row, n_excl, e0, n_children, j,
                      HAS_EXCL: tl.constexpr, EXCL_STEPS: tl.constexpr):
    """For child positions ``j`` of a node whose edges start at ``e0``: whether each is allowed
    (exists and owns an item not excluded) and its logit (-inf where not allowed)."""
    ok = j < n_children
    child = e0 + j + 1
    tok = tl.load(node_token_ptr + child, mask=ok, other=0)
    if HAS_EXCL:
        lo = tl.load(item_lo_ptr + child, mask=ok, other=0).to(tl.int64)
        hi = tl.load(item_hi_ptr + child, mask=ok, other=0).to(tl.int64)
        n_out = _lower_bound(excl_row, n_excl, hi, EXCL_STEPS) - _lower_bound(excl_row, n_excl, lo, EXCL_STEPS)
        ok = ok & (n_out < hi - lo)
    x = tl.load(row + tok, mask=ok, other=float("-inf")).to(tl.float32)
    return ok, x


@triton.jit
def _candidates_kernel(
    logits_ptr, stride_lb, stride_lw,
    scores_ptr, nodes_ptr,
    indptr_ptr, node_token_ptr, item_lo_ptr, item_hi_ptr, num_nodes,
    excl_ptr, n_excl,
    bias_ptr, stride_bb, stride_bw,
    keys_ptr,
    W, V, C, logprob_weight,
    NORMALIZE: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_BIAS: tl.constexpr,
    EXCL_STEPS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // W
    w = pid % W
    node = tl.load(nodes_ptr + pid)
    score = tl.load(scores_ptr + pid)
    alive = (node >= 0) & (node < num_nodes) & (score > float("-inf"))
    safe = tl.where(alive, node, 0)
    e0 = tl.load(indptr_ptr + safe).to(tl.int64)
    n_children = tl.where(alive, tl.load(indptr_ptr + safe + 1).to(tl.int64) - e0, 0)
    row = logits_ptr + b.to(tl.int64) * stride_lb + w.to(tl.int64) * stride_lw
    excl_row = excl_ptr + b.to(tl.int64) * n_excl

    norm = 0.0
    if NORMALIZE == 0:  # full-vocabulary log-sum-exp, online over blocks
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m, s = _lse_update(m, s, x)
        norm = m + tl.log(tl.maximum(s, 1e-30))  # s == 0 only when m == -inf: norm stays -inf
    if NORMALIZE == 1:  # log-sum-exp over the allowed children only
        m = float("-inf")
        s = 0.0
        for c0 in range(0, C, BLOCK_C):
            j = c0 + tl.arange(0, BLOCK_C)
            _, x = _allowed_children(row, node_token_ptr, item_lo_ptr, item_hi_ptr, excl_row, n_excl, e0,
                                     n_children, j, HAS_EXCL, EXCL_STEPS)
            m, s = _lse_update(m, s, x)
        norm = m + tl.log(tl.maximum(s, 1e-30))  # s == 0 only when m == -inf: norm stays -inf

    base = score - logprob_weight * norm
    key_row = keys_ptr + b.to(tl.int64) * W * C + w.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        ok, x = _allowed_children(row, node_token_ptr, item_lo_ptr, item_hi_ptr, excl_row, n_excl, e0,
                                  n_children, j, HAS_EXCL, EXCL_STEPS)
        cand = base + logprob_weight * x
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b.to(tl.int64) * stride_bb + w.to(tl.int64) * stride_bw + j, mask=ok, other=0.0)
            cand = cand + bias.to(tl.float32)
        ok = ok & (cand > float("-inf"))  # -inf and NaN are never candidates
        # order-preserving map of float32 bits to [0, 2^32)
        half = tl.full([], 2147483648, tl.int64)  # 2^31, typed: a bare literal would be uint32
        bits = cand.to(tl.int32, bitcast=True).to(tl.int64)
        mag = bits & 0x7FFFFFFF
        key32 = tl.where(bits >= 0, half + mag, 0x7FFFFFFF - mag)
        flat = (w * C + j).to(tl.int64)
        key = (key32 << 31) | (0x7FFFFFFF - flat)
        tl.store(key_row + j, tl.where(ok, key, 0), mask=j < C)


@triton.jit
def _top_keys(key_row, n, K, out_row, BLOCK: tl.constexpr):
    """Write the (at most ``K``) largest non-zero keys of ``key_row[0:n]`` to ``out_row``, in
    index order; returns how many. Keys are unique, so the ``K`` largest are well defined."""
    # radix select: the largest threshold T with count(keys >= T) >= K is the K-th largest key
    thresh = tl.zeros([], dtype=tl.int64)
    for i in range(63):
        trial = thresh | (tl.full([], 1, tl.int64) << (62 - i))
        count = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            k = tl.load(key_row + offs, mask=offs < n, other=0)
            count += tl.sum((k >= trial).to(tl.int32), axis=0)
        thresh = tl.where(count >= K, trial, thresh)
    thresh = tl.maximum(thresh, 1)  # key 0 marks "no candidate"
    n_won = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        k = tl.load(key_row + offs, mask=offs < n, other=0)
        won = (k >= thresh).to(tl.int32)
        slot = n_won + tl.cumsum(won, axis=0) - 1
        tl.store(out_row + slot, k, mask=won > 0)
        n_won += tl.sum(won, axis=0)
    return n_won


@triton.jit
def _segment_select_kernel(keys_ptr, n_cand, seg_len, out_ptr, K, KP: tl.constexpr, BLOCK: tl.constexpr):
    """Wide beams: program (b, s) keeps the top ``K`` keys of segment ``s`` of request ``b``'s
    candidates in ``out[b, s * KP : (s + 1) * KP]`` (zero-padded). The request's top ``K`` are
    among the segments' (keys are unique), so the final select reads ``n_seg * KP`` keys instead
    of all ``W * C``, and the segments run in parallel."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    start = s.to(tl.int64) * seg_len
    n = tl.minimum(seg_len, n_cand - start)
    out_row = out_ptr + (b.to(tl.int64) * tl.num_programs(1) + s) * KP
    slots = tl.arange(0, KP)
    tl.store(out_row + slots, tl.zeros([KP], dtype=tl.int64))
    _top_keys(keys_ptr + b.to(tl.int64) * n_cand + start, n, K, out_row, BLOCK)


@triton.jit
def _select_kernel(
    keys_ptr, n_cand, scratch_ptr,
    nodes_ptr, indptr_ptr, node_token_ptr,
    out_scores_ptr, out_parent_ptr, out_token_ptr, out_node_ptr,
    W, C, K,
    KP: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    key_row = keys_ptr + b.to(tl.int64) * n_cand
    scratch_row = scratch_ptr + b.to(tl.int64) * KP
    n_won = _top_keys(key_row, n_cand, K, scratch_row, BLOCK)
    slots = tl.arange(0, KP)
    k = tl.load(scratch_row + slots, mask=slots < n_won, other=0)
    k = tl.sort(k, descending=True)
    ok = (slots < n_won) & (k > 0)
    flat = 0x7FFFFFFF - (k & 0x7FFFFFFF)
    key32 = k >> 31
    half = tl.full([], 2147483648, tl.int64)  # 2^31
    mag = tl.where(key32 >= half, key32 - half, 0x7FFFFFFF - key32)
    bits = tl.where(key32 >= half, mag, mag - half).to(tl.int32)
    score = bits.to(tl.float32, bitcast=True)
    w = flat // C
    j = flat % C
    node = tl.load(nodes_ptr + b.to(tl.int64) * W + w, mask=ok, other=0)
    child = tl.load(indptr_ptr + node, mask=ok, other=0).to(tl.int64) + j + 1
    token = tl.load(node_token_ptr + child, mask=ok, other=0).to(tl.int64)
    out = b.to(tl.int64) * K + slots
    keep = slots < K
    tl.store(out_scores_ptr + out, tl.where(ok, score, float("-inf")), mask=keep)
    tl.store(out_parent_ptr + out, tl.where(ok, w, -1), mask=keep)
    tl.store(out_token_ptr + out, tl.where(ok, token, -1), mask=keep)
    tl.store(out_node_ptr + out, tl.where(ok, child, -1), mask=keep)


def _pow2(n: int, cap: int | None = None) -> int:
    p = triton.next_power_of_2(max(int(n), 1))
    return min(p, cap) if cap else p


def trie_beam_step_triton(*, logits: torch.Tensor, beam_scores: torch.Tensor, beam_nodes: torch.Tensor, trie: ItemTrie,
                          num_out: int, normalize: str, excluded_ranks: torch.Tensor | None,
                          child_bias: torch.Tensor | None, max_children: int,
                          logprob_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, W, V = logits.shape
    device = logits.device
    C = max(int(max_children), 1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    scores_in = beam_scores.float().contiguous()
    nodes_in = beam_nodes.long().contiguous()
    n_cand = W * C
    if n_cand >= (1 << 31):
        raise ValueError(f"logits: {W} beams x {C} children exceed the kernel's 2^31 candidates")
    keys = torch.empty((B, n_cand), dtype=torch.int64, device=device)
    has_excl = excluded_ranks is not None
    excl = excluded_ranks.long().contiguous() if has_excl else keys  # dummy pointer when unused
    n_excl = excl.shape[1] if has_excl else 0
    has_bias = child_bias is not None
    bias = child_bias if has_bias else scores_in
    block_v = _pow2(V, 256 if INTERPRET else 4096)
    block_c = _pow2(C, 128 if INTERPRET else 1024)
    _candidates_kernel[(B * W,)](
        logits, logits.stride(0), logits.stride(1),
        scores_in, nodes_in,
        trie.indptr, trie.node_token, trie.item_lo, trie.item_hi, trie.num_nodes,
        excl, n_excl,
        bias, bias.stride(0) if has_bias else 0, bias.stride(1) if has_bias else 0,
        keys,
        W, V, C, float(logprob_weight),
        NORMALIZE=NORMALIZE_CODES[normalize], HAS_EXCL=has_excl, HAS_BIAS=has_bias,
        EXCL_STEPS=max(1, int(n_excl).bit_length()), BLOCK_V=block_v, BLOCK_C=block_c,
    )
    kp = _pow2(num_out)
    block = _pow2(n_cand, 256 if INTERPRET else 2048)
    # wide beams (W x C far above one request's top K): segment top-Ks in parallel, then one
    # select over their union; the same exact order, since keys are unique
    seg_len = max(4 * block, 8 * kp)
    if n_cand > 2 * seg_len:
        n_seg = triton.cdiv(n_cand, seg_len)
        partial = torch.empty((B, n_seg * kp), dtype=torch.int64, device=device)
        _segment_select_kernel[(B, n_seg)](keys, n_cand, seg_len, partial, num_out, KP=kp, BLOCK=block)
        keys, n_cand = partial, n_seg * kp
        block = _pow2(n_cand, 256 if INTERPRET else 2048)
    scratch = torch.empty((B, kp), dtype=torch.int64, device=device)
    out_scores = torch.empty((B, num_out), dtype=torch.float32, device=device)
    out_parent = torch.empty((B, num_out), dtype=torch.long, device=device)
    out_token = torch.empty((B, num_out), dtype=torch.long, device=device)
    out_node = torch.empty((B, num_out), dtype=torch.long, device=device)
    _select_kernel[(B,)](
        keys, n_cand, scratch,
        nodes_in, trie.indptr, trie.node_token,
        out_scores, out_parent, out_token, out_node,
        W, C, num_out,
        KP=kp, BLOCK=block,
    )
    return out_scores, out_parent, out_token, out_node
