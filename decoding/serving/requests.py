"""The request schema and the operator's caps, one definition for every server of the package.

Two servers read these requests: ``decoding-serve`` (:mod:`decoding.serving.app`) and the exact
beam route inside vLLM's OpenAI server (:mod:`decoding.integrations.vllm.serving`). Both take an
OpenAI completions request with ``use_beam_search`` and ``vllm_xargs: {"decoding_catalog": ...,
"decoding_exclude": [...]}``, parsed here by :func:`completion_options` and checked against the
operator's caps by :func:`check_beams` and :func:`check_exclude_cap`, and against the catalog by
:func:`check_against_catalog`; ``decoding-serve`` also
takes ``/v1/recommendations`` bodies (:func:`recommendation_request`). Both end as one
:class:`DecodeRequest`.

Everything a request carries is untrusted: a field the route does not serve is refused with a
message naming it, never ignored (a misspelt ``decoding_catalog`` would otherwise leave the
request unconstrained), and no message repeats what the client sent for a catalog (a catalog is a
name the operator registered, never a path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CATALOG_KEY = "decoding_catalog"
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
DECODERS = ("beam", "speculative", "setid")  # what a /v1/recommendations request may name as its decoder
# each decoder's per-request options ({"options": {...}}): name -> what it takes
DECODER_OPTIONS = {
    "beam": {"kv_policy": "the name of a KV policy the operator allows ('shared', the default: no pruning)"},
    "speculative": {"mode": "'strict' (exact, the default) or 'relaxed'",
                    "num_drafts": "the draft's beams per level, at least k (default: 2k, at most max_beams and the "
                                  "catalog's items)",
                    "draft_steps": "levels drafted per round, 1 to 16 (default 2)",
                    "seed": "relaxed mode's random stream, a non-negative int (default 0; relaxed mode only)"},
    "setid": {},
}
MAX_DRAFT_STEPS = 16
DEFAULT_MAX_BEAMS = 1024
DEFAULT_MAX_EXCLUDE = 100_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def argument_label(parameter: str, key: str) -> str:
    """What an error message names: the ``vllm_xargs`` key itself (``decoding_catalog``,
    ``decoding_exclude``) when the request field is ``vllm_xargs``, else the field."""
    return key if parameter == "vllm_xargs" else parameter


def unknown_catalog(parameter: str = CATALOG_KEY) -> str:
    """The one answer to a catalog name the server does not serve, whatever exists on its disk."""
    return f"{parameter}: not a catalog this server serves; name a catalog that the operator registered"


UNKNOWN_CATALOG = unknown_catalog()


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); ``parameter`` names the request field. The
    message is safe to send to the client."""

    def __init__(self, message: str, parameter: str):
        super().__init__(message)
        self.parameter = parameter


class CatalogError(RequestError):
    """A request's catalog cannot be served; the message is safe to send to the client."""

    def __init__(self, message: str, parameter: str = CATALOG_KEY):
        super().__init__(message, parameter)


