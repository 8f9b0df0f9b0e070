"""transformers glue shared by the decoders and the KV caches, with no transformers import at
module level (they only read the objects they are given): what counts as a Hugging Face model,
positions and additive masks of left-padded batches, the KV cache's argument name, and the
attention switch and checks of the attention functions this package registers with transformers'
``AttentionInterface`` (the tree layout's and the shared-prefix cache's).

Every process-wide change the package makes to transformers is made here, once per process:

- :func:`register_attention`: the package's attention functions (``"decoding_tree"``,
  ``"decoding_shared_prefix"``) added to transformers' attention (and mask) registries, which
  find implementations by name;
- :func:`attention_implementation`: a config class's ``_attn_implementation`` property made to
  read a context variable first (below).

The user-facing transformers drop-ins (``generate``'s logits processor and custom generate) are
:mod:`decoding.integrations.hf`; this module is internal.

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
import inspect
import threading
from contextlib import contextmanager

import torch

# ((config, implementation name), ...): the overrides active in this thread / task
_overrides: contextvars.ContextVar[tuple] = contextvars.ContextVar("decoding_attention_overrides", default=())
_install_lock = threading.Lock()
_OVERRIDE_MARK = "_decoding_context_override"
_registered: set[str] = set()  # attention implementations added to transformers' registries


def is_hf_model(model) -> bool:
    """Whether ``model`` looks like a transformers ``PreTrainedModel`` (duck-typed)."""
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings") and callable(model)


def check_decoder_only(model, arg: str = "model") -> None:
    """Raise unless ``model`` is a Hugging Face decoder-only model (the tree layout needs one)."""
    if not is_hf_model(model):
        raise TypeError(f"{arg}: the tree layout needs a Hugging Face decoder-only model, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{arg}: the tree layout supports decoder-only models; "
                         f"{type(model).__name__} is an encoder-decoder")


def left_pad(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a left-padded int64 batch ``[B, T]`` (pad 0) and its 0/1 mask, the
    layout :func:`decoding.beam_search` takes for decoder-only models."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` int64 of a left-padded batch: real tokens count from 0, padding
    gets 0 (transformers' ``generate`` convention)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility ``[..., Q, K]`` as the additive mask transformers takes: 0 where
    visible, the dtype's most negative value elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible,
                                                                                      torch.finfo(dtype).min)


def cache_argument(model) -> str:
    """The name under which ``model.forward`` (and ``generate``) takes the KV cache: ``"cache"``
    on transformers releases that deprecate ``past_key_values`` (5.24 warns it is removed in
    5.40), else ``"past_key_values"``. Read from the signature, so no deprecated name is passed."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a transformers forward returned, under either name (``ModelOutput`` keys)."""
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


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


def register_attention(name: str, attention, mask=None) -> None:
    """Add ``attention`` (transformers' attention-function signature) to its
    ``AttentionInterface`` under ``name``, and ``mask`` (a mask builder) to its
    ``AttentionMaskInterface``, once per process: the registries are process-wide, and a model
    uses a registered implementation only when a call asks for it (:func:`attention_implementation`)."""
    if name in _registered:
        return
    with _install_lock:
        if name in _registered:
            return
        from transformers import AttentionInterface  # lazy: kernels never import transformers
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, attention)
        if mask is not None:
            AttentionMaskInterface.register(name, mask)
        _registered.add(name)
