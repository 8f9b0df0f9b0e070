"""The :class:`Decoder` protocol the serving core batches for, and beam search behind it.

A decoder takes a batch of :class:`~decoding.serving.requests.DecodeRequest` that share its
:meth:`Decoder.batch_key` and returns one :class:`Result` per request, in order. The batcher
(:mod:`decoding.serving.batcher`) calls :meth:`Decoder.admit` when a request arrives (its errors
are the client's 400) and :meth:`Decoder.decode` from one worker thread, so a decoder needs no
lock of its own; the model and catalogs are shared and never mutated per call.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from decoding.serving.requests import (
    CATALOG_KEY,
    CatalogError,
    DecodeRequest,
    argument_label,
    check_against_catalog,
    unknown_catalog,
)
from decoding.trie import ItemTrie


@dataclass
class Result:
    """One request's answer, best first.

    items: catalog item ids; scores: ``sum log p / length ** length_penalty``; identifiers: each
    item's tokens (an EOS-terminated identifier ends with its EOS); token_scores: each token's
    log-prob (their sum over ``length ** length_penalty`` is the score). Fewer than ``k`` entries
    only where exclusions leave fewer valid items."""

    items: list[int]
    scores: list[float]
    identifiers: list[list[int]]
    token_scores: list[list[float]]


@runtime_checkable
class Decoder(Protocol):
    """What the serving core needs of a decoder."""

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> None:
        """Raise :class:`~decoding.serving.requests.RequestError` if the request cannot be served
        (an unknown catalog, an item id outside it, more beams than items); ``parameters`` maps
        the schema's names (``catalog``, ``k``, ``exclude``) to the route's own field names."""

    def batch_key(self, request: DecodeRequest) -> Hashable:
        """Requests with equal keys can share one batched call."""

    def rows(self, request: DecodeRequest) -> int:
        """What the request costs in the batch budget (beam rows)."""

    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        """Answer a batch of requests sharing one key, in order."""


class BeamDecoder:
    """Trie-constrained beam search (:func:`decoding.beam_search`) on a transformers model over
    the operator's catalogs: one batched search per batch, prompts left-padded, the prompt run
    once per request with its KV shared by the beams.

    Args:
        model: a Hugging Face causal LM (eval mode, on ``device``).
        catalogs: ``{name: ItemTrie}`` the requests may name, built for the model's vocabulary.
        device: where the search runs (the model's device).
        backend: ``trie_beam_step`` backend (``"auto"``).
    """

    def __init__(self, model, catalogs: Mapping[str, ItemTrie], *, device="cpu", backend: str = "auto"):
        if not catalogs:
            raise ValueError("catalogs: expected at least one catalog")
        vocab = int(model.config.vocab_size)
        for name, trie in catalogs.items():
            if not isinstance(trie, ItemTrie):
                raise TypeError(f"catalogs[{name!r}]: expected an ItemTrie, got {type(trie).__name__}")
            if trie.vocab_size != vocab:
                raise ValueError(f"catalogs[{name!r}]: built for vocab_size {trie.vocab_size}, the model has {vocab}")
        self.model, self.device, self.backend = model, torch.device(device), backend
        self.catalogs = {name: trie.to(self.device) for name, trie in catalogs.items()}
        self.vocab_size = vocab

    def catalog(self, name: str, parameter: str) -> ItemTrie:
        trie = self.catalogs.get(name) if isinstance(name, str) else None
        if trie is None:  # one answer whatever the name (a path included) and whatever exists on disk
            raise CatalogError(unknown_catalog(argument_label(parameter, CATALOG_KEY)), parameter)
        return trie

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> None:
        check_against_catalog(request, self.catalog(request.catalog, parameters["catalog"]), parameters)

    def batch_key(self, request: DecodeRequest) -> Hashable:
        # one search has one catalog, one beam count and one length penalty
        return ("beam", request.catalog, request.k, request.length_penalty)

    def rows(self, request: DecodeRequest) -> int:
        return request.k

    @torch.inference_mode()
    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        from decoding.search.beam import beam_search

        first = requests[0]
        trie = self.catalogs[first.catalog]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for b, r in enumerate(requests):  # left padding: the decoder-only model's convention
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, width - len(r.prompt_ids):] = 1
        padded = bool((mask == 0).any())
        out = beam_search(self.model, ids.to(self.device), mask.to(self.device) if padded else None, trie=trie,
                          num_beams=first.k, length_penalty=first.length_penalty,
                          exclude_items=[list(r.exclude) for r in requests], backend=self.backend)
        items, scores = out.items.tolist(), out.scores.tolist()
        sequences, token_scores = out.sequences.tolist(), out.token_scores.tolist()
        results = []
        for b in range(len(requests)):
            keep = [j for j, item in enumerate(items[b]) if item >= 0]
            results.append(Result(items=[items[b][j] for j in keep], scores=[scores[b][j] for j in keep],
                                  identifiers=[[t for t in sequences[b][j] if t >= 0] for j in keep],
                                  token_scores=[[s for t, s in zip(sequences[b][j], token_scores[b][j]) if t >= 0]
                                                for j in keep]))
        return results
