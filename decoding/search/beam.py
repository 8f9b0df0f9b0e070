"""Trie-constrained beam search over a catalog of item identifiers.

The search reproduces transformers' beam search (``generate(num_beams=K, do_sample=False)``
with a ``prefix_allowed_tokens_fn`` that walks the trie): every step keeps the best ``2K``
candidates when identifiers can end early (EOS-terminated) and ``K`` otherwise; a candidate
that ends an identifier becomes a finished hypothesis only if it ranks in the top ``K``; the
next running beams are the best ``K`` unfinished candidates; finished hypotheses are scored
``sum log p / length ** length_penalty``; a request stops taking hypotheses as transformers'
``early_stopping`` says: ``False`` (its default) once no running beam, scored at its current
length, can beat the worst of ``K`` finished ones; ``True`` as soon as ``K`` are finished;
``"never"`` as ``False``, but with a positive length penalty a running beam is scored at the
longest identifier's length (the canonical bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from decoding._validate import FLOAT_DTYPES, INT_DTYPES, check_choice, check_positive_int, check_tensor
from decoding.ops import resolve_backend
from decoding.ops._helpers import NEG_INF, NORMALIZE_MODES, gather_children
from decoding.ops.trie_beam_step import run_trie_beam_step
from decoding.search.model import HFBeamModel, as_beam_model, model_vocab_size
from decoding.search.tree import TreeBeamModel
from decoding.trie import ItemTrie


@dataclass
class BeamSearchOutput:
    """Top-``K`` items per request, best first.

    items: int64 ``[B, K]`` item ids (row indices of the catalog), -1 where fewer than ``K``
        valid items exist.
    scores: float32 ``[B, K]`` descending; ``sum log p / length ** length_penalty`` (plus the
        assistant term with D3); -inf in padded slots.
    sequences: int64 ``[B, K, L]`` identifier tokens, ``L = trie.depth``; -1 after an
        identifier's end and in padded slots.
    kv_bytes: with the shared-prefix KV cache, the bytes it held at the end of the search,
        ``{"prompt": ..., "generated": ...}`` (buffers' capacity); None otherwise.
    token_scores: float32 ``[B, K, L]``, each identifier token's own term of the score (its
        log-prob under ``normalize``, plus the assistant term with D3): their sum over
        ``length ** length_penalty`` is ``scores``; 0 after an identifier's end and in padded
        slots. What a served answer reports as per-token log-probs. None where the decoder does
        not track them.
    """

    items: torch.Tensor
    scores: torch.Tensor
    sequences: torch.Tensor
    kv_bytes: dict | None = None
    token_scores: torch.Tensor | None = None


def item_mass_prefix(trie, assistant_logprobs: torch.Tensor) -> torch.Tensor:
    """D3 assistant mass as prefix sums over sorted item ranks.

    Args:
        assistant_logprobs: ``[B, trie.num_ids]`` float item log-probs of a text-free model.
    Returns:
        float64 ``[B, trie.num_items + 1]``: ``P[:, r]`` = mass of the ``r`` first sorted items,
        so a node's mass is ``P[:, item_hi] - P[:, item_lo]``. Each row is scaled by its max
        probability (ratios are unchanged; no underflow).
    """
    lp = assistant_logprobs.double()
    lp = lp - lp.max(dim=1, keepdim=True).values
    mass = lp.exp().index_select(1, trie.sorted_items.to(lp.device))
    return torch.nn.functional.pad(mass.cumsum(dim=1), (1, 0))


def assistant_bias(trie, prefix: torch.Tensor, beam_nodes: torch.Tensor, max_children: int, weight: float):
    """D3 term per child: ``weight * log(m(child) / m(node))``, ``[B, W, C]`` float32."""
    alive = beam_nodes >= 0
    child, _, in_node = gather_children(trie, beam_nodes, alive, max_children)
    B = beam_nodes.shape[0]
    flat = child.reshape(B, -1)
    m_child = prefix.gather(1, trie.item_hi[flat].long()) - prefix.gather(1, trie.item_lo[flat].long())
    node = beam_nodes.clamp(min=0).long()
    m_node = prefix.gather(1, trie.item_hi[node].long()) - prefix.gather(1, trie.item_lo[node].long())
    ratio = m_child.reshape(child.shape) / m_node[..., None]
    bias = (weight * torch.log(ratio)).float()
    return bias.masked_fill(~in_node, 0.0)


def validate_prompts(input_ids, attention_mask) -> None:
    """Checks shared by the decoders: a non-empty int ``[B, T]`` batch and a 0/1 mask of its
    shape with at least one prompt token per request."""
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INT_DTYPES)
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [B, T] batch, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask: expected 0/1 values")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("attention_mask: a request has no unmasked prompt token")


def validate_search(input_ids, attention_mask, trie, num_beams) -> None:
    """Checks shared by the trie decoders: the prompts, the catalog, the beam count, and prompt
    tokens inside the catalog's vocabulary."""
    validate_prompts(input_ids, attention_mask)
    if not isinstance(trie, ItemTrie):
        raise TypeError(f"trie: expected a decoding.ItemTrie, got {type(trie).__name__}")
    check_positive_int("num_beams", num_beams)
    if num_beams > trie.num_items:
        raise ValueError(f"num_beams: {num_beams} is larger than the catalog ({trie.num_items} items)")
    if bool((input_ids < 0).any()) or bool((input_ids >= trie.vocab_size).any()):
        raise ValueError(f"input_ids: token ids must be in [0, {trie.vocab_size}) (the trie's vocabulary)")


