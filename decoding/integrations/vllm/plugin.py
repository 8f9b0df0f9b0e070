"""vLLM general plugin (entry point ``vllm.general_plugins``): request checks that need the prompt.

A logits processor's ``validate_params`` sees only the sampling params. Rejecting an identifier
offset beyond the prompt, prompt tokens after the offset that no catalog identifier starts with,
or a catalog built for another vocabulary than the model's needs the rendered prompt and the
model config, which ``InputProcessor.process_inputs`` has: the plugin wraps it so these requests
fail at admission (vLLM's validation error, HTTP 400 when serving) instead of reaching the engine.
vLLM may load plugins several times per process; wrapping happens once.
"""

from __future__ import annotations

import functools


def check_request(params, prompt_token_ids, vocab_size: int, vllm_config=None) -> None:
    """Raise ValueError if the request's trie arguments do not fit its prompt or the model."""
    from decoding.integrations.vllm.catalogs import resolve_catalog
    from decoding.integrations.vllm.processor import CATALOG_KEY, OFFSET_KEY, _engine_default, _request_args

    args = _request_args(params)
    if args is None and vllm_config is not None:
        args = _engine_default(vllm_config)
    if args is None:
        return
    trie = resolve_catalog(args[0])
    if trie.vocab_size != vocab_size:
        raise ValueError(
            f"{CATALOG_KEY}: {args[0]!r} was built for vocab_size {trie.vocab_size}, the model has {vocab_size}"
        )
    prompt = list(prompt_token_ids or [])
    offset = len(prompt) if args[1] is None else args[1]
    if offset > len(prompt):
        raise ValueError(f"{OFFSET_KEY}: {offset} is beyond the prompt ({len(prompt)} tokens)")
    head = prompt[offset:]
    if head:
        if len(head) >= trie.depth or not trie.has_prefix(head):
            raise ValueError(
                f"{OFFSET_KEY}: the prompt's tokens from {offset} on do not start any identifier of {args[0]!r}"
            )


def register() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

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
