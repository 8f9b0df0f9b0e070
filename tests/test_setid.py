"""SETRec set-identifier decoding: the mask and positions against plain loops, identical hidden
states under eager and SDPA attention in real transformers models, and setid_generate against a
direct reimplementation (loop-built mask, eager attention, materialised scores, torch.topk)."""

from __future__ import annotations

import pytest
import torch

from decoding.setid import (
    ORDINARY,
    QUERY,
    SetIdCatalog,
    query_hidden_states,
    setid_attention_mask,
    setid_generate,
    setid_position_ids,
    setid_visibility,
)

D = 32


def layout(B=3, n_items=(3, 2, 4), S=3, text=(2, 3, 1), seed=0):
    """Left-padded prompts [text | items of S vectors | 1 response token] as group ids."""
    rows = []
    for b in range(B):
        g = [ORDINARY] * text[b]
        for item in range(n_items[b]):
            g += [item] * S
        rows.append(g + [ORDINARY])
    T = max(len(r) for r in rows)
    group_ids = torch.full((B, T), ORDINARY, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        group_ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    embeds = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))
    return embeds, group_ids, mask


def loop_visibility(groups, mask, causal=True):
    B, T = groups.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if i == j:
                    out[b, i, j] = True
                    continue
                gi, gj = int(groups[b, i]), int(groups[b, j])
                out[b, i, j] = (j <= i or not causal) and bool(mask[b, j]) and not (gi == gj and gi != ORDINARY)
    return out


def loop_positions(groups, mask):
    B, T = groups.shape
    out = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        pos, seen = -1, {}
        for t in range(T):
            if not mask[b, t]:
                continue
            g = int(groups[b, t])
            if g >= 0 and g in seen:
                out[b, t] = seen[g]
                continue
            pos += 1
            out[b, t] = pos
            if g >= 0:
                seen[g] = pos
    return out


def test_mask_and_positions_equal_loops():
    _, groups, mask = layout()
    groups = torch.cat([groups, torch.full((3, 3), QUERY)], 1)
    mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
    for causal in (True, False):
        assert torch.equal(setid_visibility(groups, mask, causal=causal), loop_visibility(groups, mask, causal))
    assert torch.equal(setid_position_ids(groups, mask), loop_positions(groups, mask))
    additive = setid_attention_mask(groups, mask)
    assert additive.shape == (3, 1, groups.shape[1], groups.shape[1])
    assert torch.equal(additive[:, 0] == 0, loop_visibility(groups, mask))


