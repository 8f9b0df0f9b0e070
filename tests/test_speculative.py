"""Speculative beam search: strict N-to-K verification against the target's own beam search;
relaxed (sampling) verification against the distribution it claims to sample."""

from __future__ import annotations

import math

import pytest
import torch
from test_verify import chi_square_p_value

from conftest import SID_VOCAB, TITLE_VOCAB, prompts
from decoding import ItemTrie, beam_search, speculative_beam_search
from decoding import testing as bm


@pytest.fixture(scope="module")
def drafts():
    return {"small": bm.tiny_llama(SID_VOCAB, hidden_size=32, layers=1, heads=2, seed=21),
            "other": bm.tiny_llama(SID_VOCAB, hidden_size=64, layers=2, heads=2, seed=22)}


@pytest.mark.parametrize("draft_steps", [1, 3])
@pytest.mark.parametrize("num_beams, drafts_per_beam", [(1, 1), (1, 2), (5, 1), (5, 2), (20, 1), (20, 2)])
def test_strict_mode_equals_target_beam_search(sid_catalog, sid_models, drafts, num_beams, drafts_per_beam,
                                               draft_steps):
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=4, seed=num_beams + draft_steps)
    ref = beam_search(target, ids, mask, trie=trie, num_beams=num_beams)
    for draft in (drafts["small"], drafts["other"], target):
        got = speculative_beam_search(target, draft, ids, mask, trie=trie, num_beams=num_beams,
                                      num_drafts=drafts_per_beam * num_beams, draft_steps=draft_steps)
        assert torch.equal(got.items, ref.items)
        assert torch.equal(got.sequences, ref.sequences)
        assert torch.allclose(got.scores, ref.scores, atol=1e-4)
        s = got.stats
        assert s.rounds == len(s.accepted_levels) == len(s.drafted_levels) >= 1
        assert s.target_forwards <= 1 + s.rounds and s.draft_forwards >= 1
        # every request advances accepted + 1 levels per round until it has trie.depth tokens
        for b in range(ids.shape[0]):
            assert sum(r[b] + 1 for r in s.accepted_levels if r[b] >= 0) == trie.depth


@pytest.mark.parametrize("mode", ["strict", "relaxed"])
def test_tree_attention_op_gives_the_same_results(sid_catalog, sid_models, drafts, mode):
    """Both models on decoding.ops.tree_attention instead of their own attention: same beams."""
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=3, seed=6)
    kwargs = dict(trie=trie, num_beams=5, num_drafts=10, draft_steps=3, mode=mode, seed=4)
    ref = speculative_beam_search(target, drafts["other"], ids, mask, **kwargs)
    got = speculative_beam_search(target, drafts["other"], ids, mask, tree_attention="op", **kwargs)
    assert torch.equal(got.items, ref.items)
    assert torch.allclose(got.scores, ref.scores, atol=1e-4)
    assert got.stats.accepted_levels == ref.stats.accepted_levels


def test_draft_equal_to_target_accepts_and_saves_target_forwards(sid_catalog, sid_models):
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=3, seed=5)
    got = speculative_beam_search(target, target, ids, mask, trie=trie, num_beams=1, num_drafts=1, draft_steps=3)
    # greedy with the draft equal to the target: all 3 drafted levels accepted, one round
    assert got.stats.rounds == 1 and got.stats.accepted_levels == [[3, 3, 3]]
    assert got.stats.target_forwards == 2  # prefill + one verification forward, vs 4 for beam search
    assert got.stats.acceptance_rate == 1.0


def test_strict_mode_with_excluded_items_and_tiny_catalog(sid_models, drafts):
    target = sid_models["llama"]
    seqs = bm.random_semantic_ids(30, levels=4, codes=256, seed=9)
    trie = ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)
    ids, mask = prompts(SID_VOCAB, batch=3, seed=1)
    exclude = [[0, 1, 2], [], list(range(5, 25))]
    ref = beam_search(target, ids, mask, trie=trie, num_beams=12, exclude_items=exclude)
    got = speculative_beam_search(target, drafts["small"], ids, mask, trie=trie, num_beams=12, num_drafts=24,
                                  draft_steps=3, exclude_items=exclude)
    assert torch.equal(got.items, ref.items)  # the third request has only 10 items left: -1 padded
    assert (got.items[2] == -1).sum() == 2
    assert torch.allclose(got.scores[got.scores > float("-inf")], ref.scores[ref.scores > float("-inf")], atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_drafts": 2}, ValueError, "num_drafts: must be at least"),
    ({"draft_steps": 0}, ValueError, "draft_steps"),
    ({"mode": "fast"}, ValueError, "mode"),
    ({"mode": "relaxed", "seed": -3}, ValueError, "seed"),
    ({"num_beams": 0}, ValueError, "num_beams"),
])
def test_bad_arguments_are_rejected(sid_catalog, sid_models, kwargs, error, match):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2)
    args = dict(trie=trie, num_beams=4, num_drafts=8, draft_steps=2) | kwargs
    with pytest.raises(error, match=match):
        speculative_beam_search(sid_models["llama"], sid_models["llama"], ids, mask, **args)


