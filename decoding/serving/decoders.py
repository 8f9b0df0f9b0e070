"""The :class:`Decoder` protocol the serving core batches for, and the package's decoders
behind it.

A decoder takes a batch of :class:`~decoding.serving.requests.DecodeRequest` that share its
:meth:`Decoder.batch_key` and returns one :class:`Result` per request, in order. The server calls
:meth:`Decoder.admit` when a request arrives (its errors are the client's 400) and the batcher
(:mod:`decoding.serving.batcher`) calls :meth:`Decoder.decode` from one worker thread, so a
decoder needs no lock of its own; models, catalogs and bundles are shared and never mutated per
call.

- :class:`BeamDecoder`: trie-constrained beam search, with the operator's KV policies;
- :class:`SpeculativeDecoder`: speculative beam search with a draft (strict: exactly beam
  search's items; relaxed: a sample of catalog items);
- :class:`SetIdDecoder`: set identifiers (SETRec or RPG bundles, :mod:`decoding.setid.bundle`);
- :class:`Decoders`: the one decoder a server holds, routing each request by its ``decoder``.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from decoding.serving.requests import (
    CATALOG_KEY,
    CatalogError,
    DecodeRequest,
    RequestError,
    _check,
    argument_label,
    check_against_catalog,
    check_exclusions,
    unknown_catalog,
)
from decoding.trie import ItemTrie


@dataclass
class Result:
    """One request's answer, best first.

    items: catalog item ids; scores: ``sum log p / length ** length_penalty`` (set identifiers:
    the decoder's item score); identifiers: each item's tokens (an EOS-terminated identifier ends
    with its EOS; empty for set identifiers); token_scores: each token's log-prob (their sum over
    ``length ** length_penalty`` is the score; empty where the decoder does not report them).
    Fewer than ``k`` entries only where exclusions leave fewer valid items."""

    items: list[int]
    scores: list[float]
    identifiers: list[list[int]]
    token_scores: list[list[float]]


@runtime_checkable
class Decoder(Protocol):
    """What the serving core needs of a decoder."""

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> DecodeRequest:
        """The request as it will be decoded (its prompt built from its history, where it has
        one), or :class:`~decoding.serving.requests.RequestError` if it cannot be served (an
        unknown catalog, an item id outside it, more beams than items, an option the operator
        did not allow); ``parameters`` maps the schema's names (``catalog``, ``k``, ``exclude``)
        to the route's own field names."""

    def batch_key(self, request: DecodeRequest) -> Hashable:
        """Requests with equal keys can share one batched call."""

    def rows(self, request: DecodeRequest) -> int:
        """What the request costs in the batch budget (rows of the model's forward)."""

    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        """Answer a batch of requests sharing one key, in order."""


SHARED_KV = "shared"  # the KV policy every beam request may name: the prompt's KV shared by the beams, unpruned


@dataclass(frozen=True)
class HistoryPrompt:
    """How a catalog's prompt is built from a user's history (``"history"`` in a request): the
    ``prefix`` tokens, then the identifiers of the last ``max_items`` history items, oldest
    first (as the MovieLens recommender of :mod:`decoding.workloads.movielens` was trained)."""

    prefix: tuple[int, ...] = ()
    max_items: int = 20

    def __post_init__(self):
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prefix):
            raise ValueError(f"prefix: expected token ids (non-negative ints), got {self.prefix!r}")
        if isinstance(self.max_items, bool) or not isinstance(self.max_items, int) or self.max_items <= 0:
            raise ValueError(f"max_items: expected a positive int, got {self.max_items!r}")

    def prompt(self, trie: ItemTrie, history: Sequence[int]) -> tuple[int, ...]:
        ids = trie.identifiers(history[-self.max_items:])
        return tuple(self.prefix) + tuple(itertools.chain.from_iterable(ids))


def _unknown_catalog(parameter: str) -> CatalogError:
    """One answer whatever the name (a path included) and whatever exists on disk."""
    return CatalogError(unknown_catalog(argument_label(parameter, CATALOG_KEY)), parameter)


def _check_history(request: DecodeRequest, num_ids: int) -> None:
    if any(i >= num_ids for i in request.history):
        raise RequestError(f"history: item ids must be below {num_ids} (the catalog's item ids)", "history")


