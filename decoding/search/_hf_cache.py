"""A transformers KV-cache layer for beam search over a shared prompt.

transformers' ``DynamicLayer`` re-concatenates the whole cache on every append and
``reorder_cache`` index-selects all of it on every step, so each step copies the prompt KV of
every beam twice. Beams of one request share their prompt KV exactly (it was fanned out from
one prefill row), so a reorder that keeps every row inside its request only needs to move the
generated positions. ``BeamKVLayer`` keeps keys/values in a preallocated buffer (appends write in
place) and reorders only past ``shared_length``; any other reorder copies everything, so results
never depend on the shortcut. Imported lazily: only the Hugging Face adapter uses it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache


class BeamKVLayer(DynamicLayer):
    """``DynamicLayer`` with in-place appends and prompt-sharing reorders.

    ``keys``/``values`` are views ``[rows, heads, length, head_dim]`` of buffers with spare
    capacity along the sequence dimension.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf = self._vbuf = None
        self._len = 0

    def _views(self) -> None:
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def _grow(self, capacity: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        kb = like_k.new_empty((like_k.shape[0], like_k.shape[1], capacity, like_k.shape[3]))
        vb = like_v.new_empty((like_v.shape[0], like_v.shape[1], capacity, like_v.shape[3]))
        if self._len:
            kb[:, :, : self._len].copy_(self._kbuf[:, :, : self._len])
            vb[:, :, : self._len].copy_(self._vbuf[:, :, : self._len])
        self._kbuf, self._vbuf = kb, vb

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._len + key_states.shape[-2]
        if self._kbuf is None or end > self._kbuf.shape[2] or self._kbuf.shape[0] != key_states.shape[0]:
            self._grow(end + max(16, end // 4), key_states, value_states)
        self._kbuf[:, :, self._len : end].copy_(key_states)
        self._vbuf[:, :, self._len : end].copy_(value_states)
        self._len = end
        self._views()
        return self.keys, self.values

    def reorder_rows(self, index: torch.Tensor, shared_length: int) -> None:
        """Row ``r`` becomes old row ``index[r]``. Positions below ``shared_length`` are assumed
        equal between ``r`` and ``index[r]`` (the caller checks) and are not copied."""
        if not self.is_initialized or self._len == 0:
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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder_rows(beam_idx, 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._len:
            rows = torch.arange(self._kbuf.shape[0], device=self._kbuf.device)
            self.reorder_rows(rows.repeat_interleave(repeats), 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._len:
            index = torch.arange(self._kbuf.shape[0], device=self._kbuf.device)[indices]
            self.reorder_rows(index, 0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._len = max(0, self._len + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None
        self._len = 0


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


def reorder_beams(cache, index: torch.Tensor, prompt_shared: bool, self_shared_length: int) -> None:
    """Reorder every layer by ``index``. With ``prompt_shared`` (each new row continues a row of the
    same request), self-attention layers skip their first ``self_shared_length`` positions and
    cross-attention layers (encoder KV, identical within a request) are left as they are."""
    if isinstance(cache, EncoderDecoderCache):
        for layer in cache.self_attention_cache.layers:
            layer.reorder_rows(index, self_shared_length if prompt_shared else 0)
        if not prompt_shared:
            for layer in cache.cross_attention_cache.layers:
                layer.reorder_rows(index, 0)
        return
    for layer in cache.layers:
        layer.reorder_rows(index, self_shared_length if prompt_shared else 0)
