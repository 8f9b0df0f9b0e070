"""Speculative beam search with N-to-K verification (AtSpeed's strict and relaxed modes),
batched and trie-constrained, on the tree layout (:mod:`decoding.search.tree`) with continuous
batching (:mod:`decoding.speculative.batching`).

One round, for every request at once:

1. the draft runs trie-constrained beam search with ``N = num_drafts`` beams for up to
   ``γ = draft_steps`` levels from the request's current ``K`` beams (fewer near the end of the
   identifier, so that the round's last level is the target's own);
2. the target runs all drafted levels (plus the previous round's new beams) in one forward over
   the tree;
3. level by level, the target verifies the drafted level (ops ``verify_strict`` /
   ``verify_relaxed``); at the first rejected level, or after the last drafted one, the target's
   own beams of that level become the new beams (one token of the target's own);
4. finished requests retire, and rows no request needs any more are cut from both models' KV
   caches.

The loop is :func:`speculative_loop`, a generator in named phases (:class:`SpeculativeSearch`:
``admit``, ``draft``, ``verify``, ``retire``, ``compact``) that yields a :class:`Round` after each
round and returns the output; when waiting requests join the batch is a separate policy
(:class:`AdmissionPolicy`). :func:`speculative_beam_search` validates, builds both models' trees
and drives it to the end.

Strict: the target's exact top-``K`` (``trie_beam_step``) must all be among the drafted
candidates (same parent, same token), so accepted levels are the target's exact beams and the
result is exactly ``beam_search(target, ...)``. Relaxed: sequence-level speculative sampling
(see :func:`speculative_beam_search`). Row ids are kept identical in both models' trees.

Only fixed-length identifiers (every item has ``trie.depth`` tokens, no EOS) are supported: with
EOS-terminated identifiers transformers' beam search keeps ``2K`` candidates and finished
hypotheses, which N-to-K verification of running beams does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from decoding._transformers import check_decoder_only
from decoding._validate import check_choice, check_positive_int, check_seed, seeded_generator
from decoding.ops import resolve_backend
from decoding.ops._helpers import NEG_INF
from decoding.ops.trie_beam_step import run_trie_beam_step
from decoding.ops.verify import run_match_keys, run_verify_relaxed
from decoding.search.beam import BeamSearchOutput, validate_search
from decoding.search.model import model_vocab_size
from decoding.speculative.batching import BatchedTreeModel, compaction_plan, remap_rows


@dataclass
class SpeculativeStats:
    """rounds: speculative rounds run. accepted_levels: per round, per request, the drafted levels
    the target accepted (-1 for requests not in flight: finished or still waiting).
    drafted_levels: per round, per request, the levels drafted. target_forwards /
    draft_forwards: model calls, prefills included. admissions: prefills (one per model each),
    one per group of requests admitted."""

    rounds: int = 0
    accepted_levels: list[list[int]] = field(default_factory=list)
    drafted_levels: list[list[int]] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0
    admissions: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted levels over drafted levels, all rounds and requests."""
        acc = sum(a for r in self.accepted_levels for a in r if a > 0)
        drafted = sum(d for r in self.drafted_levels for d in r if d > 0)
        return acc / drafted if drafted else 0.0


class DraftLevel(NamedTuple):
    """One drafted level of a round, ``[B, n]`` each: the drafted sequences' tree rows and keys
    (-1: empty slot); relaxed mode adds the draft's probability of each drafted sequence
    (``q_draft``) and of every candidate it drew from (``cand_keys``, ``q_all``)."""

    rows: torch.Tensor
    keys: torch.Tensor
    q_draft: torch.Tensor | None = None
    cand_keys: torch.Tensor | None = None
    q_all: torch.Tensor | None = None


class _LevelBeams(NamedTuple):
    """The target's beams at a verified level, ``[B, K]`` (history ``[B, K, L]``)."""

    parent_rows: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor
    nodes: torch.Tensor
    history: torch.Tensor


