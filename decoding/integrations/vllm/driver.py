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

from decoding._hf import left_pad
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


def _front_end_params(engine, **fields):
    """Greedy one-token ``SamplingParams`` (plus ``fields``) as vLLM's front end would hand them to
    the engine core: the model's generation config and tokenizer applied, once per driver, since
    the drivers submit to the engine core directly. ``engine``: an ``LLMEngine`` or ``AsyncLLM``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_clone=True, **fields)
    processor = engine.input_processor
    params.update_from_generation_config(processor.generation_config_fields, engine.renderer.get_eos_token_id())
    if processor.tokenizer is not None:
        params.update_from_tokenizer(processor.tokenizer)
    return params


class _EngineCoreScorer:
    """Submits one-token greedy requests to a vLLM engine core and returns their log-probs."""

    def __init__(self, llm):
        import msgspec
        from vllm.v1.engine import EngineCoreRequest

        engine = llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("llm: the engine has unfinished requests; the vLLM driver needs an idle engine")
        self._engine, self._client = engine, engine.engine_core
        self._request, self._replace = EngineCoreRequest, msgspec.structs.replace
        self._template = _front_end_params(engine)
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
            done = []
            while pending:
                for out in self._client.get_output().outputs:
                    index = pending.pop(out.request_id, None)
                    if index is not None:
                        done.append((index, out))
        except BaseException:
            if pending:
                self._client.abort_requests(list(pending))
            raise
        return flatten_logprobs(done)


def flatten_logprobs(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(request, token, logprob)`` as flat int64/int64/float32 arrays from ``(request index,
    EngineCoreOutput)`` pairs (each output's log-probs of its one generated position)."""
    owners, tokens, values = [], [], []
    for index, out in outputs:
        if out.new_logprobs is None:
            raise RuntimeError(f"vLLM engine returned no log-probs for request {index} "
                               f"(finish reason {out.finish_reason})")
        ids = out.new_logprobs.logprob_token_ids[0]
        owners.append(np.full(len(ids), index))
        tokens.append(ids)
        values.append(out.new_logprobs.logprobs[0])
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(owners).astype(np.int64), np.concatenate(tokens).astype(np.int64),
            np.concatenate(values).astype(np.float32))


