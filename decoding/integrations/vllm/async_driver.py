"""Exact trie-constrained beam search on vLLM's async engine (``AsyncLLM``: what a ``vllm serve``
process runs, or one an application builds with ``AsyncLLM.from_engine_args``).

The search is :func:`decoding.search.beam.search_loop`, the same code as :func:`decoding.beam_search`.
Each live beam is one greedy one-token request returning the full-vocabulary log-probs of the next
token. All requests of a step are in flight together, and so are the steps of every concurrent
search, so the engine batches the beams of all in-flight searches into the same forward passes;
vLLM's prefix cache reuses the prompt KV across beams and steps.

Requests go to the engine core (``engine_client.engine_core``) and their outputs are taken out
of the engine's output stream before vLLM's output processor (:class:`_OutputRouter`, installed
once per engine): the log-probs arrive as arrays, where the front end would build one Python
object per token and request (measured: most of the time of a search at full-vocabulary
log-probs). This is internal vLLM interface, which is why the driver refuses untested vLLMs.

Full-vocabulary log-probs (``logprobs=-1``: the engine needs ``max_logprobs=-1``, or at least the
vocabulary size), not ``logprob_token_ids`` with only the beam's children: in vLLM 0.32's legacy
model runner (the CPU build's) one such request in a batch makes every other request of the batch
that asks for ``logprobs`` get -inf (the sampler prefers the token-id gather for the whole batch),
and a shared engine serves other clients' requests in the same batches.

Under data parallelism every request of one search goes to one rank (``data_parallel_rank``,
round-robin over searches unless the caller names one), so its prompt stays in that rank's
prefix cache.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import numpy as np
import torch

from decoding._hf import left_pad
from decoding.integrations.vllm._version import check_version
from decoding.integrations.vllm.driver import (
    _front_end_params,
    _full_vocab_logprobs_allowed,
    _Rows,
    check_prompts,
    flatten_logprobs,
)
from decoding.search.beam import BeamSearchOutput, search_loop, validate_search

_search_ids = itertools.count()
_search_ranks = itertools.count()
_ROUTER = "_decoding_output_router"


def data_parallel_size(engine_client) -> int:
    return int(getattr(engine_client.vllm_config.parallel_config, "data_parallel_size", 1) or 1)


class _OutputRouter:
    """Takes the outputs of this package's requests out of an ``AsyncLLM``'s output stream, ahead
    of vLLM's output processor (which skips requests it does not know, so the rest of the stream
    is untouched), and hands each to the future its request waits on."""

    def __init__(self, output_processor):
        self.pending: dict[str, asyncio.Future] = {}
        self.most_searches_per_batch = 0  # distinct searches served by one engine output batch
        original = output_processor.process_outputs

        def process_outputs(outputs, *args, **kwargs):
            if self.pending:
                kept, searches = [], set()
                for out in outputs:
                    future = self.pending.get(out.request_id)
                    if future is None:
                        kept.append(out)
                        continue
                    searches.add(out.request_id.rsplit("-", 1)[0])
                    if out.finish_reason is not None or out.new_logprobs is not None:
                        del self.pending[out.request_id]
                        if not future.done():
                            future.set_result(out)
                if searches:
                    self.most_searches_per_batch = max(self.most_searches_per_batch, len(searches))
                outputs = kept
            return original(outputs, *args, **kwargs)

        output_processor.process_outputs = process_outputs

    @classmethod
    def of(cls, engine_client) -> _OutputRouter:
        """The engine's router, installed on first use (once: every later search reuses it)."""
        processor = engine_client.output_processor
        router = getattr(processor, _ROUTER, None)
        if router is None:
            router = cls(processor)
            setattr(processor, _ROUTER, router)
        return router


class _AsyncScorer:
    """One search's one-token greedy requests, sent to the engine core; their full-vocabulary
    log-probs come back through the engine's :class:`_OutputRouter`."""

    def __init__(self, engine_client, *, data_parallel_rank: int | None, lora_request=None):
        from vllm.v1.engine import EngineCoreRequest

        model_config = engine_client.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        if not _full_vocab_logprobs_allowed(engine_client, self.vocab_size):
            raise ValueError(f"engine_client: exact beam search needs the full-vocabulary log-probs of each beam; "
                             f"start the engine with max_logprobs=-1 (`--max-logprobs -1`), not "
                             f"{model_config.max_logprobs}")
        self._core, self._router = engine_client.engine_core, _OutputRouter.of(engine_client)
        self._request = EngineCoreRequest
        self._params = _front_end_params(engine_client,
                                         logprobs=-1 if model_config.max_logprobs == -1 else self.vocab_size)
        self._rank, self._lora = data_parallel_rank, lora_request
        self._tag = f"decoding-beam-{os.getpid()}-{next(_search_ids)}-"
        self._ids = itertools.count()

    async def run(self, prompts: list[list[int]]):
        """Full-vocabulary log-probs at the end of each prompt, all requests in flight together:
        (request, token, logprob) as flat int64/int64/float32 numpy arrays."""
        loop = asyncio.get_running_loop()
        now = time.time()
        futures = {}
        try:
            for prompt in prompts:
                rid = f"{self._tag}{next(self._ids)}"
                futures[rid] = self._router.pending[rid] = loop.create_future()
                await self._core.add_request_async(self._request(
                    request_id=rid, prompt_token_ids=prompt, mm_features=None, sampling_params=self._params,
                    pooling_params=None, arrival_time=now, lora_request=self._lora, cache_salt=None,
                    data_parallel_rank=self._rank))
            outputs = await asyncio.gather(*futures.values())
        except BaseException:
            waiting = [rid for rid, f in futures.items() if not f.done()]
            for rid in futures:
                self._router.pending.pop(rid, None)
            if waiting:
                await self._core.abort_requests_async(waiting)
            raise
        return flatten_logprobs(enumerate(outputs))