def _results(items, scores, sequences=None, token_scores=None) -> list[Result]:
    """Per request, the valid entries (item >= 0) of ``[B, K]`` outputs as :class:`Result`."""
    items, scores = items.tolist(), scores.tolist()
    sequences = None if sequences is None else sequences.tolist()
    token_scores = None if token_scores is None else token_scores.tolist()
    results = []
    for b in range(len(items)):
        keep = [j for j, item in enumerate(items[b]) if item >= 0]
        results.append(Result(
            items=[items[b][j] for j in keep], scores=[scores[b][j] for j in keep],
            identifiers=[[t for t in sequences[b][j] if t >= 0] for j in keep] if sequences else [[] for _ in keep],
            token_scores=([[s for t, s in zip(sequences[b][j], token_scores[b][j]) if t >= 0] for j in keep]
                          if token_scores is not None else [[] for _ in keep])))
    return results


def _left_padded(requests: Sequence[DecodeRequest], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's prompts, left-padded (the decoder-only model's convention): ``(ids, mask or None)``."""
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for b, r in enumerate(requests):
        ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[b, width - len(r.prompt_ids):] = 1
    padded = bool((mask == 0).any())
    return ids.to(device), (mask.to(device) if padded else None)


class BeamDecoder:
    """Trie-constrained beam search (:func:`decoding.beam_search`) on a transformers model over
    the operator's catalogs: one batched search per batch, prompts left-padded, the prompt run
    once per request with its KV shared by the beams, pruned by the KV policy a request names
    among those the operator allows.

    Args:
        model: a Hugging Face causal LM (eval mode, on ``device``).
        catalogs: ``{name: ItemTrie}`` the requests may name, built for the model's vocabulary.
        device: where the search runs (the model's device).
        backend: ``trie_beam_step`` backend (``"auto"``).
        kv_policies: ``{name: KVPolicy}`` (:mod:`decoding.kv`) requests may name as
            ``options.kv_policy``, beside ``"shared"`` (no pruning, the default).
        history_prompts: ``{catalog name: HistoryPrompt}``: catalogs whose requests may give a
            history instead of a prompt.
    """

    def __init__(self, model, catalogs: Mapping[str, ItemTrie], *, device="cpu", backend: str = "auto",
                 kv_policies: Mapping[str, object] | None = None,
                 history_prompts: Mapping[str, HistoryPrompt] | None = None):
        from decoding.kv import KVPolicy

        if not catalogs:
            raise ValueError("catalogs: expected at least one catalog")
        vocab = int(model.config.vocab_size)
        for name, trie in catalogs.items():
            if not isinstance(trie, ItemTrie):
                raise TypeError(f"catalogs[{name!r}]: expected an ItemTrie, got {type(trie).__name__}")
            if trie.vocab_size != vocab:
                raise ValueError(f"catalogs[{name!r}]: built for vocab_size {trie.vocab_size}, the model has {vocab}")
        layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        policies = dict(kv_policies or {})
        for name, policy in policies.items():
            if name == SHARED_KV or not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"kv_policies: {name!r} is not a policy name (an identifier other than "
                                 f"{SHARED_KV!r})")
            if not isinstance(policy, KVPolicy):
                raise TypeError(f"kv_policies[{name!r}]: expected a decoding.kv.KVPolicy, got {type(policy).__name__}")
            try:  # what the model decides (EARN's layer); a prompt's length is checked per request
                policy.check(layers, torch.ones((1, 1 << 16), dtype=torch.long))
            except ValueError as exc:
                raise ValueError(f"kv_policies[{name!r}]: {exc}") from None
        prompts = dict(history_prompts or {})
        for name, prompt in prompts.items():
            if name not in catalogs:
                raise ValueError(f"history_prompts: {name!r} is not one of the catalogs")
            if any(t >= vocab for t in prompt.prefix):
                raise ValueError(f"history_prompts[{name!r}]: prefix tokens must be below the model's vocabulary "
                                 f"({vocab})")
        self.model, self.device, self.backend = model, torch.device(device), backend
        self.catalogs = {name: trie.to(self.device) for name, trie in catalogs.items()}
        self.vocab_size = vocab
        self.kv_policies, self.history_prompts = policies, prompts

    def catalog(self, name: str, parameter: str) -> ItemTrie:
        trie = self.catalogs.get(name) if isinstance(name, str) else None
        if trie is None:
            raise _unknown_catalog(parameter)
        return trie

    def with_prompt(self, request: DecodeRequest, trie: ItemTrie) -> DecodeRequest:
        """The request with its prompt built from its history (its catalog's :class:`HistoryPrompt`)."""
        if not request.history:
            return request
        template = self.history_prompts.get(request.catalog)
        if template is None:
            raise RequestError("history: this catalog takes its prompt as prompt_token_ids or prompt (the operator "
                               "gave it no history prompt)", "history")
        _check_history(request, trie.num_ids)
        return replace(request, prompt_ids=template.prompt(trie, request.history))

    def policy(self, request: DecodeRequest):
        """The request's KV policy (None: shared, unpruned), checked against its prompt."""
        name = request.option("kv_policy", SHARED_KV)
        if name == SHARED_KV:
            return None
        policy = self.kv_policies.get(name)
        if policy is None:
            raise RequestError(f"options.kv_policy: not a KV policy this server allows; it allows "
                               f"{', '.join([SHARED_KV, *self.kv_policies])}", "options")
        try:
            policy.check(int(self.model.config.num_hidden_layers),
                         torch.ones((1, len(request.prompt_ids)), dtype=torch.long))
        except ValueError as exc:  # the prompt alone decides it, never the batch it joins
            raise RequestError(f"options.kv_policy: {str(exc).removeprefix('kv_policy: ')}", "options") from None
        return policy

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> DecodeRequest:
        trie = self.catalog(request.catalog, parameters["catalog"])
        request = self.with_prompt(request, trie)
        check_against_catalog(request, trie, parameters)
        self.policy(request)
        return request

    def batch_key(self, request: DecodeRequest) -> Hashable:
        # one search has one catalog, one beam count, one length penalty and one KV policy
        return ("beam", request.catalog, request.k, request.length_penalty, request.option("kv_policy", SHARED_KV))

    def rows(self, request: DecodeRequest) -> int:
        return request.k

    @torch.inference_mode()
    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        from decoding.search.beam import beam_search

        first = requests[0]
        ids, mask = _left_padded(requests, self.device)
        out = beam_search(self.model, ids, mask, trie=self.catalogs[first.catalog], num_beams=first.k,
                          length_penalty=first.length_penalty, exclude_items=[list(r.exclude) for r in requests],
                          backend=self.backend,  # admit checked each request's policy against its prompt
                          kv_policy=self.kv_policies.get(first.option("kv_policy", SHARED_KV)))
        return _results(out.items, out.scores, out.sequences, out.token_scores)


class SpeculativeDecoder:
    """Speculative beam search (:func:`decoding.speculative_beam_search`) on the beam decoder's
    model and catalogs with a ``draft`` over the same vocabulary (a smaller model, or
    :func:`decoding.speculative.draft.truncated_draft` of the target). Strict requests with equal
    options share a batch and return exactly beam search's items; a relaxed request is a sample
    drawn with its own ``seed``, so it runs in a batch of its own and the same request always
    gets the same answer. Catalogs of fixed-length identifiers only (no EOS)."""

    def __init__(self, beam: BeamDecoder, draft, *, backend: str | None = None, max_drafts: int | None = None):
        vocab = int(draft.config.vocab_size)
        if vocab != beam.vocab_size:
            raise ValueError(f"draft: vocabulary {vocab} differs from the model's {beam.vocab_size}")
        self.beam, self.draft = beam, draft
        self.backend = beam.backend if backend is None else backend
        self.vocab_size = beam.vocab_size
        self.max_drafts = max_drafts  # the default num_drafts stays within it (the operator's max_beams)

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> DecodeRequest:
        trie = self.beam.catalog(request.catalog, parameters["catalog"])
        if trie.eos_token_id is not None:
            raise RequestError("decoder: speculative search serves catalogs of fixed-length identifiers; this "
                               "catalog's identifiers end with an EOS (use the beam decoder)", "decoder")
        request = self.beam.with_prompt(request, trie)
        check_against_catalog(request, trie, parameters)
        drafts = request.option("num_drafts")
        if drafts is None:  # 2k, within the catalog and the operator's cap (k is within both)
            drafts = min(2 * request.k, trie.num_items, self.max_drafts or 2 * request.k)
            request = replace(request, options=tuple(sorted(request.options + (("num_drafts", drafts),))))
        elif drafts > trie.num_items:
            raise RequestError(f"options.num_drafts: {drafts} draft beams is more than the catalog's "
                               f"{trie.num_items} items", "options")
        if request.option("mode") == "relaxed":  # its sample depends on its batch: it runs alone
            request = replace(request, alone=object())
        return request

    def batch_key(self, request: DecodeRequest) -> Hashable:
        return ("speculative", request.catalog, request.k, request.options, request.alone)

    def rows(self, request: DecodeRequest) -> int:
        return request.option("num_drafts", request.k)

    @torch.inference_mode()
    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        from decoding.speculative.search import speculative_beam_search

        first = requests[0]
        ids, mask = _left_padded(requests, self.beam.device)
        out = speculative_beam_search(
            self.beam.model, self.draft, ids, mask, trie=self.beam.catalogs[first.catalog], num_beams=first.k,
            num_drafts=first.option("num_drafts"), draft_steps=first.option("draft_steps"),
            mode=first.option("mode"), seed=first.option("seed"),
            exclude_items=[list(r.exclude) for r in requests], backend=self.backend)
        return _results(out.items, out.scores, out.sequences)


class SetIdDecoder:
    """Set-identifier decoding over the operator's bundles (:mod:`decoding.setid.bundle`:
    SETRec or RPG): one forward over the users' histories, then the whole catalog scored by a
    streaming top-K. Requests name a bundle as their ``catalog`` and give a ``history``.

    Args:
        bundles: ``{name: SetRecBundle | RPGBundle}`` (:func:`decoding.setid.bundle.load_setid_bundle`).
        backend: ``catalog_topk`` backend.
    """

    def __init__(self, bundles: Mapping[str, object], *, backend: str = "auto"):
        if not bundles:
            raise ValueError("bundles: expected at least one set-identifier bundle")
        self.bundles, self.backend = dict(bundles), backend

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> DecodeRequest:
        bundle = self.bundles.get(request.catalog) if isinstance(request.catalog, str) else None
        if bundle is None:
            raise _unknown_catalog(parameters["catalog"])
        if request.k > bundle.num_items:
            raise RequestError(f"{parameters['k']}: {request.k} items is more than the catalog's {bundle.num_items}",
                               parameters["k"])
        if len(request.history) > bundle.max_history:
            raise RequestError(f"history: {len(request.history)} items is more than this catalog's model takes "
                               f"({bundle.max_history})", "history")
        _check_history(request, bundle.num_items)
        _check(check_exclusions, parameters["exclude"], list(request.exclude), len(request.exclude),
               bundle.num_items, parameter=parameters["exclude"])
        # a batch's padded prompt holds each history item's vectors
        return replace(request, width=len(request.history) * bundle.vectors_per_item)

    def batch_key(self, request: DecodeRequest) -> Hashable:
        return ("setid", request.catalog, request.k)

    def rows(self, request: DecodeRequest) -> int:
        return 1  # one forward row per request, whatever k

    @torch.inference_mode()
    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        first = requests[0]
        items, scores = self.bundles[first.catalog].topk([list(r.history) for r in requests], first.k,
                                                         exclude_items=[list(r.exclude) for r in requests],
                                                         backend=self.backend)
        return _results(items, scores)


class Decoders:
    """The server's decoders behind one :class:`Decoder`: each request goes to the decoder it
    names (``"beam"``, ``"speculative"``, ``"setid"``); a batch holds one decoder's requests."""

    ENABLE = {"beam": "--model and --catalog", "speculative": "--draft DIR or --draft-layers N",
              "setid": "--setid DIR"}

    def __init__(self, beam: BeamDecoder | None = None, speculative: SpeculativeDecoder | None = None,
                 setid: SetIdDecoder | None = None):
        self.by_name = {name: d for name, d in (("beam", beam), ("speculative", speculative), ("setid", setid))
                        if d is not None}
        if not self.by_name:
            raise ValueError("Decoders: expected at least one decoder")
        self.vocab_size = beam.vocab_size if beam is not None else None

    def _for(self, request: DecodeRequest):
        decoder = self.by_name.get(request.decoder)
        if decoder is None:
            raise RequestError(f"decoder: this server does not serve the {request.decoder} decoder (it serves "
                               f"{', '.join(self.by_name)}; the operator enables it with "
                               f"{self.ENABLE.get(request.decoder, '?')})", "decoder")
        return decoder

    def admit(self, request: DecodeRequest, parameters: Mapping[str, str]) -> DecodeRequest:
        return self._for(request).admit(request, parameters)

    def batch_key(self, request: DecodeRequest) -> Hashable:
        return self._for(request).batch_key(request)  # each decoder's key starts with its name

    def rows(self, request: DecodeRequest) -> int:
        return self._for(request).rows(request)

    def decode(self, requests: Sequence[DecodeRequest]) -> list[Result]:
        return self._for(requests[0]).decode(requests)
