"""KV pruning: each policy's kept
positions against a direct reimplementation (SnapKV's from a real model's own eager attention
weights); StreamingLLM's resulting next-token logits against a full-cache forward that masks the
dropped positions."""

from __future__ import annotations

import pytest
import torch

from decoding._transformers import cache_argument
from decoding.kv import EarnCut, SnapKV, StreamingLLM, earn_attention_mask, earn_keep, snapkv_keep, streaming_keep
from decoding.ops import compact_kv


def left_mask(lengths, T):
    return torch.stack([torch.arange(T) >= T - n for n in lengths]).long()


def test_streaming_keep_equals_direct():
    mask = left_mask([12, 5, 9], 12)
    index, valid = streaming_keep(StreamingLLM(sink=2, recent=4), mask)
    for b, n in enumerate([12, 5, 9]):
        start = 12 - n
        real = list(range(start, 12))
        want = real if n <= 6 else real[:2] + real[-4:]
        got = [int(i) for i, ok in zip(index[b, 0], valid[b, 0]) if ok]
        assert got == want


def test_earn_keep_and_mask():
    mask = left_mask([8, 6], 8)
    idx, valid = earn_keep(EarnCut(2, (0, 1, -1)), mask, layer=3)
    assert idx[:, 0].tolist() == [[0, 1, 7], [2, 3, 7]] and bool(valid.all())
    idx, valid = earn_keep(EarnCut(2, (0, 1, -1)), mask, layer=1)
    assert idx.shape == (2, 1, 8) and valid[1, 0].tolist() == [False] * 2 + [True] * 6
    masks = earn_attention_mask(mask, (0, 1, -1), num_layers=4, cut_layer=2)
    lo, hi = masks[0][:, 0] == 0, masks[3][:, 0] == 0
    assert bool(lo[0].tril().eq(lo[0]).all()) and bool(lo[0, 7].all())
    # above the cut, the last query sees only the registers (0, 1 and itself)
    assert hi[0, 7].nonzero().flatten().tolist() == [0, 1, 7]
    assert hi[1, 7].nonzero().flatten().tolist() == [2, 3, 7]
    # the cut at the number of layers is no pruning
    assert all(torch.equal(m, masks[0]) for m in earn_attention_mask(mask, (0,), 4, cut_layer=4))
    with pytest.raises(ValueError, match="registers"):
        earn_keep(EarnCut(0, (6,)), mask, layer=0)


def snapkv_direct(attn_probs, mask, policy):
    """SnapKV from the model's own attention probabilities ``[B, Hq, T, T]``: loops over requests
    and heads, as SnapKVCluster.update_kv does (per head: last-window votes, pooling, top-k)."""
    B, Hq, T, _ = attn_probs.shape
    W = policy.window
    return torch.stack([attn_probs[b, :, T - W:, :].sum(1) for b in range(B)])  # [B, Hq, T]


def small_llama(layers: int, seed: int, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, **config)
    return LlamaForCausalLM(cfg).eval()


def prefilled(model, ids, mask, pos):
    """A plain transformers cache after the prompt's forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids, attention_mask=mask, position_ids=pos, **{cache_argument(model): cache})
    return cache


def window_queries_and_keys(model, ids, mask, window, attentions=False):
    """Per layer, the last ``window`` prompt queries and all keys, rotary applied, recomputed
    from each attention module's inputs during a plain prefill (independent of the cache)."""
    from transformers.models.llama import modeling_llama as ml

    captured = {}

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        captured[module.layer_idx] = (q[:, :, -window:], k)

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        output_attentions=attentions)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def test_snapkv_keep_equals_votes_from_the_models_own_attention():
    model = small_llama(2, seed=0, attn_implementation="eager")
    T = 40
    ids = torch.randint(3, 60, (2, T))
    mask = left_mask([40, 30], T)
    policy = SnapKV(window=6, capacity=16, kernel=3)
    captured, out = window_queries_and_keys(model, ids, mask, policy.window, attentions=True)
    for layer in range(2):
        q, k = captured[layer]
        index, valid = snapkv_keep(policy, q, k, mask)
        probs = out.attentions[layer]  # [B, Hq, T, T], the model's own softmax
        votes = snapkv_direct(probs, mask, policy).view(2, 2, 2, T).mean(2)
        pooled = torch.nn.functional.avg_pool1d(votes.reshape(4, 1, T), 3, stride=1, padding=1).view(2, 2, T)
        for b, n in enumerate([40, 30]):
            start = T - n
            for h in range(2):
                cand = [(float(pooled[b, h, t]), t) for t in range(start, T - policy.window)]
                top = sorted(cand, key=lambda x: (-x[0], x[1]))[: policy.capacity - policy.window]
                want = sorted([t for _, t in top] + list(range(T - policy.window, T)))
                got = [int(i) for i, ok in zip(index[b, h], valid[b, h]) if ok]
                assert got == want, (layer, b, h)
    # compaction to the kept positions: the cache shrinks to capacity / T of its size
    k_small, v_small = compact_kv(k, k, index)
    assert k_small.shape == (2, 2, 16, 8) and k_small.numel() * T == k.numel() * 16