def _validate(input_ids, attention_mask, trie, num_beams, length_penalty, normalize, assistant_logprobs,
              assistant_weight):
    validate_search(input_ids, attention_mask, trie, num_beams)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty: expected a float, got {type(length_penalty).__name__}")
    check_choice("normalize", normalize, set(NORMALIZE_MODES))
    if not 0.0 <= float(assistant_weight) <= 1.0:
        raise ValueError(f"assistant_weight: expected a value in [0, 1], got {assistant_weight}")
    if assistant_logprobs is not None:
        check_tensor("assistant_logprobs", assistant_logprobs, ndim=2, dtypes=FLOAT_DTYPES)
        expected = (input_ids.shape[0], trie.num_ids)
        if tuple(assistant_logprobs.shape) != expected:
            raise ValueError(f"assistant_logprobs: expected shape {expected}, got {tuple(assistant_logprobs.shape)}")
    elif assistant_weight:
        raise ValueError("assistant_weight: is non-zero but assistant_logprobs was not given")


class SearchState(NamedTuple):
    """The search between steps: running beams ``[B, W]`` (tokens ``[B, W, t]``, parent: the row
    each extends), the best ``K`` finished hypotheses (tokens ``[B, K, L]``), and which requests
    can still improve (transformers' early-stop heuristic)."""

    run_scores: torch.Tensor
    run_nodes: torch.Tensor
    run_tokens: torch.Tensor
    run_parent: torch.Tensor
    fin_scores: torch.Tensor
    fin_items: torch.Tensor
    fin_tokens: torch.Tensor
    improvable: torch.Tensor
    run_path: torch.Tensor | None = None
    fin_path: torch.Tensor | None = None


def check_early_stopping(early_stopping) -> None:
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping: expected False, True or 'never' (transformers' values), "
                         f"got {early_stopping!r}")


