"""The search step of fixed-length identifiers (the beam-step op plus the beam bookkeeping) makes
no device-to-host synchronisation: torch.compile captures it as one graph (fullgraph=True, so any
sync or graph break fails) through the op's fake implementation, and the compiled step equals
the eager one. On a GPU, beam_search runs under torch.cuda.set_sync_debug_mode("error")."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import SID_VOCAB, prompts
from decoding import beam_search
from decoding.ops import available_backends
from decoding.search.beam import SearchState, search_step

K = 5


def _state(B, W, t, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return SearchState(
        run_scores=-torch.rand(B, W, generator=g) * 3, run_nodes=None,
        run_tokens=torch.zeros(B, W, t, dtype=torch.long),
        run_parent=torch.zeros(B, W, dtype=torch.long), fin_scores=torch.full((B, K), float("-inf")),
        fin_items=torch.full((B, K), -1), fin_tokens=torch.full((B, K, 4), -1),
        improvable=torch.ones(B, dtype=torch.bool), run_path=-torch.rand(B, W, t, generator=g),
        fin_path=torch.zeros(B, K, 4))


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("level", [0, 1, 3])
def test_fixed_length_search_step_compiles_as_one_graph_and_equals_eager(sid_catalog, backend, level):
    _, trie = sid_catalog
    B, W = 3, 1 if level == 0 else K
    g = torch.Generator().manual_seed(level)
    lo, hi = int(trie.level_offsets[level]), int(trie.level_offsets[level + 1])
    state = _state(B, W, level)._replace(run_nodes=torch.randint(lo, hi, (B, W), generator=g))
    logits = torch.randn(B, W, SID_VOCAB, generator=g)
    step = functools.partial(search_step, trie=trie, t=level, num_beams=K, keep=K, length_penalty=0.0,
                             normalize="full", excluded_ranks=trie.excluded_ranks([[0, 1], [], [5]], B),
                             child_bias=None,
                             max_children=trie.max_branch_at(level), backend=backend, logprob_weight=1.0)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, ref = compiled(state, logits), step(state, logits)
    for name, a, b in zip(SearchState._fields, got, ref):
        assert torch.equal(a, b), name
    if level == 3:  # the last level finishes hypotheses
        assert bool((got.fin_items >= 0).any())


@pytest.mark.gpu
def test_beam_search_makes_no_sync_on_a_gpu(sid_catalog, sid_models):
    _, trie = sid_catalog
    model = sid_models["llama"].cuda()
    ids, mask = prompts(SID_VOCAB, batch=3, seed=1)
    ids, mask, trie = ids.cuda(), mask.cuda(), trie.to("cuda")
    ref = beam_search(model, ids, mask, trie=trie, num_beams=K)  # also the warm-up: compiles the kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        # the search step alone (the model adapter's reorder checks still synchronise)
        state = _state(3, K, 1)._replace(run_nodes=torch.full((3, K), 1, device="cuda"))
        state = SearchState(*(t.cuda() if t is not None else None for t in state))
        search_step(state, torch.randn(3, K, SID_VOCAB, device="cuda"), trie, 1, num_beams=K, keep=K,
                    length_penalty=0.0, normalize="full", excluded_ranks=None, child_bias=None,
                    max_children=trie.max_branch_at(1), backend="triton", logprob_weight=1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool((ref.items >= 0).all())