def test_streaming_llm_logits_equal_a_masked_full_cache_forward():
    """Decode one token after pruning the prefilled cache to StreamingLLM's positions; the logits
    equal a full-cache forward whose attention mask hides the dropped positions."""
    from transformers import DynamicCache

    model = small_llama(2, seed=1)
    T = 30
    ids = torch.randint(3, 60, (3, T))
    mask = left_mask([30, 20, 8], T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(3, 60, (3, 1))
    nxt_pos = mask.sum(1, keepdim=True)
    policy = StreamingLLM(sink=2, recent=8)
    with torch.no_grad():
        index, valid = streaming_keep(policy, mask)
        pruned = DynamicCache(config=model.config)
        for layer_idx, layer in enumerate(prefilled(model, ids, mask, pos).layers):
            k, v = compact_kv(layer.keys, layer.values, index)
            pruned.update(k, v, layer_idx)
        got = model(nxt, attention_mask=torch.cat([valid[:, 0].long(), torch.ones(3, 1, dtype=torch.long)], 1),
                    position_ids=nxt_pos, **{cache_argument(model): pruned}).logits
        slots = torch.where(valid[:, 0], index[:, 0], T)  # unused slots go to a spare column
        kept = torch.zeros(3, T + 1, dtype=torch.long).scatter_(1, slots, 1)[:, :T] * mask
        want = model(nxt, attention_mask=torch.cat([kept, torch.ones(3, 1, dtype=torch.long)], 1),
                     position_ids=nxt_pos, **{cache_argument(model): prefilled(model, ids, mask, pos)}).logits
        full = model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                     position_ids=nxt_pos, **{cache_argument(model): prefilled(model, ids, mask, pos)}).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[0], full[0], atol=1e-4)  # request 0 really lost positions
    assert torch.allclose(got[2], full[2], atol=1e-5)  # request 2 (8 tokens) kept everything


# ---------------------------------------------------------------- policies inside beam search

def _masked_attention_factory(visible_by_layer):
    """A plain softmax attention that hides, per layer and KV head, the prompt positions a
    policy dropped (the direct reimplementation: nothing is compacted, the full cache is read)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        vis = visible_by_layer[module.layer_idx]  # [B, Hkv, T] bool over the prompt
        B, H, M, D = query.shape
        groups = H // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        S, T = k.shape[2], vis.shape[2]
        prompt = vis.repeat_interleave(groups, 1)[:, :, None, :].expand(B, H, M, T)
        generated = torch.ones(B, H, M, S - T, dtype=torch.bool)
        allowed = torch.cat([prompt, generated], -1)
        scores = (query @ k.transpose(-1, -2)) * (scaling or D ** -0.5)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return (weights @ v).transpose(1, 2).contiguous(), None

    return attention


def _visible(index, valid, T):
    B, H, C = index.shape
    slots = torch.where(valid, index, T)
    return torch.zeros(B, H, T + 1, dtype=torch.bool).scatter_(2, slots, True)[:, :, :T]


@pytest.mark.parametrize("policy", [StreamingLLM(sink=3, recent=9), SnapKV(window=5, capacity=14, kernel=3),
                                    EarnCut(layer=1, registers=(0, 1, -2, -1))], ids=["streaming", "snapkv", "earn"])
def test_policy_logits_equal_a_masked_full_cache_decode(policy):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from decoding._transformers import attention_implementation
    from decoding.search.model import HFBeamModel

    model = small_llama(3, seed=2)
    T = 32
    ids = torch.randint(3, 60, (3, T))
    mask = left_mask([32, 24, 16], T)
    token = torch.randint(3, 60, (3,))
    beams = HFBeamModel(model, kv_cache="shared", kv_policy=policy)
    beams.prefill(ids, mask)
    got = beams.step(torch.arange(3), token)
    # the kept positions of every layer, then a decode over the unpruned cache with them masked
    visible = {}
    for layer_idx, layer in enumerate(beams._cache.layers):
        if isinstance(policy, EarnCut):
            index, valid = earn_keep(policy, mask, layer_idx)
        elif isinstance(policy, StreamingLLM):
            index, valid = streaming_keep(policy, mask)
        else:
            index = None
        if index is not None:
            visible[layer_idx] = _visible(index, valid, T).expand(3, 2, T) & mask.bool()[:, None, :]
    if isinstance(policy, SnapKV):  # recompute the window queries through a plain prefill
        captured, _ = window_queries_and_keys(model, ids, mask, policy.window)
        for layer_idx, (q, k) in captured.items():
            index, valid = snapkv_keep(policy, q, k, mask)
            visible[layer_idx] = _visible(index, valid, T)
    AttentionInterface.register("test_masked_prompt", _masked_attention_factory(visible))
    AttentionMaskInterface.register("test_masked_prompt", sdpa_mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = prefilled(model, ids, mask, pos)
        with attention_implementation(model.config, "test_masked_prompt"):
            want = model(token[:, None], attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                         position_ids=pos[:, -1:] + 1, **{cache_argument(model): cache}).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5)
    report = beams.kv_bytes()
    assert report["prompt"] < report["prompt_before_pruning"]


def test_earn_cut_at_the_number_of_layers_is_no_pruning(sid_catalog, sid_models):
    from conftest import SID_VOCAB, prompts
    from decoding import beam_search

    _, trie = sid_catalog
    model = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=3, seed=2)
    ref = beam_search(model, ids, mask, trie=trie, num_beams=5)
    got = beam_search(model, ids, mask, trie=trie, num_beams=5,
                      kv_policy=EarnCut(layer=model.config.num_hidden_layers, registers=(0,)))
    assert torch.equal(got.items, ref.items) and torch.allclose(got.scores, ref.scores, atol=1e-6)
    assert got.kv_bytes["prompt"] == got.kv_bytes["prompt_before_pruning"] == ref.kv_bytes["prompt"]
    with pytest.raises(ValueError, match="kv_policy: EarnCut.layer"):
        beam_search(model, ids, mask, trie=trie, num_beams=5, kv_policy=EarnCut(layer=99, registers=(0,)))
    with pytest.raises(ValueError, match="kv_policy: pruning runs on the shared-prefix"):
        beam_search(model, ids, mask, trie=trie, num_beams=5, kv_cache="per_beam", kv_policy=StreamingLLM())
