"""trie_beam_step: one fused beam-search step constrained to a catalog trie.

For ``B`` requests x ``W`` beams, each beam at a trie node with a cumulative score, and the
model's logits for those beams, compute in one pass the step log-probabilities, read only the
valid children of each node from the CSR, add the beam score (plus an optional per-child bias),
and select the best ``num_out`` of the ``W x children`` candidates of each request.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding._validate import FLOAT_DTYPES, INT_DTYPES, check_choice, check_positive_int, check_shape, check_tensor
from decoding.ops._backend import resolve_backend, triton_launcher
from decoding.ops._helpers import NORMALIZE_MODES, TrieArrays


class BeamStepOutput(NamedTuple):
    """Per request, the selected candidates in descending score order, each ``[B, num_out]``.

    Slots past the number of valid candidates hold score -inf and parent/token/node -1.
    """

    scores: torch.Tensor  # float32: beam score + step log-prob (+ bias)
    parent: torch.Tensor  # int64: index of the beam (0..W-1) the candidate extends
    token: torch.Tensor  # int64: token appended
    node: torch.Tensor  # int64: trie node reached


def max_children_of(trie, beam_nodes: torch.Tensor) -> int:
    """Most children of any of the given nodes (a device sync; decoders pass the per-level bound)."""
    node = beam_nodes.clamp(min=0).long()
    counts = (trie.indptr[node + 1] - trie.indptr[node]) * (beam_nodes >= 0)
    return int(counts.max()) if counts.numel() else 0


def run_trie_beam_step(logits, beam_scores, beam_nodes, trie, num_out, *, normalize, excluded_ranks,
                       child_bias, max_children, backend, logprob_weight=1.0) -> BeamStepOutput:
    """Dispatch without validation: for decoders that validated their inputs once."""
    B = logits.shape[0]
    if max_children <= 0 or logits.shape[1] == 0:  # every beam is at a leaf: nothing to extend
        dev = logits.device
        return BeamStepOutput(
            torch.full((B, num_out), float("-inf"), device=dev),
            *(torch.full((B, num_out), -1, dtype=torch.long, device=dev) for _ in range(3)),
        )
    return BeamStepOutput(*torch.ops.decoding.trie_beam_step(
        logits, beam_scores, beam_nodes, trie.indptr, trie.node_token, trie.item_lo, trie.item_hi, excluded_ranks,
        child_bias, num_out, normalize, max_children, float(logprob_weight), backend))


@torch.library.custom_op("decoding::trie_beam_step", mutates_args=())
def _trie_beam_step_op(logits: torch.Tensor, beam_scores: torch.Tensor, beam_nodes: torch.Tensor,
                       indptr: torch.Tensor, node_token: torch.Tensor, item_lo: torch.Tensor, item_hi: torch.Tensor,
                       excluded_ranks: torch.Tensor | None, child_bias: torch.Tensor | None, num_out: int,
                       normalize: str, max_children: int, logprob_weight: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op as PyTorch sees it (``torch.ops.decoding.trie_beam_step``): tensors and scalars only."""
    if backend == "torch":
        from decoding.ops._torch.trie_beam_step import trie_beam_step_torch as impl
    elif backend == "cpu":
        from decoding.ops._cpu.trie_beam_step import trie_beam_step_cpu as impl
    else:
        from decoding.ops._triton.trie_beam_step import trie_beam_step_triton

        impl = triton_launcher(trie_beam_step_triton)
    out = impl(logits=logits, beam_scores=beam_scores, beam_nodes=beam_nodes,
               trie=TrieArrays(indptr, node_token, item_lo, item_hi), num_out=num_out, normalize=normalize,
               excluded_ranks=excluded_ranks, child_bias=child_bias, max_children=max_children,
               logprob_weight=logprob_weight)
    return tuple(t.contiguous() for t in out)


@_trie_beam_step_op.register_fake
def _(logits, beam_scores, beam_nodes, indptr, node_token, item_lo, item_hi, excluded_ranks, child_bias, num_out,
      normalize, max_children, logprob_weight, backend):
    shape = (logits.shape[0], num_out)
    return (logits.new_empty(shape, dtype=torch.float32),
            *(logits.new_empty(shape, dtype=torch.long) for _ in range(3)))


