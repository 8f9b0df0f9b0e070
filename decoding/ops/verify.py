"""Speculative verification ops (N-to-K, AtSpeed): per drafted level, decide whether the target
accepts the draft's level and which candidates become the target's beams.

The target's per-level top-K (strict) or full candidate list (relaxed) comes from
:func:`decoding.ops.trie_beam_step`; these ops do the rest:

* :func:`match_keys` / :func:`verify_strict`: membership of the target's K candidates in the N
  drafted ones (a candidate is the key ``parent_row * V + token``, so a match needs the same
  parent and the same token); a level is accepted iff every target candidate was drafted.
* :func:`verify_relaxed`: sequence-level speculative sampling: drafted sequence ``y`` is
  accepted with probability ``min(1, p(y) / q(y))``; if fewer than K are accepted, the missing
  beams are drawn without replacement from the residual ``max(0, p - q)``. The random numbers
  come from a counter-based generator (Philox-4x32-10, the one ``triton.language.randint``
  uses) keyed by ``seed``, so every backend draws the same numbers and a seed reproduces a run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding._validate import check_positive_int, check_seed, check_shape, check_tensor
from decoding.ops._backend import resolve_backend, triton_launcher


class RelaxedVerifyOutput(NamedTuple):
    """kept ``[B, K]`` int64: indices into the target's ``M`` candidates, the accepted drafts
    first (in draft order), then the residual draws (in draw order); -1 where fewer than K
    candidates have probability > 0. num_accepted ``[B]`` int64: drafts accepted (may exceed K).
    level_accepted ``[B]`` bool: ``num_accepted >= K`` (the level is accepted, the round goes on)."""

    kept: torch.Tensor
    num_accepted: torch.Tensor
    level_accepted: torch.Tensor


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1) for int64 counters ``offsets`` (any shape) under ``seed``:
    the first word of Philox-4x32-10 on counter ``(lo32, hi32, 0, 0)`` and key ``(seed lo32,
    seed hi32)``, mapped to ``(2 * (x >> 9) + 1) / 2**24`` (exact in float32). The same numbers
    as every backend of :func:`verify_relaxed` draws."""
    check_seed("seed", seed)
    check_tensor("offsets", offsets, dtypes=(torch.int64,))
    from decoding.ops._torch.verify import philox_uniform as reference

    return reference(seed, offsets)


