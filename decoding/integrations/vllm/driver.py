"""Exact trie-constrained beam search driven through a vLLM engine.

vLLM runs the model; :func:`decoding.beam_search` ranks the candidates with ``trie_beam_step``.
Each live beam is one engine request (prompt + the beam's tokens, ``max_tokens=1``, greedy) that
returns the full-vocabulary log-probs of exactly the valid children of the beam's trie node
(``logprob_token_ids``, at most 128 per request). A node with more children asks for the whole
vocabulary instead when the engine allows it (``max_logprobs=-1`` or at least the vocabulary size),
and is otherwise split over several requests, which prefill the same tokens once per request.
vLLM's prefix cache reuses the prompt KV across beams and steps.

Requests go straight to the engine core (the in-process or the multiprocess client), skipping
vLLM's front end: prompt rendering, per-request parameter validation and cloning, detokenisation
and ``RequestOutput`` building, which the driver does not need because it builds already valid
token-id requests and reads log-probs as arrays. That is vLLM-internal interface (reached through
:mod:`decoding.integrations.vllm._compat`), which is why the driver refuses vLLM versions outside
the supported range unless the engine opted in. The engine must be idle while the driver runs (it
drains its own requests and aborts them on error).

The top-K equals :func:`decoding.beam_search` on the same weights in transformers (float32), up
to float rounding between the two engines.
"""

from __future__ import annotations

import itertools
import os

import torch

from decoding._hf import left_pad
from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.rows import BeamRows, check_prompts
from decoding.search.beam import BeamSearchOutput
from decoding.search.beam import beam_search as _beam_search

_request_ids = itertools.count()


class _EngineCoreScorer:
    """Submits one-token greedy requests to an idle engine core and returns their log-probs."""

    def __init__(self, engine: _compat.SyncEngine):
        if engine.has_unfinished_requests():
            raise RuntimeError("llm: the engine has unfinished requests; the vLLM driver needs an idle engine")
        self.engine = engine
        self._tag = f"decoding-beam-{os.getpid()}-"

    def run(self, prompts: list[list[int]], token_ids: list[list[int] | None]):
        """``(request index, Scored)`` pairs, in any order, for one-token requests at the end of
        each prompt asking for ``token_ids`` (≤128 ids per request, or None for the whole vocabulary)."""
        engine, pending, done = self.engine, {}, []
        try:
            for index, (prompt, ids) in enumerate(zip(prompts, token_ids)):
                rid = f"{self._tag}{next(_request_ids)}"
                logprobs = engine.vocab_size if ids is None else None
                engine.add(engine.request(rid, prompt, logprobs=logprobs, token_ids=ids))
                pending[rid] = index
            while pending:
                for rid, scored in engine.outputs():
                    index = pending.pop(rid, None)
                    if index is not None:
                        done.append((index, scored))
        except BaseException:
            if pending:
                engine.abort(list(pending))
            raise
        return done


class VLLMBeamModel:
    """:class:`decoding.BeamModel` over a vLLM ``LLM``. Row logits hold the exact full-vocabulary
    log-probs of the row's valid children (plus whatever else the engine returned) and -inf
    elsewhere; ``trie_beam_step`` reads only the children, so use ``normalize="none"``. Rows whose
    node has no children (finished or dead beams) send no request."""

    def __init__(self, llm, trie):
        engine = _compat.SyncEngine(llm)
        # engine internals: refuse an unsupported vLLM (unless opted in) instead of misreading it
        _compat.check_version(vllm_config=engine.vllm_config)
        if engine.vocab_size != trie.vocab_size:
            raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has "
                             f"{engine.vocab_size}")
        self.trie = trie.to("cpu")
        self.vocab_size = engine.vocab_size
        self._scorer = _EngineCoreScorer(engine)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids.cpu()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.cpu()
        self._rows = BeamRows(self.trie, [row[m.bool()].tolist() for row, m in zip(ids, mask)], self.vocab_size,
                              "wide" if self._scorer.engine.full_vocab_logprobs_allowed else "never")
        return self._score()

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._rows.advance(beam_index, tokens)
        return self._score()

    def _score(self) -> torch.Tensor:
        prompts, wanted, owners = self._rows.requests()
        return self._rows.logits(owners, self._scorer.run(prompts, wanted) if prompts else [])


def beam_search(llm, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                backend: str = "auto") -> BeamSearchOutput:
    """Trie-constrained beam search with vLLM running the model.

    Args:
        llm: an idle ``vllm.LLM`` whose model has ``trie.vocab_size`` tokens. Give it
            ``max_logprobs=-1`` (or at least the vocabulary size) so that trie nodes with more than
            128 children cost one request rather than several.
        prompts: token-id lists (or ``TokensPrompt`` dicts with ``prompt_token_ids``), one per request.
        trie, num_beams, length_penalty, exclude_items, backend: as in :func:`decoding.beam_search`.
    Returns:
        :class:`decoding.BeamSearchOutput` (``items``, ``scores``, ``sequences``).
    """
    model = VLLMBeamModel(llm, trie)
    engine = model._scorer.engine
    rows = check_prompts(prompts, trie, engine.vocab_size, engine.max_model_len)
    input_ids, mask = left_pad(rows)
    return _beam_search(model, input_ids, mask, trie=trie, num_beams=num_beams,
                        length_penalty=length_penalty, normalize="none", exclude_items=exclude_items,
                        backend=backend)
