"""Speculative beam search with N-to-K verification (AtSpeed's strict mode), batched and
trie-constrained, on the tree layout (:mod:`decoding.search.tree`).

One round, for every request at once:

1. the draft runs trie-constrained beam search with ``N = num_drafts`` beams for up to
   ``γ = draft_steps`` levels from the request's current ``K`` beams (fewer near the end of the
   identifier, so that the round's last level is the target's own);
2. the target runs all drafted levels (plus the previous round's new beams) in one forward over
   the tree;
3. level by level, the target's exact top-``K`` candidates are computed with ``trie_beam_step``
   from its own log-probs; a level is accepted iff all of them are among the drafted candidates
   (same parent, same token); at the first rejected level, or after the last drafted one, the
   target's top-``K`` become the new beams (one token of the target's own);
4. rows no request needs any more are cut from both models' KV caches.

Accepted levels are the target's exact beams, so the result is exactly ``beam_search(target,
...)`` (strict mode). Row ids are kept identical in the target's and the draft's trees.

Only fixed-length identifiers (every item has ``trie.depth`` tokens, no EOS) are supported: with
EOS-terminated identifiers transformers' beam search keeps ``2K`` candidates and finished
hypotheses, which N-to-K verification of running beams does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoding._validate import check_choice, check_positive_int
from decoding.ops.trie_beam_step import resolve_backend, run_trie_beam_step
from decoding.search.beam import BeamSearchOutput, validate_prompts
from decoding.search.model import model_vocab_size
from decoding.search.tree import TreeModel, _check_decoder_only

NEG_INF = float("-inf")


@dataclass
class SpeculativeStats:
    """rounds: speculative rounds run. accepted_levels: per round, per request, the drafted levels
    the target accepted (-1 for requests already finished). drafted_levels: per round, per request,
    the levels drafted. target_forwards / draft_forwards: model calls, prefill included."""

    rounds: int = 0
    accepted_levels: list[list[int]] = field(default_factory=list)
    drafted_levels: list[list[int]] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted levels over drafted levels, all rounds and requests."""
        acc = sum(a for r in self.accepted_levels for a in r if a > 0)
        drafted = sum(d for r in self.drafted_levels for d in r if d > 0)
        return acc / drafted if drafted else 0.0


@dataclass
class SpeculativeOutput(BeamSearchOutput):
    """:class:`decoding.BeamSearchOutput` plus ``stats`` (:class:`SpeculativeStats`)."""

    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


def is_fixed_length(trie) -> bool:
    """Whether every item has exactly ``trie.depth`` tokens: ItemTrie requires an EOS for
    variable-length identifiers, so this is the tries without one."""
    return trie.eos_token_id is None


def _validate(target, draft, input_ids, attention_mask, trie, num_beams, num_drafts, draft_steps, mode):
    from decoding.trie import ItemTrie

    _check_decoder_only(target, "target")
    _check_decoder_only(draft, "draft")
    validate_prompts(input_ids, attention_mask)
    if not isinstance(trie, ItemTrie):
        raise TypeError(f"trie: expected a decoding.ItemTrie, got {type(trie).__name__}")
    if not is_fixed_length(trie):
        raise ValueError("trie: speculative_beam_search needs fixed-length identifiers (every item has "
                         f"trie.depth={trie.depth} tokens, no EOS)")
    for name, model in (("target", target), ("draft", draft)):
        vocab = model_vocab_size(model)
        if vocab != trie.vocab_size:
            raise ValueError(f"{name}: vocabulary {vocab} differs from the trie's {trie.vocab_size}")
    check_positive_int("num_beams", num_beams)
    check_positive_int("num_drafts", num_drafts)
    check_positive_int("draft_steps", draft_steps)
    if num_beams > trie.num_items:
        raise ValueError(f"num_beams: {num_beams} is larger than the catalog ({trie.num_items} items)")
    if num_drafts < num_beams:
        raise ValueError(f"num_drafts: must be at least num_beams ({num_beams}), got {num_drafts}")
    check_choice("mode", mode, {"strict"})
    if bool((input_ids < 0).any()) or bool((input_ids >= trie.vocab_size).any()):
        raise ValueError(f"input_ids: token ids must be in [0, {trie.vocab_size}) (the trie's vocabulary)")