def search_step(state: SearchState, logits: torch.Tensor, trie, t: int, *, num_beams: int, keep: int,
                length_penalty: float, normalize: str, excluded_ranks, child_bias, max_children: int, backend: str,
                logprob_weight: float, early_stopping: bool | str = False) -> SearchState:
    """One step of the search: the beam-step op over ``logits [B, W, V]`` of the running beams at
    level ``t``, then the bookkeeping: finished hypotheses merged (only candidates ranked in the
    top ``K`` count, transformers' rule), the best ``K`` unfinished candidates kept running.
    Tensor work only, no device-to-host synchronisation: ``torch.compile(fullgraph=True)``
    captures it (tested)."""
    K, L, lp = num_beams, trie.depth, length_penalty
    out = run_trie_beam_step(logits, state.run_scores, state.run_nodes, trie, keep, normalize=normalize,
                             excluded_ranks=excluded_ranks, child_bias=child_bias, max_children=max_children,
                             backend=backend, logprob_weight=logprob_weight)
    valid = out.node >= 0
    ends = trie.is_leaf(out.node) & valid
    parent = out.parent.clamp(min=0)
    tokens = torch.cat([state.run_tokens.gather(1, parent[..., None].expand(-1, -1, t)), out.token[..., None]], dim=2)

    rank = torch.arange(keep, device=logits.device)
    new_fin = ends & (rank < K) & state.improvable[:, None]
    cand_scores = torch.where(new_fin, out.scores / float(t + 1) ** lp, NEG_INF)
    merged_scores = torch.cat([state.fin_scores, cand_scores], dim=1)
    order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :K]
    fin_scores = merged_scores.gather(1, order)
    fin_items = torch.cat([state.fin_items, trie.leaf_items(out.node)], dim=1).gather(1, order)
    padded = torch.nn.functional.pad(tokens, (0, L - t - 1), value=-1)
    fin_tokens = torch.cat([state.fin_tokens, padded], dim=1).gather(1, order[..., None].expand(-1, -1, L))
    run_path = fin_path = None
    if state.run_path is not None:  # cumulative scores along each path, gathered like its tokens
        path = torch.cat([state.run_path.gather(1, parent[..., None].expand(-1, -1, t)), out.scores[..., None]], dim=2)
        padded_path = torch.nn.functional.pad(path, (0, L - t - 1), value=0.0)
        fin_path = torch.cat([state.fin_path, padded_path], dim=1).gather(1, order[..., None].expand(-1, -1, L))

    open_scores = torch.where(valid & ~ends, out.scores, NEG_INF)
    order = torch.sort(open_scores, dim=1, descending=True, stable=True).indices[:, :K]
    run_scores = open_scores.gather(1, order)
    alive = run_scores > NEG_INF
    run_nodes = torch.where(alive, out.node.gather(1, order), -1)

    # transformers' early-stop heuristic: stop adding hypotheses to a request once its best running
    # beam cannot beat its worst of K finished ones, the running beam scored at its current length
    # (early_stopping=False, True) or, for "never" with a positive length penalty, at the longest
    # identifier's (no identifier is longer than the trie's depth); early_stopping=True also stops
    # a request as soon as it holds K finished hypotheses
    best_length = L if early_stopping == "never" and lp > 0.0 else t + 1
    best_running = run_scores[:, 0] / float(best_length) ** lp
    full = fin_scores[:, K - 1] > NEG_INF
    improvable = state.improvable & (~full | (best_running > fin_scores[:, K - 1])) & alive.any(dim=1)
    if early_stopping is True:
        improvable = improvable & ~full
    if state.run_path is not None:
        run_path = path.gather(1, order[..., None].expand(-1, -1, t + 1))
    return SearchState(run_scores, run_nodes, tokens.gather(1, order[..., None].expand(-1, -1, t + 1)),
                       parent.gather(1, order), fin_scores, fin_items, fin_tokens, improvable, run_path, fin_path)


