"""The tree layout (decoding.search.tree): beams of a request as one flattened sequence after a
shared prompt, with a tree mask. beam_search(layout="tree") must equal the default layout."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, TITLE_VOCAB, prompts
from decoding import beam_search
from decoding import testing as bm
from decoding.ops import available_backends
from decoding.search.tree import TreeModel


@pytest.mark.parametrize("num_beams", [1, 5, 20])
@pytest.mark.parametrize("catalog", ["sid", "title"])
def test_tree_layout_equals_default_layout(catalog, num_beams, sid_catalog, sid_models, title_catalog, title_models):
    (_, trie), models, vocab = ((sid_catalog, sid_models, SID_VOCAB) if catalog == "sid"
                                else (title_catalog, title_models, TITLE_VOCAB))
    model = models["llama"]
    ids, mask = prompts(vocab, batch=4, seed=num_beams)
    ref = beam_search(model, ids, mask, trie=trie, num_beams=num_beams)
    got = beam_search(model, ids, mask, trie=trie, num_beams=num_beams, layout="tree")
    assert torch.equal(got.items, ref.items)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.scores, ref.scores, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 5, 20])
@pytest.mark.parametrize("catalog", ["sid", "title"])
def test_tree_attention_op_equals_default_layout(catalog, num_beams, sid_catalog, sid_models, title_catalog,
                                                 title_models):
    """beam_search(layout="tree", tree_attention="op"): the model's attention replaced by
    decoding.ops.tree_attention (C++ backend here) gives the default layout's results."""
    (_, trie), models, vocab = ((sid_catalog, sid_models, SID_VOCAB) if catalog == "sid"
                                else (title_catalog, title_models, TITLE_VOCAB))
    model = models["llama"]
    ids, mask = prompts(vocab, batch=4, seed=num_beams)
    ref = beam_search(model, ids, mask, trie=trie, num_beams=num_beams)
    got = beam_search(model, ids, mask, trie=trie, num_beams=num_beams, layout="tree", tree_attention="op")
    assert torch.equal(got.items, ref.items)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.scores, ref.scores, atol=1e-4)
    assert model.config._attn_implementation != "decoding_tree"  # restored after each forward


OP_BACKENDS = [("op", b) for b in available_backends("cpu")]


@pytest.mark.parametrize("attn, op_backend", [("eager", None), ("sdpa", None), *OP_BACKENDS])
def test_tree_rows_see_prompt_ancestors_and_self_only(attn, op_backend):
    """Each row's logits equal a plain forward of prompt + its own path, under both attention
    implementations and under the tree attention op (every backend), whatever else is in the
    tree (siblings, cousins, dead rows)."""
    from transformers import AutoModelForCausalLM

    model = bm.tiny_llama(50, hidden_size=32, layers=2, heads=2, seed=7)
    model = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa" if attn == "op" else attn).eval()
    torch.manual_seed(0)
    ids, mask = bm.left_padded_prompts(3, 50, 2, 6, seed=3)
    tree = TreeModel(model, attention="model") if op_backend is None else TreeModel(model, attention="op",
                                                                                     backend=op_backend)
    tree.prefill(ids, mask)
    # level 1: 3 rows under the prompt; level 2: rows under level-1 rows 2, 1, 2 and one dead row
    lvl1 = tree.add(torch.zeros((3, 3), dtype=torch.long), torch.randint(3, 50, (3, 3)))
    parents2 = torch.stack([lvl1[:, 1], lvl1[:, 0], lvl1[:, 1], torch.zeros(3, dtype=torch.long)], dim=1)
    tree.add(parents2, torch.randint(3, 50, (3, 4)))
    logits = tree.run()  # both levels in one forward
    tokens = tree._tokens
    for b in range(3):
        real = ids[b][mask[b].bool()].tolist()
        for r in range(1, tree.num_rows):
            path, node = [], r
            while node != 0:
                path.append(int(tokens[b, node]))
                node = int(tree._visible[b, node].nonzero()[-2]) - ids.shape[1] + 1 if tree._depth[b, node] > 1 else 0
            path = path[::-1]
            want = model(torch.tensor([real + path])).logits[0, -1]
            assert torch.allclose(logits[b, r - 1], want, atol=1e-4), (b, r)


def test_truncate_drops_rows_and_kv():
    model = bm.tiny_llama(40, hidden_size=32, layers=1, heads=2, seed=1)
    ids = torch.randint(3, 40, (2, 5))
    tree = TreeModel(model)
    tree.prefill(ids, None)
    rows = tree.add(torch.zeros((2, 4), dtype=torch.long), torch.randint(3, 40, (2, 4)))
    first = tree.run()
    tree.truncate(3)  # keep row 0 and the first two level-1 rows
    assert tree.num_rows == 3 and tree.kv_length() == 5 + 2
    again = tree.add(rows[:, :2], torch.tensor([[5, 6], [7, 8]]))
    out = tree.run()
    fresh = TreeModel(model)
    fresh.prefill(ids, None)
    r = fresh.add(torch.zeros((2, 2), dtype=torch.long), tree._tokens[:, 1:3])
    assert torch.allclose(fresh.run(), first[:, :2], atol=1e-5)
    fresh.add(r, torch.tensor([[5, 6], [7, 8]]))
    assert torch.allclose(fresh.run(), out, atol=1e-5)
    assert again.tolist() == [[3, 4], [3, 4]]
    with pytest.raises(ValueError, match="num_rows"):
        tree.truncate(0)