def models(kind):
    """The same random weights loaded with eager and with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, Qwen2Config, T5Config

    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(vocab_size=40, d_model=D, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
        cls = AutoModelForSeq2SeqLM
    else:
        cfg_cls = LlamaConfig if kind == "llama" else Qwen2Config
        config = cfg_cls(vocab_size=40, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
        cls = AutoModelForCausalLM
    ref = cls.from_config(config, attn_implementation="eager").eval()
    out = {}
    for impl in ("eager", "sdpa"):
        m = cls.from_config(config, attn_implementation=impl).eval()
        m.load_state_dict(ref.state_dict())
        out[impl] = m
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "t5"])
def test_hidden_states_identical_under_eager_and_sdpa(kind):
    ms = models(kind)
    embeds, groups, mask = layout()
    queries = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eager = query_hidden_states(ms["eager"], embeds, groups, queries, mask)
        sdpa = query_hidden_states(ms["sdpa"], embeds, groups, queries, mask)
        # the mask matters: the same inputs with plain causal attention (no groups) differ
        plain = query_hidden_states(ms["sdpa"], embeds, torch.full_like(groups, ORDINARY), queries, mask)
    # random tiny models: the mask moves the query states by ~1e-4, SDPA vs eager by < 1e-6
    assert float((eager - sdpa).abs().max()) < 1e-6
    assert float((eager - plain).abs().max()) > 2e-5


def direct_setid(model, embeds, groups, mask, queries, table, weights, k):
    """Reimplementation: loop-built mask and positions, eager attention, [B, N] scores, topk."""
    B, T, _ = embeds.shape
    S = queries.shape[0]
    q = queries[None].expand(B, -1, -1)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            vis = loop_visibility(groups, mask, causal=False)
            enc_mask = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)[:, None]
            enc = model.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state
            own = torch.full((B, 1, S, S), torch.finfo(torch.float32).min)
            for s in range(S):
                own[:, :, s, s] = 0
            h = model.get_decoder()(inputs_embeds=q, attention_mask=own, encoder_hidden_states=enc,
                                    encoder_attention_mask=mask).last_hidden_state
        else:
            g = torch.cat([groups, torch.full((B, S), QUERY)], 1)
            m = torch.cat([mask, torch.ones(B, S, dtype=torch.long)], 1)
            vis = loop_visibility(g, m)
            additive = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)[:, None]
            out = model.model(inputs_embeds=torch.cat([embeds, q], 1), attention_mask=additive,
                              position_ids=loop_positions(g, m))
            h = out.last_hidden_state[:, T:]
    scores = torch.einsum("bsd,snd,s->bn", h, table, weights)
    return torch.topk(scores, k, dim=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "t5"])
def test_setid_generate_equals_direct_reimplementation(kind):
    ms = models(kind)
    embeds, groups, mask = layout(seed=3)
    g = torch.Generator().manual_seed(9)
    queries = torch.randn(3, D, generator=g)
    table = torch.randn(3, 5000, D, generator=g)
    weights = torch.tensor([0.9, 0.1, 0.1])
    ref = direct_setid(ms["eager"], embeds, groups, mask, queries, table, weights, 20)
    for impl in ("eager", "sdpa"):
        got = setid_generate(ms[impl], embeds, groups, queries, SetIdCatalog(table, weights), 20,
                             attention_mask=mask)
        assert torch.equal(got.items, ref.indices)
        assert torch.allclose(got.scores, ref.values, atol=1e-4)
        assert got.sequences.shape == (3, 20, 0)


def test_setid_generate_exclusions_masks_and_errors():
    ms = models("llama")
    embeds, groups, mask = layout(seed=4)
    queries = torch.randn(3, D)
    catalog = SetIdCatalog(torch.randn(3, 300, D).half())
    first = setid_generate(ms["sdpa"], embeds, groups, queries, catalog, 10, attention_mask=mask)
    warm = torch.ones(3, 300, dtype=torch.bool)  # per request: request 1 loses its first answers
    warm[1, first.items[1]] = False
    got = setid_generate(ms["sdpa"], embeds, groups, queries, catalog, 10, attention_mask=mask,
                         exclude_items=[first.items[0].tolist(), [], []], item_mask=warm)
    assert not set(got.items[0].tolist()) & set(first.items[0].tolist())
    assert not set(got.items[1].tolist()) & set(first.items[1].tolist())
    assert torch.equal(got.items[2], first.items[2])
    with pytest.raises(ValueError, match="queries: expected shape"):
        setid_generate(ms["sdpa"], embeds, groups, queries[:2], catalog, 10)
    with pytest.raises(ValueError, match="group_ids: the prompt must not contain QUERY"):
        setid_generate(ms["sdpa"], embeds, torch.full_like(groups, QUERY), queries, catalog, 10)
    with pytest.raises(ValueError, match="k: 301 is larger than the catalog"):
        setid_generate(ms["sdpa"], embeds, groups, queries, catalog, 301)
    with pytest.raises(TypeError, match="catalog"):
        setid_generate(ms["sdpa"], embeds, groups, queries, catalog.item_embeddings, 10)
    with pytest.raises(ValueError, match="slot_weights"):
        SetIdCatalog(torch.randn(3, 10, D), torch.ones(2))


def test_bundles_round_trip_and_a_padded_batch_answers_as_each_history_alone(tmp_path):
    """A SETRec and an RPG bundle saved and loaded by decoding.setid.bundle: the loaded bundle's
    top-k for histories of different lengths in one (left-padded) batch equals each history's
    answer alone, and equals setid_generate / rpg_topk on inputs built by hand from the tensors."""
    from decoding import testing as bm
    from decoding.setid.bundle import load_setid_bundle, save_rpg_bundle, save_setrec_bundle

    g = torch.Generator().manual_seed(4)
    table, queries, weights = torch.randn(3, 200, D, generator=g), torch.randn(3, D, generator=g), torch.rand(3)
    save_setrec_bundle(tmp_path / "s", bm.tiny_llama(40, hidden_size=D, heads=2, seed=1), queries,
                       SetIdCatalog(table, weights), name="sets")
    codes = torch.randint(0, 8, (300, 4), generator=g, dtype=torch.uint8)
    codebooks, heads = torch.randn(4, 8, D, generator=g), torch.randn(4, D, D, generator=g) / D ** 0.5
    save_rpg_bundle(tmp_path / "r", bm.tiny_llama(40, hidden_size=D, heads=2, seed=2), codes, codebooks, heads, 0.3)
    histories = [[5], [7, 3, 199, 0, 12], [150, 150, 2]]
    setrec, rpg = load_setid_bundle(tmp_path / "s"), load_setid_bundle(tmp_path / "r")
    assert (setrec.kind, setrec.name, setrec.num_items, rpg.kind, rpg.name, rpg.num_items) == (
        "setrec", "sets", 200, "rpg", "setid", 300)
    for bundle in (setrec, rpg):
        items, scores = bundle.topk(histories, 6, exclude_items=[[1], [], [2, 3]])
        for b, history in enumerate(histories):
            alone = bundle.topk([history], 6, exclude_items=[[[1], [], [2, 3]][b]])
            assert items[b].tolist() == alone[0][0].tolist()
            torch.testing.assert_close(scores[b], alone[1][0], atol=1e-5, rtol=0)
    history = histories[1]
    embeds = table[:, history].transpose(0, 1).reshape(1, -1, D)
    groups = torch.arange(len(history)).repeat_interleave(3)[None]
    ref = setid_generate(setrec.model, embeds, groups, queries, SetIdCatalog(table, weights), 6)
    assert setrec.topk([history], 6)[0].tolist() == ref.items.tolist()
    from decoding.setid import cosine_digit_logits, digit_logprobs, rpg_topk

    with torch.no_grad():
        inputs = torch.stack([codebooks[torch.arange(4), codes[i].long()].mean(0) for i in history])[None]
        h = rpg.model.model(inputs_embeds=inputs).last_hidden_state[:, -1]
        lp = digit_logprobs(cosine_digit_logits(torch.einsum("sde,be->bsd", heads, h), codebooks, 0.3))
    assert rpg.topk([history], 6)[0].tolist() == rpg_topk(lp, codes, 6).items.tolist()


def test_bundles_that_do_not_fit_are_refused_at_save_or_load(tmp_path):
    import json

    from decoding import testing as bm
    from decoding.setid.bundle import load_setid_bundle, save_rpg_bundle, save_setrec_bundle

    model = bm.tiny_llama(40, hidden_size=D, heads=2, seed=1)
    with pytest.raises(ValueError, match=r"queries: expected shape \[3, 32\]"):
        save_setrec_bundle(tmp_path / "a", model, torch.randn(2, D), SetIdCatalog(torch.randn(3, 10, D)))
    with pytest.raises(ValueError, match="heads: expected shape"):
        save_rpg_bundle(tmp_path / "b", model, torch.zeros(10, 4, dtype=torch.uint8), torch.randn(4, 8, D),
                        torch.randn(4, D, 2), 1.0)
    with pytest.raises(ValueError, match="item_codes: codes must be in"):
        save_rpg_bundle(tmp_path / "b", model, torch.full((10, 4), 8, dtype=torch.uint8), torch.randn(4, 8, D),
                        torch.randn(4, D, D), 1.0)
    with pytest.raises(ValueError, match="name: expected a catalog name"):
        save_setrec_bundle(tmp_path / "c", model, torch.randn(3, D), SetIdCatalog(torch.randn(3, 10, D)),
                           name="../x")
    with pytest.raises(ValueError, match="not a set-identifier bundle"):
        load_setid_bundle(tmp_path / "missing")
    # a table of another width than the model's hidden size, written by hand
    save_setrec_bundle(tmp_path / "d", model, torch.randn(3, D), SetIdCatalog(torch.randn(3, 10, D)))
    wide = bm.tiny_llama(40, hidden_size=2 * D, heads=2, seed=1)
    wide.save_pretrained(tmp_path / "d" / "model")
    with pytest.raises(ValueError, match="the model's hidden size"):
        load_setid_bundle(tmp_path / "d")
    manifest = tmp_path / "d" / "setid.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "kind": "other"}))
    with pytest.raises(ValueError, match="kind must be"):
        load_setid_bundle(tmp_path / "d")
