"""Reentrancy: decoders called concurrently from threads on one shared model return exactly what
sequential calls return, for every layout, KV cache, backend and drop-in; the shared model is
left as it was."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SID_VOCAB, prompts
from decoding import beam_search, setid_generate, speculative_beam_search
from decoding import testing as bm
from decoding.integrations import hf
from decoding.kv import SnapKV, StreamingLLM
from decoding.setid import SetIdCatalog

THREADS = 8


@pytest.fixture(scope="module")
def draft():
    return bm.tiny_llama(SID_VOCAB, hidden_size=32, layers=1, heads=2, seed=21)


@pytest.fixture(scope="module")
def setid_setup():
    from test_setid import D, layout, models

    model = models("llama")["sdpa"]
    embeds, groups, mask = layout(seed=3)
    g = torch.Generator().manual_seed(9)
    queries = torch.randn(3, D, generator=g)
    catalog = SetIdCatalog(torch.randn(3, 2000, D, generator=g), torch.tensor([0.9, 0.1, 0.1]))
    return model, embeds, groups, mask, queries, catalog


def _calls(sid_catalog, sid_models, draft, setid_setup):
    """name -> a zero-argument call returning a tuple of tensors; each uses the shared models."""
    _, trie = sid_catalog
    llama, t5 = sid_models["llama"], sid_models["t5"]

    def beam(model, seed, **kw):
        ids, mask = prompts(SID_VOCAB, batch=3, seed=seed)
        return lambda: _tensors(beam_search(model, ids, mask, trie=trie, num_beams=5, **kw))

    def speculative(prompt_seed, **kw):
        ids, mask = prompts(SID_VOCAB, batch=3, seed=prompt_seed)
        return lambda: _tensors(speculative_beam_search(llama, draft, ids, mask, trie=trie, num_beams=5,
                                                        num_drafts=10, draft_steps=2, **kw))

    def custom_generate(seed):
        ids, mask = prompts(SID_VOCAB, batch=3, seed=seed)
        return lambda: _tensors(llama.generate(input_ids=ids, attention_mask=mask, custom_generate=hf.generate,
                                               trie=trie, num_beams=5, length_penalty=0.0,
                                               num_return_sequences=5, max_new_tokens=trie.depth,
                                               return_dict_in_generate=True, output_scores=True))

    def transformers_beam_search(seed):
        ids, mask = prompts(SID_VOCAB, batch=2, seed=seed)
        proc = hf.TrieLogitsProcessor(trie, prompt_length=ids.shape[1])
        return lambda: _tensors(llama.generate(input_ids=ids, attention_mask=mask, num_beams=4,
                                               num_return_sequences=4, logits_processor=[proc], do_sample=False,
                                               length_penalty=0.0, max_new_tokens=trie.depth,
                                               return_dict_in_generate=True, output_scores=False))

    model, embeds, groups, mask, queries, catalog = setid_setup
    return {
        "shared-kv cpu": beam(llama, 1, backend="cpu"),
        "shared-kv torch": beam(llama, 2, backend="torch"),
        "shared-kv triton": beam(llama, 3, backend="triton"),
        "per-beam kv": beam(llama, 4, kv_cache="per_beam"),
        "exclusions": beam(llama, 5, exclude_items=[[0, 1, 2], [], [7]]),
        "streaming-llm": beam(llama, 6, kv_policy=StreamingLLM(sink=2, recent=4)),
        "snapkv": beam(llama, 7, kv_policy=SnapKV(window=2, capacity=4, kernel=1)),
        "tree model-attention": beam(llama, 8, layout="tree"),
        "tree op-attention": beam(llama, 9, layout="tree", tree_attention="op"),
        "t5": beam(t5, 10),
        "speculative strict": speculative(11),
        "speculative strict op": speculative(12, tree_attention="op"),
        "speculative relaxed": speculative(13, mode="relaxed", seed=5),
        "setid": lambda: _tensors(setid_generate(model, embeds, groups, queries, catalog, 20, attention_mask=mask)),
        "hf custom_generate": custom_generate(14),
        "hf logits processor": transformers_beam_search(15),
    }


def _tensors(out):
    if isinstance(out, dict):  # transformers' GenerateOutput
        return tuple(t for t in (out.sequences, out.get("sequences_scores")) if t is not None)
    return out.items, out.scores, out.sequences


def _attention_state(*models):
    return [(m.config._attn_implementation, m.config._attn_implementation_internal) for m in models]


def test_concurrent_calls_equal_sequential_calls(sid_catalog, sid_models, draft, setid_setup):
    calls = _calls(sid_catalog, sid_models, draft, setid_setup)
    shared = (sid_models["llama"], sid_models["t5"], draft, setid_setup[0])
    before = _attention_state(*shared)
    expected = {name: call() for name, call in calls.items()}
    # every setting twice, interleaved, on 8 threads released together
    names = [name for _ in range(2) for name in calls]
    start, local = threading.Barrier(THREADS), threading.local()

    def run(name):
        if not getattr(local, "started", False):  # each worker's first call waits for the others
            local.started = True
            try:
                start.wait(timeout=60)
            except threading.BrokenBarrierError:
                pass
        return name, calls[name]()

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, names))
    mismatched = [name for name, got in results
                  if len(got) != len(expected[name]) or not all(torch.equal(a, b) for a, b in zip(got, expected[name]))]
    assert not mismatched, f"concurrent results differ from sequential ones: {mismatched}"
    assert _attention_state(*shared) == before


def test_attention_switch_is_seen_only_by_the_calling_thread(sid_models):
    from decoding._transformers import attention_implementation

    config = sid_models["llama"].config
    inside, seen_elsewhere = threading.Event(), []

    def other():
        inside.wait(10)
        seen_elsewhere.append(config._attn_implementation)

    thread = threading.Thread(target=other)
    thread.start()
    with attention_implementation(config, "decoding_tree"):
        with attention_implementation(config, "decoding_shared_prefix"):
            assert config._attn_implementation == "decoding_shared_prefix"  # the innermost block wins
        assert config._attn_implementation == "decoding_tree"
        inside.set()
        thread.join(10)
    assert seen_elsewhere == ["sdpa"] and config._attn_implementation == "sdpa"
    assert config._attn_implementation_internal == "sdpa"  # never written