@torch.inference_mode()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    trie,
    num_beams: int,
    length_penalty: float = 0.0,
    normalize: str = "full",
    exclude_items=None,
    assistant_logprobs: torch.Tensor | None = None,
    assistant_weight: float = 0.0,
    backend: str = "auto",
    layout: str = "default",
    tree_attention: str = "model",
    kv_cache: str = "auto",
    kv_policy=None,
    early_stopping: bool | str = False,
) -> BeamSearchOutput:
    """Trie-constrained beam search: the top ``num_beams`` catalog items for each request.

    Args:
        model: a Hugging Face decoder-only or encoder-decoder model, or any
            :class:`decoding.search.model.BeamModel`. The prompt runs once per request.
        input_ids: int64 ``[B, T]`` prompts (left-padded for decoder-only models).
        attention_mask: ``[B, T]`` 0/1, or None for no padding.
        trie: :class:`decoding.ItemTrie` built with the model's ``vocab_size``.
        num_beams: ``K``, the number of beams and of items returned.
        length_penalty: finished scores are ``sum log p / length ** length_penalty``.
        normalize: step log-probs over the ``"full"`` vocabulary (transformers' semantics),
            the ``"valid"`` children only, or ``"none"`` (the model returns log-probs).
        exclude_items: per-request item ids never to return (a list of ``B`` lists, or an int
            tensor ``[B, X]`` padded with -1), e.g. the user's history.
        assistant_logprobs: D3: float ``[B, trie.num_ids]`` item log-probs of a text-free model;
            each step scores ``(1-w) log p_LLM(t|h) + w log(m(h.t) / m(h))`` with ``m`` the
            assistant's mass over the child's items and ``w = assistant_weight``.
        backend: ``trie_beam_step`` backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``.
        layout: ``"default"`` (a KV cache row per beam, prompt KV shared, reorders move only
            generated positions) or ``"tree"`` (Hugging Face decoder-only models: the beams of a
            request are one flattened sequence after the prompt, with a tree mask; see
            :mod:`decoding.search.tree`). Both give the same results.
        tree_attention: with ``layout="tree"``, how the tree rows attend: ``"model"`` (the
            model's own attention with a 4-D mask) or ``"op"`` (:func:`decoding.ops.tree_attention`,
            on ``backend``). Same results.
        kv_cache: default layout, Hugging Face models: ``"shared"`` stores the prompt KV once
            per request and only generated KV per beam (:mod:`decoding.kv.shared_prefix`);
            ``"per_beam"`` keeps a prompt copy per beam; ``"auto"`` (default) is ``"shared"``
            for decoder-only models on SDPA attention without sliding windows. Same results.
        kv_policy: prune the prompt KV after prefill (shared-prefix cache only):
            :class:`decoding.kv.StreamingLLM`, :class:`decoding.kv.SnapKV` or
            :class:`decoding.kv.EarnCut`. Results then follow the pruned cache (compare with an
            unpruned run); ``out.kv_bytes["prompt_before_pruning"]`` is the memory report.
        early_stopping: when a request stops taking finished hypotheses, as transformers'
            ``early_stopping``: ``False`` (its default heuristic), ``True`` (once ``K`` are
            finished) or ``"never"`` (the canonical bound). Identifiers of one length (no EOS)
            all finish at the last level, where the three agree.
    """
    check_early_stopping(early_stopping)
    _validate(input_ids, attention_mask, trie, num_beams, length_penalty, normalize, assistant_logprobs,
              assistant_weight)
    check_choice("layout", layout, {"default", "tree"})
    check_choice("tree_attention", tree_attention, {"model", "op"})
    check_choice("kv_cache", kv_cache, {"auto", "shared", "per_beam"})
    if layout != "tree" and tree_attention != "model":
        raise ValueError("tree_attention: 'op' needs layout='tree'")
    if layout == "tree" and kv_policy is not None:
        raise ValueError("kv_policy: applies to the default layout")
    if layout == "tree":
        beam_model = TreeBeamModel(model, attention=tree_attention, backend=backend)
    else:
        beam_model = as_beam_model(model, kv_cache=kv_cache, kv_policy=kv_policy)
    vocab = model_vocab_size(model)
    if vocab is not None and vocab != trie.vocab_size:
        raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, but the model's vocabulary is {vocab}")

    B = input_ids.shape[0]
    logits = beam_model.prefill(input_ids, attention_mask)
    if logits.dim() != 2 or logits.shape[0] != B or logits.shape[1] != trie.vocab_size:
        raise ValueError(
            f"model: prefill returned logits of shape {tuple(logits.shape)}, expected [{B}, {trie.vocab_size}]"
        )
    search = search_loop(logits, trie=trie, num_beams=num_beams, length_penalty=length_penalty, normalize=normalize,
                         exclude_items=exclude_items, assistant_logprobs=assistant_logprobs,
                         assistant_weight=assistant_weight, backend=backend, early_stopping=early_stopping)
    # our own adapter is told the rows' layout, so its reorders need no device sync
    request_major = isinstance(beam_model, HFBeamModel)
    try:
        beam_index, tokens = next(search)
        while True:
            logits = (beam_model.step(beam_index, tokens, request_major=True) if request_major
                      else beam_model.step(beam_index, tokens))
            beam_index, tokens = search.send(logits)
    except StopIteration as done:
        out = done.value
    out.kv_bytes = beam_model.kv_bytes() if hasattr(beam_model, "kv_bytes") else None
    return out