def _append_token(history: torch.Tensor, parent: torch.Tensor, token: torch.Tensor, column: torch.Tensor):
    """history ``[B, W, L]`` gathered by ``parent [B, K]``, with ``token [B, K]`` written at
    ``column [B]`` (clamped; columns of finished requests are ignored by the caller)."""
    L = history.shape[2]
    out = history.gather(1, parent[..., None].expand(-1, -1, L)).clone()
    col = column.clamp(max=L - 1).view(-1, 1, 1).expand(-1, parent.shape[1], 1)
    return out.scatter_(2, col, token[..., None])


@torch.inference_mode()
def speculative_beam_search(
    target,
    draft,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    trie,
    num_beams: int,
    num_drafts: int,
    draft_steps: int,
    mode: str = "strict",
    exclude_items=None,
    backend: str = "auto",
) -> SpeculativeOutput:
    """Top ``num_beams`` catalog items per request, exactly as ``beam_search(target, ...)``, with
    a draft model proposing ``num_drafts`` beams for ``draft_steps`` levels per round.

    Args:
        target, draft: Hugging Face decoder-only models over the same vocabulary.
        input_ids: int64 ``[B, T]`` prompts, left-padded. attention_mask: ``[B, T]`` 0/1 or None.
        trie: :class:`decoding.ItemTrie` of fixed-length identifiers (no EOS).
        num_beams: ``K``. num_drafts: ``N >= K``. draft_steps: ``γ >= 1``.
        mode: ``"strict"``: the exact target top-K.
        exclude_items, backend: as in :func:`decoding.beam_search`.
    Returns:
        :class:`SpeculativeOutput`: ``items``, ``scores``, ``sequences`` as ``beam_search``, and
        ``stats``.
    """
    _validate(target, draft, input_ids, attention_mask, trie, num_beams, num_drafts, draft_steps, mode)
    B, K, N, L = input_ids.shape[0], num_beams, num_drafts, trie.depth
    stats = SpeculativeStats()
    tgt, drf = TreeModel(target), TreeModel(draft)
    target_level0 = tgt.prefill(input_ids, attention_mask)[:, None, :]  # [B, 1, V]
    draft_level0 = drf.prefill(input_ids, attention_mask)[:, None, :]
    stats.target_forwards += 1
    stats.draft_forwards += 1
    device = target_level0.device
    trie = trie.to(device)
    backend = resolve_backend(backend, device)
    excluded = trie.excluded_ranks(exclude_items, B)
    V = trie.vocab_size

    def step(logits, scores, nodes, levels, width):
        C = max(trie.max_branch_at(d) for d in levels)
        return run_trie_beam_step(logits, scores, nodes, trie, width, normalize="full", excluded_ranks=excluded,
                                  child_bias=None, max_children=C, backend=backend)

    # current beams: rows (identical ids in both trees), target scores, trie nodes, tokens
    beam_rows = torch.zeros((B, 1), dtype=torch.long, device=device)
    beam_scores = torch.zeros((B, 1), device=device)
    beam_nodes = torch.zeros((B, 1), dtype=torch.long, device=device)
    beam_tokens = torch.full((B, 1, L), -1, dtype=torch.long, device=device)
    depth = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_items = torch.full((B, K), -1, dtype=torch.long, device=device)
    out_scores = torch.full((B, K), NEG_INF, device=device)
    out_tokens = torch.full((B, K, L), -1, dtype=torch.long, device=device)
    pending_beams = 0  # new beams of the last round, added to both trees but not run yet

    while not bool(done.all()):
        stats.rounds += 1
        gamma = torch.where(done, 0, (L - 1 - depth).clamp(min=0).clamp(max=draft_steps))
        G = int(gamma.max())
        live_depths = depth[~done].tolist()
        if pending_beams:  # the draft's log-probs at the current beams
            draft_level0 = drf.run()[:, -pending_beams:]
            stats.draft_forwards += 1

        # 1. draft G levels of N beams (rows added to both trees)
        drafted = []  # per level: rows, parent rows, keys (parent_row * V + token, -1 if not drafted)
        d_rows, d_scores, d_nodes, d_logits = beam_rows, beam_scores, beam_nodes, draft_level0
        for j in range(1, G + 1):
            out = step(d_logits, d_scores, d_nodes, [d + j - 1 for d in live_depths], N)
            ok = (out.node >= 0) & (gamma >= j)[:, None]
            parent_rows = torch.where(ok, d_rows.gather(1, out.parent.clamp(min=0)), 0)
            tokens = torch.where(ok, out.token, 0)
            rows = drf.add(parent_rows, tokens)
            tgt.add(parent_rows, tokens)
            drafted.append((rows, torch.where(ok, parent_rows * V + tokens, -1)))
            d_rows, d_scores = rows, torch.where(ok, out.scores, NEG_INF)
            d_nodes = torch.where(ok, out.node, -1)
            if j < G:
                d_logits = drf.run()[:, -N:]
                stats.draft_forwards += 1

        # 2. one target forward over the new beams and every drafted level
        level_logits = [target_level0] if not pending_beams else []
        if pending_beams or G:
            logits = tgt.run()
            stats.target_forwards += 1
            if pending_beams:
                level_logits.append(logits[:, :pending_beams])
            for j in range(G):
                start = pending_beams + j * N
                level_logits.append(logits[:, start: start + N])

        # 3. verify level by level: accept while the target's top-K were all drafted
        p_rows, p_scores, p_nodes, p_tokens = beam_rows, beam_scores, beam_nodes, beam_tokens
        p_logits = level_logits[0]
        stopped = done.clone()
        accepted = torch.zeros(B, dtype=torch.long, device=device)
        new = {}
        for i in range(G + 1):
            out = step(p_logits, p_scores, p_nodes, [d + i for d in live_depths], K)
            valid = out.node >= 0
            parent = out.parent.clamp(min=0)
            cand_rows = p_rows.gather(1, parent)
            cand_tokens = _append_token(p_tokens, parent, out.token.clamp(min=0), depth + i)
            if i < G:
                rows, keys = drafted[i]
                match = (cand_rows * V + out.token)[:, :, None] == keys[:, None, :]
                hit = match.any(-1) | ~valid
                accept = hit.all(-1) & ~stopped & (gamma > i)
            else:
                accept = torch.zeros_like(stopped)
            stop_now = ~stopped & ~accept
            if i == 0:
                new = {"parent_rows": cand_rows, "tokens": out.token.clamp(min=0), "scores": out.scores,
                       "nodes": out.node, "history": cand_tokens}
            else:
                sel = stop_now[:, None]
                new["parent_rows"] = torch.where(sel, cand_rows, new["parent_rows"])
                new["tokens"] = torch.where(sel, out.token.clamp(min=0), new["tokens"])
                new["scores"] = torch.where(sel, out.scores, new["scores"])
                new["nodes"] = torch.where(sel, out.node, new["nodes"])
                new["history"] = torch.where(sel[..., None], cand_tokens, new["history"])
            accepted = torch.where(stop_now, i, accepted)
            stopped |= stop_now
            if i == G or bool(stopped.all()):
                break
            # accepted requests continue from the matched drafted rows
            index = match.float().argmax(-1)  # position among the level's N drafted rows
            a = accept[:, None]
            p_rows = torch.where(a, rows.gather(1, index), 0)
            p_scores = torch.where(a & valid, out.scores, NEG_INF)
            p_nodes = torch.where(a & valid, out.node, -1)
            p_tokens = cand_tokens
            p_logits = level_logits[i + 1].gather(1, index[..., None].expand(-1, -1, V))

        stats.accepted_levels.append(torch.where(done, -1, accepted).tolist())
        stats.drafted_levels.append(torch.where(done, -1, gamma).tolist())
        depth = torch.where(done, depth, depth + accepted + 1)
        finishing = ~done & (depth >= L)
        if bool(finishing.any()):
            f = finishing[:, None]
            out_items = torch.where(f, trie.leaf_items(new["nodes"]), out_items)
            out_scores = torch.where(f, new["scores"], out_scores)
            out_tokens = torch.where(f[..., None], new["history"], out_tokens)
        done |= finishing
        if bool(done.all()):
            break

        # 4. cut rows no live request needs, then add the new beams to both trees
        live = ~done[:, None]
        # rows are added after their ancestors, so the highest parent row bounds every row needed
        needed = int(torch.where(live, new["parent_rows"], 0).max()) + 1
        tgt.truncate(needed)
        drf.truncate(needed)
        parent_rows = torch.where(live, new["parent_rows"], 0)
        tokens = torch.where(live, new["tokens"], 0)
        beam_rows = tgt.add(parent_rows, tokens)
        drf.add(parent_rows, tokens)
        beam_scores = torch.where(live, new["scores"], NEG_INF)
        beam_nodes = torch.where(live, new["nodes"], -1)
        beam_tokens = new["history"]
        pending_beams = K

    out_items = torch.where(out_scores > NEG_INF, out_items, -1)
    out_tokens = torch.where((out_scores > NEG_INF)[..., None], out_tokens, -1)
    return SpeculativeOutput(items=out_items, scores=out_scores, sequences=out_tokens, stats=stats)
