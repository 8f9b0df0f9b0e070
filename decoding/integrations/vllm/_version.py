"""Which vLLM versions the integration is tested with, and what it does on the others.

vLLM imports the package's entry points (``vllm.logits_processors``, ``vllm.general_plugins``)
in every engine it starts, and turns any exception there into a failed start. So nothing here
raises on an untested version: the processor and the plugin load, log one warning naming the
installed and the tested versions, and stay inert; requests that name a catalog are refused at
admission with :func:`untested_message` (HTTP 400 when serving). The in-process driver
(:func:`decoding.integrations.vllm.beam_search`), which a user calls explicitly, raises it.
"""

from __future__ import annotations

import logging
import threading

TESTED_VLLM = ("0.32.0", "0.33.0")  # [lo, hi)

logger = logging.getLogger("decoding.integrations.vllm")
_warned = threading.Event()


def installed_vllm_version() -> str | None:
    """``vllm.__version__`` as the running process reports it (None without vLLM)."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def _is_tested(version: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with pip and vLLM
        return False
    try:
        v = Version(version.split("+")[0])
    except InvalidVersion:
        return False
    return Version(TESTED_VLLM[0]) <= v < Version(TESTED_VLLM[1])


def untested_message(version: str | None = None) -> str | None:
    """None on a tested vLLM; else the message that explains why the integration is inert."""
    version = installed_vllm_version() if version is None else version
    if version is not None and _is_tested(version):
        return None
    return (f"decoding's vLLM integration is tested with vLLM >= {TESTED_VLLM[0]}, < {TESTED_VLLM[1]}; this "
            f"server runs vLLM {version}, so it is inert and requests that name a decoding catalog are refused. "
            "Install a tested vLLM (`pip install 'genrec-decoding[vllm]'`) or a decoding release tested with it.")


def warn_if_untested() -> bool:
    """Log the untested-version warning (once per process); returns whether vLLM is untested."""
    message = untested_message()
    if message is None:
        return False
    if not _warned.is_set():
        _warned.set()
        logger.warning(message)
    return True


def check_version(version: str | None = None) -> None:
    """Raise RuntimeError on an untested vLLM (for calls a user makes explicitly)."""
    message = untested_message(version)
    if message is not None:
        raise RuntimeError(message)
