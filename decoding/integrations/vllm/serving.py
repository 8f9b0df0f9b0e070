"""Exact constrained beam search behind vLLM's OpenAI server.

A completions request with ``use_beam_search: true, n: K`` and ``vllm_xargs: {"decoding_catalog":
<a catalog the operator registered>}`` (optionally ``"decoding_exclude": [item ids]``) is served by
:mod:`decoding.integrations.vllm.async_driver` instead of vLLM's own beam search, which drops
``vllm_xargs`` and would return unconstrained beams. The answer is the exact top-K catalog items,
best first: each choice carries the identifier's ``token_ids`` (with ``return_token_ids``), its text,
and per-token log-probs when ``logprobs`` is set (their sum over ``length ** length_penalty`` is the
score; the alternatives listed are the best other valid continuations). Requests without a catalog get vLLM's
own beam search, untouched.

What the exact path cannot serve is refused with HTTP 400 saying why, never served unconstrained:
options it does not implement (see :data:`decoding.integrations.vllm.arguments.BEAM_UNSUPPORTED_FIELDS`,
``decoding_offset``, chat completions), ``max_tokens`` shorter than the catalog's identifiers, more
beams than items, prompts as embeddings, and an engine whose ``logprobs_mode`` is not
``raw_logprobs``.

The plugin (:mod:`decoding.integrations.vllm.plugin`) installs the route through
:func:`decoding.integrations.vllm._compat.install_beam_route`, which wraps vLLM's request classes
(to carry the catalog arguments, which vLLM's ``BeamSearchParams`` has no field for) and its
serving classes' ``beam_search``. This module sees none of vLLM's objects.
"""

from __future__ import annotations

import logging

import numpy as np

from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.arguments import beam_options, beam_unsupported, check_beams, check_exclude_cap
from decoding.integrations.vllm.catalogs import CatalogError, catalogs_for
from decoding.serving.requests import (
    DecodeRequest,
    RequestError,
    check_against_catalog,
    check_length_penalty,
    shown_tokens,
)

logger = logging.getLogger("decoding.integrations.vllm")


_METRICS = None


def _metrics():
    """The route's Prometheus counters (served at the server's ``/metrics``), made on first use;
    None without prometheus_client."""
    global _METRICS
    if _METRICS is None:
        try:
            from prometheus_client import Counter
        except ImportError:  # pragma: no cover - a vLLM dependency
            _METRICS = {}
            return _METRICS
        from prometheus_client import Gauge

        _METRICS = {"requests_in_flight": Gauge("decoding_beam_requests_in_flight",
                                                "One-token engine requests of the exact path the engine holds now")}
        _METRICS |= {name: Counter(f"decoding_beam_{name}", doc) for name, doc in (
            ("searches", "Catalog beam searches served by the exact path"),
            ("engine_requests", "One-token engine requests the exact path sent"),
            ("logprobs", "(token, log-prob) pairs the engine returned to the exact path"),
            ("wide_rows", "Beam rows whose trie node has more than 128 children"),
            ("top_n_rows", "Wide rows that asked the engine's top-N log-probs first"),
            ("fallback_rows", "Wide rows whose top-N could not decide them, asked again by id"))}
    return _METRICS


def _count(stats) -> None:
    metrics = _metrics()
    if not metrics:
        return
    metrics["searches"].inc()
    for name in ("logprobs", "wide_rows", "top_n_rows", "fallback_rows"):
        metrics[name].inc(getattr(stats, name))
    metrics["engine_requests"].inc(stats.requests)


class BeamRouteError(RequestError):
    """A beam request the exact route refuses; ``parameter`` names the request field (the serving
    core's :class:`~decoding.serving.requests.RequestError`, as ``decoding-serve`` raises it)."""


