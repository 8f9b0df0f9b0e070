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

from dataclasses import dataclass

from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.catalogs import CATALOG_KEY, CatalogError, catalogs_for

OFFSET_KEY = "decoding_offset"
EXCLUDE_KEY = "decoding_exclude"
ROUTE_KEYS = {"sampling": (CATALOG_KEY, OFFSET_KEY), "beam": (CATALOG_KEY, EXCLUDE_KEY)}
# OpenAI request fields the exact beam route does not implement: (field, its value when unset)
BEAM_UNSUPPORTED_FIELDS = (
    ("echo", False), ("stop", None), ("stop_token_ids", None), ("min_tokens", 0), ("structured_outputs", None),
    ("response_format", None), ("prompt_logprobs", None), ("suffix", None), ("allowed_token_ids", None),
)
CHAT_BEAM_SEARCH_REFUSED = (
    f"{CATALOG_KEY}: beam search with a catalog is served on /v1/completions (token-id or text prompts); "
    "chat completions with use_beam_search do not apply it, so they are refused rather than answered "
    "with unconstrained beams"
)


@dataclass(frozen=True)
class CatalogArgs:
    """A request's catalog arguments, checked for form (the catalog itself is resolved later)."""

    catalog: str
    offset: int | None = None  # token index where the identifier starts; None: after the prompt
    exclude: tuple[int, ...] = ()  # item ids never to return


def beam_unsupported(field: str) -> str:
    return (f"{field}: not supported by exact beam search over a catalog ({CATALOG_KEY}); "
            "send the request without it")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(extra, route: str) -> CatalogArgs | None:
    """The catalog arguments in ``extra`` (a request's ``extra_args`` / ``vllm_xargs``) on
    ``route``; None if it names no catalog. ValueError (CatalogError for the catalog's own
    field), naming the argument, for anything malformed or not served on the route."""
    keys = ROUTE_KEYS[route]
    extra = extra or {}
    if not isinstance(extra, dict):
        raise ValueError(f"extra_args: expected a dict, got {type(extra).__name__}")
    for key in extra:
        if isinstance(key, str) and key.startswith("decoding_") and key not in keys:
            if route == "beam":
                raise ValueError(beam_unsupported(key))
            raise ValueError(f"{key}: not a decoding argument of this route; it takes {', '.join(keys)}"
                             + (" (exclusions are served by beam search over the OpenAI API)"
                                if key == EXCLUDE_KEY else ""))
    if CATALOG_KEY not in extra:
        present = [k for k in keys if k in extra]
        if present:
            raise ValueError(f"{present[0]}: given without {CATALOG_KEY}")
        return None
    catalog = extra[CATALOG_KEY]
    offset = extra.get(OFFSET_KEY)
    if offset is not None and (not _is_int(offset) or offset < 0):
        raise ValueError(f"{OFFSET_KEY}: expected a non-negative int (a token index), got {offset!r}")
    exclude = extra.get(EXCLUDE_KEY, [])
    if not isinstance(exclude, list):
        raise ValueError(f"{EXCLUDE_KEY}: expected a list of item ids (non-negative ints)")
    if not isinstance(catalog, str):
        raise CatalogError(f"{CATALOG_KEY}: expected the name of a catalog (a string), got {catalog!r}")
    return CatalogArgs(catalog, offset, tuple(exclude))  # the ids are checked against the operator's cap first


def check_exclusions(exclude, max_exclude: int, num_ids: int) -> list[int]:
    """``exclude`` checked: at most the operator's ``max_exclude`` ids (checked before each id is,
    so an oversized list costs nothing), each a non-negative int below ``num_ids``."""
    if len(exclude) > max_exclude:
        raise ValueError(f"{EXCLUDE_KEY}: {len(exclude)} item ids is above this server's max_exclude ({max_exclude}); "
                         f"the operator raises it with --additional-config "
                         f"'{{\"decoding\": {{\"max_exclude\": <ids>}}}}'")
    if not all(_is_int(i) and i >= 0 for i in exclude):
        raise ValueError(f"{EXCLUDE_KEY}: expected a list of item ids (non-negative ints)")
    if any(i >= num_ids for i in exclude):
        raise ValueError(f"{EXCLUDE_KEY}: item ids must be below {num_ids} (the catalog's item ids)")
    return list(exclude)


def check_beams(beams: int, max_beams: int) -> None:
    if beams > max_beams:
        raise ValueError(f"n: {beams} beams is above this server's max_beams ({max_beams}); the operator raises it "
                         f"with --additional-config '{{\"decoding\": {{\"max_beams\": <beams>}}}}'")


def beam_options(xargs, field, chat: bool) -> dict | None:
    """The exact beam route's options for an OpenAI beam-search request (``field(name, default)``
    reads its fields); None if it names no catalog; ValueError naming the field for anything the
    route does not serve."""
    args = parse(xargs, "beam")
    if args is None:
        return None
    if chat:
        raise ValueError(CHAT_BEAM_SEARCH_REFUSED)
    for name, unset in BEAM_UNSUPPORTED_FIELDS:
        if field(name, unset) not in (unset, None, [], ""):
            raise ValueError(beam_unsupported(name))
    return {"catalog": args.catalog, "exclude": list(args.exclude), "logprobs": field("logprobs", None)}


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
