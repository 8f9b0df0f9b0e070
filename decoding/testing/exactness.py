"""The judge of the exactness contract (docs/exactness.md) for an engine other than transformers:
its top-K against :func:`decoding.beam_search`'s on the same weights in transformers (float32).

- **exact**: the same items in the same order, each score within :data:`SCORE_TOL`;
- **near-tie**: the answer differs only where two engines' float32 rounding decides: items whose
  reference scores lie within :data:`NEAR_TIE` (relative) of each other come in the other order,
  or an item stands in for another where every differing item scores within :data:`NEAR_TIE` of
  the K-th score, or its prefix scored within it of the beam cut at some step (the lowest score
  among the beams the reference kept; the subtree below survives in one engine and not the
  other); the items both answers hold still carry the reference's scores;
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


def classify(got: dict, items: list[int], scores: list[float], cuts=(), prefix_scores=None) -> str:
    """``exact``, ``near-tie`` or ``wrong`` as item sets: ``got`` ({item: score}) against the
    exact top-K (``items``, ``scores`` best first). A near-tie: every differing item scores
    within :data:`NEAR_TIE` of the K-th score, or at some step its prefix scores (in the
    reference's arithmetic, ``prefix_scores(item) -> [score after step 1, ...]``) within it of
    the score at which the reference cut its beams that step (``cuts``)."""
    missing, extra = set(items) - set(got), set(got) - set(items)
    if not missing and not extra:
        return "exact"
    ref = dict(zip(items, scores))
    if all(near(ref[i] if i in ref else got[i], scores[-1]) for i in missing | extra):
        return "near-tie"
    if prefix_scores is not None and all(
            any(near(s, cut) for s, cut in zip(prefix_scores(i), cuts)) for i in missing | extra):
        return "near-tie"
    return "wrong"


def classify_ordered(got_items: list[int], got_scores: list[float], items: list[int], scores: list[float],
                     cuts=(), prefix_scores=None) -> str:
    """``exact``, ``near-tie`` or ``wrong`` for an answer whose order and scores are promised
    (the served beam search): ``got_items`` best first with ``got_scores``, against the exact
    top-K (``items``, ``scores``; -1 padding dropped). See the module docstring."""
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
    if classify(got, items, scores, cuts, prefix_scores) == "wrong":
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
    step, the lowest cumulative log-prob among the beams the search kept (its cut)."""

    def __init__(self, inner, num_beams: int):
        self.inner, self.K, self.cuts = inner, num_beams, []

    def prefill(self, input_ids, attention_mask):
        logits = self.inner.prefill(input_ids, attention_mask)
        self._cum, self._logp = torch.zeros(logits.shape[0]), torch.log_softmax(logits.float(), -1)
        return logits

    def step(self, beam_index, tokens):
        self._cum = self._cum[beam_index] + self._logp[beam_index, tokens]
        self.cuts.append(self._cum.view(-1, self.K).min(dim=1).values)
        logits = self.inner.step(beam_index, tokens)
        self._logp = torch.log_softmax(logits.float(), -1)
        return logits


class ExactReference:
    """``decoding.beam_search``'s top-K on the model in transformers (float32; scores are summed
    log-probs, ``length_penalty=0``) for ``prompts`` (``[B, T]``, or token lists of any lengths,
    searched one at a time), with the beam cut of every step, to judge another engine's answers.
    ``seqs[item]``: the item's identifier tokens."""

    def __init__(self, model, prompts, trie, num_beams: int, seqs, batch: int = 16, exclude_items=None):
        from decoding.search.beam import beam_search
        from decoding.search.model import as_beam_model

        self.model, self.seqs = model, seqs
        rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
        same_length = len({len(r) for r in rows}) == 1
        step = batch if same_length else 1  # no padding: the reference's arithmetic is the plain model's
        self.prompts, self.items, self.cuts = rows, [], []
        for i in range(0, len(rows), step):
            recorder = CutRecorder(as_beam_model(model), num_beams)
            exclude = None if exclude_items is None else exclude_items[i: i + step]
            out = beam_search(recorder, torch.tensor(rows[i: i + step]), None, trie=trie, num_beams=num_beams,
                              exclude_items=exclude)
            self.items += [(out.items[j].tolist(), out.scores[j].tolist()) for j in range(out.items.shape[0])]
            self.cuts += torch.stack(recorder.cuts, dim=1).tolist()
        self.sets = [set(items) for items, _ in self.items]

    @torch.no_grad()
    def prefix_scores(self, b: int, item: int) -> list[float]:
        """The item's cumulative log-probs after each of its tokens but the last, in transformers."""
        tokens = [int(t) for t in self.seqs[item]]
        logits = self.model(torch.tensor([self.prompts[b] + tokens])).logits[0, -len(tokens) - 1: -1]
        steps = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        return steps.cumsum(0)[:-1].tolist()

    def check(self, b: int, items: list[int], scores: list[float]) -> str:
        """Request ``b``'s answer (items best first, summed log-probs) by the contract's ordered
        rule (:func:`classify_ordered`)."""
        return classify_ordered(items, scores, *self.items[b], cuts=self.cuts[b],
                                prefix_scores=lambda i: self.prefix_scores(b, i))

    def judge(self, answers) -> tuple[dict, list]:
        """``answers``: per request ``(items, scores)``, judged as item sets (:func:`classify`).
        Returns the share of exact, near-tie and wrong requests, and what differed in the first
        few that are not exact."""
        kinds, differences = [], []
        for b, (items, scores) in enumerate(answers):
            got = {i: s for i, s in zip(items, scores) if i >= 0}
            kinds.append(classify(got, *self.items[b], cuts=self.cuts[b],
                                  prefix_scores=lambda i, b=b: self.prefix_scores(b, i)))
            if kinds[-1] != "exact" and len(differences) < 8:  # what differs, for a reader to judge
                ref = dict(zip(*self.items[b]))
                differences.append({"request": b, "kind": kinds[-1], "kth_score": self.items[b][1][-1],
                                    "missing": {i: ref[i] for i in set(ref) - set(got)},
                                    "extra": {i: got[i] for i in set(got) - set(ref)}})
        n = max(len(answers), 1)
        return {k: kinds.count(k) / n for k in ("exact", "near-tie", "wrong")}, differences
