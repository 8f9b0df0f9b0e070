"""The beam rows both vLLM drivers keep between engine calls (no vLLM import: the engine's
answers arrive as :class:`decoding.integrations.vllm._compat.Scored` arrays)."""

from __future__ import annotations

import numpy as np
import torch

MAX_TOKEN_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS


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


def flatten_scored(answers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(request, token, logprob)`` as flat int64/int64/float32 arrays from ``(request index,
    Scored)`` pairs."""
    owners, tokens, values = [], [], []
    for index, scored in answers:
        owners.append(np.full(len(scored.token_ids), index))
        tokens.append(scored.token_ids)
        values.append(scored.logprobs)
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(owners).astype(np.int64), np.concatenate(tokens).astype(np.int64),
            np.concatenate(values).astype(np.float32))


class BeamRows:
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

    def logits(self, owners: list[int], answers) -> torch.Tensor:
        """float32 ``[rows, V]``: the log-probs ``answers`` (``(request index, Scored)`` pairs of the
        last :meth:`requests`) returned, -inf elsewhere."""
        request, token, value = flatten_scored(answers)
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