class _InFlight(NamedTuple):
    """The requests in flight, one entry each: its index in the input (``request [b]``), its
    ``K`` beams (``beam_rows`` with the same ids in both trees, the target's ``beam_scores``, trie
    ``beam_nodes``, ``beam_tokens [b, K, L]``), its ``depth``, whether its beams' rows are added
    but not run yet (``pending``), and each model's log-probs at its beams (``[b, K, V]``)."""

    request: torch.Tensor
    beam_rows: torch.Tensor
    beam_scores: torch.Tensor
    beam_nodes: torch.Tensor
    beam_tokens: torch.Tensor
    depth: torch.Tensor
    pending: torch.Tensor
    target_level0: torch.Tensor
    draft_level0: torch.Tensor

    @classmethod
    def admitted(cls, request, target_logits, draft_logits, K: int, L: int) -> _InFlight:
        """New requests: one live beam each (the prompt, row 0), the prefill's log-probs."""
        n, V = target_logits.shape
        device = request.device
        first = torch.arange(K, device=device) == 0
        return cls(request, torch.zeros((n, K), dtype=torch.long, device=device),
                   torch.where(first, 0.0, NEG_INF).expand(n, K), torch.where(first, 0, -1).expand(n, K),
                   torch.full((n, K, L), -1, dtype=torch.long, device=device),
                   torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device),
                   target_logits[:, None, :].float().expand(n, K, V), draft_logits[:, None, :].float().expand(n, K, V))

    def extend(self, other: _InFlight) -> _InFlight:
        return _InFlight(*(torch.cat([a, b]) for a, b in zip(self, other)))

    def select(self, index: torch.Tensor) -> _InFlight:
        return _InFlight(*(t[index] for t in self))


@dataclass
class SpeculativeOutput(BeamSearchOutput):
    """:class:`decoding.BeamSearchOutput` plus ``stats`` (:class:`SpeculativeStats`)."""

    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


def _validate(target, draft, input_ids, attention_mask, trie, num_beams, num_drafts, draft_steps, mode, seed,
              max_batch_size):
    check_decoder_only(target, "target")
    check_decoder_only(draft, "draft")
    validate_search(input_ids, attention_mask, trie, num_beams)
    if trie.eos_token_id is not None:  # ItemTrie needs an EOS exactly for variable-length identifiers
        raise ValueError("trie: speculative_beam_search needs fixed-length identifiers (every item has "
                         f"trie.depth={trie.depth} tokens, no EOS)")
    for name, model in (("target", target), ("draft", draft)):
        vocab = model_vocab_size(model)
        if vocab != trie.vocab_size:
            raise ValueError(f"{name}: vocabulary {vocab} differs from the trie's {trie.vocab_size}")
    check_positive_int("num_drafts", num_drafts)
    check_positive_int("draft_steps", draft_steps)
    if num_drafts < num_beams:
        raise ValueError(f"num_drafts: must be at least num_beams ({num_beams}), got {num_drafts}")
    check_choice("mode", mode, {"strict", "relaxed"})
    if seed is not None:
        check_seed("seed", seed)
    if max_batch_size is not None:
        check_positive_int("max_batch_size", max_batch_size)


def _append_token(history: torch.Tensor, parent: torch.Tensor, token: torch.Tensor, column: torch.Tensor):
    """history ``[B, W, L]`` gathered by ``parent [B, K]``, with ``token [B, K]`` written at
    ``column [B]`` (clamped; columns of finished requests are ignored by the caller)."""
    L = history.shape[2]
    out = history.gather(1, parent[..., None].expand(-1, -1, L)).clone()
    col = column.clamp(max=L - 1).view(-1, 1, 1).expand(-1, parent.shape[1], 1)
    return out.scatter_(2, col, token[..., None])


class AdmissionPolicy:
    """When waiting requests join the running batch (continuous batching), at most ``capacity``
    in flight: once at least half of the slots are free, or none is live. Each admission costs a
    prefill forward of both models, which fewer requests do not repay (admitting every round was
    slower than static batches at γ = 1)."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def admit(self, live: int, waiting: int) -> int:
        """How many of the ``waiting`` requests to admit now, ``live`` being in flight."""
        free = self.capacity - live
        if waiting and free > 0 and (free >= (self.capacity + 1) // 2 or live == 0):
            return min(waiting, free)
        return 0


@dataclass
class Round:
    """What one round did (yielded by :func:`speculative_loop`), int64 ``[b]`` each over the
    ``b`` requests in flight: their indices in the input, the levels drafted and the drafted
    levels the target accepted; ``finished``: the input indices of the requests that finished."""

    requests: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    finished: torch.Tensor


class _Drafts:
    """One round's drafting: per request the levels to draft (``gamma``), the most of them
    (``G``), the requests' depths, and each drafted level (:class:`DraftLevel`)."""

    def __init__(self, gamma, G, live_depths):
        self.gamma, self.G, self.live_depths = gamma, G, live_depths
        self.drafted = []
        self.level_logits = []  # the target's log-probs at each level: [0] the beams', then per drafted level


