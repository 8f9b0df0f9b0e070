"""Tree layout: the beams of a request stored as one flattened sequence after a shared prompt.

Each request's KV cache holds ``[prompt (T) | tree tokens]`` once; every tree token (a "row")
has a parent row, and attends to the prompt, its ancestors and itself, through a 4-D additive
mask, with position ``prompt length + depth - 1``. Reordering beams is then only a change of
parent pointers: nothing in the cache moves, and the prompt KV is never copied per beam. Dropped
beams stay in the cache, masked out, until :meth:`TreeModel.truncate` cuts them off.

Row 0 stands for the prompt's last token (depth 0); tree row ``r >= 1`` sits at cache position
``T + r - 1``. All requests of a batch have the same number of rows, so the cache stays
rectangular; rows a request does not need are added as dead rows (parent 0, ignored).

Attention of the tree rows (``attention=``): ``"model"`` runs the model's own attention
implementation with the 4-D mask; ``"op"`` routes it, through transformers' attention
interface, to :func:`decoding.ops.tree_attention` (prompt part and tree part merged by
log-sum-exp, no dense mask over the prompt; Triton on CUDA, C++ on CPU). The prompt's prefill
always runs the model's own attention.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

import torch

from decoding._transformers import (
    additive_mask,
    attention_implementation,
    cache_argument,
    check_decoder_only,
    left_padded_positions,
    register_attention,
    reject_unsupported_attention,
    returned_cache,
)
from decoding._validate import check_choice
from decoding.ops import resolve_backend
from decoding.ops.tree_attention import run_tree_attention
from decoding.search.model import model_vocab_size

TREE_ATTENTION = "decoding_tree"
ATTENTION_MODES = ("model", "op")


@dataclass
class _TreeAttentionContext:
    prefix_len: int
    prefix_valid: torch.Tensor  # [B, P] bool
    tree_visible: torch.Tensor  # [B, M, R] bool
    backend: str
    calls: int = 0


_active_context: contextvars.ContextVar = contextvars.ContextVar("decoding_tree_attention", default=None)


def tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``AttentionInterface``) for the tree rows of
    :meth:`TreeModel.run`: query ``[B, H, M, D]``, key/value ``[B, Hkv, P + R, D]`` (the cache
    after this step's update); returns ``([B, M, H, D], None)``. The 4-D mask is not read: the
    prompt padding and the tree visibility come from the running :class:`TreeModel`."""
    ctx = _active_context.get()
    if ctx is None:
        raise RuntimeError(f"attention implementation {TREE_ATTENTION!r} runs only inside TreeModel.run")
    reject_unsupported_attention(module, kwargs, "tree attention op", "use TreeModel(model, attention='model')")
    if dropout and module.training:
        raise NotImplementedError("tree attention op: attention dropout is not supported (inference only)")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out, _ = run_tree_attention(query, key, value, ctx.prefix_len, ctx.prefix_valid, ctx.tree_visible, float(scale),
                                ctx.backend)
    ctx.calls += 1
    return out.transpose(1, 2).contiguous(), None


def _register_tree_attention():
    register_attention(TREE_ATTENTION, tree_attention_forward)