class _Rows:
    """The search's rows between engine calls: each row's tokens (prompt + identifier so far) and
    trie node, the engine requests that score them, and the log-probs those requests returned.

    A row whose node has no children (a finished or dead beam) sends no request. The requests of
    one engine call all ask for the same kind of log-probs: vLLM 0.32's legacy model runner (the
    CPU build's) answers a batch that mixes ``logprob_token_ids`` requests with ``logprobs=N``
    requests with -inf for the latter's tokens (its sampler prefers the token-id gather for the
    whole batch). So a step asks every row for the whole vocabulary when any row has more than 128
    children and the engine allows it (``full_vocab="wide"``), or always (``"always"``: a shared
    engine, whose other requests may ask for ``logprobs``); otherwise each row asks for its
    children, split over several requests above 128."""

    def __init__(self, trie, rows: list[list[int]], vocab_size: int, full_vocab: str, record: bool = False):
        self.trie, self.vocab_size, self.full_vocab = trie, vocab_size, full_vocab
        self.tokens = rows
        self.request_of = list(range(len(rows)))  # which prompt each row belongs to
        self.prompt_len = [len(r) for r in rows]
        self.nodes = torch.zeros(len(rows), dtype=torch.long)
        # (prompt, identifier prefix) -> (logits, row, children's node range): read by children_of
        self.children_logprobs: dict | None = {} if record else None
        self._scored: list[tuple[int, int, int]] = []

    def advance(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> None:
        beam_index, tokens = beam_index.cpu(), tokens.cpu()
        self.tokens = [self.tokens[i] + [t] for i, t in zip(beam_index.tolist(), tokens.tolist())]
        self.request_of = [self.request_of[i] for i in beam_index.tolist()]
        self.nodes = self.trie.walk(tokens[:, None], start=self.nodes[beam_index])

    def _live(self):
        """(row, first child node, end) of every row whose node has children, as Python ints."""
        nodes = self.nodes
        live = (nodes >= 0).nonzero().flatten()
        safe = nodes[live]
        lo, hi = self.trie.indptr[safe].long(), self.trie.indptr[safe + 1].long()
        keep = lo < hi
        return list(zip(live[keep].tolist(), lo[keep].tolist(), hi[keep].tolist()))

    def requests(self):
        """(prompts, token ids per request or None for the whole vocabulary, owning row per request)."""
        node_token = self.trie.node_token
        live = self._scored = self._live()  # the rows logits() fills in
        whole = self.full_vocab == "always" or (
            self.full_vocab == "wide" and any(hi - lo > MAX_TOKEN_IDS_PER_REQUEST for _, lo, hi in live))
        prompts, wanted, owners = [], [], []
        for row, lo, hi in live:
            if whole:
                chunks = [None]
            else:
                children = node_token[lo + 1: hi + 1].tolist()
                chunks = [children[c: c + MAX_TOKEN_IDS_PER_REQUEST]
                          for c in range(0, len(children), MAX_TOKEN_IDS_PER_REQUEST)]
            for chunk in chunks:
                prompts.append(self.tokens[row])
                wanted.append(chunk)
                owners.append(row)
        return prompts, wanted, owners

    def logits(self, owners: list[int], request: np.ndarray, token: np.ndarray, value: np.ndarray) -> torch.Tensor:
        """float32 ``[rows, V]``: the returned log-probs of the last :meth:`requests`, -inf elsewhere."""
        # NumPy, single-threaded: in a server process beside a busy engine, torch's intra-op
        # threads wait for cores far longer than this scatter takes (measured: most of a search)
        scores = np.full((len(self.tokens), self.vocab_size), -np.inf, dtype=np.float32)
        if len(request):
            scores[np.asarray(owners, dtype=np.int64)[request], token] = value
        out = torch.from_numpy(scores)
        if self.children_logprobs is not None:
            # kept by reference; read for the results' prefixes only (children_of)
            for row, lo, hi in self._scored:
                request = self.request_of[row]
                key = (request, tuple(self.tokens[row][self.prompt_len[request]:]))
                self.children_logprobs[key] = (out, row, lo, hi)
        return out

    def children_of(self, request: int, prefix) -> dict[int, float]:
        """``{child token: log-prob}`` of the node the identifier ``prefix`` of ``request`` reached."""
        out, row, lo, hi = self.children_logprobs[(request, tuple(prefix))]
        children = self.trie.node_token[lo + 1: hi + 1].long()
        return dict(zip(children.tolist(), out[row, children].tolist()))


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
        self._rows = _Rows(self.trie, [row[m.bool()].tolist() for row, m in zip(ids, mask)], self.vocab_size,
                           "wide" if self._scorer.full_vocab_allowed else "never")
        return self._score()

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._rows.advance(beam_index, tokens)
        return self._score()

    def _score(self) -> torch.Tensor:
        prompts, wanted, owners = self._rows.requests()
        found = self._scorer.run(prompts, wanted) if prompts else (np.zeros(0, np.int64),) * 2 + (np.zeros(0),)
        return self._rows.logits(owners, *found)


def check_prompts(prompts, trie, vocab: int, max_len: int) -> list[list[int]]:
    """Token-id lists from ``prompts`` (lists or ``TokensPrompt`` dicts), checked as vLLM's front
    end would check them (the drivers skip it)."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        ids = p["prompt_token_ids"] if isinstance(p, dict) else p
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompts: prompt {i} must be a non-empty list of token ids")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompts: prompt {i} has token ids outside [0, {vocab}) of the engine's model")
        if len(ids) + trie.depth > max_len:
            raise ValueError(f"prompts: prompt {i} has {len(ids)} tokens; with {trie.depth}-token identifiers "
                             f"that exceeds the engine's max_model_len {max_len}")
        rows.append(list(ids))
    return rows


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
    model_config = llm.llm_engine.model_config
    rows = check_prompts(prompts, trie, _engine_vocab_size(llm), int(model_config.max_model_len))
    input_ids, mask = left_pad(rows)
    return _beam_search(VLLMBeamModel(llm, trie), input_ids, mask, trie=trie, num_beams=num_beams,
                        length_penalty=length_penalty, normalize="none", exclude_items=exclude_items,
                        backend=backend)
