"""The judge of the exactness contract (docs/exactness.md) for an engine other than transformers:
its top-K against :func:`decoding.beam_search`'s on the same weights in transformers (float32).

- **exact**: the same items in the same order, each score within :data:`SCORE_TOL`;
- **near-tie**: the answer differs only where two engines' float32 rounding decides: items whose
  reference scores lie within :data:`NEAR_TIE` (relative) of each other come in the other order,
  or an item stands in for another where each differing item scores within :data:`NEAR_TIE` of
  the K-th score, or stands on a beam cut (its prefix scored within :data:`NEAR_TIE` of the lowest
  score among the beams the reference kept at some step, and the reference kept that prefix if
  the item is missing, dropped it if the item is extra: the subtree survived in one engine and not
  the other); every score, a stand-in's included, is the reference's within :data:`SCORE_TOL`;
- **wrong**: anything else.

The benches (``decoding-bench vllm``, ``vllm-http``) also judge engines that return item sets
without scores (vLLM's own beam search): :meth:`ExactReference.judge` compares sets there.
"""

from __future__ import annotations

import torch

NEAR_TIE = 1e-5  # relative: how close two scores must be for float rounding to order them
SCORE_TOL = 1e-4  # absolute, float32: how close a reported score must be to the reference's


def near(a: float, b: float) -> bool:
    """``a`` within :data:`NEAR_TIE` of ``b`` (relative to ``|b|``, at least 1)."""
    return abs(a - b) <= NEAR_TIE * max(abs(b), 1.0)


def classify(got: dict, items: list[int], scores: list[float], cuts=(), prefixes=None, kept=()) -> str:
    """``exact``, ``near-tie`` or ``wrong`` as item sets: ``got`` ({item: score}) against the
    exact top-K (``items``, ``scores`` best first).

    A near-tie: each differing item either scores within :data:`NEAR_TIE` of the K-th score, or
    stands on a beam cut: at some step its prefix scored within :data:`NEAR_TIE` of the lowest
    score the reference kept there (``cuts[t]``), and the reference kept that prefix if the item
    is missing from ``got``, dropped it if the item is extra (one engine kept the subtree, the
    other did not). ``prefixes(item) -> [(prefix tokens, cumulative score), ...]`` after each of
    its tokens but the last, in the reference's arithmetic; ``kept[t]``: the set of prefixes
    (token tuples) the reference kept at step ``t``. Without them only the K-th rule applies."""
    missing, extra = set(items) - set(got), set(got) - set(items)
    if not missing and not extra:
        return "exact"
    ref = dict(zip(items, scores))

    def on_a_cut(item) -> bool:
        if prefixes is None:
            return False
        for t, ((prefix, score), cut) in enumerate(zip(prefixes(item), cuts)):
            if t < len(kept) and near(score, cut) and (tuple(prefix) in kept[t]) == (item in missing):
                return True
        return False

    if all(near(ref[i] if i in ref else got[i], scores[-1]) or on_a_cut(i) for i in missing | extra):
        return "near-tie"
    return "wrong"


def classify_ordered(got_items: list[int], got_scores: list[float], items: list[int], scores: list[float],
                     cuts=(), prefixes=None, kept=(), item_score=None) -> str:
    """``exact``, ``near-tie`` or ``wrong`` for an answer whose order and scores are promised
    (the served beam search): ``got_items`` best first with ``got_scores``, against the exact
    top-K (``items``, ``scores``; -1 padding dropped). ``item_score(item)``: an item's true score
    in the reference's arithmetic, to check the scores of items the reference did not return;
    ``cuts``, ``prefixes``, ``kept``: as :func:`classify`. See the module docstring."""
    pairs = [(i, s) for i, s in zip(items, scores) if i >= 0]
    items, scores = [i for i, _ in pairs], [s for _, s in pairs]
    ref = dict(pairs)
    got = dict(zip(got_items, got_scores))
    if len(got) != len(got_items) or len(got_items) != len(items):
        return "wrong"  # a repeated item, or another number of items than the catalog allows
    if any(abs(got[i] - ref[i]) > SCORE_TOL for i in got if i in ref):
        return "wrong"  # a misreported score is never a tie
    if got_items == items:
        return "exact"
    if item_score is not None and any(abs(got[i] - item_score(i)) > SCORE_TOL for i in got if i not in ref):
        return "wrong"  # a stand-in item with a misreported score
    if classify(got, items, scores, cuts, prefixes, kept) == "wrong":
        return "wrong"
    # the items both hold: any two in the other order must tie in the reference
    common = [i for i in got_items if i in ref]
    for a in range(len(common)):
        for b in range(a + 1, len(common)):
            first, second = common[a], common[b]
            if ref[first] < ref[second] and not near(ref[first], ref[second]):
                return "wrong"
    return "near-tie"


