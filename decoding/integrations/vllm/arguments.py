"""The request arguments of every route, parsed in one place.

A request reaches the package by one of three routes:

- ``"sampling"``: ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP) of any generation
  request, read by the logits processor: ``decoding_catalog`` and ``decoding_offset``;
- ``"beam"``: ``vllm_xargs`` of an OpenAI completions request with ``use_beam_search``, read by
  the exact beam route: ``decoding_catalog`` and ``decoding_exclude``;
- the engine-wide catalog of the operator's ``additional_config["decoding"]`` (``catalog``,
  ``offset``), for requests that name none (see :mod:`decoding.integrations.vllm.catalogs`).

Everything a request carries is untrusted: a key the route does not serve is refused with a
message naming it, never ignored (a misspelt ``decoding_catalog`` would otherwise leave the
request unconstrained).
"""

from __future__ import annotations

from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.catalogs import catalogs_for
from decoding.serving import requests as _requests
from decoding.serving.requests import (  # noqa: F401 - one definition, shared with decoding-serve
    BEAM_UNSUPPORTED_FIELDS,
    CATALOG_KEY,
    CHAT_BEAM_SEARCH_REFUSED,
    EXCLUDE_KEY,
    OFFSET_KEY,
    ROUTE_KEYS,
    CatalogArgs,
    beam_unsupported,
    parse,
)
from decoding.serving.requests import completion_options as beam_options  # noqa: F401

# how the operator of a vLLM server raises a cap, named in the 400 a request above it gets
RAISE_WITH = "--additional-config '{{\"decoding\": {{\"{cap}\": <{unit}>}}}}'"


def check_exclude_cap(exclude, max_exclude: int) -> None:
    """At most the operator's ``max_exclude`` ids, before any is looked at
    (:func:`decoding.serving.requests.check_exclude_cap`; RequestError naming ``vllm_xargs``)."""
    _requests.check_exclude_cap(exclude, max_exclude, "vllm_xargs", RAISE_WITH.format(cap="max_exclude", unit="ids"))


def check_beams(beams: int, max_beams: int) -> None:
    _requests.check_beams(beams, max_beams, raise_with=RAISE_WITH.format(cap="max_beams", unit="beams"))


def request_catalog(extra, vllm_config):
    """``(ItemTrie, offset)`` for a sampling-route request: its own catalog, else the engine-wide
    one, else None. Raises ValueError (safe to show the client) for bad arguments or unknown
    catalogs."""
    catalogs = catalogs_for(vllm_config)
    args = parse(extra, "sampling")
    if args is not None:
        return catalogs.resolve(args.catalog), args.offset
    default = catalogs.resolve_default()
    return None if default is None else (default, catalogs.options.default_offset)


def check_admission(extra, prompt_token_ids, vllm_config) -> None:
    """Raise ValueError if a sampling-route request's catalog arguments do not fit the engine,
    its prompt or the model (the checks that need the engine's config or the prompt)."""
    found = request_catalog(extra, vllm_config)
    if found is None:
        return
    trie, offset = found
    vocab_size = _compat.vocab_size(vllm_config)
    if trie.vocab_size != vocab_size:
        raise ValueError(f"{CATALOG_KEY}: the catalog was built for vocab_size {trie.vocab_size}, the model has "
                         f"{vocab_size}")
    prompt = [int(t) for t in (prompt_token_ids if prompt_token_ids is not None else [])]
    offset = len(prompt) if offset is None else offset
    if offset > len(prompt):
        raise ValueError(f"{OFFSET_KEY}: {offset} is beyond the prompt ({len(prompt)} tokens)")
    head = prompt[offset:]
    if head and (len(head) >= trie.depth or not trie.has_prefix(head)):
        raise ValueError(f"{OFFSET_KEY}: the prompt's tokens from {offset} on do not start any identifier of the "
                         "catalog")