def trie_beam_step(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    beam_nodes: torch.Tensor,
    trie,
    num_out: int,
    *,
    normalize: str = "full",
    excluded_ranks: torch.Tensor | None = None,
    child_bias: torch.Tensor | None = None,
    max_children: int | None = None,
    logprob_weight: float = 1.0,
    backend: str = "auto",
) -> BeamStepOutput:
    """One trie-constrained beam step.

    Args:
        logits: ``[B, W, V]`` float32/float16/bfloat16/float64; ``V == trie.vocab_size``.
        beam_scores: ``[B, W]`` float32, cumulative scores; -inf marks a dead beam.
        beam_nodes: ``[B, W]`` int64/int32, trie node of each beam; -1 marks a dead beam.
        trie: :class:`decoding.ItemTrie` on the same device.
        num_out: candidates kept per request (``W'``).
        normalize: ``"full"`` log-softmax over the whole vocabulary (as Hugging Face does
            before masking), ``"valid"`` over the node's allowed children only, ``"none"``:
            logits are already log-probabilities.
        excluded_ranks: ``[B, X]`` int64 sorted item ranks each request must never reach,
            padded with ``trie.num_items``; build it with ``trie.excluded_ranks(item_ids, B)``.
            A child is allowed iff its item range holds a rank not excluded.
        child_bias: ``[B, W, C]`` float32 added to the score of the ``j``-th child of each beam's
            node (``C`` >= most children of the given nodes), e.g. the D3 assistant term.
        max_children: optional upper bound on the children of the given nodes (saves a sync).
        logprob_weight: the step log-probability is scaled by this before the bias is added
            (D3 uses ``1 - w``); candidate score = beam score + weight * log-prob + bias.
        backend: ``"auto"``, ``"torch"`` (reference), ``"cpu"`` (C++), ``"triton"``.

    Returns:
        :class:`BeamStepOutput` of ``[B, num_out]`` tensors, best first; ties keep the order
        (beam, child).

    Memory traffic (what a bandwidth-bound kernel must move): reads the logits, ``B·W·V``
    elements with ``normalize="full"`` (one pass for the log-sum-exp) or only the ``B·W·C``
    children's otherwise, the beams' scores and nodes (``12·B·W`` bytes), the CSR entries of the
    children (``node_token``, ``item_lo``, ``item_hi``: ``12·B·W·C`` bytes) and the bias if given;
    writes ``28·B·num_out`` bytes. No ``[B, W, V]`` mask is ever materialised.
    """
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    B, W, V = logits.shape
    device = logits.device
    check_tensor("beam_scores", beam_scores, ndim=2, dtypes=(torch.float32,), device=device)
    check_shape("beam_scores", beam_scores, (B, W))
    check_tensor("beam_nodes", beam_nodes, ndim=2, dtypes=INT_DTYPES, device=device)
    check_shape("beam_nodes", beam_nodes, (B, W))
    if trie.device != device:
        raise ValueError(f"trie: is on {trie.device} but logits are on {device}; use trie.to(device)")
    if V != trie.vocab_size:
        raise ValueError(f"logits: vocabulary size {V} does not match the trie's vocab_size {trie.vocab_size}")
    check_positive_int("num_out", num_out)
    check_choice("normalize", normalize, set(NORMALIZE_MODES))
    if isinstance(logprob_weight, bool) or not isinstance(logprob_weight, (int, float)):
        raise TypeError(f"logprob_weight: expected a float, got {type(logprob_weight).__name__}")
    if beam_nodes.numel() and bool(((beam_nodes < -1) | (beam_nodes >= trie.num_nodes)).any()):
        raise ValueError(f"beam_nodes: node ids must be in [-1, {trie.num_nodes})")
    if excluded_ranks is not None:
        check_tensor("excluded_ranks", excluded_ranks, ndim=2, dtypes=(torch.int64,), device=device)
        if excluded_ranks.shape[0] != B:
            raise ValueError(f"excluded_ranks: expected {B} rows, got {excluded_ranks.shape[0]}")
        if excluded_ranks.shape[1] and bool((excluded_ranks.diff(dim=1) < 0).any()):
            raise ValueError("excluded_ranks: each row must be sorted ascending (use trie.excluded_ranks)")
        if excluded_ranks.shape[1] == 0:
            excluded_ranks = None
    needed = max_children_of(trie, beam_nodes)
    if max_children is None:
        max_children = needed
    elif max_children < needed:
        raise ValueError(f"max_children: {max_children} is below the {needed} children of a given node")
    if child_bias is not None:
        check_tensor("child_bias", child_bias, ndim=3, dtypes=(torch.float32,), device=device)
        if tuple(child_bias.shape[:2]) != (B, W) or child_bias.shape[2] < max_children:
            raise ValueError(
                f"child_bias: expected shape [{B}, {W}, C] with C >= {max_children}, got {tuple(child_bias.shape)}"
            )
    name = resolve_backend(backend, device)
    return run_trie_beam_step(logits, beam_scores, beam_nodes, trie, num_out, normalize=normalize,
                              excluded_ranks=excluded_ranks, child_bias=child_bias,
                              max_children=max_children, backend=name,
                              logprob_weight=float(logprob_weight))
