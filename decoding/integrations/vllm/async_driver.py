"""Exact trie-constrained beam search on vLLM's async engine client (``AsyncLLM``: what a
``vllm serve`` process runs, or one an application builds with ``AsyncLLM.from_engine_args``).

The search is :func:`decoding.search.beam.search_loop`, the same code as :func:`decoding.beam_search`;
the model work goes to the engine as public ``engine_client.generate`` requests: each live beam is
one greedy one-token request returning the full-vocabulary log-probs (``logprobs=-1``; the engine
needs ``max_logprobs=-1``, or at least the vocabulary size). Not ``logprob_token_ids``, which
would return only the beam's children: in vLLM 0.32's legacy model runner (the CPU build's) one
such request in a batch makes every other request of the batch that asks for ``logprobs`` get -inf
(the sampler prefers the token-id gather for the whole batch), and a shared engine serves other
clients' requests in the same batches. All requests of a step are in flight together, and so are
the steps of every concurrent search, so the engine batches the beams of all in-flight searches
into the same forward passes. vLLM's prefix cache reuses the prompt KV across beams and steps.

Under data parallelism every request of one search goes to one rank (``data_parallel_rank``,
round-robin over searches unless the caller names one), so its prompt stays in that rank's
prefix cache.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import numpy as np
import torch

from decoding.integrations.vllm._version import check_version
from decoding.integrations.vllm.driver import _full_vocab_logprobs_allowed, _left_padded, _Rows, check_prompts
from decoding.search.beam import BeamSearchOutput, search_loop, validate_search

_request_ids = itertools.count()
_search_ranks = itertools.count()


def data_parallel_size(engine_client) -> int:
    return int(getattr(engine_client.vllm_config.parallel_config, "data_parallel_size", 1) or 1)


class _AsyncScorer:
    """Sends one-token greedy requests through ``engine_client.generate`` and gathers their log-probs."""

    def __init__(self, engine_client, *, data_parallel_rank: int | None, lora_request=None):
        from vllm import SamplingParams

        model_config = engine_client.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        if not _full_vocab_logprobs_allowed(engine_client, self.vocab_size):
            raise ValueError(f"engine_client: exact beam search needs the full-vocabulary log-probs of each beam; "
                             f"start the engine with max_logprobs=-1 (`--max-logprobs -1`), not "
                             f"{model_config.max_logprobs}")
        self._all = -1 if model_config.max_logprobs == -1 else self.vocab_size
        self._client, self._rank, self._lora = engine_client, data_parallel_rank, lora_request
        self._params = SamplingParams
        self._tag = f"decoding-beam-{os.getpid()}-"

    async def _one(self, prompt: list[int]):
        params = self._params(max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True,
                              logprobs=self._all)
        last = None
        async for last in self._client.generate({"type": "token", "prompt_token_ids": prompt}, params,
                                                f"{self._tag}{next(_request_ids)}", lora_request=self._lora,
                                                data_parallel_rank=self._rank):
            pass
        out = None if last is None else last.outputs[0]
        if out is None or out.logprobs is None or len(out.logprobs) == 0:
            reason = None if out is None else out.finish_reason
            raise RuntimeError(f"vLLM engine returned no log-probs for a beam-search request (finish reason {reason})")
        flat = out.logprobs
        if hasattr(flat, "start_indices"):  # FlatLogprobs: plain lists, no per-token objects
            lo, hi = flat.start_indices[0], flat.end_indices[0]
            return flat.token_ids[lo:hi], flat.logprobs[lo:hi]
        first = flat[0]
        return list(first), [v.logprob for v in first.values()]

    async def run(self, prompts: list[list[int]]):
        """Full-vocabulary log-probs at the end of each prompt, all requests in flight together:
        (request, token, logprob) as flat int64/int64/float32 numpy arrays."""
        tasks = [asyncio.ensure_future(self._one(p)) for p in prompts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # a cancelled generate() aborts its engine request
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        owners = np.concatenate([np.full(len(ids), i) for i, (ids, _) in enumerate(results)]).astype(np.int64)
        tokens = np.concatenate([np.asarray(ids, np.int64) for ids, _ in results])
        values = np.concatenate([np.asarray(v, np.float32) for _, v in results])
        return owners, tokens, values


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
    input_ids, mask = _left_padded(rows)
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
    with torch.inference_mode():
        loop = search_loop(logits, trie=trie, num_beams=num_beams, length_penalty=length_penalty, normalize="none",
                           exclude_items=exclude_items, backend=backend)
        try:
            beam_index, tokens = next(loop)
            while True:
                book.advance(beam_index, tokens)
                logits = await score()
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
