"""Speculative beam search (strict N-to-K verification) against the target's own beam search."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, TITLE_VOCAB, prompts
from decoding import ItemTrie, beam_search, speculative_beam_search
from decoding.bench import models as bm
from decoding.search.speculative import is_fixed_length


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


def test_fixed_length_check(sid_catalog, title_catalog):
    assert is_fixed_length(sid_catalog[1])
    assert not is_fixed_length(title_catalog[1])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_drafts": 2}, ValueError, "num_drafts: must be at least"),
    ({"draft_steps": 0}, ValueError, "draft_steps"),
    ({"mode": "fast"}, ValueError, "mode"),
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
