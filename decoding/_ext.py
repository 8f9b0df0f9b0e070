"""Loads the compiled extension. The package does not run without it: no silent Python fallback."""

try:
    from decoding import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "decoding: the compiled extension `decoding._C` is missing or failed to load "
        f"({exc}). Reinstall the package from its root with `pip install -e .` "
        "(a C++17 compiler with OpenMP is needed)."
    ) from exc

__all__ = ["_C"]
