"""Exact trie-constrained beam search driven through a vLLM engine.

vLLM runs the model; :func:`decoding.beam_search` ranks the candidates with ``trie_beam_step``.
The engine is reached through its public API: each live beam is one request (prompt + the
beam's tokens, ``max_tokens=1``) asking, through ``SamplingParams.logprob_token_ids``, for the
full-vocabulary log-probs of exactly the valid children of the beam's trie node (at most 128
per request, so wider nodes are split over several requests). vLLM's prefix cache reuses the
prompt KV across beams and steps. The top-K equals :func:`decoding.beam_search` on the same
weights in transformers (float32), up to float rounding between the two engines.
"""

from __future__ import annotations

import torch

from decoding.search.beam import BeamSearchOutput
from decoding.search.beam import beam_search as _beam_search

MAX_TOKEN_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS


def _engine_vocab_size(llm) -> int:
    return int(llm.llm_engine.model_config.get_vocab_size())


class VLLMBeamModel:
    """:class:`decoding.BeamModel` over a vLLM ``LLM``: row logits are the exact log-probs of
    the row's valid children, -inf elsewhere (use ``normalize="none"``). Rows whose node has no
    children (finished or dead beams) send no request."""

    def __init__(self, llm, trie):
        vocab = _engine_vocab_size(llm)
        if vocab != trie.vocab_size:
            raise ValueError(f"trie: built for vocab_size {trie.vocab_size}, the engine's model has {vocab}")
        self.llm = llm
        self.trie = trie.to("cpu")
        self.vocab_size = vocab

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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        trie = self.trie
        out = torch.full((len(self._tokens), self.vocab_size), float("-inf"))
        requests, params, owners = [], [], []
        indptr, node_token = trie.indptr, trie.node_token
        for row, node in enumerate(self._nodes.tolist()):
            if node < 0:
                continue
            children = node_token[int(indptr[node]) + 1 : int(indptr[node + 1]) + 1].tolist()
            for lo in range(0, len(children), MAX_TOKEN_IDS_PER_REQUEST):
                requests.append(TokensPrompt(prompt_token_ids=self._tokens[row]))
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True,
                                             logprob_token_ids=children[lo : lo + MAX_TOKEN_IDS_PER_REQUEST]))
                owners.append(row)
        if requests:
            results = self.llm.generate(requests, params, use_tqdm=False)
            rows, toks, vals = [], [], []
            for row, res, sp in zip(owners, results, params):
                flat = res.outputs[0].logprobs  # FlatLogprobs: one position, sampled token first
                lo, hi = flat.start_indices[0], flat.end_indices[0]
                wanted = set(sp.logprob_token_ids)  # drop the sampled token unless it was asked for
                for tok, val in zip(flat.token_ids[lo:hi], flat.logprobs[lo:hi]):
                    if tok in wanted:
                        rows.append(row)
                        toks.append(tok)
                        vals.append(val)
            out[torch.as_tensor(rows), torch.as_tensor(toks)] = torch.as_tensor(vals, dtype=torch.float32)
        return out


def beam_search(llm, prompts, *, trie, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
                backend: str = "auto") -> BeamSearchOutput:
    """Trie-constrained beam search with vLLM running the model.

    Args:
        llm: a ``vllm.LLM`` whose model has ``trie.vocab_size`` tokens.
        prompts: token-id lists (or ``TokensPrompt`` dicts with ``prompt_token_ids``), one per request.
        trie, num_beams, length_penalty, exclude_items, backend: as in :func:`decoding.beam_search`.
    Returns:
        :class:`decoding.BeamSearchOutput` (``items``, ``scores``, ``sequences``).
    """
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        ids = p["prompt_token_ids"] if isinstance(p, dict) else p
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"prompts: prompt {i} must be a non-empty list of token ids")
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