def test_models_and_catalogs_it_cannot_serve_are_rejected(sid_catalog, sid_models, title_catalog, title_models):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2)
    with pytest.raises(ValueError, match="fixed-length"):
        speculative_beam_search(title_models["llama"], title_models["llama"], *prompts(TITLE_VOCAB, batch=2),
                                trie=title_catalog[1], num_beams=2, num_drafts=2, draft_steps=1)
    with pytest.raises(ValueError, match="draft: vocabulary"):
        speculative_beam_search(sid_models["llama"], title_models["llama"], ids, mask, trie=trie, num_beams=2,
                                num_drafts=2, draft_steps=1)
    with pytest.raises(ValueError, match="target: the tree layout supports decoder-only"):
        speculative_beam_search(sid_models["t5"], sid_models["llama"], ids, mask, trie=trie, num_beams=2,
                                num_drafts=2, draft_steps=1)


# ---------------------------------------------------------------- relaxed mode

def sharp_llama(vocab, seed, scale):
    """A random Llama whose next-token distributions are far from uniform (scaled output layer),
    so that a target and a draft sample visibly different items."""
    model = bm.tiny_llama(vocab, hidden_size=32, layers=1, heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def ancestral_distribution(model, prompt, trie, seqs):
    """Exact probability of each item under trie-constrained ancestral sampling: per level, the
    model's next-token probabilities renormalised over the node's children (plain forwards)."""
    probs = torch.zeros(trie.num_items, dtype=torch.float64)
    indptr, tokens = trie.indptr.tolist(), trie.node_token.tolist()
    for item in range(trie.num_items):
        seq = [int(t) for t in seqs[item]]
        ids = torch.tensor([prompt + seq])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        node, total = 0, 0.0
        for level, token in enumerate(seq):
            kids = list(range(indptr[node] + 1, indptr[node + 1] + 1))
            lp = logp[len(prompt) - 1 + level]
            child = next(c for c in kids if tokens[c] == token)
            total += float(lp[token] - torch.logsumexp(lp[[tokens[c] for c in kids]], 0))
            node = child
        probs[item] = math.exp(total)
    return probs


@pytest.mark.parametrize("draft_steps", [1, 3])
def test_relaxed_one_beam_samples_trie_constrained_ancestral_sampling(draft_steps):
    """With K = N = 1, relaxed verification is speculative sampling, so the items it returns are
    distributed exactly as trie-constrained ancestral sampling from the target (chi-square over
    3,000 requests, seeded). The draft samples a different distribution, and the same test
    rejects it: the check has power."""
    vocab = bm.sid_vocab_size(3, 4)
    seqs = bm.random_semantic_ids(24, levels=3, codes=4, seed=2)
    trie = ItemTrie.from_sequences(seqs, vocab_size=vocab)
    target, draft = sharp_llama(vocab, 1, 6.0), sharp_llama(vocab, 2, 6.0)
    prompt = [1, 5, 9, 4]
    R = 3000
    ids = torch.tensor([prompt] * R)
    got = speculative_beam_search(target, draft, ids, trie=trie, num_beams=1, num_drafts=1, draft_steps=draft_steps,
                                  mode="relaxed", seed=7)
    assert 0.05 < got.stats.acceptance_rate < 0.95  # drafts are neither all accepted nor all rejected
    counts = torch.bincount(got.items[:, 0], minlength=trie.num_items).double()
    p_target = ancestral_distribution(target, prompt, trie, seqs)
    p_draft = ancestral_distribution(draft, prompt, trie, seqs)
    assert chi_square_p_value(counts, p_target) > 1e-3
    assert chi_square_p_value(counts, p_draft) < 1e-6
    # scores are the target's log-probabilities of the sampled identifiers (full-vocabulary softmax)
    item = int(got.items[0, 0])
    seq = [int(t) for t in seqs[item]]
    with torch.no_grad():
        logp = torch.log_softmax(target(torch.tensor([prompt + seq])).logits[0], -1)
    expect = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
    assert abs(float(got.scores[0, 0]) - expect) < 1e-4


@pytest.mark.parametrize("num_beams, num_drafts", [(1, 1), (5, 5), (5, 10), (20, 40)])
def test_relaxed_with_draft_equal_to_target_accepts_every_level(sid_catalog, sid_models, num_beams, num_drafts):
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=3, seed=4)
    got = speculative_beam_search(target, target, ids, mask, trie=trie, num_beams=num_beams, num_drafts=num_drafts,
                                  draft_steps=3, mode="relaxed", seed=1)
    assert got.stats.rounds == 1 and got.stats.accepted_levels == [[3, 3, 3]]
    assert got.stats.acceptance_rate == 1.0 and got.stats.target_forwards == 2
    assert_valid_sorted_beams(got, trie, num_beams)


