"""Helpers shared by the attention functions this package registers with transformers'
``AttentionInterface`` (the tree layout's and the shared-prefix cache's). No transformers
import: they only read the module, the kwargs and the config they are given."""

from __future__ import annotations

from contextlib import contextmanager


def reject_unsupported_attention(module, kwargs: dict, what: str, alternative: str) -> None:
    """Sliding windows, soft-capping and attention sinks change the softmax; the package's
    kernels do not implement them, so such layers raise instead of computing something else."""
    if (getattr(module, "sliding_window", None) or kwargs.get("sliding_window") or kwargs.get("softcap")
            or getattr(module, "sinks", None) is not None):
        raise NotImplementedError(f"{what}: sliding windows, soft-capping and attention sinks are not supported; "
                                  f"{alternative}")


@contextmanager
def attention_implementation(config, name: str):
    """Switch ``config._attn_implementation`` to ``name`` for one forward (restored on exit, also
    on error), so that a user's model is left as it was."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
