"""align_draft: a mini-batched loop with one optimiser over a data set of prompts, reproducible,
reporting the loss and, on validation prompts, strict acceptance before and after."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, prompts
from decoding import testing as bm
from decoding.speculative import align_draft


def fresh_draft():
    return bm.tiny_llama(SID_VOCAB, hidden_size=32, layers=1, heads=2, seed=21)


@pytest.mark.parametrize("loss", ["strict", "relaxed"])
def test_alignment_lowers_the_loss_over_mini_batches(sid_catalog, sid_models, loss):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=6, seed=7)
    logs = []
    result = align_draft(fresh_draft(), sid_models["llama"], trie, ids, mask, num_beams=4, epochs=3, batch_size=2,
                         lr=3e-3, loss=loss, log=logs.append)
    before, after = result  # unpacks as the pair it always was
    assert after < before
    assert len(result.losses) == 3 and logs[-1].startswith("  align: 9/9 steps")  # 3 mini-batches x 3 epochs
    assert result.acceptance_before is None


def test_steps_are_exact_the_run_reproducible_and_validation_acceptance_reported(sid_catalog, sid_models):
    _, trie = sid_catalog
    target = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=5, seed=8)
    valid = prompts(SID_VOCAB, batch=3, seed=9)
    logs = []
    a, b = fresh_draft(), fresh_draft()
    result = align_draft(a, target, trie, ids, mask, num_beams=3, steps=4, batch_size=2, lr=3e-3, validation=valid,
                         seed=5, log=logs.append)
    align_draft(b, target, trie, ids, mask, num_beams=3, steps=4, batch_size=2, lr=3e-3, seed=5, log=lambda m: None)
    assert logs[-1].startswith("  align: 4/4 steps")  # 3 mini-batches: one epoch and one step of the next
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert 0.0 <= result.acceptance_before <= 1.0 and 0.0 <= result.acceptance_after <= 1.0
    assert not any(p.requires_grad and p.grad is None for p in a.parameters())  # it trained


def test_bad_arguments(sid_catalog, sid_models):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2, seed=1)
    with pytest.raises(ValueError, match="epochs"):
        align_draft(fresh_draft(), sid_models["llama"], trie, ids, mask, num_beams=2, epochs=0)
    with pytest.raises(ValueError, match="loss"):
        align_draft(fresh_draft(), sid_models["llama"], trie, ids, mask, num_beams=2, loss="other")