class SpeculativeSearch:
    """One call's state and the phases of a round; :func:`speculative_loop` runs them in order.

    Candidate keys are ``parent_row * V + token`` (-1 for an empty slot): since row ids are the
    same in both trees, equal keys mean the same sequence in the target and the draft.

    Args:
        target, draft: :class:`decoding.speculative.batching.BatchedTreeModel` over the same vocabulary.
        input_ids, attention_mask: ``[B, T]`` left-padded prompts and their 0/1 mask, on the models' device.
        trie: :class:`decoding.ItemTrie` (fixed-length identifiers) on that device.
        num_beams, num_drafts, draft_steps, mode: as in :func:`speculative_beam_search`.
        excluded: ``[B, X]`` sorted excluded ranks (``trie.excluded_ranks``) or None.
        backend: a resolved backend name. generator: relaxed mode's random stream (None in strict mode).
        policy: the :class:`AdmissionPolicy`.
    """

    def __init__(self, target, draft, input_ids, attention_mask, *, trie, num_beams: int, num_drafts: int,
                 draft_steps: int, mode: str, excluded, backend: str, generator, policy: AdmissionPolicy):
        self.tgt, self.drf, self.trie, self.backend = target, draft, trie, backend
        self.input_ids, self.attention_mask, self.excluded_all = input_ids, attention_mask, excluded
        self.K, self.N, self.gamma_max, self.mode = num_beams, num_drafts, draft_steps, mode
        self.V, self.L, self.generator, self.policy = trie.vocab_size, trie.depth, generator, policy
        self.stats = SpeculativeStats()
        self.excluded = None  # the excluded ranks of the requests in flight
        B, K, L, device = input_ids.shape[0], num_beams, trie.depth, input_ids.device
        self.out_items = torch.full((B, K), -1, dtype=torch.long, device=device)
        self.out_scores = torch.full((B, K), NEG_INF, device=device)
        self.out_tokens = torch.full((B, K, L), -1, dtype=torch.long, device=device)
        self.fl: _InFlight | None = None  # the requests in flight
        self.queued = 0  # requests admitted so far (in input order)
        self._draft_phase = self.draft_strict if mode == "strict" else self.draft_relaxed
        self._verify_phase = self.verify_strict if mode == "strict" else self.verify_relaxed

    @property
    def in_flight(self) -> int:
        return 0 if self.fl is None else self.fl.request.numel()

    # ------------------------------------------------------------------ phases of a round
    def admit(self) -> None:
        """Prefill the requests the policy admits now (one forward of each model) and add them
        to the batch."""
        count = self.policy.admit(self.in_flight, self.input_ids.shape[0] - self.queued)
        if not count:
            return
        admitted = torch.arange(self.queued, self.queued + count, device=self.input_ids.device)
        self.queued += count
        ids, mask = self.input_ids[admitted], self.attention_mask[admitted]
        new = _InFlight.admitted(admitted, self.tgt.admit(ids, mask), self.drf.admit(ids, mask), self.K, self.L)
        self.stats.target_forwards += 1
        self.stats.draft_forwards += 1
        self.stats.admissions += 1
        self.fl = new if self.fl is None else self.fl.extend(new)
        self._select_excluded()

    def draft(self) -> _Drafts:
        """The draft's levels of this round (rows added to both trees)."""
        fl = self.fl
        self.stats.rounds += 1
        gamma = (self.L - 1 - fl.depth).clamp(min=0).clamp(max=self.gamma_max)
        rnd = _Drafts(gamma, int(gamma.max()), fl.depth.tolist())
        if bool(fl.pending.any()):  # the draft's log-probs at the beams the last round chose
            self.fl = fl = fl._replace(draft_level0=torch.where(fl.pending[:, None, None],
                                                                self.run_draft(self.K).float(), fl.draft_level0))
        self._draft_phase(rnd, fl.beam_rows, fl.beam_scores, fl.beam_nodes, fl.draft_level0)
        return rnd

    def verify(self, rnd: _Drafts) -> tuple[_LevelBeams, torch.Tensor]:
        """One target forward over the new beams and every drafted level, then level by level
        verification: at the first rejected level (or after the last drafted one) the target's
        own beams of that level become the new beams. Returns them and the levels accepted."""
        self._target_forward(rnd)
        fl, V = self.fl, self.V
        b, device = fl.request.numel(), fl.request.device
        p_rows, p_scores, p_nodes, p_tokens = fl.beam_rows, fl.beam_scores, fl.beam_nodes, fl.beam_tokens
        p_logits = rnd.level_logits[0]
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        accepted = torch.zeros(b, dtype=torch.long, device=device)
        new = None
        for i in range(rnd.G + 1):
            out, accept, index = self._verify_phase(rnd, i, p_rows, p_scores, p_nodes, p_logits, stopped)
            valid = out.node >= 0
            parent = out.parent.clamp(min=0)
            cand = _LevelBeams(p_rows.gather(1, parent), out.token.clamp(min=0), out.scores, out.node,
                               _append_token(p_tokens, parent, out.token.clamp(min=0), fl.depth + i))
            stop_now = ~stopped & ~accept
            if i == 0:
                new = cand
            else:
                new = _LevelBeams(*(torch.where(stop_now.view(-1, *([1] * (c.dim() - 1))), c, n)
                                    for c, n in zip(cand, new)))
            accepted = torch.where(stop_now, i, accepted)
            stopped |= stop_now
            if i == rnd.G or bool(stopped.all()):
                break
            # accepted requests continue from the matched drafted rows
            index = index.clamp(min=0)  # position among the level's drafted rows
            a = accept[:, None]
            p_rows = torch.where(a, rnd.drafted[i].rows.gather(1, index), 0)
            p_scores = torch.where(a & valid, out.scores, NEG_INF)
            p_nodes = torch.where(a & valid, out.node, -1)
            p_tokens = cand.history
            p_logits = rnd.level_logits[i + 1].gather(1, index[..., None].expand(-1, -1, V))
        return new, accepted

    def retire(self, rnd: _Drafts, new: _LevelBeams, accepted: torch.Tensor) -> tuple[Round, _LevelBeams | None]:
        """Record the round, write the finished requests' results and retire them from both
        trees. Returns the :class:`Round` and the new beams of the requests still in flight
        (None if none is)."""
        fl, B = self.fl, self.input_ids.shape[0]
        for record, values in ((self.stats.accepted_levels, accepted), (self.stats.drafted_levels, rnd.gamma)):
            row = [-1] * B
            for r, v in zip(fl.request.tolist(), values.tolist()):
                row[r] = v
            record.append(row)
        report = Round(fl.request, rnd.gamma, accepted, fl.request[:0])
        self.fl = fl = fl._replace(depth=fl.depth + accepted + 1)
        finishing = fl.depth >= self.L
        if bool(finishing.any()):
            done = fl.request[finishing]
            report.finished = done
            self.out_items[done] = self.trie.leaf_items(new.nodes[finishing])
            self.out_scores[done] = new.scores[finishing]
            self.out_tokens[done] = new.history[finishing]
            live = (~finishing).nonzero().squeeze(1)
            self.tgt.select(live)
            self.drf.select(live)
            self.fl, new = fl.select(live), _LevelBeams(*(c[live] for c in new))
            self._select_excluded()
        return report, (new if self.in_flight else None)

    def compact(self, new: _LevelBeams) -> None:
        """Keep only the rows the new beams descend from (both trees, one layout), then add the
        new beams to both trees (their log-probs are computed by the next round's forwards)."""
        valid = new.nodes >= 0
        parent_rows = torch.where(valid, new.parent_rows, 0)
        plan = compaction_plan(self.tgt.ancestors(parent_rows), min(self.tgt.num_computed, self.drf.num_computed))
        self.tgt.compact(plan)
        self.drf.compact(plan)
        self.fl = self.fl._replace(
            beam_rows=self.add_rows(remap_rows(parent_rows, plan), new.tokens, valid),
            beam_scores=torch.where(valid, new.scores, NEG_INF), beam_nodes=torch.where(valid, new.nodes, -1),
            beam_tokens=new.history,
            pending=torch.ones(self.in_flight, dtype=torch.bool, device=self.fl.request.device))

    def output(self) -> SpeculativeOutput:
        """The results of every request (all finished)."""
        out_items, out_scores, out_tokens, L = self.out_items, self.out_scores, self.out_tokens, self.L
        if self.mode == "relaxed":  # sampled beams come in draw order
            order = out_scores.sort(dim=1, descending=True, stable=True).indices
            out_scores, out_items = out_scores.gather(1, order), out_items.gather(1, order)
            out_tokens = out_tokens.gather(1, order[..., None].expand(-1, -1, L))
        out_items = torch.where(out_scores > NEG_INF, out_items, -1)
        out_tokens = torch.where((out_scores > NEG_INF)[..., None], out_tokens, -1)
        return SpeculativeOutput(items=out_items, scores=out_scores, sequences=out_tokens, stats=self.stats)

    # ------------------------------------------------------------------ shared pieces
    def _select_excluded(self) -> None:
        self.excluded = None if self.excluded_all is None else self.excluded_all[self.fl.request]

    def _target_forward(self, rnd: _Drafts) -> None:
        """The target's log-probs at the beams the last round chose (pending) and at every
        drafted level, in one forward."""
        fl, K = self.fl, self.K
        has_pending = bool(fl.pending.any())
        if has_pending or rnd.G:
            logits = self.tgt.run()
            self.stats.target_forwards += 1
            start = K if has_pending else 0
            if has_pending:
                self.fl = fl = fl._replace(target_level0=torch.where(fl.pending[:, None, None],
                                                                     logits[:, :K].float(), fl.target_level0))
            for level in rnd.drafted:
                width = level.rows.shape[1]
                rnd.level_logits.append(logits[:, start: start + width])
                start += width
        rnd.level_logits.insert(0, fl.target_level0)

    def step(self, logits, scores, nodes, levels, width, all_candidates=False):
        """trie_beam_step at the given per-request depths; ``all_candidates``: every valid child
        of every beam, best first (``width`` is then the number of beams)."""
        C = max(self.trie.max_branch_at(d) for d in levels)
        num_out = width * max(C, 1) if all_candidates else width
        return run_trie_beam_step(logits, scores, nodes, self.trie, num_out, normalize="full",
                                  excluded_ranks=self.excluded, child_bias=None, max_children=C,
                                  backend=self.backend)

    def keys(self, rows, out):
        """Keys of a step's candidates: parent row (from the beams' ``rows``) * V + token."""
        valid = out.node >= 0
        parent_rows = rows.gather(1, out.parent.clamp(min=0))
        return torch.where(valid, parent_rows * self.V + out.token, -1), parent_rows

    def add_rows(self, parent_rows, tokens, ok):
        rows = self.drf.add(torch.where(ok, parent_rows, 0), torch.where(ok, tokens, 0))
        self.tgt.add(torch.where(ok, parent_rows, 0), torch.where(ok, tokens, 0))
        return rows

    def run_draft(self, n_rows):
        self.stats.draft_forwards += 1
        return self.drf.run()[:, -n_rows:]

    # ---- strict: the draft's top-N beams; accept iff the target's top-K were all drafted ----
    def draft_strict(self, rnd, rows, scores, nodes, logits):
        for j in range(1, rnd.G + 1):
            out = self.step(logits, scores, nodes, [d + j - 1 for d in rnd.live_depths], self.N)
            ok = (out.node >= 0) & (rnd.gamma >= j)[:, None]
            keys, parent_rows = self.keys(rows, out)
            rows = self.add_rows(parent_rows, out.token, ok)
            rnd.drafted.append(DraftLevel(rows, torch.where(ok, keys, -1)))
            scores, nodes = torch.where(ok, out.scores, NEG_INF), torch.where(ok, out.node, -1)
            if j < rnd.G:
                logits = self.run_draft(self.N)

    def verify_strict(self, rnd, i, rows, scores, nodes, logits, stopped):
        """Returns the target's beams at this level (``out``, parent index into ``rows``), whether
        the level is accepted, and where the accepted beams sit among the drafted ones."""
        out = self.step(logits, scores, nodes, [d + i for d in rnd.live_depths], self.K)
        if i == rnd.G:
            return out, torch.zeros_like(stopped), None
        keys, _ = self.keys(rows, out)
        index = run_match_keys(keys, rnd.drafted[i].keys, self.backend)
        accept = ((index >= 0) | (keys < 0)).all(dim=1) & ~stopped & (rnd.gamma > i)
        return out, accept, index

    # ---- relaxed: sampled drafts, acceptance min(1, p/q), residual draws ----
    def draft_relaxed(self, rnd, rows, scores, nodes, logits):
        """Per level, N sequences drawn without replacement (Gumbel top-N) from the draft's
        distribution q over all children of its beams; the first K drawn continue."""
        for j in range(1, rnd.G + 1):
            out = self.step(logits, scores, nodes, [d + j - 1 for d in rnd.live_depths], rows.shape[1],
                            all_candidates=True)
            cand_keys, parent_rows = self.keys(rows, out)
            q_all = torch.softmax(out.scores, dim=1).nan_to_num(0.0)  # a row of -inf: no candidate
            u = torch.rand(out.scores.shape, generator=self.generator, device=out.scores.device)
            perturbed = out.scores - (-u.clamp(min=1e-30).log()).log()
            n = min(self.N, out.scores.shape[1])
            sel = perturbed.topk(n, dim=1).indices  # sorted: the order of the draws
            ok = (out.scores.gather(1, sel) > NEG_INF) & (rnd.gamma >= j)[:, None]
            new_rows = self.add_rows(parent_rows.gather(1, sel), out.token.gather(1, sel), ok)
            keys = torch.where(ok, cand_keys.gather(1, sel), -1)
            q_draft = torch.where(ok, q_all.gather(1, sel), 0.0)
            rnd.drafted.append(DraftLevel(new_rows, keys, q_draft, cand_keys, q_all))
            if j < rnd.G:
                logits = self.run_draft(n)[:, : self.K]
                rows = new_rows[:, : self.K]
                scores = torch.where(ok, out.scores.gather(1, sel), NEG_INF)[:, : self.K]
                nodes = torch.where(ok, out.node.gather(1, sel), -1)[:, : self.K]

    def verify_relaxed(self, rnd, i, rows, scores, nodes, logits, stopped):
        out = self.step(logits, scores, nodes, [d + i for d in rnd.live_depths], rows.shape[1],
                        all_candidates=True)
        keys, _ = self.keys(rows, out)
        p_all = torch.softmax(out.scores, dim=1).nan_to_num(0.0)
        B = keys.shape[0]
        device = keys.device
        if i < rnd.G:
            d = rnd.drafted[i]
            active = ~stopped & (rnd.gamma > i)
            in_draft = run_match_keys(keys, d.cand_keys, self.backend)
            q_cand = torch.where((in_draft >= 0) & active[:, None], d.q_all.gather(1, in_draft.clamp(min=0)), 0.0)
            draft_cand = torch.where(active[:, None], run_match_keys(d.keys, keys, self.backend), -1)
            q_draft = d.q_draft
        else:  # the round's own target level: K draws from p
            active = torch.zeros_like(stopped)
            q_cand = torch.zeros_like(p_all)
            draft_cand = torch.zeros((B, 0), dtype=torch.long, device=device)
            q_draft = torch.zeros((B, 0), device=device)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=device))
        res = run_verify_relaxed(p_all, q_cand, q_draft, draft_cand, self.K, seed, 0, self.backend)
        kept = res.kept.clamp(min=0)
        alive = res.kept >= 0
        picked = type(out)(
            scores=torch.where(alive, out.scores.gather(1, kept), NEG_INF),
            parent=torch.where(alive, out.parent.gather(1, kept), -1),
            token=torch.where(alive, out.token.gather(1, kept), -1),
            node=torch.where(alive, out.node.gather(1, kept), -1),
        )
        accept = res.level_accepted & active
        index = None
        if i < rnd.G:
            picked_keys = torch.where(alive, keys.gather(1, kept), -1)
            index = run_match_keys(picked_keys, rnd.drafted[i].keys, self.backend)
        return picked, accept, index


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
    seed: int | None = None,
    exclude_items=None,
    backend: str = "auto",
    tree_attention: str = "model",
    max_batch_size: int | None = None,
) -> SpeculativeOutput:
    """Top ``num_beams`` catalog items per request from ``target``, with a draft model proposing
    ``num_drafts`` beams for ``draft_steps`` levels per round.

    Args:
        target, draft: Hugging Face decoder-only models over the same vocabulary.
        input_ids: int64 ``[B, T]`` prompts, left-padded. attention_mask: ``[B, T]`` 0/1 or None.
        trie: :class:`decoding.ItemTrie` of fixed-length identifiers (no EOS).
        num_beams: ``K``. num_drafts: ``N >= K``. draft_steps: ``γ >= 1``.
        mode: ``"strict"``: exactly ``beam_search(target, ...)``. ``"relaxed"``: AtSpeed's
            sampling verification. Both models sample: per level the draft draws ``N``
            sequences without replacement from its distribution ``q`` over all children of its
            beams (softmax of cumulative scores), and its first ``K`` draws continue; the target
            accepts drafted ``y`` with probability ``min(1, p(y)/q(y))``, ``p`` being its own
            distribution over the children of the beams it kept; the level is accepted when at
            least ``K`` are (the first ``K`` in draw order are kept), else the missing beams are
            drawn from ``max(0, p - q)`` and the round ends. The result is a sample, not the
            top-K: with ``K = N = 1`` it is distributed exactly as trie-constrained ancestral
            sampling from the target; beams come back sorted by target score.
        seed: relaxed mode's random stream (None: drawn from torch's global generator, so
            ``torch.manual_seed`` also reproduces a run). Ignored in strict mode.
        exclude_items, backend: as in :func:`decoding.beam_search`.
        tree_attention: ``"model"`` or ``"op"``, as in ``beam_search(..., layout="tree")``, for
            both models.
        max_batch_size: requests in flight at once (None: all ``B``). Requests finish after
            different numbers of rounds; a finished request always retires (later forwards run
            only the live ones), and with ``max_batch_size < B`` the next waiting requests are
            admitted into the freed slots before a round once at least half of ``max_batch_size``
            slots are free (their prompts prefilled together, one forward of each model: fewer
            requests would not repay that forward), so a batch no longer waits for its slowest
            request. Strict results do not depend on it; relaxed samples do (the random stream is
            drawn per round).
    Returns:
        :class:`SpeculativeOutput`: ``items``, ``scores`` (the target's cumulative
        log-probabilities), ``sequences`` as ``beam_search``, and ``stats``.
    """
    _validate(target, draft, input_ids, attention_mask, trie, num_beams, num_drafts, draft_steps, mode, seed,
              max_batch_size)
    B = input_ids.shape[0]
    tgt = BatchedTreeModel(target, attention=tree_attention, backend=backend)
    drf = BatchedTreeModel(draft, attention=tree_attention, backend=backend)
    device = tgt.device
    trie = trie.to(device)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    policy = AdmissionPolicy(B if max_batch_size is None else min(max_batch_size, B))
    generator = seeded_generator(seed, device) if mode == "relaxed" else None
    search = SpeculativeSearch(
        tgt, drf, input_ids, attention_mask, trie=trie, num_beams=num_beams, num_drafts=num_drafts,
        draft_steps=draft_steps, mode=mode, excluded=trie.excluded_ranks(exclude_items, B),
        backend=resolve_backend(backend, device), generator=generator, policy=policy)
    loop = speculative_loop(search)
    while True:
        try:
            next(loop)
        except StopIteration as done:
            return done.value


def speculative_loop(search: SpeculativeSearch):
    """The rounds of a speculative beam search: a generator that yields a :class:`Round` after
    each round and returns the :class:`SpeculativeOutput` (``StopIteration.value``) once every
    request has finished. Between rounds the caller may inspect ``search`` (its ``stats``, the
    requests in flight). Drive it under ``torch.inference_mode()``, as
    :func:`speculative_beam_search` does."""
    while True:
        search.admit()
        if not search.in_flight:
            return search.output()
        drafts = search.draft()
        new, accepted = search.verify(drafts)
        report, new = search.retire(drafts, new, accepted)
        if new is not None:
            search.compact(new)
        yield report