def test_tree_layout_rejects_models_it_cannot_run(sid_catalog, sid_models):
    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        beam_search(sid_models["t5"], ids, mask, trie=trie, num_beams=2, layout="tree")
    with pytest.raises(ValueError, match="layout"):
        beam_search(sid_models["llama"], ids, mask, trie=trie, num_beams=2, layout="flat")
    with pytest.raises(ValueError, match="parents"):
        tree = TreeModel(sid_models["llama"])
        tree.prefill(ids, mask)
        tree.add(torch.full((2, 1), 5), torch.ones((2, 1), dtype=torch.long))


def test_tree_attention_op_rejects_what_it_cannot_run(sid_catalog):
    """Sliding-window models and bad arguments get clear errors, not a silent fallback."""
    from transformers import MistralConfig, MistralForCausalLM

    _, trie = sid_catalog
    config = MistralConfig(vocab_size=SID_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    ids, mask = prompts(SID_VOCAB, batch=2)
    with pytest.raises(NotImplementedError, match="sliding windows"):
        beam_search(model, ids, mask, trie=trie, num_beams=2, layout="tree", tree_attention="op")
    assert model.config._attn_implementation != "decoding_tree"
    with pytest.raises(ValueError, match="tree_attention"):
        beam_search(model, ids, mask, trie=trie, num_beams=2, tree_attention="op")
    with pytest.raises(ValueError, match="tree_attention"):
        beam_search(model, ids, mask, trie=trie, num_beams=2, layout="tree", tree_attention="fast")


@pytest.mark.parametrize("attention", ["model", "op"])
def test_retire_admit_and_compact_keep_every_row_exact(attention):
    """Continuous batching on the tree layout: requests retire (select), new prompts join a
    running batch (admit), rows nobody needs leave (compact, pending rows included). Every row
    run afterwards still has the logits of a plain forward of its prompt + path."""
    from decoding.speculative.batching import BatchedTreeModel, compaction_plan, remap_rows

    model = bm.tiny_llama(50, hidden_size=32, layers=2, heads=2, seed=5)
    ids, mask = bm.left_padded_prompts(5, 50, 2, 6, seed=4)
    gen = torch.Generator().manual_seed(1)
    tree = BatchedTreeModel(model, attention=attention)
    tree.prefill(ids[:3], mask[:3])
    requests = [0, 1, 2]  # the prompt of each batch entry
    paths = [{0: []} for _ in requests]  # per batch entry: row id -> tokens after the prompt

    def add(parents, computed=True):
        tokens = torch.randint(3, 50, parents.shape, generator=gen)
        rows = tree.add(parents, tokens)
        for b, path in enumerate(paths):
            for m in range(parents.shape[1]):
                path[int(rows[b, m])] = path[int(parents[b, m])] + [int(tokens[b, m])]
        return rows

    def check(logits, rows):
        for b, (req, path) in enumerate(zip(requests, paths)):
            prompt = ids[req][mask[req].bool()].tolist()
            for m in range(rows.shape[1]):
                want = model(torch.tensor([prompt + path[int(rows[b, m])]])).logits[0, -1]
                assert torch.allclose(logits[b, m], want, atol=1e-4), (req, m)

    lvl1 = add(torch.zeros((3, 4), dtype=torch.long))
    check(tree.run(), lvl1)
    lvl2 = add(lvl1[:, [2, 0, 2]])  # pending: not run before the compaction, as a draft's last level
    tree.select(torch.tensor([2, 0]))  # request 1 retires
    requests, paths, lvl2 = [2, 0], [paths[2], paths[0]], lvl2[[2, 0]]
    logits = tree.admit(ids[3:5], mask[3:5])
    for req in (3, 4):
        prompt = ids[req][mask[req].bool()].tolist()
        assert torch.allclose(logits[req - 3], model(torch.tensor([prompt])).logits[0, -1], atol=1e-4)
    requests += [3, 4]
    paths += [{0: []}, {0: []}]
    assert tree.batch_size == 4 and tree.num_computed == 5 and tree.num_rows == 8
    # keep the ancestors of level-2 rows 0 and 2 (old requests; both under level-1 row 2) and row 0
    # (new requests)
    keep_of = torch.cat([lvl2[:, [0, 2]], torch.zeros((2, 2), dtype=torch.long)])
    plan = compaction_plan(tree.ancestors(keep_of), tree.num_computed)
    tree.compact(plan)
    assert tree.num_rows == plan.shape[1] == 4 and tree.num_computed == 2  # row 0, level-1 row 2
    assert tree.kv_length() == ids.shape[1] + 1
    kept = remap_rows(keep_of, plan)
    assert bool((kept >= 0).all())
    paths = [{int(remap_rows(torch.tensor([[r]]), plan[b:b + 1])): p for r, p in path.items()
              if int(remap_rows(torch.tensor([[r]]), plan[b:b + 1])) >= 0} for b, path in enumerate(paths)]
    lvl3 = add(kept)
    logits = tree.run()  # the kept pending level-2 rows and the new rows, in one forward
    check(logits[:, -2:], lvl3)
    with pytest.raises(ValueError, match="input_ids"):
        tree.admit(ids[:1, 1:], mask[:1, 1:])