def assert_valid_sorted_beams(out, trie, K):
    items = out.items
    assert (items >= 0).all() and (items < trie.num_items).all()
    for row in items.tolist():
        assert len(set(row)) == K
    assert torch.equal(trie.lookup(out.sequences.reshape(-1, trie.depth)).view(items.shape), items)
    assert (out.scores.diff(dim=1) <= 0).all()


def test_relaxed_is_reproducible_and_valid(sid_catalog, sid_models, drafts):
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=4, seed=8)
    kwargs = dict(trie=trie, num_beams=5, num_drafts=10, draft_steps=2, mode="relaxed")
    a = speculative_beam_search(target, drafts["small"], ids, mask, seed=11, **kwargs)
    b = speculative_beam_search(target, drafts["small"], ids, mask, seed=11, **kwargs)
    c = speculative_beam_search(target, drafts["small"], ids, mask, seed=12, **kwargs)
    assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.items, c.items)
    assert_valid_sorted_beams(a, trie, 5)
    torch.manual_seed(0)
    d = speculative_beam_search(target, drafts["small"], ids, mask, **kwargs)
    torch.manual_seed(0)
    e = speculative_beam_search(target, drafts["small"], ids, mask, **kwargs)
    assert torch.equal(d.items, e.items)
    # wider beams: residual draws whose support runs out are completed from p (no -1 items)
    wide = speculative_beam_search(target, drafts["small"], ids, mask, seed=2, trie=trie, num_beams=20,
                                   num_drafts=40, draft_steps=3, mode="relaxed")
    assert_valid_sorted_beams(wide, trie, 20)
    # excluded items never come back
    excl = [a.items[0].tolist(), [], [], []]
    f = speculative_beam_search(target, drafts["small"], ids, mask, seed=11, exclude_items=excl, **kwargs)
    assert not set(f.items[0].tolist()) & set(excl[0])


