"""A transformers KV cache whose beams share the prompt KV: stored once per request.

transformers' beam search keeps the prompt KV once per beam (``K`` copies) and copies it at
every reorder. :class:`SharedPrefixLayer` keeps the prompt's keys/values once per request
(``[B, Hkv, P, D]``) and only the generated tokens per beam (``[R, Hkv, G, D]``, ``R`` beam
rows), with ``row_request[r]`` saying whose prompt row ``r`` continues. A reorder is an index
update of ``row_request`` plus a gather of the generated part; the prompt never moves.

Attention over that layout is :func:`shared_prefix_attention` (registered with transformers'
``AttentionInterface`` as ``"decoding_shared_prefix"``): the prompt part runs per request with
all of its beams' queries at once (:func:`decoding.ops.tree_attention`, each prompt K/V tile
read once for the request), the generated part per row, and the two are merged by log-sum-exp.
The prefill itself runs transformers' SDPA. Imported lazily: only the Hugging Face adapter and
users who pass the cache to ``generate`` use it.
"""

from __future__ import annotations

import math
import threading

import torch
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from decoding._transformers import register_attention, reject_unsupported_attention
from decoding.kv._layer import BufferedLayer
from decoding.ops import resolve_backend
from decoding.ops.compact_kv import compact_kv
from decoding.ops.tree_attention import run_tree_attention

SHARED_PREFIX_ATTENTION = "decoding_shared_prefix"
_current = threading.local()  # the layer whose update ran last in this thread