@dataclass(frozen=True)
class Caps:
    """What the operator lets one request ask (``decoding-serve --max-beams ...``; the vLLM route
    reads ``max_beams`` and ``max_exclude`` from ``additional_config["decoding"]``).

    max_beams: most beams (``n`` / ``k``) per request; max_exclude: most excluded item ids;
    max_prompt_tokens: longest prompt (None: no cap); max_queue: requests waiting for a batch
    before the server answers 429; max_body_bytes: largest request body, refused with 413 before
    it is parsed (decoding-serve); max_history: most history item ids per request."""

    max_beams: int = DEFAULT_MAX_BEAMS
    max_exclude: int = DEFAULT_MAX_EXCLUDE
    max_prompt_tokens: int | None = None
    max_queue: int = 1024
    max_body_bytes: int = 16 << 20
    max_history: int = 1024
    raise_with: str = "decoding-serve --{flag} <value>"  # how the operator raises a cap, shown in the 400

    def __post_init__(self):
        for name in ("max_beams", "max_exclude", "max_prompt_tokens", "max_queue", "max_body_bytes", "max_history"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    def hint(self, cap: str) -> str:
        return self.raise_with.format(flag=cap.replace("_", "-"), cap=cap)

    @property
    def max_text_chars(self) -> int | None:
        """Longest text prompt handed to the tokenizer: 32 characters per token of the cap."""
        return None if self.max_prompt_tokens is None else 32 * self.max_prompt_tokens


@dataclass(frozen=True)
class CatalogArgs:
    """A request's catalog arguments, checked for form (the catalog itself is resolved later)."""

    catalog: str
    offset: int | None = None  # token index where the identifier starts; None: after the prompt
    exclude: tuple[int, ...] = ()  # item ids never to return


@dataclass(frozen=True)
class DecodeRequest:
    """One request for a decoder, whichever route it came by.

    prompt_ids: the prompt's token ids; k: items to return (beams); catalog: a registered catalog
    name; exclude: item ids never to return; decoder: which decoder serves it (:data:`DECODERS`);
    length_penalty: scores are ``sum log p / length ** length_penalty``; max_tokens: the
    completions route's token budget, which must hold the catalog's identifiers; history: the
    user's item ids, which a decoder turns into its prompt (``prompt_ids`` is then empty until
    the decoder admits the request); options: the decoder's options, checked for form
    (:func:`decoder_options`)."""

    prompt_ids: tuple[int, ...]
    k: int
    catalog: str
    exclude: tuple[int, ...] = ()
    decoder: str = "beam"
    length_penalty: float = 0.0
    max_tokens: int | None = None  # the completions route's token budget (None: no limit)
    history: tuple[int, ...] = ()  # the user's items, when the prompt is built from them
    options: tuple[tuple[str, object], ...] = ()  # the decoder's options (DECODER_OPTIONS), sorted by name
    width: int = 0  # prompt positions the request takes in a batch, where its decoder says (0: its tokens)
    alone: object = None  # a key of its own (set by its decoder): the request never shares a batch

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    @property
    def length(self) -> int:
        """What the request adds to a batch's padded prompt: the positions its decoder counted,
        or its prompt tokens, or its history items."""
        return self.width or len(self.prompt_ids) or len(self.history)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def beam_unsupported(field_name: str) -> str:
    return (f"{field_name}: not supported by exact beam search over a catalog ({CATALOG_KEY}); "
            "send the request without it")


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
            key = _field_name(key)
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
        raise CatalogError(f"{CATALOG_KEY}: expected the name of a catalog (a string)")
    return CatalogArgs(catalog, offset, tuple(exclude))  # the ids are checked against the operator's cap first


def check_exclusions(exclude, max_exclude: int, num_ids: int, *, parameter: str = EXCLUDE_KEY,
                     raise_with: str = "") -> list[int]:
    """``exclude`` checked: at most the operator's ``max_exclude`` ids (checked before each id is,
    so an oversized list costs nothing), each a non-negative int below ``num_ids``."""
    if not isinstance(exclude, (list, tuple)):
        raise ValueError(f"{parameter}: expected a list of item ids (non-negative ints)")
    if len(exclude) > max_exclude:
        raise ValueError(f"{parameter}: {len(exclude)} item ids is above this server's max_exclude ({max_exclude})"
                         + (f"; the operator raises it with {raise_with}" if raise_with else ""))
    if not all(_is_int(i) and i >= 0 for i in exclude):
        raise ValueError(f"{parameter}: expected a list of item ids (non-negative ints)")
    if any(i >= num_ids for i in exclude):
        raise ValueError(f"{parameter}: item ids must be below {num_ids} (the catalog's item ids)")
    return list(exclude)


def check_beams(beams: int, max_beams: int, *, parameter: str = "n", raise_with: str = "") -> None:
    if beams > max_beams:
        raise ValueError(f"{parameter}: {beams} beams is above this server's max_beams ({max_beams})"
                         + (f"; the operator raises it with {raise_with}" if raise_with else ""))


def check_against_catalog(request: DecodeRequest, trie, parameters: dict) -> None:
    """What a request asks of its catalog (an :class:`~decoding.ItemTrie`): a token budget that
    holds the identifiers, no more beams than items, excluded ids inside the catalog.
    ``parameters`` maps ``k`` and ``exclude`` to the route's field names. RequestError naming the
    field otherwise. Both servers call it once the catalog is resolved."""
    if request.max_tokens is not None and request.max_tokens < trie.depth:
        raise RequestError(f"max_tokens: {request.max_tokens} is shorter than the catalog's identifiers "
                           f"({trie.depth} tokens)", "max_tokens")
    if request.k > trie.num_items:
        raise RequestError(f"{parameters['k']}: {request.k} beams is more than the catalog's {trie.num_items} items",
                           parameters["k"])
    _check(check_exclusions, parameters["exclude"], list(request.exclude), len(request.exclude), trie.num_ids,
           parameter=argument_label(parameters["exclude"], EXCLUDE_KEY))


def shown_tokens(tokens: list[int], eos_token_id: int | None, include_stop: bool) -> tuple[list[int], bool]:
    """A completion choice's tokens, as both servers show them: ``(tokens, ended)``; an identifier
    that ends with the catalog's EOS has ended (``finish_reason`` "stop"), and the EOS is shown only
    with ``include_stop_str_in_output``."""
    ended = eos_token_id is not None and bool(tokens) and tokens[-1] == eos_token_id
    return (tokens[:-1] if ended and not include_stop else tokens), ended


def completion_options(xargs, field_of, chat: bool) -> dict | None:
    """The exact beam route's options for an OpenAI beam-search request (``field_of(name,
    default)`` reads its fields): ``{"catalog", "exclude", "logprobs"}``; None if it names no
    catalog; ValueError naming the field for anything the route does not serve."""
    args = parse(xargs, "beam")
    if args is None:
        return None
    if chat:
        raise ValueError(CHAT_BEAM_SEARCH_REFUSED)
    for name, unset in BEAM_UNSUPPORTED_FIELDS:
        if field_of(name, unset) not in (unset, None, [], ""):
            raise RequestError(beam_unsupported(name), name)
    return {"catalog": args.catalog, "exclude": list(args.exclude), "logprobs": field_of("logprobs", None)}


def _prompt(body: dict, tokenize, *, ids_key: str, text_key: str, vocab_size: int | None,
            max_text_chars: int | None = None) -> tuple[int, ...]:
    """The prompt's token ids: ``body[ids_key]`` (a list of ints) or ``body[text_key]`` (a string,
    through ``tokenize``; on the completions route ``prompt`` also takes token ids, or a list of
    one prompt)."""
    given = [key for key in dict.fromkeys((ids_key, text_key)) if body.get(key) is not None]
    if len(given) != 1:
        raise RequestError(f"{ids_key}: give the prompt as {ids_key} (token ids)"
                           + (f" or {text_key} (text)" if text_key != ids_key else " or text"), ids_key)
    key = given[0]
    prompt = body[key]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # OpenAI's list of prompts, holding one
    if isinstance(prompt, str):
        if key == ids_key and ids_key != text_key:
            raise RequestError(f"{ids_key}: expected a list of token ids; send text as {text_key}", ids_key)
        if not prompt:
            raise RequestError(f"{key}: the prompt is empty", key)
        if tokenize is None:
            raise RequestError(f"{key}: this model has no tokenizer; send the prompt as token ids", key)
        if max_text_chars is not None and len(prompt) > max_text_chars:  # before the tokenizer sees it
            raise RequestError(f"{key}: {len(prompt)} characters is more than this server tokenizes "
                               f"({max_text_chars}, 32 per token of max_prompt_tokens)", key)
        ids = [int(t) for t in tokenize(prompt)]
        if not ids:
            raise RequestError(f"{key}: the prompt has no tokens", key)
        if vocab_size is not None and max(ids) >= vocab_size:
            raise RequestError(f"{key}: the tokenizer gives token ids the model does not have (at or above its "
                               f"vocabulary, {vocab_size})", key)
        return tuple(ids)
    if not isinstance(prompt, list) or not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
        raise RequestError(f"{key}: expected one prompt: a non-empty list of token ids (non-negative ints)"
                           + ("" if key == ids_key and ids_key != text_key else " or a string"), key)
    if vocab_size is not None and max(prompt) >= vocab_size:
        raise RequestError(f"{key}: token ids must be below {vocab_size} (the model's vocabulary)", key)
    return tuple(prompt)


def check_prompt(prompt_ids, caps: Caps, parameter: str) -> None:
    if caps.max_prompt_tokens is not None and len(prompt_ids) > caps.max_prompt_tokens:
        raise RequestError(f"{parameter}: {len(prompt_ids)} tokens is above this server's max_prompt_tokens "
                           f"({caps.max_prompt_tokens}); the operator raises it with "
                           f"{caps.hint('max_prompt_tokens')}", parameter)


def check_length_penalty(value) -> float:
    """A request's length penalty: a number in [-100, 100] (NaN and infinities refused; a huge
    JSON integer is compared, never converted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
        raise RequestError("length_penalty: expected a finite number between -100 and 100", "length_penalty")
    return float(value)


def _length_penalty(body: dict, default: float) -> float:
    return check_length_penalty(body.get("length_penalty", default))


def _field_name(key) -> str:
    """A request's unknown field, as an error may name it: a plain identifier, never what else a
    client sent (a path)."""
    return key if isinstance(key, str) and _IDENTIFIER.fullmatch(key) else "a field"


def check_exclude_cap(exclude, max_exclude: int, parameter: str, raise_with: str = "") -> None:
    """At most the operator's ``max_exclude`` ids, checked before any id is looked at (an
    oversized list costs nothing)."""
    if len(exclude) > max_exclude:
        raise RequestError(f"{argument_label(parameter, EXCLUDE_KEY)}: {len(exclude)} item ids is "
                           f"above this server's max_exclude ({max_exclude})"
                           + (f"; the operator raises it with {raise_with}" if raise_with else ""), parameter)


def _check(fn, as_field: str, *args, **kwargs):
    """``fn(*args, **kwargs)``, its ValueError as a RequestError naming ``as_field``."""
    try:
        return fn(*args, **kwargs)
    except RequestError:
        raise
    except ValueError as exc:
        raise RequestError(str(exc), as_field) from None


RECOMMENDATION_FIELDS = ("catalog", "prompt_token_ids", "prompt", "history", "k", "exclude_items", "decoder",
                         "options", "length_penalty")


def _non_negative_int(value, label: str, *, below: int | None = None) -> int:
    if not _is_int(value) or value < 0 or (below is not None and value >= below):
        raise RequestError(f"{label}: expected a non-negative int" + (f" below {below}" if below else ""),
                           label.split(".")[0])
    return value


def decoder_options(decoder: str, options, k: int, caps: Caps) -> tuple[tuple[str, object], ...]:
    """A request's ``options`` for ``decoder``, checked for form (not against what the server
    holds: a decoder does that when it admits the request), defaults filled in, as sorted
    ``(name, value)`` pairs. RequestError naming ``options.<name>`` otherwise."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise RequestError("options: expected a JSON object of the decoder's options", "options")
    allowed = DECODER_OPTIONS[decoder]
    for key in options:
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "none"
            raise RequestError(f"options.{_field_name(key)}: not an option of the {decoder} decoder; it takes "
                               f"{takes}", "options")
    out: dict = {}
    if decoder == "beam":
        policy = options.get("kv_policy", "shared")
        if not isinstance(policy, str) or not _IDENTIFIER.fullmatch(policy):
            raise RequestError("options.kv_policy: expected the name of a KV policy the operator allows", "options")
        if policy != "shared":  # the default is left out: one request whichever route it came by
            out["kv_policy"] = policy
    elif decoder == "speculative":
        mode = options.get("mode", "strict")
        if mode not in ("strict", "relaxed"):
            raise RequestError("options.mode: expected 'strict' or 'relaxed'", "options")
        if "num_drafts" in options:  # unset: the decoder's default, which knows the catalog's size
            drafts = options["num_drafts"]
            if not _is_int(drafts) or drafts < k:
                raise RequestError(f"options.num_drafts: expected an int of at least k ({k})", "options")
            _check(check_beams, "options", drafts, caps.max_beams, parameter="options.num_drafts",
                   raise_with=caps.hint("max_beams"))
            out["num_drafts"] = drafts
        steps = options.get("draft_steps", 2)
        if not _is_int(steps) or not 1 <= steps <= MAX_DRAFT_STEPS:
            raise RequestError(f"options.draft_steps: expected an int from 1 to {MAX_DRAFT_STEPS}", "options")
        out.update(mode=mode, draft_steps=steps)
        if mode == "relaxed":
            out["seed"] = _non_negative_int(options.get("seed", 0), "options.seed", below=1 << 63)
        elif "seed" in options:
            raise RequestError("options.seed: strict mode is exact and draws nothing; a seed is for mode relaxed",
                               "options")
    return tuple(sorted(out.items()))