def match_keys(queries: torch.Tensor, keys: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """For each query, the first position of an equal key in its row.

    Args:
        queries: ``[B, Q]`` int64; negative entries match nothing.
        keys: ``[B, N]`` int64; negative entries are never matched.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``.
    Returns:
        ``[B, Q]`` int64 index into ``keys`` (the lowest one on duplicates), -1 where absent.

    Memory traffic: reads ``8·B·(Q + N)`` bytes, writes ``8·B·Q``.
    """
    check_tensor("queries", queries, ndim=2, dtypes=(torch.int64,))
    check_tensor("keys", keys, ndim=2, dtypes=(torch.int64,), device=queries.device)
    if keys.shape[0] != queries.shape[0]:
        raise ValueError(f"keys: expected {queries.shape[0]} rows (as queries), got {keys.shape[0]}")
    name = resolve_backend(backend, queries.device)
    return run_match_keys(queries, keys, name)


def run_match_keys(queries, keys, backend):
    """Dispatch without validation (decoders validate once)."""
    if queries.shape[1] == 0 or keys.shape[1] == 0:
        return torch.full(queries.shape, -1, dtype=torch.long, device=queries.device)
    return torch.ops.decoding.match_keys(queries, keys, backend)


@torch.library.custom_op("decoding::match_keys", mutates_args=())
def _match_keys_op(queries: torch.Tensor, keys: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "torch":
        from decoding.ops._torch.verify import match_keys_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.verify import match_keys_cpu as impl
    else:
        from decoding.ops._triton.verify import match_keys_triton

        impl = triton_launcher(match_keys_triton)
    return impl(queries=queries.contiguous(), keys=keys.contiguous()).contiguous()


@_match_keys_op.register_fake
def _(queries, keys, backend):
    return queries.new_empty(queries.shape, dtype=torch.long)


def verify_strict(target_keys: torch.Tensor, draft_keys: torch.Tensor, *, backend: str = "auto"):
    """Strict N-to-K verification of one level.

    Args:
        target_keys: ``[B, K]`` int64 keys of the target's top-K candidates, -1 for empty slots
            (a catalog with fewer than K continuations).
        draft_keys: ``[B, N]`` int64 keys of the drafted candidates, -1 for empty slots.
    Returns:
        ``(match [B, K] int64, accepted [B] bool)``: each target candidate's position among the
        drafts (-1 if not drafted), and whether every non-empty target candidate was drafted.
    """
    match = match_keys(target_keys, draft_keys, backend=backend)
    return match, ((match >= 0) | (target_keys < 0)).all(dim=1)


def verify_relaxed(
    p_cand: torch.Tensor,
    q_cand: torch.Tensor,
    q_draft: torch.Tensor,
    draft_cand: torch.Tensor,
    num_keep: int,
    *,
    seed: int,
    offset: int = 0,
    backend: str = "auto",
) -> RelaxedVerifyOutput:
    """Relaxed (sampling) verification of one level.

    Args:
        p_cand: ``[B, M]`` float32: the target's probability of each of its ``M`` candidate
            sequences at this level (softmax of cumulative scores; 0 for empty slots).
        q_cand: ``[B, M]`` float32: the draft's probability of the same sequences (0 where the
            draft did not consider them, and all 0 at a level nothing was drafted for).
        q_draft: ``[B, N]`` float32: the draft's probability of each drafted sequence.
        draft_cand: ``[B, N]`` int64: each drafted sequence's index among the target's
            candidates, -1 if it is not one (or the slot is empty): then it is rejected. Drafted
            sequences must be distinct.
        num_keep: ``K``, the beams to keep.
        seed, offset: the random stream; request ``b`` uses counters
            ``offset + b * (N + M) + [0, N + M)``: ``N`` acceptance draws, then ``M`` for the
            residual draws.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``.
    Returns:
        :class:`RelaxedVerifyOutput`. Drafted ``y`` (in order) is accepted iff ``p(y) > 0`` and
        ``u * q(y) <= p(y)``. With at least K accepted the first K are kept; otherwise all
        accepted are kept and ``K - accepted`` more are drawn without replacement (Gumbel top-k)
        from ``max(0, p - q)`` over the candidates not accepted; when that residual has fewer
        than ``K - accepted`` positive entries (or none), the rest are drawn from ``p`` over the
        candidates left. So K beams come back whenever K candidates have ``p > 0``.

    Memory traffic: reads ``4·B·(2M + N) + 8·B·N`` bytes, writes ``8·B·(K + 1)`` (plus a
    ``B·M``-byte mark buffer on the compiled backends).
    """
    check_tensor("p_cand", p_cand, ndim=2, dtypes=(torch.float32,))
    B, M = p_cand.shape
    device = p_cand.device
    check_tensor("q_cand", q_cand, ndim=2, dtypes=(torch.float32,), device=device)
    check_shape("q_cand", q_cand, (B, M))
    check_tensor("q_draft", q_draft, ndim=2, dtypes=(torch.float32,), device=device)
    N = q_draft.shape[1]
    check_shape("q_draft", q_draft, (B, N))
    check_tensor("draft_cand", draft_cand, ndim=2, dtypes=(torch.int64,), device=device)
    check_shape("draft_cand", draft_cand, (B, N))
    check_positive_int("num_keep", num_keep)
    check_seed("seed", seed)
    check_seed("offset", offset)
    if draft_cand.numel() and bool(((draft_cand < -1) | (draft_cand >= M)).any()):
        raise ValueError(f"draft_cand: indices must be in [-1, {M})")
    for name, t in (("p_cand", p_cand), ("q_cand", q_cand), ("q_draft", q_draft)):
        if t.numel() and bool(((t < 0) | ~torch.isfinite(t)).any()):
            raise ValueError(f"{name}: probabilities must be finite and >= 0")
    name = resolve_backend(backend, device)
    return run_verify_relaxed(p_cand, q_cand, q_draft, draft_cand, num_keep, seed, offset, name)


def run_verify_relaxed(p_cand, q_cand, q_draft, draft_cand, num_keep, seed, offset, backend):
    """Dispatch without validation (decoders validate once)."""
    kept, num_accepted = torch.ops.decoding.verify_relaxed(p_cand, q_cand, q_draft, draft_cand, num_keep, seed, offset,
                                                           backend)
    return RelaxedVerifyOutput(kept, num_accepted, num_accepted >= num_keep)


@torch.library.custom_op("decoding::verify_relaxed", mutates_args=())
def _verify_relaxed_op(p_cand: torch.Tensor, q_cand: torch.Tensor, q_draft: torch.Tensor, draft_cand: torch.Tensor,
                       num_keep: int, seed: int, offset: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "torch":
        from decoding.ops._torch.verify import verify_relaxed_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.verify import verify_relaxed_cpu as impl
    else:
        from decoding.ops._triton.verify import verify_relaxed_triton

        impl = triton_launcher(verify_relaxed_triton)
    kept, num_accepted = impl(p_cand=p_cand.contiguous(), q_cand=q_cand.contiguous(), q_draft=q_draft.contiguous(),
                              draft_cand=draft_cand.contiguous(), num_keep=num_keep, seed=seed, offset=offset)
    return kept.contiguous(), num_accepted.contiguous()


@_verify_relaxed_op.register_fake
def _(p_cand, q_cand, q_draft, draft_cand, num_keep, seed, offset, backend):
    B = p_cand.shape[0]
    return p_cand.new_empty((B, num_keep), dtype=torch.long), p_cand.new_empty((B,), dtype=torch.long)
