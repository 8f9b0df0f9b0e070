"""A transformers KV-cache layer for beam search over a shared prompt.

transformers' ``DynamicLayer`` re-concatenates the whole cache on every append and
``reorder_cache`` index-selects all of it on every step, so each step copies the prompt KV of
every beam twice. Beams of one request share their prompt KV exactly (it was fanned out from
one prefill row), so a reorder that keeps every row inside its request only needs to move the
generated positions. ``BeamKVLayer`` keeps keys/values in a preallocated buffer (appends write in
place) and reorders only past ``shared_length``; any other reorder copies everything, so results
never depend on the shortcut. Imported lazily: only the Hugging Face adapter uses it (with
``beam_search(..., kv_cache="per_beam")``, and for encoder-decoders).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from decoding.kv._layer import BufferedLayer


class BeamKVLayer(BufferedLayer):
    """``DynamicLayer`` with in-place appends and prompt-sharing reorders: the buffers hold every
    position of every row."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._init_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)

    def reorder_rows(self, index: torch.Tensor, shared_length: int = 0) -> None:
        if not self.rows:
            return
        index = index.to(self._kbuf.device)
        if shared_length > 0 and index.numel() == self._kbuf.shape[0]:
            lo = min(shared_length, self._len)
            if lo < self._len:
                # advanced indexing reads into a new tensor before the write: no aliasing
                self._kbuf[:, :, lo : self._len] = self._kbuf[index, :, lo : self._len]
                self._vbuf[:, :, lo : self._len] = self._vbuf[index, :, lo : self._len]
        else:  # one gather of the whole buffer (spare capacity included) beats gather + copy
            self._kbuf = self._kbuf.index_select(0, index)
            self._vbuf = self._vbuf.index_select(0, index)
        self._views()


def _swap_layers(cache: DynamicCache) -> bool:
    """Use BeamKVLayer for a cache made only of plain full-attention layers (sliding-window and
    other layer kinds keep transformers' own). Returns whether the swap happened."""
    if cache.layers:
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return False
        cache.layers = [BeamKVLayer() for _ in cache.layers]
        return True
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = BeamKVLayer
        return True
    return False


def new_beam_cache(config, encoder_decoder: bool):
    """A transformers cache for ``config`` whose plain layers are :class:`BeamKVLayer`."""
    if encoder_decoder:
        self_attn, cross_attn = DynamicCache(config=config), DynamicCache(config=config)
        fast = _swap_layers(self_attn) & _swap_layers(cross_attn)
        return EncoderDecoderCache(self_attn, cross_attn), fast
    cache = DynamicCache(config=config)
    return cache, _swap_layers(cache)


def reorder_beams(cache, index: torch.Tensor, prompt_shared: bool, self_shared_length: int,
                  request_major: bool = False) -> None:
    """Reorder every layer by ``index``. With ``prompt_shared`` (each new row continues a row of the
    same request), self-attention layers skip their first ``self_shared_length`` positions and
    cross-attention layers (encoder KV, identical within a request) are left as they are. With
    ``request_major`` (rows grouped by request, equally many each: the caller knows), layers that
    track it record so, and need not check on the device."""
    if isinstance(cache, EncoderDecoderCache):
        for layer in cache.self_attention_cache.layers:
            layer.reorder_rows(index, self_shared_length if prompt_shared else 0)
        if not prompt_shared:
            for layer in cache.cross_attention_cache.layers:
                layer.reorder_rows(index, 0)
        return
    for layer in cache.layers:
        layer.reorder_rows(index, self_shared_length if prompt_shared else 0)
        if hasattr(layer, "rows_request_major"):
            layer.rows_request_major = True if request_major else None
