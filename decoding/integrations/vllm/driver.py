"""Exact trie-constrained beam search driven through a vLLM engine.

vLLM runs the model; :func:`decoding.beam_search` ranks the candidates with ``trie_beam_step``.
Each live beam is one engine request (prompt + the beam's tokens, ``max_tokens=1``, greedy) that
returns the full-vocabulary log-probs of exactly the valid children of the beam's trie node
(``logprob_token_ids``, at most 128 per request). A node with more children asks for the whole
vocabulary instead when the engine allows it (``max_logprobs=-1`` or at least the vocabulary size),
and is otherwise split over several requests, which prefill the same tokens once per request.
vLLM's prefix cache reuses the prompt KV across beams and steps.

Requests go straight to the engine core (``LLMEngine.engine_core``: the in-process or the
multiprocess client), skipping vLLM's front end: prompt rendering, per-request parameter
validation and cloning, detokenisation and ``RequestOutput`` building, which the driver does not
need because it builds already valid token-id requests and reads log-probs as arrays. This is an
internal vLLM interface, which is why the driver refuses untested vLLM versions. The engine must
be idle while the driver runs (it drains its own requests and aborts them on error).

The top-K equals :func:`decoding.beam_search` on the same weights in transformers (float32), up
to float rounding between the two engines.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import torch

from decoding.integrations.vllm._version import check_version
from decoding.search.beam import BeamSearchOutput
from decoding.search.beam import beam_search as _beam_search

MAX_TOKEN_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS
_request_ids = itertools.count()


def _engine_vocab_size(llm) -> int:
    return int(llm.llm_engine.model_config.get_vocab_size())


def _full_vocab_logprobs_allowed(engine, vocab_size: int) -> bool:
    max_logprobs = engine.model_config.max_logprobs
    return max_logprobs == -1 or max_logprobs >= vocab_size


class _EngineCoreScorer:
    """Submits one-token greedy requests to a vLLM engine core and returns their log-probs."""

    def __init__(self, llm):
        import msgspec
        from vllm import SamplingParams
        from vllm.v1.engine import EngineCoreRequest

        engine = llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("llm: the engine has unfinished requests; the vLLM driver needs an idle engine")
        self._engine, self._client = engine, engine.engine_core
        self._request, self._replace = EngineCoreRequest, msgspec.structs.replace
        # what the front end would do to every request's params, done once
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_clone=True)
        processor = engine.input_processor
        params.update_from_generation_config(processor.generation_config_fields, engine.renderer.get_eos_token_id())
        if processor.tokenizer is not None:
            params.update_from_tokenizer(processor.tokenizer)
        self._template = params
        self.vocab_size = _engine_vocab_size(llm)
        self.full_vocab_allowed = _full_vocab_logprobs_allowed(engine, self.vocab_size)
        self._tag = f"decoding-beam-{os.getpid()}-"

    def run(self, prompts: list[list[int]], token_ids: list[list[int] | None]):
        """Log-probs at the end of each prompt.

        Args:
            prompts: token-id lists, one per request.
            token_ids: per request, the ≤128 token ids to return, or None for the whole vocabulary.
        Returns:
            (request, token, logprob) as three flat int64/int64/float32 numpy arrays, in any order;
            each request's sampled (argmax) token is included as well.
        """
        now = time.time()
        pending = {}
        try:
            for index, (prompt, ids) in enumerate(zip(prompts, token_ids)):
                rid = f"{self._tag}{next(_request_ids)}"
                if ids is None:
                    params = self._replace(self._template, logprobs=self.vocab_size)
                else:
                    params = self._replace(self._template, logprob_token_ids=ids)
                self._client.add_request(self._request(rid, prompt, None, params, None, now, None, None, None))
                pending[rid] = index
            owners, tokens, values = [], [], []
            while pending:
                for out in self._client.get_output().outputs:
                    index = pending.pop(out.request_id, None)
                    if index is None:
                        continue
                    if out.new_logprobs is None:
                        raise RuntimeError(f"vLLM engine returned no log-probs for request {index} "
                                           f"(finish reason {out.finish_reason})")
                    ids = out.new_logprobs.logprob_token_ids[0]
                    owners.append(np.full(len(ids), index))
                    tokens.append(ids)
                    values.append(out.new_logprobs.logprobs[0])
        except BaseException:
            if pending:
                self._client.abort_requests(list(pending))
            raise
        if not owners:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return (np.concatenate(owners).astype(np.int64), np.concatenate(tokens).astype(np.int64),
                np.concatenate(values).astype(np.float32))


class VLLMBeamModel:
    """:class:`decoding.BeamModel` over a vLLM ``LLM``. Row logits hold the exact full-vocabulary
    log-probs of the row's valid children (plus whatever else the engine returned) and -inf
    elsewhere; ``trie_beam_step`` reads only the children, so use ``normalize="none"``. Rows whose
    node has no children (finished or dead beams) send no request."""

    def __init__(self, llm, trie):
        check_version()  # engine internals: refuse an untested vLLM instead of misreading it
        vocab = _engine_vocab_size(llm)
        if vocab != trie.vocab_size:
            raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has {vocab}")
        self.trie = trie.to("cpu")
        self.vocab_size = vocab
        self._scorer = _EngineCoreScorer(llm)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids.cpu()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.cpu()
        self._tokens = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        self._nodes = torch.zeros(len(self._tokens), dtype=torch.long)
        return self._score()

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        beam_index, tokens = beam_index.cpu(), tokens.cpu()
        self._tokens = [self._tokens[i] + [t] for i, t in zip(beam_index.tolist(), tokens.tolist())]
        self._nodes = self.trie.walk(tokens[:, None], start=self._nodes[beam_index])
        return self._score()

    def _score(self) -> torch.Tensor:
        indptr, node_token = self.trie.indptr.tolist(), self.trie.node_token
        prompts, wanted, owners = [], [], []
        for row, node in enumerate(self._nodes.tolist()):
            if node < 0 or indptr[node] == indptr[node + 1]:
                continue
            children = node_token[indptr[node] + 1: indptr[node + 1] + 1].tolist()
            if len(children) > MAX_TOKEN_IDS_PER_REQUEST and self._scorer.full_vocab_allowed:
                chunks = [None]
            else:
                chunks = [children[lo: lo + MAX_TOKEN_IDS_PER_REQUEST]
                          for lo in range(0, len(children), MAX_TOKEN_IDS_PER_REQUEST)]
            for chunk in chunks:
                prompts.append(self._tokens[row])
                wanted.append(chunk)
                owners.append(row)
        out = torch.full((len(self._tokens), self.vocab_size), float("-inf"))
        if prompts:
            request, token, value = self._scorer.run(prompts, wanted)
            rows = torch.as_tensor(owners)[torch.from_numpy(request)]
            out[rows, torch.from_numpy(token)] = torch.from_numpy(value)
        return out


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
    check_version()
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    vocab, max_len = _engine_vocab_size(llm), int(llm.llm_engine.model_config.max_model_len)
    rows = []
    for i, p in enumerate(prompts):
        ids = p["prompt_token_ids"] if isinstance(p, dict) else p
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompts: prompt {i} must be a non-empty list of token ids")
        # the driver skips vLLM's front end, so it checks what the front end would have checked
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompts: prompt {i} has token ids outside [0, {vocab}) of the engine's model")
        if len(ids) + trie.depth > max_len:
            raise ValueError(f"prompts: prompt {i} has {len(ids)} tokens; with {trie.depth}-token identifiers "
                             f"that exceeds the engine's max_model_len {max_len}")
        rows.append(list(ids))
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):  # left padding, as decoding.beam_search expects
        input_ids[i, width - len(r):] = torch.as_tensor(r)
        mask[i, width - len(r):] = 1
    return _beam_search(VLLMBeamModel(llm, trie), input_ids, mask, trie=trie, num_beams=num_beams,
                        length_penalty=length_penalty, normalize="none", exclude_items=exclude_items,
                        backend=backend)