def recommendation_request(body, caps: Caps, *, tokenize=None, vocab_size: int | None = None) -> DecodeRequest:
    """A ``/v1/recommendations`` body: ``{"catalog", "prompt_token_ids" | "prompt" | "history",
    "k", "exclude_items", "decoder" ("beam", "speculative" or "setid"), "options" (the decoder's,
    :data:`DECODER_OPTIONS`), "length_penalty" (0.0)}``. ``history`` (item ids of the catalog)
    asks the server to build the prompt from the user's items; set identifiers take only a
    history. RequestError naming the field for anything malformed, unknown or above a cap."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object", "body")
    for key in body:
        if key not in RECOMMENDATION_FIELDS:
            raise RequestError(f"{_field_name(key)}: not a field of /v1/recommendations; it takes "
                               f"{', '.join(RECOMMENDATION_FIELDS)}", _field_name(key))
    catalog = body.get("catalog")
    if not isinstance(catalog, str):
        raise CatalogError("catalog: expected the name of a catalog (a string)", "catalog")
    decoder = body.get("decoder", "beam")
    if decoder not in DECODERS:
        raise RequestError(f"decoder: expected one of {', '.join(DECODERS)}", "decoder")
    k = body.get("k", 10)
    if not _is_int(k) or k <= 0:
        raise RequestError("k: expected a positive int (items to return)", "k")
    _check(check_beams, "k", k, caps.max_beams, parameter="k", raise_with=caps.hint("max_beams"))
    exclude = body.get("exclude_items", [])
    if not isinstance(exclude, list):
        raise RequestError("exclude_items: expected a list of item ids (non-negative ints)", "exclude_items")
    check_exclude_cap(exclude, caps.max_exclude, "exclude_items", caps.hint("max_exclude"))
    length_penalty = _length_penalty(body, 0.0)
    if decoder != "beam" and length_penalty != 0:
        raise RequestError(f"length_penalty: the {decoder} decoder takes no length penalty; leave it unset",
                           "length_penalty")
    options = decoder_options(decoder, body.get("options"), k, caps)
    history = body.get("history")
    if history is not None or decoder == "setid":
        if decoder == "setid" and any(body.get(key) is not None for key in ("prompt_token_ids", "prompt")):
            raise RequestError("history: the setid decoder takes the user's history (item ids), not a prompt",
                               "history")
        if body.get("prompt_token_ids") is not None or body.get("prompt") is not None:
            raise RequestError("history: give the prompt as history (item ids) or as prompt_token_ids / prompt, "
                               "not both", "history")
        if not isinstance(history, list) or not history:
            raise RequestError("history: expected a non-empty list of item ids (non-negative ints)", "history")
        if len(history) > caps.max_history:  # before any id is looked at: an oversized list costs nothing
            raise RequestError(f"history: {len(history)} items is above this server's max_history "
                               f"({caps.max_history}); the operator raises it with {caps.hint('max_history')}",
                               "history")
        if not all(_is_int(i) and i >= 0 for i in history):
            raise RequestError("history: expected a non-empty list of item ids (non-negative ints)", "history")
        return DecodeRequest((), k, catalog, tuple(exclude), decoder, length_penalty, history=tuple(history),
                             options=options)
    if body.get("prompt_token_ids") is None and body.get("prompt") is None:
        raise RequestError("prompt_token_ids: give the prompt as prompt_token_ids (token ids), prompt (text) or "
                           "history (item ids)", "prompt_token_ids")
    prompt = _prompt(body, tokenize, ids_key="prompt_token_ids", text_key="prompt", vocab_size=vocab_size,
                     max_text_chars=caps.max_text_chars)
    check_prompt(prompt, caps, "prompt_token_ids" if "prompt_token_ids" in body else "prompt")
    return DecodeRequest(prompt, k, catalog, tuple(exclude), decoder, length_penalty, options=options)


# OpenAI completions fields decoding-serve reads, beside vllm_xargs and BEAM_UNSUPPORTED_FIELDS:
# (field, what it takes); anything else is refused naming it
COMPLETION_FIELDS = {
    "model": "the served model's name", "prompt": "token ids or text", "n": "beams (items returned)",
    "use_beam_search": "true", "max_tokens": "at least the identifiers' length", "temperature": "0",
    "length_penalty": "a number (vLLM's default 1.0)", "return_token_ids": "a bool",
    "logprobs": "null or 0 (the chosen tokens' log-probs)", "vllm_xargs": "the decoding_* arguments",
    "stream": "false", "ignore_eos": "a bool", "include_stop_str_in_output": "a bool",
    "skip_special_tokens": "a bool", "seed": "any (beam search is deterministic)", "user": "any",
    "top_p": "1", "top_k": "0 or -1", "best_of": "null or n", "early_stopping": "false",
    "presence_penalty": "0", "frequency_penalty": "0", "repetition_penalty": "1", "logit_bias": "null",
    "stream_options": "null",
}


def completion_request(body, caps: Caps, *, tokenize=None, vocab_size: int | None = None) -> tuple[DecodeRequest, dict]:
    """An OpenAI ``/v1/completions`` beam-search body, as the vLLM route takes it:
    ``(DecodeRequest, reply options {"max_tokens", "logprobs", "return_token_ids", ...})``.
    RequestError naming the field for anything malformed, not served or above a cap."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object", "body")
    unsupported = {name for name, _ in BEAM_UNSUPPORTED_FIELDS}
    for key in body:
        if key not in COMPLETION_FIELDS and key not in unsupported:
            raise RequestError(f"{_field_name(key)}: not supported by decoding-serve's /v1/completions "
                               "(beam search over a catalog)", _field_name(key))
    if body.get("use_beam_search") is not True:
        raise RequestError("use_beam_search: decoding-serve serves beam search over a catalog; send "
                           "use_beam_search: true", "use_beam_search")
    options = _check(completion_options, "vllm_xargs", body.get("vllm_xargs"), body.get, False)
    if options is None:
        raise CatalogError(f"vllm_xargs: name a catalog with {CATALOG_KEY}", "vllm_xargs")
    if body.get("stream") not in (None, False):
        raise RequestError("stream: not supported by beam search over a catalog", "stream")
    temperature = body.get("temperature")
    if temperature not in (None, 0, 0.0):
        raise RequestError("temperature: beam search over a catalog ranks by the model's log-probs; send 0",
                           "temperature")
    for name, allowed in (("top_p", (None, 1, 1.0)), ("top_k", (None, 0, -1)), ("early_stopping", (None, False)),
                          ("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
                          ("repetition_penalty", (None, 1, 1.0)), ("logit_bias", (None, {})),
                          ("stream_options", (None,))):
        if body.get(name) not in allowed:
            raise RequestError(f"{name}: not supported by beam search over a catalog", name)
    n = body.get("n", 1)
    if not _is_int(n) or n <= 0:
        raise RequestError("n: expected a positive int (beams)", "n")
    if body.get("best_of") not in (None, n):
        raise RequestError("best_of: beam search returns its n beams; leave best_of unset", "best_of")
    _check(check_beams, "n", n, caps.max_beams, parameter="n", raise_with=caps.hint("max_beams"))
    exclude = options["exclude"]
    check_exclude_cap(exclude, caps.max_exclude, "vllm_xargs", caps.hint("max_exclude"))
    max_tokens = body.get("max_tokens", 16)
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise RequestError("max_tokens: expected a positive int", "max_tokens")
    logprobs = options["logprobs"]
    if logprobs not in (None, 0) or isinstance(logprobs, bool):
        raise RequestError("logprobs: decoding-serve returns the chosen tokens' log-probs (logprobs: 0); "
                           "alternatives are not served", "logprobs")
    length_penalty = _length_penalty(body, 1.0)
    for name in ("return_token_ids", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if not isinstance(body.get(name, False), bool):
            raise RequestError(f"{name}: expected a bool", name)
    prompt = _prompt(body, tokenize, ids_key="prompt", text_key="prompt", vocab_size=vocab_size,
                     max_text_chars=caps.max_text_chars)
    check_prompt(prompt, caps, "prompt")
    request = DecodeRequest(prompt, n, options["catalog"], tuple(exclude), "beam", length_penalty, max_tokens)
    reply = {"logprobs": logprobs, "return_token_ids": body.get("return_token_ids", False),
             "include_stop_str_in_output": body.get("include_stop_str_in_output", False),
             "skip_special_tokens": body.get("skip_special_tokens", True)}
    return request, reply
