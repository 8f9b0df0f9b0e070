"""The beam rows both vLLM drivers keep between engine calls, and which log-probs each row asks
the engine for (no vLLM import: the engine's answers arrive as
:class:`decoding.integrations.vllm._compat.Scored` arrays).

What a row asks for scales with its trie node, never with the vocabulary:

- a node with at most ``max_ids`` children (the engine's cap on ``logprob_token_ids``: 128 on
  vLLM's current runner, 4096 on the legacy one): the log-probs of exactly its children, by id,
  in one request, exact;
- a wider node, on a small vocabulary (at most :data:`SMALL_VOCAB` tokens) when the engine allows
  that many top log-probs: the whole row (the top-``V``), one request, exact;
- else the top-``N`` log-probs over the vocabulary (``N`` about twice the beams the search keeps
  per step, as vLLM's own beam search asks). That answer decides the row exactly when it holds
  every child, or at least ``keep`` children the request has not excluded: a child it does not
  hold scores at most the ``N``-th value, so it could never enter the top ``keep`` of its row
  ahead of them. Otherwise the row falls back to the children the answer lacks, by id, in
  requests of at most ``max_ids`` (:meth:`BeamRows.followups`). A search most of whose wide rows
  fell back in a step (a model that does not rank identifier tokens first, such as random
  weights) asks by id directly from then on.

Every answer is exact full-vocabulary log-probs (``raw_logprobs``), so the ranks, items and scores
equal ``decoding.beam_search``'s on the same weights, up to ties at the ``keep``-th score.

The search itself runs over the catalog's compact vocabulary (:meth:`decoding.ItemTrie.compact`:
only the tokens identifiers use), so a row's scores are ``C`` numbers (1,024 for 4 x 256 semantic
IDs), whatever the model's vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_TOKEN_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS: the default cap per request
SMALL_VOCAB = 4096  # at most this many tokens, a wide node asks for the whole (explicit top-V) row


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


def top_n_for(keep: int, vocab_size: int, max_logprobs: int) -> tuple[int, bool]:
    """``(N, whole)``: the top-``N`` a wide row asks for (0: none, ask by id), and whether that is
    the whole vocabulary. ``max_logprobs``: the engine's cap (-1: none)."""
    allowed = vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)
    if vocab_size <= SMALL_VOCAB and allowed >= vocab_size:
        return vocab_size, True
    n = min(2 * keep, allowed)
    return (n, n >= vocab_size) if n >= keep else (0, False)


@dataclass
class ScoreRequest:
    """One one-token engine request a row needs: the log-probs of ``token_ids`` (at most 128), or
    the top-``top_n`` over the vocabulary."""

    row: int
    prompt: list[int]
    token_ids: list[int] | None = None
    top_n: int | None = None


@dataclass
class RowStats:
    """What one search asked of the engine."""

    requests: int = 0  # one-token engine requests
    logprobs: int = 0  # (token, log-prob) pairs returned
    wide_rows: int = 0  # rows whose node has more children than one request may ask by id
    top_n_rows: int = 0  # ... that asked the top-N first
    fallback_rows: int = 0  # ... whose top-N could not decide them (then asked by id)
    per_step: list = field(default_factory=list)  # requests per step


