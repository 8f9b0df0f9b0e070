"""The vLLM drivers' request plan (``decoding.integrations.vllm.rows``), without an engine: rows ask
for O(children) log-probs, and a search fed only those answers equals ``decoding.beam_search``
with the whole vocabulary, whether the top-N answers decide the wide rows (a model that ranks
identifier tokens first) or fall back by id (random weights), with exclusions and EOS catalogs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import need
from decoding import ItemTrie, beam_search
from decoding import testing as bm

# the plan imports no vLLM, but lives in the vLLM integration, whose package needs vLLM installed
need("vllm")
from decoding.integrations.vllm.rows import (  # noqa: E402
    MAX_TOKEN_IDS_PER_REQUEST,
    SMALL_VOCAB,
    BeamRows,
    top_n_for,
)


class Scored:  # what the engine returns for one request (as _compat.Scored)
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = np.asarray(token_ids, dtype=np.int64), np.asarray(logprobs, np.float32)


class HashedModel:
    """Log-probs that depend only on the token sequence (a fixed random function of it): the same
    row whether a BeamModel asks or an engine request does. ``boost`` lifts the codes of the next
    identifier level (level ``l`` is ``first_code + l*256 ...``), as a trained recommender ranks them."""

    def __init__(self, vocab: int, first_code: int, boost: float, seed: int = 0):
        self.vocab, self.first_code, self.boost, self.seed = vocab, first_code, boost, seed

    def row(self, tokens) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, tuple(tokens))) % (2**62))
        logits = torch.randn(self.vocab, generator=g) * 3
        last = tokens[-1] - self.first_code
        level = last // 256 + 1 if 0 <= last < 4 * 256 else 0
        start = self.first_code + 256 * level
        logits[start: start + 256] += self.boost
        return torch.log_softmax(logits, -1)

    # the BeamModel protocol, for decoding.beam_search (the reference)
    def prefill(self, input_ids, attention_mask):
        self._rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
        return torch.stack([self.row(r) for r in self._rows])

    def step(self, beam_index, tokens):
        self._rows = [self._rows[i] + [t] for i, t in zip(beam_index.tolist(), tokens.tolist())]
        return torch.stack([self.row(r) for r in self._rows])

    def answer(self, request) -> Scored:
        """What vLLM returns for one ScoreRequest: the sampled (argmax) token first, then the asked ids
        or the top-N."""
        row = self.row(request.prompt)
        top = int(row.argmax())
        if request.token_ids is not None:
            ids = [top, *request.token_ids]
        else:
            ids = [top, *torch.topk(row, request.top_n).indices.tolist()]
        return Scored(ids, row[ids].numpy())


def run_rows(model, trie, prompts, num_beams, *, max_logprobs, exclude=None):
    """decoding's search fed only what BeamRows asks of an engine; returns (output, stats, requests)."""
    keep = 2 * num_beams if trie.eos_token_id is not None else num_beams
    excluded = trie.excluded_ranks(exclude, len(prompts)) if exclude is not None else None
    book = BeamRows(trie, prompts, model.vocab, keep=keep, max_logprobs=max_logprobs, excluded=excluded)
    asked = []

    def score():
        requests = book.requests()
        answers = [model.answer(r) for r in requests]
        more = book.followups(requests, answers)
        requests, answers = requests + more, answers + [model.answer(r) for r in more]
        asked.extend(requests)
        return book.logits(requests, answers)

    def checked_score():
        logits = score()
        assert logits.shape[1] == book.search_trie.vocab_size < trie.vocab_size  # rows are catalog tokens only
        return logits

    out = book.search(checked_score, num_beams=num_beams, exclude_items=exclude, backend="torch")
    return out, book.stats, asked


def reference(model, trie, prompts, num_beams, exclude=None):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return beam_search(model, ids, mask, trie=trie, num_beams=num_beams, normalize="none", exclude_items=exclude,
                       backend="torch")


SID = bm.SPECIAL_TOKENS
TEXT = 6000  # a text vocabulary before the semantic-ID codes: above SMALL_VOCAB, so wide rows ask the top-N


def sid_catalog(n=6000, seed=3):
    return ItemTrie.from_sequences(bm.random_semantic_ids(n, seed=seed) + TEXT, vocab_size=TEXT + SID + 4 * 256)


@pytest.mark.parametrize("boost", [0.0, 12.0], ids=["random-weights", "ranks-identifiers-first"])
@pytest.mark.parametrize("num_beams", [1, 5, 20])
def test_rows_answers_give_the_exact_search(boost, num_beams):
    trie = sid_catalog(60_000)  # some second-level nodes are wide too
    model = HashedModel(trie.vocab_size, TEXT + SID, boost, seed=num_beams)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [13]]
    history = [[0, 1, 2], [], list(range(40, 200))]
    got, stats, asked = run_rows(model, trie, prompts, num_beams, max_logprobs=-1, exclude=history)
    ref = reference(model, trie, prompts, num_beams, exclude=history)
    assert torch.equal(got.items, ref.items) and torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.scores, ref.scores, atol=1e-5)
    # O(children): never the vocabulary; at most 128 ids or 2K top-N per request
    assert all((r.token_ids is not None and len(r.token_ids) <= MAX_TOKEN_IDS_PER_REQUEST)
               or (r.token_ids is None and r.top_n == 2 * num_beams) for r in asked)
    assert stats.logprobs <= len(asked) * (MAX_TOKEN_IDS_PER_REQUEST + 1)
    assert stats.wide_rows > 0 and stats.top_n_rows >= 1
    if boost:  # the top-N decides (nearly) every wide row
        assert stats.top_n_rows == stats.wide_rows and stats.fallback_rows <= stats.top_n_rows // 3
    else:  # random weights: the roots fall back, and the search asks its later wide rows by id
        assert stats.fallback_rows == stats.top_n_rows == len(prompts) < stats.wide_rows