async def search(engine_client, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                 backend: str = "auto", data_parallel_rank: int | None = None, lora_request=None,
                 record_logprobs: bool = False):
    """:func:`beam_search_async`, also returning the rows' book (:class:`_Rows`), whose
    ``children_logprobs`` holds every scored prefix's children log-probs with ``record_logprobs``."""
    check_version()
    model_config = engine_client.model_config
    mode = getattr(model_config, "logprobs_mode", "raw_logprobs")
    if str(mode) != "raw_logprobs":
        raise ValueError(f"engine_client: the engine's logprobs_mode is {mode!r}; exact beam search needs "
                         "'raw_logprobs' (the full-vocabulary log-probs transformers ranks by)")
    vocab = int(model_config.get_vocab_size())
    if trie.vocab_size != vocab:
        raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has {vocab}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty: expected a float, got {type(length_penalty).__name__}")
    rows = check_prompts(prompts, trie, vocab, int(model_config.max_model_len))
    input_ids, mask = left_pad(rows)
    validate_search(input_ids, mask, trie, num_beams)
    trie = trie.to("cpu")
    ranks = data_parallel_size(engine_client)
    if data_parallel_rank is None and ranks > 1:
        data_parallel_rank = next(_search_ranks) % ranks  # one rank per search: its prefix cache
    scorer = _AsyncScorer(engine_client, data_parallel_rank=data_parallel_rank, lora_request=lora_request)
    book = _Rows(trie, rows, vocab, "always", record=record_logprobs)

    async def score() -> torch.Tensor:
        prompts_, _, owners = book.requests()
        if not prompts_:
            return book.logits(owners, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        return book.logits(owners, *await scorer.run(prompts_))

    logits = await score()
    loop = search_loop(logits, trie=trie, num_beams=num_beams, length_penalty=length_penalty, normalize="none",
                       exclude_items=exclude_items, backend=backend)
    # grad mode is per thread and every search shares the event loop's thread: a mode held across
    # an await would be restored out of order by the other searches (and leak into the host), so
    # each synchronous stretch of the search sets it for itself
    try:
        with torch.inference_mode():
            beam_index, tokens = next(loop)
        while True:
            book.advance(beam_index, tokens)
            logits = await score()
            with torch.inference_mode():
                beam_index, tokens = loop.send(logits)
    except StopIteration as done:
        return done.value, book


async def beam_search_async(engine_client, prompts, *, trie, num_beams: int, length_penalty: float = 0.0,
                            exclude_items=None, backend: str = "auto", data_parallel_rank: int | None = None,
                            lora_request=None) -> BeamSearchOutput:
    """Trie-constrained beam search on vLLM's async engine client; ``await`` it.

    Args:
        engine_client: a running ``vllm.v1.engine.async_llm.AsyncLLM`` (or the engine client of
            vLLM's OpenAI server) whose model has ``trie.vocab_size`` tokens, started with
            ``max_logprobs=-1`` (or at least the vocabulary size) and the default
            ``logprobs_mode="raw_logprobs"``.
        prompts: token-id lists (or ``TokensPrompt`` dicts with ``prompt_token_ids``), one per request.
        trie, num_beams, length_penalty, exclude_items, backend: as in :func:`decoding.beam_search`.
        data_parallel_rank: the rank every request of this search goes to; default: round-robin
            over searches when the engine is data-parallel.
        lora_request: a ``vllm.lora.request.LoRARequest`` for every request, or None.
    Returns:
        :class:`decoding.BeamSearchOutput`, the same as :func:`decoding.beam_search` on the same
        weights in transformers (float32), up to float rounding between the two engines.

    The engine keeps serving other requests meanwhile; concurrent calls share its forward passes.
    """
    out, _ = await search(engine_client, prompts, trie=trie, num_beams=num_beams, length_penalty=length_penalty,
                          exclude_items=exclude_items, backend=backend, data_parallel_rank=data_parallel_rank,
                          lora_request=lora_request)
    return out
