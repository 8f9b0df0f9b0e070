"""Parallel set-identifier decoding (SETRec): one forward, then the whole catalog is scored.

An item is a set of ``S`` continuous token vectors (a CF slot and semantic slots) instead of a
token sequence. The prompt holds the history items as ``S`` vectors each; ``S`` learned query
vectors are appended; the model's outputs at the query positions are scored against per-slot
item tables (``score(i) = Σ_s w_s <h_s, E_s[i]>``) and the top ``k`` items are kept
(:func:`decoding.ops.catalog_topk`, which never builds the ``[B, N]`` score matrix).

The layout is described per token by a **group id**:

* ``ORDINARY = -1``: an ordinary token (instruction, response text): causal, its own position;
* ``g >= 0``: a token of history item ``g``: tokens of one item do not see each other (only
  themselves) and share one position;
* ``QUERY = -2``: a query token: query tokens do not see each other, each has its own position.

:func:`setid_attention_mask` turns group ids into the 4-D additive mask (a real mask passed to
the model, so it holds under SDPA as under eager attention; SETRec's released code loses it
under SDPA), :func:`setid_position_ids` into positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding._transformers import additive_mask
from decoding._validate import INT_DTYPES, check_positive_int, check_shape, check_tensor
from decoding.ops.catalog_topk import EMBEDDING_DTYPES, catalog_topk
from decoding.search.beam import BeamSearchOutput

ORDINARY = -1
QUERY = -2


def _check_groups(group_ids, attention_mask):
    check_tensor("group_ids", group_ids, ndim=2, dtypes=INT_DTYPES)
    if group_ids.numel() and bool((group_ids < QUERY).any()):
        raise ValueError(f"group_ids: expected ids >= {QUERY} (QUERY), {ORDINARY} (ORDINARY) or item groups >= 0")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, device=group_ids.device)
        check_shape("attention_mask", attention_mask, tuple(group_ids.shape))


def setid_visibility(group_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     causal: bool = True) -> torch.Tensor:
    """bool ``[B, T, T]``: whether query token ``i`` sees key token ``j``.

    ``j <= i`` (if ``causal``), ``j`` not padding, and ``i``, ``j`` not two different tokens of
    one group (an item's tokens, or two query tokens). Every token sees itself, padding included
    (so no softmax row is empty).
    """
    _check_groups(group_ids, attention_mask)
    B, T = group_ids.shape
    g = group_ids.long()
    idx = torch.arange(T, device=g.device)
    visible = (idx[None, :, None] >= idx[None, None, :]) if causal else torch.ones(1, T, T, dtype=torch.bool,
                                                                                      device=g.device)
    same_group = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] != ORDINARY)
    visible = visible & ~same_group
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, :]
    return visible | torch.eye(T, dtype=torch.bool, device=g.device)[None]


def setid_attention_mask(group_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         causal: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4-D mask ``[B, 1, T, T]`` of ``dtype`` (0 visible, ``finfo.min`` hidden) from
    :func:`setid_visibility`, in the form transformers passes to attention as it is."""
    return additive_mask(setid_visibility(group_ids, attention_mask, causal=causal), dtype)[:, None]


def setid_position_ids(group_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[B, T]``: one position per ordinary or query token and one per history item (its
    tokens share the position of the item's first token), counted over real tokens; padding
    gets 0 (as for left-padded prompts)."""
    _check_groups(group_ids, attention_mask)
    g = group_ids.long()
    T = g.shape[1]
    idx = torch.arange(T, device=g.device)
    real = torch.ones_like(g, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    earlier_same = ((g[:, :, None] == g[:, None, :]) & (idx[None, None, :] < idx[None, :, None])
                    & real[:, None, :]).any(dim=2)
    new_position = real & ((g < 0) | ~earlier_same)
    return (new_position.long().cumsum(dim=1) - 1).clamp(min=0).masked_fill(~real, 0)


@dataclass
class SetIdCatalog:
    """Per-slot item tables ``item_embeddings [S, N, d]`` (float32/float16/bfloat16) and slot
    weights ``slot_weights [S]`` float32 (SETRec: ``[1 - β, β, ..., β]``; None: all ones)."""

    item_embeddings: torch.Tensor
    slot_weights: torch.Tensor | None = None

    def __post_init__(self):
        check_tensor("item_embeddings", self.item_embeddings, ndim=3, dtypes=EMBEDDING_DTYPES)
        if self.slot_weights is not None:
            check_tensor("slot_weights", self.slot_weights, ndim=1, dtypes=(torch.float32,))
            check_shape("slot_weights", self.slot_weights, (self.item_embeddings.shape[0],))

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[1]


def query_hidden_states(model, inputs_embeds, group_ids, queries, attention_mask=None):
    """The model's final hidden states at the ``S`` query positions, ``[B, S, d]``.

    Decoder-only: ``[prompt | queries]`` in one forward with the set-identifier mask and
    positions. Encoder-decoder (T5): the prompt through the encoder (bidirectional, an item's
    tokens still do not see each other), the queries as the decoder's input, each seeing only
    itself (so its relative position is always 0) and the whole encoder output.
    """
    B, T, d = inputs_embeds.shape
    device = inputs_embeds.device
    dtype = inputs_embeds.dtype
    queries = queries.to(device=device, dtype=dtype)
    if queries.dim() == 2:
        queries = queries[None].expand(B, -1, -1)
    S = queries.shape[1]
    mask = torch.ones((B, T), dtype=torch.long, device=device) if attention_mask is None else attention_mask.long()
    if getattr(model.config, "is_encoder_decoder", False):
        enc_mask = setid_attention_mask(group_ids, mask, causal=False, dtype=dtype)
        encoded = model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=enc_mask).last_hidden_state
        own_only = additive_mask(torch.eye(S, dtype=torch.bool, device=device), dtype).expand(B, 1, S, S)
        decoded = model.get_decoder()(inputs_embeds=queries, attention_mask=own_only, encoder_hidden_states=encoded,
                                      encoder_attention_mask=mask)
        return decoded.last_hidden_state
    groups = torch.cat([group_ids.to(device).long(), torch.full((B, S), QUERY, device=device)], dim=1)
    full_mask = torch.cat([mask, torch.ones((B, S), dtype=torch.long, device=device)], dim=1)
    base = getattr(model, "base_model", model)
    out = base(inputs_embeds=torch.cat([inputs_embeds, queries], dim=1),
               attention_mask=setid_attention_mask(groups, full_mask, dtype=dtype),
               position_ids=setid_position_ids(groups, full_mask), use_cache=False)
    return out.last_hidden_state[:, T:]


@torch.inference_mode()
def setid_generate(model, inputs_embeds: torch.Tensor, group_ids: torch.Tensor, queries: torch.Tensor,
                   catalog: SetIdCatalog, k: int, *, attention_mask: torch.Tensor | None = None,
                   exclude_items=None, item_mask: torch.Tensor | None = None,
                   backend: str = "auto") -> BeamSearchOutput:
    """SETRec decoding: the top ``k`` catalog items per request from one forward.

    Args:
        model: a Hugging Face decoder-only model (Llama, Qwen2, ...) or T5 encoder-decoder.
        inputs_embeds: ``[B, T, d]`` the prompts as input vectors (text token embeddings and
            the history items' ``S`` vectors), left-padded for decoder-only models.
        group_ids: int ``[B, T]``: :data:`ORDINARY` or the history item index of each position
            (see the module docstring).
        queries: ``[S, d]`` (or ``[B, S, d]``) the learned query vectors, one per slot.
        catalog: :class:`SetIdCatalog` with ``S`` slots.
        k: items per request.
        attention_mask: ``[B, T]`` 0/1 or None.
        exclude_items, item_mask: as in :func:`decoding.ops.catalog_topk` (history, warm/cold).
        backend: ``catalog_topk`` backend.
    Returns:
        :class:`decoding.BeamSearchOutput`: ``items``/``scores`` ``[B, k]``; ``sequences`` is
        ``[B, k, 0]`` (set identifiers have no token sequence).
    """
    check_tensor("inputs_embeds", inputs_embeds, ndim=3, dtypes=EMBEDDING_DTYPES)
    B, T, d = inputs_embeds.shape
    _check_groups(group_ids, attention_mask)
    check_shape("group_ids", group_ids, (B, T))
    if group_ids.numel() and bool((group_ids == QUERY).any()):
        raise ValueError("group_ids: the prompt must not contain QUERY tokens (setid_generate appends the queries)")
    if not isinstance(catalog, SetIdCatalog):
        raise TypeError(f"catalog: expected a decoding.setid.SetIdCatalog, got {type(catalog).__name__}")
    S = catalog.item_embeddings.shape[0]
    check_tensor("queries", queries, dtypes=EMBEDDING_DTYPES)
    if queries.dim() not in (2, 3) or tuple(queries.shape[-2:]) != (S, d) or (queries.dim() == 3
                                                                              and queries.shape[0] != B):
        raise ValueError(f"queries: expected shape [{S}, {d}] or [{B}, {S}, {d}] (one per catalog slot), "
                         f"got {tuple(queries.shape)}")
    if catalog.item_embeddings.shape[2] != d:
        raise ValueError(f"catalog: item vectors have size {catalog.item_embeddings.shape[2]}, the model's {d}")
    check_positive_int("k", k)
    hidden = query_hidden_states(model, inputs_embeds, group_ids, queries, attention_mask)
    table = catalog.item_embeddings
    weights = catalog.slot_weights
    top = catalog_topk(k, hidden=hidden.to(table.device), item_embeddings=table,
                       slot_weights=None if weights is None else weights.to(table.device),
                       exclude_items=exclude_items, item_mask=item_mask, backend=backend)
    return BeamSearchOutput(items=top.items, scores=top.scores,
                            sequences=torch.empty((B, k, 0), dtype=torch.long, device=top.items.device))