def _choice_logprobs(book, prompt_index: int, tokens: list[int], alternatives: int, ranked: dict):
    """Per token, ``(token, logprob, rank)`` triples: the chosen token first, then the best
    ``alternatives`` other children. ``ranked`` caches each prefix's children (the choices of one
    answer share their prefixes). Ranks count from 1 over the node's children, ties in the
    trie's order."""
    out = []
    for t, token in enumerate(tokens):
        prefix = tuple(tokens[:t])
        entry = ranked.get(prefix)
        if entry is None:
            ids, values = book.children_of(prompt_index, prefix)
            order = np.argsort(-values, kind="stable")  # best first, ties in the trie's order
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(1, len(order) + 1)
            best = order[: alternatives + 1].tolist()
            entry = ranked[prefix] = (ids.tolist(), values.tolist(), rank.tolist(), best)
        ids, values, rank, best = entry
        at = ids.index(token)
        step = [(token, values[at], rank[at])]
        step += [(ids[i], values[i], rank[i]) for i in best if i != at][:alternatives]
        out.append(step)
    return out


async def catalog_beam_search(call: _compat.BeamCall, options: dict) -> list[_compat.Choice]:
    """The top-K catalog items for a beam request that names a catalog, best first.

    Raises :class:`BeamRouteError` (HTTP 400 when serving) for what the route cannot serve."""
    from decoding.integrations.vllm.async_driver import search

    if call.prompt_ids is None:
        raise BeamRouteError(beam_unsupported("a prompt that is not token ids or text"), "prompt")
    catalogs = catalogs_for(call.vllm_config)
    try:
        trie = catalogs.resolve(options["catalog"])
    except CatalogError as exc:
        raise BeamRouteError(str(exc), "vllm_xargs") from None
    limits = catalogs.options
    try:
        check_beams(call.beam_width, limits.max_beams)
    except ValueError as exc:
        raise BeamRouteError(str(exc), "n") from None
    try:
        check_exclude_cap(options["exclude"], limits.max_exclude)  # the cap, before any id is looked at
    except RequestError as exc:
        raise BeamRouteError(str(exc), exc.parameter) from None
    # the serving core's request and checks, as decoding-serve applies them
    try:
        request = DecodeRequest(tuple(call.prompt_ids), call.beam_width, options["catalog"],
                                tuple(options["exclude"]), length_penalty=check_length_penalty(call.length_penalty),
                                max_tokens=call.max_tokens)
        check_against_catalog(request, trie, {"k": "n", "exclude": "vllm_xargs"})
    except RequestError as exc:
        raise BeamRouteError(str(exc), exc.parameter) from None
    exclude = list(request.exclude)
    metrics = _metrics()
    if metrics:  # the engine's router knows the exact path's requests in flight
        pending = call.engine.router.pending
        metrics["requests_in_flight"].set_function(lambda: len(pending))
    try:
        out, book = await search(call.engine, [call.prompt_ids], trie=trie, num_beams=call.beam_width,
                                 length_penalty=request.length_penalty, exclude_items=[exclude],
                                 lora_request=call.lora_request, record_logprobs=options["logprobs"] is not None)
    except (ValueError, TypeError) as exc:
        raise BeamRouteError(str(exc), "prompt") from None
    _count(book.stats)

    eos = trie.eos_token_id
    alternatives, ranked = options["logprobs"] or 0, {}
    choices = []
    for score, sequence in zip(out.scores[0].tolist(), out.sequences[0].tolist()):
        if score == float("-inf"):
            break  # fewer valid items than beams (exclusions): fewer choices
        tokens = [t for t in sequence if t >= 0]
        shown, ended = shown_tokens(tokens, eos, call.include_stop_str_in_output)
        text = call.tokenizer.decode(shown, skip_special_tokens=call.skip_special_tokens) if call.tokenizer else ""
        logprobs = (_choice_logprobs(book, 0, tokens, alternatives, ranked)[:len(shown)]
                    if options["logprobs"] is not None else None)
        choices.append(_compat.Choice(token_ids=shown, text=text, score=score, finished=ended, logprobs=logprobs))
    return choices


def install() -> bool:
    """Route completions beam search with a catalog to the exact path; refuse chat beam search
    with a catalog. Idempotent; a vLLM class that is missing or has changed logs a warning."""
    return _compat.install_beam_route(beam_options, catalog_beam_search)