def search_loop(logits: torch.Tensor, *, trie, num_beams: int, length_penalty: float = 0.0, normalize: str = "full",
                exclude_items=None, assistant_logprobs=None, assistant_weight: float = 0.0, backend: str = "auto",
                early_stopping: bool | str = False):
    """The search as a generator, for drivers that run the model themselves (an async engine).

    Args:
        logits: float ``[B, V]`` the prefill's next-token logits (log-probs with ``normalize="none"``).
        the rest: as in :func:`beam_search` (arguments are validated there).
    Yields:
        ``(beam_index, tokens)``: int64 ``[B * K]`` each: every next row extends row
        ``beam_index`` of the previous logits with ``tokens`` (dead beams repeat a row with token 0).
    Receives:
        float ``[B * K, V]`` the next-token logits of those rows, via ``send``.
    Returns:
        :class:`BeamSearchOutput` (as ``StopIteration.value``).
    """
    check_early_stopping(early_stopping)  # drivers call the loop without beam_search's checks
    B, K, L = logits.shape[0], num_beams, trie.depth
    device = logits.device
    trie = trie.to(device)
    backend = resolve_backend(backend, device)
    excluded = trie.excluded_ranks(exclude_items, B)
    weight = float(assistant_weight)
    prefix = item_mass_prefix(trie, assistant_logprobs.to(device)) if weight > 0 else None
    # transformers keeps 2K candidates so K unfinished remain when top ones end; with
    # fixed-length identifiers nothing ends early and K suffice.
    keep = 2 * K if trie.eos_token_id is not None else K
    lp = float(length_penalty)

    state = SearchState(
        run_scores=torch.zeros((B, 1), device=device),
        run_nodes=torch.zeros((B, 1), dtype=torch.long, device=device),
        run_tokens=torch.empty((B, 1, 0), dtype=torch.long, device=device),
        run_parent=torch.zeros((B, 1), dtype=torch.long, device=device),
        fin_scores=torch.full((B, K), NEG_INF, device=device),
        fin_items=torch.full((B, K), -1, dtype=torch.long, device=device),
        fin_tokens=torch.full((B, K, L), -1, dtype=torch.long, device=device),
        improvable=torch.ones(B, dtype=torch.bool, device=device),
        run_path=torch.empty((B, 1, 0), device=device),
        fin_path=torch.zeros((B, K, L), device=device),
    )
    for t in range(L):
        W = state.run_nodes.shape[1]
        C = trie.max_branch_at(t)
        bias = assistant_bias(trie, prefix, state.run_nodes, C, weight) if prefix is not None else None
        state = search_step(state, logits.reshape(B, W, -1), trie, t, num_beams=K, keep=keep, length_penalty=lp,
                            normalize=normalize, excluded_ranks=excluded, child_bias=bias, max_children=C,
                            backend=backend, logprob_weight=1.0 - weight, early_stopping=early_stopping)
        if t + 1 == L:
            break
        # fixed-length identifiers: no hypothesis finishes before the last level, so the loop
        # needs no look at the device (no sync); EOS-terminated ones may stop early (one sync)
        if trie.eos_token_id is not None and not bool(state.improvable.any()):
            break
        beam_index = (torch.arange(B, device=device)[:, None] * W + state.run_parent).reshape(-1)
        # dead beams (fewer than K open candidates) still occupy a row: feed them token 0
        tokens = state.run_tokens[:, :, -1].clamp(min=0).reshape(-1)
        logits = yield beam_index, tokens
        if not torch.is_floating_point(logits) or logits.shape != (B * K, trie.vocab_size):
            raise ValueError(
                f"model: step returned logits of shape {tuple(logits.shape)}, expected [{B * K}, {trie.vocab_size}]"
            )

    fin_scores, fin_items, fin_tokens = state.fin_scores, state.fin_items, state.fin_tokens
    fin_items = torch.where(fin_scores > NEG_INF, fin_items, -1)
    fin_tokens = torch.where((fin_scores > NEG_INF)[..., None], fin_tokens, -1)
    # per-token terms: differences of the cumulative path scores, 0 after the end and in padding
    path = state.fin_path
    steps = torch.diff(path, dim=2, prepend=torch.zeros_like(path[..., :1]))
    token_scores = torch.where(fin_tokens >= 0, steps, 0.0)
    return BeamSearchOutput(items=fin_items, scores=fin_scores, sequences=fin_tokens, token_scores=token_scores)
