"""Helpers shared by the attention functions this package registers with transformers'
``AttentionInterface`` (the tree layout's and the shared-prefix cache's). No transformers
import: they only read the module, the kwargs and the config they are given.

Reentrancy: a decoder call switches the attention implementation of *its* model for *its*
forwards only. transformers picks a layer's attention function (and its mask builder) by reading
``config._attn_implementation`` on every forward, so switching it by assignment on a model that
another thread is running changes that thread's forward too (and crashes it). Instead the read
itself consults a context variable, which is per thread (and per asyncio task): inside
:func:`attention_implementation` the reads of that config (and its sub-configs) in the calling
context return the requested name; every other reader, in any thread, sees the stored value.
The read is redirected once per process by wrapping the config class's ``_attn_implementation``
property getter; outside such a block it returns exactly what it returned before.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager

# ((config, implementation name), ...): the overrides active in this thread / task
_overrides: contextvars.ContextVar[tuple] = contextvars.ContextVar("decoding_attention_overrides", default=())
_install_lock = threading.Lock()
_OVERRIDE_MARK = "_decoding_context_override"


def reject_unsupported_attention(module, kwargs: dict, what: str, alternative: str) -> None:
    """Sliding windows, soft-capping and attention sinks change the softmax; the package's
    kernels do not implement them, so such layers raise instead of computing something else."""
    if (getattr(module, "sliding_window", None) or kwargs.get("sliding_window") or kwargs.get("softcap")
            or getattr(module, "sinks", None) is not None):
        raise NotImplementedError(f"{what}: sliding windows, soft-capping and attention sinks are not supported; "
                                  f"{alternative}")


def _defining_class(config_type: type):
    for cls in config_type.__mro__:
        if "_attn_implementation" in cls.__dict__:
            return cls
    return None


def _install_context_override(config) -> None:
    """Make ``config``'s class read ``_attn_implementation`` through the context variable (once)."""
    cls = _defining_class(type(config))
    prop = cls.__dict__["_attn_implementation"] if cls is not None else None
    if not isinstance(prop, property) or prop.fget is None:
        raise NotImplementedError(
            f"model: {type(config).__name__}._attn_implementation is not a property, so the attention "
            "implementation cannot be switched per call; this transformers version is not supported")
    if getattr(prop.fget, _OVERRIDE_MARK, False):
        return
    with _install_lock:
        prop = cls.__dict__["_attn_implementation"]
        if getattr(prop.fget, _OVERRIDE_MARK, False):
            return
        stored = prop.fget

        def read(self):
            for config_, name in reversed(_overrides.get()):  # the innermost block wins
                if config_ is self:
                    return name
            return stored(self)

        setattr(read, _OVERRIDE_MARK, True)
        read.__doc__ = stored.__doc__
        setattr(cls, "_attn_implementation", property(read, prop.fset, prop.fdel, prop.__doc__))


def _with_sub_configs(config) -> list:
    found, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is f for f in found):
            continue
        found.append(c)
        todo.extend(getattr(c, key, None) for key in (getattr(c, "sub_configs", None) or {}))
    return found


@contextmanager
def attention_implementation(config, name: str):
    """Within this block, in this thread (or asyncio task) only, ``config`` and its sub-configs
    report ``_attn_implementation == name``: a forward of the model run here uses that
    attention function. The config object is never written; other threads are unaffected."""
    configs = _with_sub_configs(config)
    for c in configs:
        _install_context_override(c)
    token = _overrides.set(_overrides.get() + tuple((c, name) for c in configs))
    try:
        yield
    finally:
        _overrides.reset(token)


def register_once(register) -> None:
    """Run ``register`` (which adds this package's functions to transformers' registries) once
    per process, not once per call: the registries are process-wide."""
    if getattr(register, "_decoding_done", False):
        return
    with _install_lock:
        if not getattr(register, "_decoding_done", False):
            register()
            register._decoding_done = True
