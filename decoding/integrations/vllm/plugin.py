"""vLLM general plugin (entry point ``vllm.general_plugins``): request checks that need the
engine's config or the prompt, and the OpenAI beam route.

A logits processor's ``validate_params`` sees only the sampling params. Resolving the catalog a
request names against the operator's registry (``additional_config``), rejecting an identifier
offset beyond the prompt, prompt tokens after the offset that no catalog identifier starts with,
or a catalog built for another vocabulary than the model's needs the engine config and the
rendered prompt, which vLLM's input processing has: the plugin hooks it (through
:mod:`decoding.integrations.vllm._compat`) so these requests fail at admission (vLLM's validation
error, HTTP 400 when serving) instead of reaching the engine. vLLM may load plugins several times
per process; hooking happens once.

It mends vLLM 0.32-0.33's legacy sampler, which answers a batch that mixes token-id log-prob
requests (the exact path's) with top-N ones (other clients') with -inf alternatives for the
latter (``_compat.install_mixed_logprobs_fix``).

It also routes OpenAI completions requests that ask for beam search (``use_beam_search``) and
name a catalog to the exact beam search (:mod:`decoding.integrations.vllm.serving`): vLLM's own
server beam search drops per-request arguments, so it would return unconstrained beams.

Each hook is installed only where the vLLM class it wraps has the shape the package expects (a
warning names any that does not) and passes every request through untouched on an engine outside
the supported range that did not opt in; there the processor's ``validate_params`` refuses
requests that name a catalog.
"""

from __future__ import annotations

from decoding.integrations.vllm import _compat, serving
from decoding.integrations.vllm.arguments import check_admission

# kept importable under its old name
check_request = check_admission


def register() -> None:
    # no version warning here: whether the engine opted in is known only once it has a config
    _compat.install_admission(check_admission)
    serving.install()
    # in the engine's worker processes: the exact path asks token ids beside other clients' top-N
    _compat.install_mixed_logprobs_fix()
