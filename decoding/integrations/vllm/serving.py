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
options it does not implement (``echo``, ``stop``, ``min_tokens``, structured outputs,
``decoding_offset``, chat completions), ``max_tokens`` shorter than the catalog's identifiers, more
beams than items, prompts as embeddings, and an engine whose ``logprobs_mode`` is not
``raw_logprobs``.

The plugin (:mod:`decoding.integrations.vllm.plugin`) installs this on a tested vLLM only, by
wrapping ``CompletionRequest.to_beam_search_params`` (to carry the catalog arguments, which vLLM's
``BeamSearchParams`` has no field for) and the serving classes' ``beam_search``.
"""

from __future__ import annotations

import functools
import logging

from decoding.integrations.vllm.catalogs import CATALOG_KEY, CatalogError, catalogs_for

logger = logging.getLogger("decoding.integrations.vllm")

EXCLUDE_KEY = "decoding_exclude"
MAX_EXCLUDED = 100_000
_OPTIONS = "_decoding_beam"  # the attribute of BeamSearchParams that carries the catalog arguments
_UNSUPPORTED = (  # request field, its value when unset
    ("echo", False), ("stop", None), ("stop_token_ids", None), ("min_tokens", 0), ("structured_outputs", None),
    ("response_format", None), ("prompt_logprobs", None), ("suffix", None),
)

CHAT_BEAM_SEARCH_REFUSED = (
    f"{CATALOG_KEY}: beam search with a catalog is served on /v1/completions (token-id or text prompts); "
    "chat completions with use_beam_search do not apply it, so they are refused rather than answered "
    "with unconstrained beams"
)


def _unsupported(field: str) -> str:
    return (f"{field}: not supported by exact beam search over a catalog ({CATALOG_KEY}); "
            "send the request without it")


def beam_options(request, xargs: dict) -> dict:
    """The catalog arguments of a completions request with ``use_beam_search``, checked;
    ValueError (naming the field) for anything the exact path does not serve."""
    for key in xargs:
        if key.startswith("decoding_") and key not in (CATALOG_KEY, EXCLUDE_KEY):
            raise ValueError(_unsupported(key))
    for field, unset in _UNSUPPORTED:
        if getattr(request, field, unset) not in (unset, None, [], ""):
            raise ValueError(_unsupported(field))
    exclude = xargs.get(EXCLUDE_KEY, [])
    if (not isinstance(exclude, list) or len(exclude) > MAX_EXCLUDED
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in exclude)):
        raise ValueError(f"{EXCLUDE_KEY}: expected a list of at most {MAX_EXCLUDED} item ids (non-negative ints)")
    logprobs = getattr(request, "logprobs", None)
    return {"catalog": xargs[CATALOG_KEY], "exclude": exclude, "logprobs": logprobs}


def _choice_logprobs(book, prompt_index: int, tokens: list[int], alternatives: int):
    """Per-token ``{token: Logprob}`` dicts: the chosen token first, then the best other children."""
    from vllm.logprobs import Logprob

    out = []
    for t, token in enumerate(tokens):
        children = book.children_of(prompt_index, tokens[:t])
        ranked = sorted(children.items(), key=lambda kv: -kv[1])
        rank = {tok: r + 1 for r, (tok, _) in enumerate(ranked)}
        step = {token: Logprob(logprob=children[token], rank=rank[token])}
        for tok, value in ranked:
            if len(step) > alternatives:
                break
            step.setdefault(tok, Logprob(logprob=value, rank=rank[tok]))
        out.append(step)
    return out


async def catalog_beam_search(serving, prompt, request_id: str, params, options: dict, lora_request=None):
    """What ``beam_search`` yields for a request that names a catalog: one final ``RequestOutput``
    whose outputs are the top-K catalog items, best first."""
    from vllm import CompletionOutput, RequestOutput
    from vllm.exceptions import VLLMValidationError

    from decoding.integrations.vllm.async_driver import search

    def refuse(message: str, parameter: str):
        return VLLMValidationError(message, parameter=parameter)

    if prompt.get("type") in ("embeds", "enc_dec") or "prompt_token_ids" not in prompt:
        raise refuse(_unsupported("a prompt that is not token ids or text"), "prompt")
    engine_client = serving.engine_client
    try:
        trie = catalogs_for(engine_client.vllm_config).resolve(options["catalog"])
    except CatalogError as exc:
        raise refuse(str(exc), "vllm_xargs") from None
    if params.max_tokens < trie.depth:
        raise refuse(f"max_tokens: {params.max_tokens} is shorter than the catalog's identifiers ({trie.depth} "
                     "tokens)", "max_tokens")
    if any(i >= trie.num_ids for i in options["exclude"]):
        raise refuse(f"{EXCLUDE_KEY}: item ids must be below {trie.num_ids} (the catalog's item ids)", "vllm_xargs")
    if params.beam_width > trie.num_items:
        raise refuse(f"n: {params.beam_width} beams is more than the catalog's {trie.num_items} items", "n")
    prompt_ids = list(prompt["prompt_token_ids"])
    try:
        out, book = await search(engine_client, [prompt_ids], trie=trie, num_beams=params.beam_width,
                                 length_penalty=params.length_penalty, exclude_items=[options["exclude"]],
                                 lora_request=lora_request, record_logprobs=options["logprobs"] is not None)
    except (ValueError, TypeError) as exc:
        raise refuse(str(exc), "prompt") from None

    tokenizer = serving.renderer.get_tokenizer() if getattr(serving, "renderer", None) is not None else None
    eos = trie.eos_token_id
    alternatives = options["logprobs"] or 0
    outputs = []
    for score, sequence in zip(out.scores[0].tolist(), out.sequences[0].tolist()):
        if score == float("-inf"):
            break  # fewer valid items than beams (exclusions): fewer choices
        tokens = [t for t in sequence if t >= 0]
        ended = eos is not None and tokens and tokens[-1] == eos
        shown = tokens[:-1] if ended and not params.include_stop_str_in_output else tokens
        text = tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens) if tokenizer else ""
        logprobs = (_choice_logprobs(book, 0, tokens, alternatives)[:len(shown)]
                    if options["logprobs"] is not None else None)
        outputs.append(CompletionOutput(index=len(outputs), text=text, token_ids=shown, cumulative_logprob=score,
                                        logprobs=logprobs, finish_reason="stop" if ended else "length",
                                        stop_reason=None))
    yield RequestOutput(request_id=request_id, prompt=prompt.get("prompt"), prompt_token_ids=prompt_ids,
                        prompt_logprobs=None, outputs=outputs, finished=True)


def install(error_type) -> None:
    """Route completions beam search with a catalog to the exact path; refuse chat beam search
    with a catalog. Idempotent; a missing vLLM class logs a warning and leaves that path as it is."""
    _wrap_to_beam_search_params("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", error_type,
                                chat=False)
    _wrap_to_beam_search_params("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
                                error_type, chat=True)
    try:
        from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    except Exception as exc:  # noqa: BLE001 - never stop vLLM from starting
        logger.warning("decoding: vLLM's online beam search not found (%s); beam-search requests naming a catalog "
                       "are refused", exc)
        return
    original = BeamSearchOnlineMixin.beam_search
    if getattr(original, "_decoding_checks", False):
        return

    @functools.wraps(original)
    async def beam_search(self, prompt, request_id, params, lora_request=None, *args, **kwargs):
        options = getattr(params, _OPTIONS, None)
        if options is None:
            async for output in original(self, prompt, request_id, params, lora_request, *args, **kwargs):
                yield output
            return
        async for output in catalog_beam_search(self, prompt, request_id, params, options, lora_request):
            yield output

    beam_search._decoding_checks = True
    BeamSearchOnlineMixin.beam_search = beam_search


def _wrap_to_beam_search_params(module: str, name: str, error_type, *, chat: bool) -> None:
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
    except Exception as exc:  # noqa: BLE001 - never stop vLLM from starting
        logger.warning("decoding: %s.%s not found (%s); beam-search requests naming a catalog are not routed",
                       module, name, exc)
        return
    original = cls.to_beam_search_params
    if getattr(original, "_decoding_checks", False):
        return

    def to_beam_search_params(self, *args, _original=original, **kwargs):
        xargs = getattr(self, "vllm_xargs", None) or {}
        if CATALOG_KEY not in xargs:
            return _original(self, *args, **kwargs)
        if chat:
            raise error_type(CHAT_BEAM_SEARCH_REFUSED, parameter="vllm_xargs")
        try:
            options = beam_options(self, xargs)
        except ValueError as exc:
            raise error_type(str(exc), parameter="vllm_xargs") from None
        params = _original(self, *args, **kwargs)
        setattr(params, _OPTIONS, options)  # BeamSearchParams keeps a __dict__ (msgspec dict=True)
        return params

    to_beam_search_params._decoding_checks = True
    cls.to_beam_search_params = functools.wraps(original)(to_beam_search_params)