class SharedPrefixLayer(BufferedLayer):
    """One layer: prompt KV per request (``prefix_keys``/``prefix_values [B, Hkv, P, D]``),
    generated KV per beam row (the buffers), ``row_request [R]`` mapping rows to requests.

    Pruning policies read ``prefix_keys`` and, when they ask for it (``capture_window``),
    ``window_queries [B, Hq, W, D]``: the prefill's last ``W`` queries of this layer."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.prefix_keys = self.prefix_values = None
        self.prefix_valid = None  # [B, P] bool, filled by the prefill's attention call
        self.row_request = None
        self.rows_request_major = None  # True: rows grouped by request, equally many each; None: unknown
        self._prefilling = False
        self.capture_window = 0
        self.window_queries = None
        self.prompt_bytes_before_pruning = None

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def prefilling(self) -> bool:
        return self._prefilling

    @property
    def rows(self) -> int:
        return 0 if self.row_request is None else self.row_request.shape[0]

    def _row_device(self) -> torch.device:
        return self.row_request.device

    def _spare(self, length: int) -> int:
        return 8

    def update(self, key_states, value_states, *args, **kwargs):
        _current.layer = self
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prefix_keys is None:  # the prompt: stored once per request
            self.prefix_keys, self.prefix_values = key_states, value_states
            self.row_request = torch.arange(key_states.shape[0], device=key_states.device)
            self.rows_request_major = True
            self._prefilling = True
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        self._prefilling = False
        return self._append(key_states, value_states)

    def get_seq_length(self) -> int:
        if self.prefix_keys is None:
            return 0
        return self.prefix_keys.shape[2] + self._len

    def reorder_rows(self, index: torch.Tensor, shared_length: int = 0) -> None:
        """Row ``r`` becomes old row ``index[r]``: an index update; only generated KV moves."""
        if self.row_request is None:
            return
        index = index.to(self.row_request.device)
        self.row_request = self.row_request.index_select(0, index)
        self.rows_request_major = None  # the caller may know (reorder_beams); the layer does not
        if self._len:
            self._kbuf = self._kbuf.index_select(0, index)
            self._vbuf = self._vbuf.index_select(0, index)
            self._views()

    def reset(self) -> None:
        self.prefix_keys = self.prefix_values = self.prefix_valid = None
        self._init_buffers()
        self.row_request = None
        self.rows_request_major = None
        self._prefilling = False
        self.keys = self.values = None
        self.is_initialized = False

    def prune_prefix(self, index: torch.Tensor, valid: torch.Tensor, backend: str = "auto") -> None:
        """Keep only the prompt positions ``index [B, Hkv or 1, C]`` (``valid``: which slots are
        real, the same for every head) of this layer, compacted (:func:`decoding.ops.compact_kv`)."""
        before = self.kv_bytes()["prompt"]
        self.prefix_keys, self.prefix_values = compact_kv(self.prefix_keys, self.prefix_values, index,
                                                          backend=backend)
        self.prefix_valid = valid[:, 0].contiguous()
        self.prompt_bytes_before_pruning = before
        self.window_queries = None

    def kv_bytes(self) -> dict:
        """Bytes held: ``{"prompt": ..., "generated": ...}`` (buffers' full capacity)."""
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()
        return {"prompt": size(self.prefix_keys) + size(self.prefix_values),
                "generated": size(self._kbuf) + size(self._vbuf)}


class SharedPrefixCache(DynamicCache):
    """A ``DynamicCache`` of :class:`SharedPrefixLayer`. Use it with a model whose attention
    implementation is ``"decoding_shared_prefix"`` (see :func:`use_shared_prefix_attention`)."""

    def __init__(self, config=None, backend: str = "auto", capture_window: int = 0, **kwargs):
        super().__init__(config=config, **kwargs)
        layers = len(self.layers) if self.layers else config.num_hidden_layers
        self.layers = [SharedPrefixLayer(backend) for _ in range(layers)]
        for layer in self.layers:
            layer.capture_window = capture_window
        self.layer_class_to_replicate = None

    def prune_prompt(self, policy, attention_mask: torch.Tensor, *, backend: str = "auto") -> None:
        """Prune the prefilled prompt KV of every layer to what ``policy`` (a
        :class:`decoding.kv.KVPolicy`) keeps; ``attention_mask [B, T]`` is the prompt's."""
        policy.check(len(self.layers), attention_mask)
        for layer_idx, layer in enumerate(self.layers):
            index, valid = policy.keep(layer_idx, layer, attention_mask)
            layer.prune_prefix(index, valid, backend=backend)

    def kv_bytes(self) -> dict:
        """Bytes held by all layers; with a pruning policy applied, also the prompt's bytes
        before it (``"prompt_before_pruning"``)."""
        total = {"prompt": 0, "generated": 0}
        for layer in self.layers:
            for k, v in layer.kv_bytes().items():
                total[k] += v
        if any(layer.prompt_bytes_before_pruning is not None for layer in self.layers):
            total["prompt_before_pruning"] = sum(
                layer.kv_bytes()["prompt"] if layer.prompt_bytes_before_pruning is None
                else layer.prompt_bytes_before_pruning for layer in self.layers)
        return total


def _prefix_validity(attention_mask, key):
    """Valid prompt positions ``[B, P]`` from the prefill's mask (None: no padding)."""
    B, P = key.shape[0], key.shape[2]
    if attention_mask is None:
        return torch.ones((B, P), dtype=torch.bool, device=key.device)
    last = attention_mask[:, 0, -1, :P]
    return last if last.dtype == torch.bool else last == 0


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for :class:`SharedPrefixLayer` caches."""
    layer = getattr(_current, "layer", None)
    if not isinstance(layer, SharedPrefixLayer):
        raise RuntimeError(f"attention implementation {SHARED_PREFIX_ATTENTION!r} needs a SharedPrefixCache")
    reject_unsupported_attention(module, kwargs, "shared-prefix attention", "use beam_search(..., kv_cache='per_beam')")
    if layer.prefilling:
        layer.prefix_valid = _prefix_validity(attention_mask, key)
        if layer.capture_window:
            layer.window_queries = query[:, :, -layer.capture_window:].detach()
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    R, H, M, D = query.shape
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    backend = resolve_backend(layer.backend, query.device)
    pk, pv = layer.prefix_keys, layer.prefix_values
    B, P = pk.shape[0], pk.shape[2]
    rows = layer.row_request
    K = R // B if R % B == 0 else 0
    if K and layer.rows_request_major:  # known from the search's layout: no look at the device
        grouped = True
    else:
        grouped = K and bool((rows == torch.arange(B, device=rows.device).repeat_interleave(K)).all())
    if grouped:  # every request's beams together: the prompt part reads each prompt once
        q = query.view(B, K, H, M, D).permute(0, 2, 1, 3, 4).reshape(B, H, K * M, D)
        empty = torch.zeros((B, K * M, 0), dtype=torch.bool, device=query.device)
        out_p, lse_p = run_tree_attention(q, pk, pv, P, layer.prefix_valid, empty, scale, backend)
        out_p = out_p.view(B, H, K, M, D).permute(0, 2, 1, 3, 4).reshape(R, H, M, D)
        lse_p = lse_p.view(B, H, K, M).permute(0, 2, 1, 3).reshape(R, H, M)
    else:  # rows out of request order: gather each row's prompt (correct, more memory)
        empty = torch.zeros((R, M, 0), dtype=torch.bool, device=query.device)
        out_p, lse_p = run_tree_attention(query, pk[rows], pv[rows], P, layer.prefix_valid[rows], empty, scale,
                                          backend)
    G = key.shape[2]
    causal = torch.arange(G, device=query.device)[None, :] <= (G - M + torch.arange(M, device=query.device))[:, None]
    no_prefix = torch.zeros((R, 0), dtype=torch.bool, device=query.device)
    out_t, lse_t = run_tree_attention(query, key, value, 0, no_prefix, causal.expand(R, M, G).contiguous(), scale,
                                      backend)
    lse = torch.logaddexp(lse_p, lse_t)
    out = (out_p.float() * torch.exp(lse_p - lse)[..., None] + out_t.float() * torch.exp(lse_t - lse)[..., None])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_shared_prefix_attention() -> None:
    """Add ``"decoding_shared_prefix"`` to transformers' attention and mask registries (once per process)."""
    register_attention(SHARED_PREFIX_ATTENTION, shared_prefix_attention, sdpa_mask)


def use_shared_prefix_attention(model) -> None:
    """Switch ``model`` (a transformers decoder-only model) to shared-prefix attention, e.g. to
    pass a :class:`SharedPrefixCache` to ``model.generate(..., cache=cache)`` (``past_key_values=``
    before transformers renamed it; :func:`decoding.search.model.cache_argument` says which)."""
    register_shared_prefix_attention()
    model.config._attn_implementation = SHARED_PREFIX_ATTENTION
