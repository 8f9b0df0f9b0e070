"""The shared-prefix KV cache: beam search results equal the per-beam cache (Llama, Qwen2), the
prompt's KV bytes are 1/K of transformers' at K beams (bytes held by the caches), each
tree-attention backend gives the same decode logits, and transformers' own generate runs on it."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, prompts
from decoding import beam_search
from decoding import testing as bm
from decoding._transformers import cache_argument, returned_cache
from decoding.ops import available_backends


def qwen2(vocab, seed=3):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("num_beams", [1, 5, 20])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_cache_equals_per_beam_cache(sid_catalog, sid_models, arch, num_beams):
    _, trie = sid_catalog
    model = sid_models["llama"] if arch == "llama" else qwen2(SID_VOCAB)
    ids, mask = prompts(SID_VOCAB, batch=4, seed=num_beams)
    ref = beam_search(model, ids, mask, trie=trie, num_beams=num_beams, kv_cache="per_beam")
    got = beam_search(model, ids, mask, trie=trie, num_beams=num_beams, kv_cache="shared")
    assert torch.equal(got.items, ref.items) and torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.scores, ref.scores, atol=1e-5)
    assert ref.kv_bytes is None and got.kv_bytes["prompt"] > 0
    assert model.config._attn_implementation == "sdpa"  # restored after every forward


def prompt_bytes_of_transformers(model, ids, mask, K, L):
    """Prompt KV bytes held by transformers' own beam-search cache after generate."""
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=K, num_return_sequences=K, do_sample=False,
                         max_new_tokens=L, min_new_tokens=L, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
    T = ids.shape[1]
    return sum(layer.keys[:, :, :T].numel() * layer.keys.element_size() * 2 for layer in returned_cache(out).layers)


@pytest.mark.parametrize("num_beams", [4, 20])
def test_prompt_kv_bytes_are_one_kth_of_transformers(sid_catalog, sid_models, num_beams):
    _, trie = sid_catalog
    model = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=3, seed=1)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=num_beams, kv_cache="shared").kv_bytes["prompt"]
    theirs = prompt_bytes_of_transformers(model, ids, mask, num_beams, trie.depth)
    assert theirs == num_beams * ours
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expect = 2 * cfg.num_hidden_layers * 3 * cfg.num_key_value_heads * ids.shape[1] * head_dim * 4
    assert ours == expect  # one prompt per request, keys and values, float32


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_decode_logits_equal_the_plain_cache_for_every_backend(backend):
    from transformers import DynamicCache

    from decoding._transformers import attention_implementation
    from decoding.kv.shared_prefix import SHARED_PREFIX_ATTENTION, SharedPrefixCache, register_shared_prefix_attention

    V, K = 50, 4
    model = bm.tiny_llama(V, hidden_size=32, layers=2, heads=2, seed=1)
    ids, mask = bm.left_padded_prompts(3, V, 4, 9, seed=2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = [torch.randint(3, V, (3 * K, 1), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reorder = torch.tensor([1, 0, 3, 2, 4, 4, 5, 6, 11, 10, 9, 8])

    def run(cache):
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=pos, **{cache_argument(model): cache})
            cache.batch_repeat_interleave(K)
            m = mask.repeat_interleave(K, 0)
            p = pos[:, -1:].repeat_interleave(K, 0) + 1
            logits = []
            for i, tok in enumerate(steps):
                m = torch.cat([m, torch.ones(3 * K, 1, dtype=torch.long)], 1)
                logits.append(model(tok, attention_mask=m, position_ids=p + i, **{cache_argument(model): cache}).logits)
                cache.reorder_cache(reorder)
        return logits

    ref = run(DynamicCache(config=model.config))
    register_shared_prefix_attention()
    with attention_implementation(model.config, SHARED_PREFIX_ATTENTION):
        got = run(SharedPrefixCache(config=model.config, backend=backend))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_transformers_generate_runs_on_the_shared_cache(sid_models):
    from decoding.kv.shared_prefix import SharedPrefixCache, use_shared_prefix_attention

    model = bm.tiny_llama(SID_VOCAB, hidden_size=32, layers=2, heads=2, seed=4)
    ids, mask = prompts(SID_VOCAB, batch=2, seed=3)
    kwargs = dict(input_ids=ids, attention_mask=mask, num_beams=4, do_sample=False, max_new_tokens=3,
                  pad_token_id=0, eos_token_id=None)
    ref = model.generate(**kwargs)
    use_shared_prefix_attention(model)
    got = model.generate(**kwargs, **{cache_argument(model): SharedPrefixCache(config=model.config)})
    assert torch.equal(got, ref)


def test_kv_cache_argument_is_checked(sid_catalog, sid_models):
    from transformers import MistralConfig, MistralForCausalLM

    _, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2)
    with pytest.raises(ValueError, match="kv_cache"):
        beam_search(sid_models["llama"], ids, mask, trie=trie, num_beams=2, kv_cache="fast")
    windowed = MistralForCausalLM(MistralConfig(vocab_size=SID_VOCAB, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                sliding_window=4)).eval()
    with pytest.raises(ValueError, match="kv_cache: 'shared' needs"):
        beam_search(windowed, ids, mask, trie=trie, num_beams=2, kv_cache="shared")
    # auto picks the per-beam cache there, and results hold
    beam_search(windowed, ids, mask, trie=trie, num_beams=2)
