"""Exact trie-constrained beam search on vLLM's async engine (``AsyncLLM``: what a ``vllm serve``
process runs, or one an application builds with ``AsyncLLM.from_engine_args``).

The search is :func:`decoding.search.beam.search_loop`, the same code as :func:`decoding.beam_search`.
Each live beam is one greedy one-token request returning the full-vocabulary log-probs of the next
token. All requests of a step are in flight together, and so are the steps of every concurrent
search, so the engine batches the beams of all in-flight searches into the same forward passes;
vLLM's prefix cache reuses the prompt KV across beams and steps.

Requests go to the engine core and their outputs are taken out of the engine's output stream
before vLLM's output processor (``_compat``'s output router, installed once per engine): the
log-probs arrive as arrays, where the front end would build one Python object per token and
request (measured: most of the time of a search at full-vocabulary log-probs). This is internal
vLLM interface (reached through :mod:`decoding.integrations.vllm._compat`), which is why the
driver refuses vLLM versions outside the supported range unless the engine opted in.

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

import torch

from decoding._hf import left_pad
from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.rows import BeamRows, check_prompts
from decoding.search.beam import BeamSearchOutput, search_loop, validate_search

_search_ids = itertools.count()
_search_ranks = itertools.count()


class _AsyncScorer:
    """One search's one-token greedy requests, sent to the engine core; their full-vocabulary
    log-probs come back through the engine's output router."""

    def __init__(self, engine: _compat.AsyncEngine, *, data_parallel_rank: int | None, lora_request=None):
        if not engine.full_vocab_logprobs_allowed:
            raise ValueError(f"engine_client: exact beam search needs the full-vocabulary log-probs of each beam; "
                             f"start the engine with max_logprobs=-1 (`--max-logprobs -1`), not "
                             f"{engine.max_logprobs}")
        self.engine = engine
        self._logprobs = -1 if engine.max_logprobs == -1 else engine.vocab_size
        self._rank, self._lora = data_parallel_rank, lora_request
        self._tag = f"decoding-beam-{os.getpid()}-{next(_search_ids)}-"
        self._ids = itertools.count()

    async def run(self, prompts: list[list[int]]):
        """Full-vocabulary log-probs at the end of each prompt, all requests in flight together:
        ``(request index, Scored)`` pairs."""
        loop = asyncio.get_running_loop()
        engine, futures = self.engine, {}
        try:
            for prompt in prompts:
                rid = f"{self._tag}{next(self._ids)}"
                futures[rid] = loop.create_future()
                await engine.add(engine.request(rid, prompt, logprobs=self._logprobs,
                                                data_parallel_rank=self._rank, lora_request=self._lora),
                                 futures[rid])
            answers = await asyncio.gather(*futures.values())
        except BaseException:
            # a cancelled search (its client left) cancels the futures too: every request without
            # an answer is still in the engine, and is aborted there
            await engine.abort([rid for rid, f in futures.items() if not f.done() or f.cancelled()])
            raise
        return list(enumerate(answers))


async def search(engine_client, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                 backend: str = "auto", data_parallel_rank: int | None = None, lora_request=None,
                 record_logprobs: bool = False):
    """:func:`beam_search_async`, also returning the rows' book (:class:`BeamRows`), whose
    ``children_logprobs`` holds every scored prefix's children log-probs with ``record_logprobs``."""
    engine = engine_client if isinstance(engine_client, _compat.AsyncEngine) else _compat.AsyncEngine(engine_client)
    _compat.check_version(vllm_config=engine.vllm_config)
    if engine.logprobs_mode != "raw_logprobs":
        raise ValueError(f"engine_client: the engine's logprobs_mode is {engine.logprobs_mode!r}; exact beam search "
                         "needs 'raw_logprobs' (the full-vocabulary log-probs transformers ranks by)")
    vocab = engine.vocab_size
    if trie.vocab_size != vocab:
        raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has {vocab}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty: expected a float, got {type(length_penalty).__name__}")
    rows = check_prompts(prompts, trie, vocab, engine.max_model_len)
    input_ids, mask = left_pad(rows)
    validate_search(input_ids, mask, trie, num_beams)
    trie = trie.to("cpu")
    if data_parallel_rank is None and engine.data_parallel_size > 1:
        data_parallel_rank = next(_search_ranks) % engine.data_parallel_size  # one rank per search: its prefix cache
    scorer = _AsyncScorer(engine, data_parallel_rank=data_parallel_rank, lora_request=lora_request)
    book = BeamRows(trie, rows, vocab, "always", record=record_logprobs)

    async def score() -> torch.Tensor:
        prompts_, _, owners = book.requests()
        return book.logits(owners, await scorer.run(prompts_) if prompts_ else [])

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
