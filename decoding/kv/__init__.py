"""KV-cache reduction: the prompt's KV shared by a request's beams, and pruning after prefill.

- :class:`SharedPrefixCache` (a transformers cache) stores the prompt KV once per request and
  only generated KV per beam; :func:`use_shared_prefix_attention` switches a model to the
  attention that reads it. ``beam_search`` uses it by default.
- Pruning policies (:class:`KVPolicy`): :class:`StreamingLLM`, :class:`SnapKV`, :class:`EarnCut`,
  and EARN's training mask :func:`earn_attention_mask`.
- :mod:`decoding.kv.per_beam`: the per-beam cache (``kv_cache="per_beam"``, encoder-decoders).

The caches import transformers, so they load on first use.
"""

from decoding.kv.policies import (
    EarnCut,
    KVPolicy,
    SnapKV,
    StreamingLLM,
    earn_attention_mask,
    earn_keep,
    snapkv_keep,
    streaming_keep,
)

_LAZY = {"SharedPrefixCache", "SharedPrefixLayer", "use_shared_prefix_attention"}


def __getattr__(name):
    if name in _LAZY:  # transformers is imported only when a cache is asked for
        from decoding.kv import shared_prefix

        return getattr(shared_prefix, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EarnCut", "KVPolicy", "SharedPrefixCache", "SharedPrefixLayer", "SnapKV", "StreamingLLM",
           "earn_attention_mask", "earn_keep", "snapkv_keep", "streaming_keep", "use_shared_prefix_attention"]