class BeamRows:
    """The search's rows between engine calls: each row's tokens (prompt + identifier so far) and
    trie node, the requests that score them, and the log-probs those requests returned.

    Args:
        trie: the catalog, on the CPU (the search runs on ``search_trie``, its compact twin, and
            yields compact token ids; :meth:`to_real` maps its output back).
        rows: the prompts, as token-id lists.
        vocab_size: the engine's vocabulary.
        keep: candidates the search keeps per step (``num_beams``, or twice that with EOS).
        max_logprobs: the engine's cap on top-N log-probs (-1: none).
        max_ids: the engine's cap on ``logprob_token_ids`` per request.
        excluded: ``[B, X]`` sorted excluded item ranks per prompt (``trie.excluded_ranks``), or None.
        record: keep every scored prefix's children log-probs (for per-token log-probs in answers).
    """

    def __init__(self, trie, rows: list[list[int]], vocab_size: int, *, keep: int, max_logprobs: int,
                 max_ids: int = MAX_TOKEN_IDS_PER_REQUEST, excluded: torch.Tensor | None = None,
                 record: bool = False):
        self.trie, self.vocab_size, self.keep, self.max_ids = trie, vocab_size, keep, max_ids
        # the search's trie: the same nodes over the catalog's tokens only (compact ids)
        self.search_trie, real = trie.compact()
        self.real_tokens = real
        self._real_np = real.numpy()
        self.top_n, self._whole = top_n_for(keep, vocab_size, max_logprobs)
        self.excluded = excluded
        self.tokens = rows
        self.request_of = list(range(len(rows)))  # which prompt each row belongs to
        self.prompt_len = [len(r) for r in rows]
        self.nodes = torch.zeros(len(rows), dtype=torch.long)
        self.stats = RowStats()
        self._by_id_only = False  # set once a search's wide rows fell back: ask by id directly
        # (prompt, identifier prefix) -> (logits, row, children's node range): read by children_of
        self.children_logprobs: dict | None = {} if record else None
        self._live_rows: list[tuple[int, int, int]] = []

    def advance(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> None:
        """Row ``r`` of the next step extends row ``beam_index[r]`` with compact token ``tokens[r]``."""
        beam_index, tokens = beam_index.cpu(), tokens.cpu()
        real = self.real_tokens[tokens.clamp(min=0)]
        self.tokens = [self.tokens[i] + [t] for i, t in zip(beam_index.tolist(), real.tolist())]
        self.request_of = [self.request_of[i] for i in beam_index.tolist()]
        self.nodes = self.search_trie.walk(tokens[:, None], start=self.nodes[beam_index])

    def to_real(self, out):
        """A search's :class:`decoding.BeamSearchOutput` with its sequences in the model's tokens."""
        sequences = torch.where(out.sequences >= 0, self.real_tokens[out.sequences.clamp(min=0)], out.sequences)
        return dataclasses.replace(out, sequences=sequences)

    def _live(self):
        """(row, first child node - 1, last child node) of every row whose node has children."""
        nodes = self.nodes
        live = (nodes >= 0).nonzero().flatten()
        safe = nodes[live]
        lo, hi = self.trie.indptr[safe].long(), self.trie.indptr[safe + 1].long()
        keep = lo < hi
        return list(zip(live[keep].tolist(), lo[keep].tolist(), hi[keep].tolist()))

    def _by_id(self, row: int, tokens) -> list[ScoreRequest]:
        tokens = [int(t) for t in tokens]
        return [ScoreRequest(row, self.tokens[row], token_ids=tokens[c: c + self.max_ids])
                for c in range(0, len(tokens), self.max_ids)]

    def requests(self) -> list[ScoreRequest]:
        """The requests that score the live rows of this step (first round)."""
        node_token = self.trie.node_token
        self._live_rows = self._live()
        out = []
        for row, lo, hi in self._live_rows:
            wide = hi - lo > self.max_ids
            self.stats.wide_rows += wide
            if wide and self.top_n > 0 and (self._whole or not self._by_id_only):
                self.stats.top_n_rows += 1
                out.append(ScoreRequest(row, self.tokens[row], top_n=self.top_n))
            else:
                out += self._by_id(row, node_token[lo + 1: hi + 1].tolist())
        self.stats.per_step.append(len(out))
        return out

    def _usable(self, row: int, child_nodes: np.ndarray) -> np.ndarray:
        """Which of ``child_nodes`` still lead to an item the row's request did not exclude."""
        if self.excluded is None or len(child_nodes) == 0:
            return np.ones(len(child_nodes), dtype=bool)
        ranks = self.excluded[self.request_of[row]]
        nodes = torch.as_tensor(child_nodes, dtype=torch.long)
        lo, hi = self.trie.item_lo[nodes].long(), self.trie.item_hi[nodes].long()
        excluded = torch.searchsorted(ranks, hi) - torch.searchsorted(ranks, lo)
        return (excluded < hi - lo).numpy()

    def followups(self, requests: list[ScoreRequest], answers) -> list[ScoreRequest]:
        """Second round: for each top-N answer that cannot decide its row exactly, the children
        it lacks, by id. ``answers``: the :class:`Scored` of each request, in order."""
        node_token = self.trie.node_token.numpy()
        out, tried, fell_back = [], 0, 0
        for request, scored in zip(requests, answers):
            if request.top_n is None:
                continue
            tried += 1
            lo, hi = self._node_range(request.row)
            children = np.arange(lo + 1, hi + 1)
            held = np.isin(node_token[children], scored.token_ids)
            if held.all() or int((held & self._usable(request.row, children)).sum()) >= self.keep:
                continue
            fell_back += 1
            out += self._by_id(request.row, node_token[children[~held]])
        self.stats.fallback_rows += fell_back
        if 2 * fell_back > tried and not self._whole:
            self._by_id_only = True  # this model does not rank the children first: stop asking the top-N
        if out:
            self.stats.per_step[-1] += len(out)
        return out

    def _node_range(self, row: int) -> tuple[int, int]:
        node = int(self.nodes[row])
        return int(self.trie.indptr[node]), int(self.trie.indptr[node + 1])

    def logits(self, requests: list[ScoreRequest], answers) -> torch.Tensor:
        """float32 ``[rows, C]`` over the compact vocabulary: the log-probs ``answers`` (the
        :class:`Scored` of each of ``requests``, both rounds) returned for catalog tokens, -inf
        elsewhere."""
        self.stats.requests += len(requests)
        real_np, width = self._real_np, len(self._real_np)
        # NumPy, single-threaded: in a server process beside a busy engine, torch's intra-op
        # threads wait for cores far longer than this scatter takes (measured: most of a search)
        scores = np.full((len(self.tokens), max(width, 1)), -np.inf, dtype=np.float32)
        for request, scored in zip(requests, answers):
            self.stats.logprobs += len(scored.token_ids)
            at = np.searchsorted(real_np, scored.token_ids).clip(max=width - 1)
            # a catalog token, and a value (the engine pads its answer rows with token 0 at -inf)
            keep = (real_np[at] == scored.token_ids) & np.isfinite(scored.logprobs)
            scores[request.row, at[keep]] = scored.logprobs[keep]
        out = torch.from_numpy(scores)
        if self.children_logprobs is not None:
            # kept by reference; read for the results' prefixes only (children_of)
            for row, lo, hi in self._live_rows:
                request = self.request_of[row]
                key = (request, tuple(self.tokens[row][self.prompt_len[request]:]))
                self.children_logprobs[key] = (out, row, lo, hi)
        return out

    def search(self, score, *, num_beams: int, length_penalty: float = 0.0, exclude_items=None,
               backend: str = "auto"):
        """Run :func:`decoding.search.beam.search_loop` over these rows to the end, synchronously:
        ``score()`` answers each step's rows (the compact logits ``[rows, C]``, e.g. through
        :meth:`requests`, :meth:`followups` and :meth:`logits`). Returns the
        :class:`decoding.BeamSearchOutput`, its sequences in the model's tokens."""
        from decoding.search.beam import search_loop

        with torch.inference_mode():
            loop = search_loop(score(), trie=self.search_trie, num_beams=num_beams, length_penalty=length_penalty,
                               normalize="none", exclude_items=exclude_items, backend=backend)
            try:
                beam_index, tokens = next(loop)
                while True:
                    self.advance(beam_index, tokens)
                    beam_index, tokens = loop.send(score())
            except StopIteration as done:
                return self.to_real(done.value)

    def children_of(self, request: int, prefix) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, logprobs)``: the children (model tokens, int64 ``[n]``) of the node the
        identifier ``prefix`` (model tokens) of ``request`` reached, in the trie's order, with
        their log-probs (float32 ``[n]``); children the engine was not asked for, which cannot
        rank, are left out."""
        out, row, lo, hi = self.children_logprobs[(request, tuple(prefix))]
        values = out[row].numpy()[self.search_trie.node_token[lo + 1: hi + 1].numpy()]
        real = self.trie.node_token[lo + 1: hi + 1].numpy().astype(np.int64)
        keep = np.isfinite(values)
        return real[keep], values[keep]
