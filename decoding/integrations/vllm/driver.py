"""Exact trie-constrained beam search driven through a vLLM engine.

vLLM runs the model; :func:`decoding.beam_search` ranks the candidates with ``trie_beam_step``.
Each live beam is one-token engine requests (prompt + the beam's tokens, ``max_tokens=1``,
greedy) that return the exact full-vocabulary log-probs the beam needs, O(children) numbers per
beam, never the vocabulary: the log-probs of its trie node's children by id, or for a node with
more than 128 children the top-N over the vocabulary with a fallback by id where those cannot
decide the beam (see :mod:`decoding.integrations.vllm.rows`). vLLM's prefix cache reuses the
prompt KV across beams and steps.

Requests go straight to the engine core (the in-process or the multiprocess client), skipping
vLLM's front end: prompt rendering, per-request parameter validation and cloning, detokenisation
and ``RequestOutput`` building, which the driver does not need because it builds already valid
token-id requests and reads log-probs as arrays. That is vLLM-internal interface (reached through
:mod:`decoding.integrations.vllm._compat`), which is why the driver refuses vLLM versions outside
the supported range unless the engine opted in. The engine must be idle while the driver runs (it
drains its own requests and aborts them on error).

The top-K equals :func:`decoding.beam_search` on the same weights in transformers (float32), up
to float rounding between the two engines and ties at the K-th score.
"""

from __future__ import annotations

import itertools
import os

import torch

from decoding._transformers import left_pad
from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.rows import BeamRows, ScoreRequest, check_prompts
from decoding.search.beam import BeamSearchOutput, validate_search

_request_ids = itertools.count()


class _EngineCoreScorer:
    """Submits one-token greedy requests to an idle engine core and returns their log-probs."""

    def __init__(self, engine: _compat.SyncEngine):
        if engine.has_unfinished_requests():
            raise RuntimeError("llm: the engine has unfinished requests; the vLLM driver needs an idle engine")
        self.engine = engine
        self._tag = f"decoding-beam-{os.getpid()}-"

    def run(self, requests: list[ScoreRequest]):
        """The :class:`Scored` answer of each request, in order."""
        engine, pending, done = self.engine, {}, [None] * len(requests)
        try:
            for index, request in enumerate(requests):
                rid = f"{self._tag}{next(_request_ids)}"
                engine.add(engine.request(rid, request.prompt, logprobs=request.top_n, token_ids=request.token_ids))
                pending[rid] = index
            while pending:
                for rid, scored in engine.outputs():
                    index = pending.pop(rid, None)
                    if index is not None:
                        done[index] = scored
        except BaseException:
            if pending:
                engine.abort(list(pending))
            raise
        return done


def _score(scorer: _EngineCoreScorer, rows: BeamRows) -> torch.Tensor:
    """One step's engine rounds for ``rows``: their compact logits ``[rows, C]``."""
    requests = rows.requests()
    answers = scorer.run(requests)
    more = rows.followups(requests, answers)
    if more:
        requests, answers = requests + more, answers + scorer.run(more)
    return rows.logits(requests, answers)


def _engine_for(llm, trie) -> _compat.SyncEngine:
    engine = _compat.SyncEngine(llm)
    # engine internals: refuse an unsupported vLLM (unless opted in) instead of misreading it
    _compat.check_version(vllm_config=engine.vllm_config)
    if engine.vocab_size != trie.vocab_size:
        raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has {engine.vocab_size}")
    return engine


class VLLMBeamModel:
    """:class:`decoding.BeamModel` over a vLLM ``LLM``, for :func:`decoding.beam_search` with
    ``normalize="none"``: row logits ``[R, V]`` hold the exact full-vocabulary log-probs of the
    row's valid children and -inf elsewhere (``trie_beam_step`` reads only the children). Rows
    whose node has no children (finished or dead beams) send no request. :func:`beam_search` is
    the faster route (its rows are the catalog's tokens only, not the vocabulary).

    Args:
        llm, trie: as in :func:`beam_search`.
        num_beams: the search's beams, which lets a wide node be decided by the engine's top-N
            log-probs; None asks every node's children by id.
    """

    def __init__(self, llm, trie, num_beams: int | None = None):
        engine = _engine_for(llm, trie)
        self.trie = trie.to("cpu")
        self.vocab_size = engine.vocab_size
        eos = self.trie.eos_token_id is not None
        self.keep = self.trie.num_items if num_beams is None else (2 if eos else 1) * num_beams
        self._scorer = _EngineCoreScorer(engine)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids.cpu()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.cpu()
        engine = self._scorer.engine
        self.rows = BeamRows(self.trie, [row[m.bool()].tolist() for row, m in zip(ids, mask)], self.vocab_size,
                             keep=self.keep, max_logprobs=engine.max_logprobs, max_ids=engine.max_logprob_token_ids)
        return self._dense(_score(self._scorer, self.rows))

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # the BeamModel protocol speaks the model's tokens; the rows walk the compact catalog
        compact = torch.searchsorted(self.rows.real_tokens, tokens.cpu()).clamp(max=self.rows.real_tokens.numel() - 1)
        self.rows.advance(beam_index, compact)
        return self._dense(_score(self._scorer, self.rows))

    def _dense(self, compact: torch.Tensor) -> torch.Tensor:
        out = torch.full((compact.shape[0], self.vocab_size), float("-inf"))
        out[:, self.rows.real_tokens] = compact
        return out


def beam_search(llm, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                backend: str = "auto") -> BeamSearchOutput:
    """Trie-constrained beam search with vLLM running the model.

    Args:
        llm: an idle ``vllm.LLM`` whose model has ``trie.vocab_size`` tokens. A ``max_logprobs``
            of at least twice ``num_beams`` (or -1) lets a wide trie node cost one request rather
            than several (with vLLM's default, 20, such nodes ask their children by id).
        prompts: token-id lists (or ``TokensPrompt`` dicts with ``prompt_token_ids``), one per request.
        trie, num_beams, length_penalty, exclude_items, backend: as in :func:`decoding.beam_search`.
    Returns:
        :class:`decoding.BeamSearchOutput` (``items``, ``scores``, ``sequences``).
    """
    engine = _engine_for(llm, trie)
    rows = check_prompts(prompts, trie, engine.vocab_size, engine.max_model_len)
    input_ids, mask = left_pad(rows)
    validate_search(input_ids, mask, trie, num_beams)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty: expected a float, got {type(length_penalty).__name__}")
    trie = trie.to("cpu")
    keep = 2 * num_beams if trie.eos_token_id is not None else num_beams
    excluded = trie.excluded_ranks(exclude_items, len(rows)) if exclude_items is not None else None
    book = BeamRows(trie, rows, engine.vocab_size, keep=keep, max_logprobs=engine.max_logprobs,
                    max_ids=engine.max_logprob_token_ids, excluded=excluded)
    scorer = _EngineCoreScorer(engine)
    return book.search(lambda: _score(scorer, book), num_beams=num_beams, length_penalty=length_penalty,
                       exclude_items=exclude_items, backend=backend)