@pytest.mark.parametrize("mode", ["strict", "relaxed"])
@pytest.mark.parametrize("max_batch_size", [1, 3, 4, 7, 100])
def test_finished_requests_retire_and_waiting_ones_are_admitted(sid_catalog, sid_models, drafts, max_batch_size,
                                                                mode):
    """Every target forward runs only requests in flight (at most max_batch_size, finished ones
    retired); strict results are still exactly beam_search's, relaxed ones valid and reproducible."""
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=7, seed=11)
    exclude = [[0, 1], [], [5], [], [2, 3, 4], [], [9]]
    kwargs = dict(trie=trie, num_beams=5, num_drafts=10, draft_steps=2, mode=mode, seed=3, exclude_items=exclude,
                  max_batch_size=max_batch_size)
    widths, prefills = [], []  # batch of every target forward; of the prefills (2-D masks) only

    def record(module, args, kw):
        widths.append(kw["input_ids"].shape[0])
        if kw["attention_mask"].dim() == 2:
            prefills.append(kw["input_ids"].shape[0])

    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = speculative_beam_search(target, drafts["small"], ids, mask, **kwargs)
    finally:
        hook.remove()
    s = got.stats
    assert len(widths) == s.target_forwards == s.admissions + s.rounds
    assert max(widths) <= max_batch_size
    assert s.admissions == len(prefills) and sum(prefills) == 7
    assert s.admissions >= -(-7 // max_batch_size) and prefills[0] == min(7, max_batch_size)
    # later admissions wait for half a batch of free slots (or take the last waiting requests)
    assert all(p >= (max_batch_size + 1) // 2 for p in prefills[1:-1])
    # prefills run each prompt once; each round's forward runs exactly the requests still live
    assert sum(widths) == 7 + sum(sum(a >= 0 for a in r) for r in s.accepted_levels)
    for b in range(7):
        assert sum(r[b] + 1 for r in s.accepted_levels if r[b] >= 0) == trie.depth
    if mode == "strict":
        ref = beam_search(target, ids, mask, trie=trie, num_beams=5, exclude_items=exclude)
        assert torch.equal(got.items, ref.items)
        assert torch.equal(got.sequences, ref.sequences)
        assert torch.allclose(got.scores, ref.scores, atol=1e-4)
    else:
        again = speculative_beam_search(target, drafts["small"], ids, mask, **kwargs)
        assert torch.equal(again.items, got.items)
        for b, row in enumerate(got.items.tolist()):
            assert all(0 <= i < trie.num_items and i not in exclude[b] for i in row) and len(set(row)) == 5


def test_max_batch_size_is_checked(sid_catalog, sid_models):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        speculative_beam_search(sid_models["llama"], sid_models["llama"], ids, mask, trie=trie, num_beams=2,
                                num_drafts=2, draft_steps=1, max_batch_size=0)


def test_the_loop_is_driven_round_by_round_by_its_caller(sid_catalog, sid_models, drafts):
    """speculative_loop yields one Round per round (the requests in flight, levels drafted and
    accepted, the requests that finished) and returns what speculative_beam_search returns."""
    from decoding.speculative.batching import BatchedTreeModel
    from decoding.speculative.search import AdmissionPolicy, SpeculativeSearch, speculative_loop

    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=5, seed=8)
    ref = speculative_beam_search(target, drafts["other"], ids, mask, trie=trie, num_beams=5, num_drafts=10,
                                  draft_steps=2, max_batch_size=3)
    search = SpeculativeSearch(BatchedTreeModel(target), BatchedTreeModel(drafts["other"]), ids, mask, trie=trie,
                               num_beams=5, num_drafts=10, draft_steps=2, mode="strict",
                               excluded=None, backend="torch", generator=None, policy=AdmissionPolicy(3))
    rounds, finished = [], []
    with torch.inference_mode():
        loop = speculative_loop(search)
        try:
            while True:
                report = next(loop)
                assert report.requests.numel() <= 3  # the policy's capacity
                assert torch.equal(report.accepted, torch.tensor(
                    [search.stats.accepted_levels[-1][r] for r in report.requests.tolist()]))
                rounds.append(report)
                finished += report.finished.tolist()
        except StopIteration as done:
            got = done.value
    assert sorted(finished) == list(range(5)) and len(rounds) == got.stats.rounds == ref.stats.rounds
    assert torch.equal(got.items, ref.items) and torch.allclose(got.scores, ref.scores)
    assert got.stats.accepted_levels == ref.stats.accepted_levels


@pytest.mark.parametrize("live, waiting, admitted", [(0, 5, 4), (0, 2, 2), (3, 5, 0), (2, 5, 2), (1, 1, 1),
                                                     (4, 3, 0), (0, 0, 0)])
def test_admission_policy_admits_once_half_the_slots_are_free(live, waiting, admitted):
    from decoding.speculative.search import AdmissionPolicy

    assert AdmissionPolicy(4).admit(live, waiting) == admitted


def test_a_truncated_draft_is_the_targets_first_layers_and_leaves_the_target_alone(sid_models):
    import copy

    from decoding.speculative.draft import truncated_draft

    target = sid_models["llama"]
    layers = len(target.model.layers)
    draft = truncated_draft(target, 1)
    ref = copy.deepcopy(target)  # the plain way: a copy with its upper layers cut
    ref.model.layers = ref.model.layers[:1]
    ref.config.num_hidden_layers = 1
    ids = torch.randint(0, SID_VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, ref(ids).logits)
    # as a search runs it: the shared-prefix cache and the tree-attention op dispatch on the
    # draft's own config, which its layers must hold
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(300, seed=9), vocab_size=SID_VOCAB)
    ids, mask = prompts(SID_VOCAB, batch=3, seed=4)
    assert torch.equal(beam_search(draft, ids, mask, trie=trie, num_beams=5).items,
                       beam_search(ref, ids, mask, trie=trie, num_beams=5).items)
    fast = speculative_beam_search(target, draft, ids, mask, trie=trie, num_beams=5, num_drafts=8, draft_steps=2,
                                   tree_attention="op")
    assert torch.equal(fast.items, beam_search(target, ids, mask, trie=trie, num_beams=5).items)
    assert len(target.model.layers) == layers and target.config.num_hidden_layers == layers
    assert draft.lm_head.weight is target.lm_head.weight and draft.config.num_hidden_layers == 1
    assert draft.model.layers[0].self_attn.config is draft.config
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    for bad in (0, layers + 1, True):
        with pytest.raises(ValueError, match="layers: expected an int"):
            truncated_draft(target, bad)
    with pytest.raises(ValueError, match="no decoder layers"):
        truncated_draft(sid_models["t5"], 1)