def test_rows_with_eos_terminated_identifiers_keep_twice_the_beams():
    eos = 2
    seqs = bm.random_title_ids(3000, TEXT + 400, eos, min_len=1, max_len=4, seed=4)
    trie = ItemTrie.from_sequences(seqs, vocab_size=TEXT + 400, eos_token_id=eos)
    model = HashedModel(trie.vocab_size, 0, 0.0, seed=7)
    prompts = [[5, 6, 7], [8]]
    got, _, asked = run_rows(model, trie, prompts, 4, max_logprobs=-1)
    ref = reference(model, trie, prompts, 4)
    assert torch.equal(got.items, ref.items) and torch.allclose(got.scores, ref.scores, atol=1e-5)
    assert {r.top_n for r in asked if r.token_ids is None} <= {16}


def test_small_vocabulary_asks_wide_rows_once_and_engine_caps_are_honoured():
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(6000, seed=3), vocab_size=bm.sid_vocab_size(4, 256))
    assert trie.vocab_size <= SMALL_VOCAB
    model = HashedModel(trie.vocab_size, SID, 0.0)
    got, stats, asked = run_rows(model, trie, [[5, 6, 7]], 5, max_logprobs=-1)
    assert torch.equal(got.items, reference(model, trie, [[5, 6, 7]], 5).items)
    assert stats.fallback_rows == 0 and all(r.top_n in (None, trie.vocab_size) for r in asked)
    # an engine that allows fewer top log-probs than the search keeps: wide rows ask by id (exact all the same)
    assert top_n_for(5, trie.vocab_size, 20) == (10, False) and top_n_for(20, trie.vocab_size, 10) == (0, False)
    got, stats, asked = run_rows(model, trie, [[5, 6, 7]], 20, max_logprobs=10)
    assert torch.equal(got.items, reference(model, trie, [[5, 6, 7]], 20).items)
    assert all(r.token_ids is not None for r in asked)


def test_padding_in_an_answer_never_overwrites_a_value_and_other_tokens_are_dropped():
    trie = ItemTrie.from_sequences([[0, 3], [1, 3]], vocab_size=8)
    book = BeamRows(trie, [[5]], 8, keep=1, max_logprobs=-1)
    (request,) = book.requests()
    assert request.token_ids == [0, 1] and book.real_tokens.tolist() == [0, 1, 3]
    # the engine pads its answer rows with token 0 at -inf after the real entries; 6 is no catalog token
    logits = book.logits([request], [Scored([1, 0, 1, 6, 0], [-0.5, -1.5, -0.5, -0.1, -np.inf])])
    assert logits.tolist() == [[-1.5, -0.5, -np.inf]]


def test_a_legacy_engine_asks_nodes_of_up_to_4096_children_in_one_request():
    trie = sid_catalog(60_000)
    model = HashedModel(trie.vocab_size, TEXT + SID, 0.0)
    keep = 5
    book = BeamRows(trie, [[5, 6, 7]], trie.vocab_size, keep=keep, max_logprobs=-1, max_ids=4096)
    (request,) = book.requests()  # the root's 256 children, by id, in one request
    assert len(request.token_ids) == trie.max_branch_at(0) == 256
    got, stats, asked = run_rows(model, trie, [[5, 6, 7]], keep, max_logprobs=-1)
    assert torch.equal(got.items, reference(model, trie, [[5, 6, 7]], keep).items)


class TiedBook:
    """A book whose nodes' children hold ties: ``children_of`` as :class:`BeamRows` answers it
    (each node's children ids in the trie's order, their log-probs); three levels, the first three
    children of each node have children of their own."""

    def __init__(self, seed=0):
        g = np.random.default_rng(seed)
        self.rows, frontier = {}, [()]
        for _ in range(3):
            nxt = []
            for prefix in frontier:
                ids = np.sort(g.choice(1000, size=9, replace=False)).astype(np.int64)
                values = g.choice([-1.0, -2.5, -0.25], size=9).astype(np.float32)  # many ties
                self.rows[prefix] = (ids, values)
                nxt += [prefix + (int(t),) for t in ids[:3]]
            frontier = nxt

    def children_of(self, request, prefix):
        return self.rows[tuple(prefix)]


def test_choice_logprobs_rank_each_token_among_its_siblings_ties_in_trie_order():
    """The per-token log-probs of a beam answer: the chosen token's value and rank (1 = best,
    ties broken by the trie's order, as a stable sort of the children would), then the best
    ``alternatives`` other children, best first."""
    from decoding.integrations.vllm.serving import _choice_logprobs

    book = TiedBook()

    def expected(tokens, alternatives):
        out = []
        for t, token in enumerate(tokens):
            ids, values = book.children_of(0, tokens[:t])
            children = dict(zip(ids.tolist(), values.tolist()))
            order = sorted(children, key=children.__getitem__, reverse=True)  # stable: trie order on ties
            rank = {tok: r + 1 for r, tok in enumerate(order)}
            step = [(token, children[token], rank[token])]
            step += [(tok, children[tok], rank[tok]) for tok in order if tok != token][:alternatives]
            out.append(step)
        return out

    g = np.random.default_rng(1)
    for alternatives in (0, 1, 4, 20):
        ranked = {}
        for _ in range(20):
            tokens = []
            for d in range(3):
                ids, _ = book.children_of(0, tokens)
                tokens.append(int(ids[g.integers(3)]))
            assert _choice_logprobs(book, 0, tokens, alternatives, ranked) == expected(tokens, alternatives)