class CutRecorder:
    """A :class:`decoding.BeamModel` around the reference model that records, per request and
    step, the beams the search kept (their token prefixes) and the lowest cumulative log-prob
    among them (the cut)."""

    def __init__(self, inner, num_beams: int):
        self.inner, self.K, self.cuts, self.kept = inner, num_beams, [], []

    def prefill(self, input_ids, attention_mask):
        logits = self.inner.prefill(input_ids, attention_mask)
        self._cum, self._logp = torch.zeros(logits.shape[0]), torch.log_softmax(logits.float(), -1)
        self._prefixes = [()] * logits.shape[0]
        return logits

    def step(self, beam_index, tokens):
        self._cum = self._cum[beam_index] + self._logp[beam_index, tokens]
        self._prefixes = [self._prefixes[r] + (t,) for r, t in zip(beam_index.tolist(), tokens.tolist())]
        self.cuts.append(self._cum.view(-1, self.K).min(dim=1).values)
        K = self.K
        self.kept.append([set(self._prefixes[b * K: (b + 1) * K]) for b in range(len(self._prefixes) // K)])
        logits = self.inner.step(beam_index, tokens)
        self._logp = torch.log_softmax(logits.float(), -1)
        return logits


class ExactReference:
    """``decoding.beam_search``'s top-K on the model in transformers (float32; scores are summed
    log-probs, ``length_penalty=0``) for ``prompts`` (``[B, T]``, or token lists of any lengths,
    searched one at a time), with the beams it kept and its cut at every step, to judge another
    engine's answers. ``seqs[item]``: the item's identifier tokens."""

    def __init__(self, model, prompts, trie, num_beams: int, seqs, batch: int = 16, exclude_items=None):
        from decoding.search.beam import beam_search
        from decoding.search.model import as_beam_model

        self.model, self.seqs = model, seqs
        rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
        same_length = len({len(r) for r in rows}) == 1
        step = batch if same_length else 1  # no padding: the reference's arithmetic is the plain model's
        self.prompts, self.items, self.cuts, self.kept = rows, [], [], []
        for i in range(0, len(rows), step):
            recorder = CutRecorder(as_beam_model(model), num_beams)
            exclude = None if exclude_items is None else exclude_items[i: i + step]
            out = beam_search(recorder, torch.tensor(rows[i: i + step]), None, trie=trie, num_beams=num_beams,
                              exclude_items=exclude)
            self.items += [(out.items[j].tolist(), out.scores[j].tolist()) for j in range(out.items.shape[0])]
            self.cuts += torch.stack(recorder.cuts, dim=1).tolist() if recorder.cuts else [[]] * out.items.shape[0]
            self.kept += [[kept[j] for kept in recorder.kept] for j in range(out.items.shape[0])]
        self._item_scores: dict[tuple[int, int], list[float]] = {}

    @torch.no_grad()
    def item_scores(self, b: int, item: int) -> list[float]:
        """The item's cumulative log-probs after each of its tokens, in transformers (one forward
        per request and item: its prefixes and its full score are both read from it)."""
        if (b, item) not in self._item_scores:
            tokens = [int(t) for t in self.seqs[item]]
            logits = self.model(torch.tensor([self.prompts[b] + tokens])).logits[0, -len(tokens) - 1: -1]
            steps = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
            self._item_scores[b, item] = steps.cumsum(0).tolist()
        return self._item_scores[b, item]

    def prefixes(self, b: int, item: int) -> list[tuple[tuple, float]]:
        """The item's prefixes after each of its tokens but the last, with their cumulative log-probs."""
        tokens = tuple(int(t) for t in self.seqs[item])
        return [(tokens[: t + 1], score) for t, score in enumerate(self.item_scores(b, item)[:-1])]

    def check(self, b: int, items: list[int], scores: list[float]) -> str:
        """Request ``b``'s answer (items best first, summed log-probs) by the contract's ordered
        rule (:func:`classify_ordered`)."""
        return classify_ordered(items, scores, *self.items[b], cuts=self.cuts[b], kept=self.kept[b],
                                prefixes=lambda i: self.prefixes(b, i),
                                item_score=lambda i: self.item_scores(b, i)[-1])

    def judge(self, answers) -> tuple[dict, list]:
        """``answers``: per request ``(items, scores)``, judged as item sets (:func:`classify`).
        Returns the share of exact, near-tie and wrong requests, and what differed in the first
        few that are not exact."""
        kinds, differences = [], []
        for b, (items, scores) in enumerate(answers):
            got = {i: s for i, s in zip(items, scores) if i >= 0}
            kinds.append(classify(got, *self.items[b], cuts=self.cuts[b], kept=self.kept[b],
                                  prefixes=lambda i, b=b: self.prefixes(b, i)))
            if kinds[-1] != "exact" and len(differences) < 8:  # what differs, for a reader to judge
                ref = dict(zip(*self.items[b]))
                differences.append({"request": b, "kind": kinds[-1], "kth_score": self.items[b][1][-1],
                                    "missing": {i: ref[i] for i in set(ref) - set(got)},
                                    "extra": {i: got[i] for i in set(got) - set(ref)}})
        n = max(len(answers), 1)
        return {k: kinds.count(k) / n for k in ("exact", "near-tie", "wrong")}, differences