class TreeModel:
    """A Hugging Face decoder-only model run over the tree layout.

    ``prefill`` runs the prompts; ``add`` appends rows (tokens and parent rows) without running
    them; ``run`` forwards every pending row in one call and returns their logits; ``truncate``
    drops rows (and their KV) past a given count. Continuous batching (retiring, admitting and
    compacting requests) is :class:`decoding.speculative.batching.BatchedTreeModel`, which
    speculative beam search runs on.
    """

    def __init__(self, model, attention: str = "model", backend: str = "auto"):
        check_decoder_only(model)
        check_choice("attention", attention, set(ATTENTION_MODES))
        self.model = model
        self.vocab_size = model_vocab_size(model)
        self.attention = attention
        self.backend = resolve_backend(backend, self.device) if attention == "op" else None
        if attention == "op":
            _register_tree_attention()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_rows(self) -> int:
        return self._visible.shape[1]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompts ``[B, T]`` (left-padded); returns the last position's logits ``[B, V]``."""
        from transformers import DynamicCache  # lazy: kernels never import transformers

        device = self.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        position_ids = left_padded_positions(mask)
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         return_dict=True, **{cache_argument(self.model): self._cache})
        self._cache = returned_cache(out)
        self._prompt_len = input_ids.shape[1]
        B = input_ids.shape[0]
        # per row: visibility over cache positions (bool [B, R, S]), depth, and token (the input of run)
        self._visible = mask.bool()[:, None, :]
        self._depth = torch.zeros((B, 1), dtype=torch.long, device=device)
        self._last_prompt_pos = position_ids[:, -1]
        self._tokens = torch.full((B, 1), -1, dtype=torch.long, device=device)
        self._computed = 1  # rows whose KV is in the cache (row 0: the prompt)
        return out.logits[:, -1, :]

    def add(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Append rows ``tokens [B, M]`` whose parents are existing rows ``parents [B, M]`` (int64);
        returns the new rows' ids ``[B, M]``. Nothing runs until :meth:`run`."""
        B, M = tokens.shape
        device = self._visible.device
        parents, tokens = parents.to(device).long(), tokens.to(device).long()
        R, S = self._visible.shape[1], self._visible.shape[2]
        if bool((parents < 0).any()) or bool((parents >= R).any()):
            raise ValueError(f"parents: row ids must be in [0, {R})")
        visible = torch.nn.functional.pad(self._visible, (0, M))
        rows = visible.gather(1, parents[..., None].expand(-1, -1, S + M)).clone()
        positions = S + torch.arange(M, device=device)
        rows[:, torch.arange(M, device=device), positions] = True  # each row sees itself
        self._visible = torch.cat([visible, rows], dim=1)
        self._depth = torch.cat([self._depth, self._depth.gather(1, parents) + 1], dim=1)
        self._tokens = torch.cat([self._tokens, tokens], dim=1)
        return torch.arange(R, R + M, device=device).expand(B, M)

    @torch.inference_mode()
    def run(self) -> torch.Tensor:
        """Forward every pending row at once; returns their logits ``[B, M, V]`` in row order."""
        start, end = self._computed, self.num_rows
        if start == end:
            raise RuntimeError("TreeModel.run: no pending rows")
        cached = self._prompt_len + start - 1
        visible = self._visible[:, start:end, : self._prompt_len + end - 1]
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        # additive 4-D mask [B, 1, M, S]: transformers passes a 4-D mask to attention as it is
        mask = additive_mask(visible, dtype)[:, None]
        position_ids = self._last_prompt_pos[:, None] + self._depth[:, start:end]
        assert self._cache.get_seq_length() == cached
        kwargs = dict(input_ids=self._tokens[:, start:end].clamp(min=0), attention_mask=mask,
                      position_ids=position_ids, use_cache=True, return_dict=True,
                      **{cache_argument(self.model): self._cache})
        if self.attention == "op":
            out = self._run_with_op(start, end, kwargs)
        else:
            out = self.model(**kwargs)
        self._cache = returned_cache(out)
        self._computed = end
        return out.logits

    def _run_with_op(self, start, end, kwargs):
        """The forward with the model's attention switched to the tree attention op for this
        call only (restored afterwards, also on error)."""
        P = self._prompt_len
        ctx = _TreeAttentionContext(prefix_len=P, prefix_valid=self._visible[:, 0, :P].contiguous(),
                                    tree_visible=self._visible[:, start:end, P: P + end - 1].contiguous(),
                                    backend=self.backend)
        token = _active_context.set(ctx)
        try:
            with attention_implementation(self.model.config, TREE_ATTENTION):
                out = self.model(**kwargs)
        finally:
            _active_context.reset(token)
        if ctx.calls == 0:
            raise RuntimeError(f"attention: {type(self.model).__name__} does not route attention through "
                               "transformers' AttentionInterface, so the tree attention op cannot run; "
                               "use attention='model'")
        return out

    def truncate(self, num_rows: int) -> None:
        """Keep the first ``num_rows`` rows (row 0 included) and their KV; drop the rest."""
        if not 1 <= num_rows <= self.num_rows:
            raise ValueError(f"num_rows: expected 1..{self.num_rows}, got {num_rows}")
        self._visible = self._visible[:, :num_rows, : self._prompt_len + num_rows - 1]
        self._depth = self._depth[:, :num_rows]
        self._tokens = self._tokens[:, :num_rows]
        if self._computed > num_rows:
            # a negative count removes that many trailing positions (positive values are deprecated)
            self._cache.crop(-(self._cache.get_seq_length() - (self._prompt_len + num_rows - 1)))
            self._computed = num_rows

    def kv_length(self) -> int:
        return int(self._cache.get_seq_length())


class TreeBeamModel:
    """:class:`decoding.search.model.BeamModel` over the tree layout (``beam_search(...,
    layout="tree")``): each step appends the new beams' tokens as rows under their parents' rows
    and runs them in one forward; the prompt KV is stored once per request."""

    def __init__(self, model, attention: str = "model", backend: str = "auto"):
        self.tree = TreeModel(model, attention=attention, backend=backend)
        self.model = model
        self.vocab_size = self.tree.vocab_size

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits = self.tree.prefill(input_ids, attention_mask)
        self._beam_rows = torch.zeros((input_ids.shape[0], 1), dtype=torch.long, device=logits.device)
        return logits

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, W = self._beam_rows.shape
        device = self._beam_rows.device
        beam_index, tokens = beam_index.to(device), tokens.to(device)
        K = beam_index.numel() // B
        request = beam_index // W
        if beam_index.numel() != B * K or bool((request != torch.arange(B, device=device).repeat_interleave(K)).any()):
            raise ValueError("beam_index: the tree layout needs every new beam to continue a beam of its own request")
        parents = self._beam_rows.reshape(-1)[beam_index].view(B, K)
        self._beam_rows = self.tree.add(parents, tokens.view(B, K))
        return self.tree.run().reshape(B * K, -1)
