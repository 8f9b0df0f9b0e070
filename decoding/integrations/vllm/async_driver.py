"""Exact trie-constrained beam search on vLLM's async engine (``AsyncLLM``: what a ``vllm serve``
process runs, or one an application builds with ``AsyncLLM.from_engine_args``).

The search is :func:`decoding.search.beam.search_loop`, the same code as :func:`decoding.beam_search`.
Each live beam is one-token greedy requests returning the exact full-vocabulary log-probs the beam
needs: O(children) numbers per beam and step, never the vocabulary (the plan is
:mod:`decoding.integrations.vllm.rows`). The requests of every concurrent search share the
engine's forward passes; vLLM's prefix cache reuses the prompt KV across beams and steps.

Requests go to the engine core and their outputs are taken out of the engine's output stream
before vLLM's output processor (``_compat``'s output router, installed once per engine), as
arrays. This is internal vLLM interface (reached through :mod:`decoding.integrations.vllm._compat`),
which is why the driver refuses vLLM versions outside the supported range unless the engine opted in.

Sharing an engine:

- **fairness**: one search keeps at most ``max_requests_per_search`` requests in the engine
  (operator config, default twice the engine's ``max_num_seqs``: enough to keep the engine's next
  batch full), sending the next as each is answered: a search at thousands of beams interleaves
  with the other clients' requests and never queues more than that ahead of them;
- **cancellation**: a search whose caller is cancelled (a client that disconnects) sends nothing
  more and aborts its requests in flight;
- **other clients' log-probs**: asking token ids beside other clients' ``logprobs=N`` requests is
  safe: the current runner answers each row for itself, and on vLLM 0.32-0.33's legacy runner the
  package's plugin mends the sampler, which otherwise answers such a batch with -inf alternatives
  (``_compat.install_mixed_logprobs_fix``).

Under data parallelism every request of one search goes to one rank (``data_parallel_rank``,
round-robin over searches unless the caller names one), so its prompt stays in that rank's
prefix cache.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import torch

from decoding._transformers import left_pad
from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.catalogs import catalogs_for
from decoding.integrations.vllm.rows import BeamRows, ScoreRequest, check_prompts
from decoding.search.beam import BeamSearchOutput, search_loop, validate_search

_search_ids = itertools.count()
_search_ranks = itertools.count()


class _AsyncScorer:
    """One search's one-token greedy requests, sent to the engine core under the search's
    in-flight bound; their log-probs come back through the engine's output router."""

    def __init__(self, engine: _compat.AsyncEngine, *, data_parallel_rank: int | None, lora_request=None):
        self.engine = engine
        self._rank, self._lora = data_parallel_rank, lora_request
        self._tag = f"decoding-beam-{os.getpid()}-{next(_search_ids)}-"
        self._ids = itertools.count()
        bound = catalogs_for(engine.vllm_config).options.max_requests_per_search
        self._slots = asyncio.Semaphore(bound if bound is not None else 2 * engine.max_num_seqs)

    async def run(self, requests: list[ScoreRequest]):
        """The :class:`Scored` answer of each request, in order."""
        loop = asyncio.get_running_loop()
        engine, futures = self.engine, {}
        try:
            for request in requests:
                await self._slots.acquire()
                future = loop.create_future()
                future.add_done_callback(lambda _: self._slots.release())  # answered, failed or cancelled
                rid = f"{self._tag}{next(self._ids)}"
                futures[rid] = future
                await engine.add(engine.request(rid, request.prompt, logprobs=request.top_n,
                                                token_ids=request.token_ids, data_parallel_rank=self._rank,
                                                lora_request=self._lora), future)
            return list(await asyncio.gather(*futures.values()))
        except BaseException:
            # a cancelled search (its client left) cancels the futures too: every request without
            # an answer is still in the engine, and is aborted there
            unanswered = [rid for rid, f in futures.items() if not f.done() or f.cancelled()]
            for rid in unanswered:
                futures[rid].cancel()
            await engine.abort(unanswered)
            raise


async def search(engine_client, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                 backend: str = "auto", data_parallel_rank: int | None = None, lora_request=None,
                 record_logprobs: bool = False):
    """:func:`beam_search_async`, also returning the rows' book (:class:`BeamRows`): its ``stats``
    say what the search asked of the engine, and with ``record_logprobs`` its ``children_logprobs``
    hold every scored prefix's children log-probs."""
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
    keep = 2 * num_beams if trie.eos_token_id is not None else num_beams
    excluded = trie.excluded_ranks(exclude_items, len(rows)) if exclude_items is not None else None
    book = BeamRows(trie, rows, vocab, keep=keep, max_logprobs=engine.max_logprobs,
                    max_ids=engine.max_logprob_token_ids, excluded=excluded, record=record_logprobs)

    async def score() -> torch.Tensor:
        requests = book.requests()
        answers = await scorer.run(requests) if requests else []
        more = book.followups(requests, answers)
        if more:
            requests, answers = requests + more, answers + await scorer.run(more)
        return book.logits(requests, answers)

    logits = await score()
    loop = search_loop(logits, trie=book.search_trie, num_beams=num_beams, length_penalty=length_penalty,
                       normalize="none", exclude_items=exclude_items, backend=backend)
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
        return book.to_real(done.value), book


async def beam_search_async(engine_client, prompts, *, trie, num_beams: int, length_penalty: float = 0.0,
                            exclude_items=None, backend: str = "auto", data_parallel_rank: int | None = None,
                            lora_request=None) -> BeamSearchOutput:
    """Trie-constrained beam search on vLLM's async engine client; ``await`` it.

    Args:
        engine_client: a running ``vllm.v1.engine.async_llm.AsyncLLM`` (or the engine client of
            vLLM's OpenAI server) whose model has ``trie.vocab_size`` tokens, with the default
            ``logprobs_mode="raw_logprobs"``. A ``max_logprobs`` of at least twice ``num_beams``
            (or -1) lets a trie node with more than 128 children cost one request, not several.
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
