"""vLLM general plugin (entry point ``vllm.general_plugins``): request checks that need the
engine's config or the prompt.

A logits processor's ``validate_params`` sees only the sampling params. Resolving the catalog a
request names against the operator's registry (``additional_config``), rejecting an identifier
offset beyond the prompt, prompt tokens after the offset that no catalog identifier starts with,
or a catalog built for another vocabulary than the model's needs the engine config and the
rendered prompt, which ``InputProcessor.process_inputs`` has: the plugin wraps it so these
requests fail at admission (vLLM's validation error, HTTP 400 when serving) instead of reaching
the engine. vLLM may load plugins several times per process; wrapping happens once.

It also routes OpenAI completions requests that ask for beam search (``use_beam_search``) and
name a catalog to the exact beam search (:mod:`decoding.integrations.vllm.serving`): vLLM's own
server beam search drops per-request arguments, so it would return unconstrained beams.

On an untested vLLM the plugin only logs the version warning and wraps nothing; the processor's
``validate_params`` then refuses requests that name a catalog.
"""

from __future__ import annotations

import functools
import logging

from decoding.integrations.vllm._version import warn_if_untested

logger = logging.getLogger("decoding.integrations.vllm")


def check_request(params, prompt_token_ids, vocab_size: int, vllm_config=None) -> None:
    """Raise ValueError if the request's trie arguments do not fit the engine, its prompt or the model."""
    from decoding.integrations.vllm.catalogs import CATALOG_KEY
    from decoding.integrations.vllm.processor import OFFSET_KEY, request_catalog

    found = request_catalog(params, vllm_config)
    if found is None:
        return
    trie, offset = found
    if trie.vocab_size != vocab_size:
        raise ValueError(f"{CATALOG_KEY}: the catalog was built for vocab_size {trie.vocab_size}, the model has "
                         f"{vocab_size}")
    prompt = list(prompt_token_ids or [])
    offset = len(prompt) if offset is None else offset
    if offset > len(prompt):
        raise ValueError(f"{OFFSET_KEY}: {offset} is beyond the prompt ({len(prompt)} tokens)")
    head = prompt[offset:]
    if head and (len(head) >= trie.depth or not trie.has_prefix(head)):
        raise ValueError(f"{OFFSET_KEY}: the prompt's tokens from {offset} on do not start any identifier of the "
                         "catalog")


def register() -> None:
    if warn_if_untested():
        return
    try:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.input_processor import InputProcessor
    except Exception as exc:  # noqa: BLE001 - never stop vLLM from starting
        logger.warning("decoding: vLLM's input processor could not be wrapped (%s); requests that name a catalog "
                       "are checked only by the logits processor", exc)
        return
    if getattr(InputProcessor.process_inputs, "_decoding_checks", False):
        return
    original = InputProcessor.process_inputs

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if request.sampling_params is not None:
            try:
                check_request(params, request.prompt_token_ids, self.model_config.get_vocab_size(), self.vllm_config)
            except ValueError as exc:
                raise VLLMValidationError(str(exc), parameter="extra_args") from None
        return request

    process_inputs._decoding_checks = True
    InputProcessor.process_inputs = process_inputs
    from decoding.integrations.vllm import serving

    serving.install(VLLMValidationError)
