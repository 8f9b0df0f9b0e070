"""The buffer mechanics both of the package's KV-cache layers share (transformers' ``DynamicLayer``
API): keys/values are views ``[rows, kv_heads, length, head_dim]`` of buffers with spare
capacity along the sequence, appends write in place, and every row operation transformers may
call (``reorder_cache``, ``batch_repeat_interleave``, ``batch_select_indices``, ``crop``) goes
through one declared method, :meth:`BufferedLayer.reorder_rows`."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """Base of :class:`decoding.kv.per_beam.BeamKVLayer` and
    :class:`decoding.kv.shared_prefix.SharedPrefixLayer`. Subclasses say what a row is
    (:attr:`rows`), how much spare capacity to add (:meth:`_spare`) and how rows move
    (:meth:`reorder_rows`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0  # positions held in the buffers

    @property
    def rows(self) -> int:
        """Rows the layer holds (0 before anything is stored)."""
        return 0 if self._kbuf is None or not self._len else self._kbuf.shape[0]

    def _spare(self, length: int) -> int:
        return max(16, length // 4)

    def _views(self) -> None:
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def _grow(self, rows: int, capacity: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        kb = like_k.new_empty((rows, like_k.shape[1], capacity, like_k.shape[3]))
        vb = like_v.new_empty((rows, like_v.shape[1], capacity, like_v.shape[3]))
        if self._len and self._kbuf is not None:
            kb[:, :, : self._len].copy_(self._kbuf[:, :, : self._len])
            vb[:, :, : self._len].copy_(self._vbuf[:, :, : self._len])
        self._kbuf, self._vbuf = kb, vb

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write ``[R, H, M, D]`` after the held positions (growing the buffers if needed)."""
        rows, end = key_states.shape[0], self._len + key_states.shape[2]
        if self._kbuf is None or end > self._kbuf.shape[2] or self._kbuf.shape[0] != rows:
            self._grow(rows, end + self._spare(end), key_states, value_states)
        self._kbuf[:, :, self._len : end].copy_(key_states)
        self._vbuf[:, :, self._len : end].copy_(value_states)
        self._len = end
        self._views()
        return self.keys, self.values

    def reorder_rows(self, index: torch.Tensor, shared_length: int = 0) -> None:
        """Row ``r`` becomes old row ``index[r]``; positions below ``shared_length`` are equal
        between ``r`` and ``index[r]`` (the caller checks), so a layer may skip them."""
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder_rows(beam_idx, 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows:
            self.reorder_rows(torch.arange(self.rows, device=self._row_device()).repeat_interleave(repeats), 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows:
            self.reorder_rows(torch.arange(self.rows, device=self._row_device())[indices], 0)

    def _row_device(self) -> torch.device:
        return self._kbuf.device

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        self._len = max(0, self._len + tokens_to_remove)
        if self._kbuf is not None:
            self._views()

    def reset(self) -> None:
        super().reset()
        self._init_buffers()
