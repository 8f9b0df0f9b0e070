"""Continuous batching on the tree layout, for speculative beam search: requests finish after
different numbers of rounds, so finished requests retire (:meth:`BatchedTreeModel.select`),
waiting prompts join the running batch (:meth:`BatchedTreeModel.admit`) and each round keeps
only the rows the new beams descend from (:func:`compaction_plan`,
:meth:`BatchedTreeModel.compact`), one plan for the target's and the draft's trees so their row
ids stay identical."""

from __future__ import annotations

import torch

from decoding.search.tree import TreeModel


class BatchedTreeModel(TreeModel):
    """:class:`decoding.search.tree.TreeModel` whose batch changes while it runs."""

    @property
    def batch_size(self) -> int:
        return self._visible.shape[0]

    @property
    def num_computed(self) -> int:
        """Rows whose KV is in the cache (row 0 included); later rows are pending."""
        return self._computed

    def _kv_layers(self):
        """The cache's layers, which must be transformers' plain full-attention ``DynamicLayer``:
        their ``keys``/``values`` ``[B, H, S, D]`` are indexed directly."""
        from transformers.cache_utils import DynamicLayer  # lazy: kernels never import transformers

        layers = self._cache.layers
        for layer in layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"TreeModel: retiring, admitting and compacting requests need plain "
                                          f"full-attention KV layers; {type(self.model).__name__} uses "
                                          f"{type(layer).__name__}")
        return layers

    def select(self, index: torch.Tensor) -> None:
        """Keep only the requests ``index`` (int64 ``[b]``, in that order): finished requests
        retire, so later forwards run only the live ones."""
        index = index.to(self._visible.device).long()
        for layer in self._kv_layers():
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self._visible, self._depth = self._visible.index_select(0, index), self._depth.index_select(0, index)
        self._tokens = self._tokens.index_select(0, index)
        self._last_prompt_pos = self._last_prompt_pos.index_select(0, index)

    @torch.inference_mode()
    def admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Prefill new prompts ``[b, T]`` (left-padded, ``T`` the running batch's prompt width)
        and append them to the batch; returns their last position's logits ``[b, V]``.

        A new request gets the running batch's rows as dead rows (zero KV, seen by nobody), so
        the cache stays rectangular; its own rows are added from then on, under its row 0.
        Without a running batch (none yet, or every request retired) this is :meth:`prefill`."""
        if not hasattr(self, "_visible") or self.batch_size == 0:
            return self.prefill(input_ids, attention_mask)
        if input_ids.shape[1] != self._prompt_len:
            raise ValueError(f"input_ids: admitted prompts must be {self._prompt_len} tokens wide (the running "
                             f"batch's), got {input_ids.shape[1]}")
        layers = self._kv_layers()
        old = ([(layer.keys, layer.values) for layer in layers], self._visible, self._depth, self._tokens,
               self._last_prompt_pos, self._computed)
        logits = self.prefill(input_ids, attention_mask)
        old_kv, old_visible, old_depth, old_tokens, old_last_pos, computed = old
        P, (_, R, S) = self._prompt_len, old_visible.shape
        b, device = input_ids.shape[0], old_visible.device
        for layer, (k, v) in zip(self._kv_layers(), old_kv):
            pad = (0, 0, 0, computed - 1)  # the dead rows' cache positions
            layer.keys = torch.cat([k, torch.nn.functional.pad(layer.keys, pad)])
            layer.values = torch.cat([v, torch.nn.functional.pad(layer.values, pad)])
        visible = torch.zeros((b, R, S), dtype=torch.bool, device=device)
        visible[:, :, :P] = self._visible[:, :1, :P]  # every row sees the prompt; dead rows also themselves
        visible[:, torch.arange(1, R, device=device), P + torch.arange(R - 1, device=device)] = True
        self._visible = torch.cat([old_visible, visible])
        self._depth = torch.cat([old_depth, (torch.arange(R, device=device) > 0).long().expand(b, R)])
        self._tokens = torch.cat([old_tokens, torch.full((b, R), 0, dtype=torch.long, device=device)
                                  .index_fill_(1, torch.zeros(1, dtype=torch.long, device=device), -1)])
        self._last_prompt_pos = torch.cat([old_last_pos, self._last_prompt_pos])
        self._computed = computed
        return logits

    def ancestors(self, rows: torch.Tensor) -> torch.Tensor:
        """bool ``[B, R]``: row 0 and every row that one of ``rows`` (int64 ``[B, M]``) is or
        descends from, i.e. what those rows' descendants will attend to."""
        P, (B, _, S) = self._prompt_len, self._visible.shape
        seen = self._visible.gather(1, rows.to(self._visible.device).long()[..., None].expand(-1, -1, S))
        return torch.cat([torch.ones((B, 1), dtype=torch.bool, device=seen.device), seen[:, :, P:].any(1)], dim=1)

    def compact(self, src: torch.Tensor) -> None:
        """Rebuild the rows as ``src`` (int64 ``[B, R']``, from :func:`compaction_plan`): new row
        ``i`` of request ``b`` is old row ``src[b, i]`` (-1: a dead padding row); row 0 stays.
        Rows no request needs leave the cache, so attention and memory stop growing with the
        rows a batch has ever had. Rows not computed yet stay pending, after the computed ones."""
        B, R = self._visible.shape[:2]
        P, C, device = self._prompt_len, self._computed, self._visible.device
        src = src.to(device).long()
        Rn = src.shape[1]
        valid = src >= 0
        srcc = src.clamp(min=0)
        if Rn == R and bool((src == torch.arange(R, device=device)).all()):
            return  # nothing to drop
        computed_col = (~valid | (srcc < C)).all(0)
        Cn = Rn if bool(computed_col.all()) else int((~computed_col).nonzero()[0])
        row0_first = bool((src[:, 0] == 0).all())
        if not row0_first or bool((valid[:, Cn:] & (srcc[:, Cn:] < C)).any()):
            raise ValueError("src: row 0 must stay first and computed rows must precede pending ones")
        rows = self._visible.gather(1, srcc[..., None].expand(-1, -1, self._visible.shape[2]))
        cols = torch.cat([torch.arange(P, device=device).expand(B, P), P + srcc[:, 1:] - 1], dim=1)
        visible = rows.gather(2, cols[:, None, :].expand(-1, Rn, -1))
        visible[:, :, P:] &= valid[:, None, 1:]
        dead = torch.zeros_like(visible)  # a padding row: a dead row (the prompt and itself)
        dead[:, :, :P] = self._visible[:, :1, :P]
        dead[:, torch.arange(1, Rn, device=device), P + torch.arange(Rn - 1, device=device)] = True
        self._visible = torch.where(valid[..., None], visible, dead)
        self._depth = torch.where(valid, self._depth.gather(1, srcc), 1)
        self._tokens = torch.where(valid, self._tokens.gather(1, srcc), 0)
        positions = torch.where(valid[:, 1:Cn], P + srcc[:, 1:Cn] - 1, P - 1)  # padding: any position
        for layer in self._kv_layers():
            index = positions[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.cat([layer.keys[:, :, :P], layer.keys.gather(2, index)], dim=2)
            layer.values = torch.cat([layer.values[:, :, :P], layer.values.gather(2, index)], dim=2)
        self._computed = Cn



def compaction_plan(keep: torch.Tensor, computed: int) -> torch.Tensor:
    """The row layout :meth:`BatchedTreeModel.compact` takes: for bool ``keep [B, R]`` (row 0 is always
    kept), each request's kept computed rows (the first ``computed``), then its kept pending
    rows, in their order, each block padded with -1 to the longest request's. int64 ``[B, R']``.

    One plan for two trees with the same rows (the target's and the draft's) keeps their row
    ids identical; ``computed`` is then the smaller of their computed counts."""
    keep = keep.clone()
    keep[:, 0] = True
    blocks = []
    for lo, hi in ((0, computed), (computed, keep.shape[1])):
        part = keep[:, lo:hi]
        count = part.sum(1)
        width = int(count.max()) if hi > lo else 0
        if width:
            order = torch.sort((~part).to(torch.int8), dim=1, stable=True).indices[:, :width] + lo
            blocks.append(torch.where(torch.arange(width, device=keep.device) < count[:, None], order, -1))
    return torch.cat(blocks, dim=1)


def remap_rows(rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Row ids ``rows [B, M]`` in the layout ``src`` made (-1 where a row was dropped)."""
    B, R = rows.shape[0], int(rows.max()) + 1 if rows.numel() else 1
    R = max(R, int(src.max()) + 1)
    inverse = torch.full((B, R + 1), -1, dtype=torch.long, device=src.device)
    inverse.scatter_(1, torch.where(src >= 0, src, R), torch.arange(src.shape[1], device=src.device).expand_as(src))
    return inverse[:, :R].gather(1, rows)
