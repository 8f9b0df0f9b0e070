"""The small model protocol decoders talk to, and its adapter for Hugging Face models.

A decoder never sees a model's internals; it needs two calls:

``prefill(input_ids [B, T] int64, attention_mask [B, T] int64 | None) -> logits [B, V] float``
    runs the prompt (or encoder) once per request and returns the logits of the first
    generated token.

``step(beam_index [R] int64, tokens [R] int64) -> logits [R, V] float``
    row ``r`` of the new batch continues row ``beam_index[r]`` of the previous call's batch
    (``prefill``'s rows at the first step) with ``tokens[r]`` appended; the model reorders or
    fans out its cache by ``beam_index`` and returns the next-token logits of each row.

Any object with these two methods works (plain PyTorch models included); Hugging Face models
are wrapped by :func:`as_beam_model`. This module imports no transformers code: it duck-types.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from decoding._transformers import (
    attention_implementation,
    cache_argument,
    is_hf_model,
    left_padded_positions,
    returned_cache,
)
from decoding.kv import KVPolicy


@runtime_checkable
class BeamModel(Protocol):
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor: ...

    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


def as_beam_model(model, kv_cache: str = "auto", kv_policy=None) -> BeamModel:
    """Return ``model`` if it implements :class:`BeamModel`, else wrap a Hugging Face model."""
    if isinstance(model, BeamModel):
        if kv_policy is not None:
            raise ValueError("kv_policy: applies to Hugging Face models only")
        return model
    if is_hf_model(model):
        return HFBeamModel(model, kv_cache=kv_cache, kv_policy=kv_policy)
    raise TypeError(
        "model: expected a Hugging Face model or an object with prefill(input_ids, attention_mask) "
        f"and step(beam_index, tokens) (see decoding.search.model.BeamModel), got {type(model).__name__}"
    )


def model_vocab_size(model) -> int | None:
    """The width of the model's logits when it can be read without running it."""
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)
    return getattr(model, "vocab_size", None)


def shared_prefix_supported(model) -> bool:
    """Whether the shared-prefix cache can serve ``model``: a transformers decoder-only model on
    SDPA attention dispatched through ``AttentionInterface``, with full attention in every layer."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or config._attn_implementation != "sdpa":
        return False
    if not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(t == "full_attention" for t in layer_types)


class HFBeamModel:
    """:class:`BeamModel` over a Hugging Face causal LM or encoder-decoder (T5 style).

    The prompt runs once per request. By default (decoder-only models on SDPA) the prompt KV is
    stored once per request and only generated KV per beam (:class:`decoding.kv.SharedPrefixCache`);
    otherwise a row per beam whose reorders move only generated positions
    (:mod:`decoding.kv.per_beam`). Positions follow transformers' ``generate`` for left-padded
    batches.
    """

    def __init__(self, model, kv_cache: str = "auto", kv_policy=None):
        self.model = model
        if kv_policy is not None and not isinstance(kv_policy, KVPolicy):
            raise TypeError(f"kv_policy: expected a decoding.kv.KVPolicy (StreamingLLM, SnapKV, EarnCut, ...), "
                            f"got {type(kv_policy).__name__}")
        self.kv_policy = kv_policy
        self.config = model.config
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.shared_prefix = shared_prefix_supported(model) if kv_cache == "auto" else kv_cache == "shared"
        if kv_policy is not None and not self.shared_prefix:
            raise ValueError("kv_policy: pruning runs on the shared-prefix KV cache (kv_cache='shared'), which this "
                             "model cannot use (decoder-only, SDPA, no sliding windows)")
        if kv_cache == "shared" and not shared_prefix_supported(model):
            raise ValueError("kv_cache: 'shared' needs a decoder-only model on SDPA attention through transformers' "
                             "AttentionInterface, without sliding windows; use 'per_beam'")
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_argument = cache_argument(model)
        self._cache = None
        self._mask = None
        self._next_pos = None
        self._encoder_states = None

    @property
    def vocab_size(self) -> int:
        return model_vocab_size(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_cache(self):
        # lazy: the caches import transformers, which a plain BeamModel user need not have
        if self.shared_prefix:
            from decoding.kv.shared_prefix import SharedPrefixCache, register_shared_prefix_attention

            register_shared_prefix_attention()
            self._fast_reorder = True
            window = self.kv_policy.capture_window if self.kv_policy is not None else 0
            return SharedPrefixCache(config=self.config, capture_window=window)
        from decoding.kv.per_beam import new_beam_cache

        cache, self._fast_reorder = new_beam_cache(self.config, self.is_encoder_decoder)
        return cache

    def kv_bytes(self) -> dict | None:
        """KV bytes the cache holds now (shared-prefix cache only): prompt and generated parts."""
        return self._cache.kv_bytes() if self.shared_prefix and self._cache is not None else None

    def _reorder(self, beam_index: torch.Tensor, request_major: bool = False) -> bool:
        """Reorder the cache; rows that stay within their request keep their shared prompt KV.
        Returns whether every new row continues a row of its own request (known without a
        device sync when the caller says the rows are request-major)."""
        same_count = beam_index.numel() == self._row_request.numel()
        within = same_count and (request_major or bool(
            (self._row_request.index_select(0, beam_index) == self._row_request).all()))
        self._row_request = self._row_request.index_select(0, beam_index)
        if self._fast_reorder:
            from decoding.kv.per_beam import reorder_beams

            reorder_beams(self._cache, beam_index, within, self._shared_length, request_major)
        else:
            self._cache.reorder_cache(beam_index)
        return within

    def _start_decoder(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder-decoder: a fresh cache and the decoder start token's logits ``[B, V]``."""
        batch = encoder_states.shape[0]
        device = encoder_states.device
        self._cache = self._new_cache()
        self._row_request = torch.arange(batch, device=device)
        self._shared_length = 1  # the decoder start token
        self._encoder_states = encoder_states
        self._mask = attention_mask
        start = self.config.decoder_start_token_id
        if start is None:
            raise ValueError("model: config.decoder_start_token_id is not set for this encoder-decoder model")
        decoder_ids = torch.full((batch, 1), int(start), dtype=torch.long, device=device)
        return self._forward(decoder_input_ids=decoder_ids, encoder_outputs=(encoder_states,),
                             attention_mask=attention_mask)

    def _forward(self, **kwargs) -> torch.Tensor:
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        kwargs[self._cache_argument] = self._cache
        if self.shared_prefix:  # the shared-prefix attention for this call only
            with attention_implementation(self.config, "decoding_shared_prefix"):
                out = self.model(**kwargs, use_cache=True, return_dict=True)
        else:
            out = self.model(**kwargs, use_cache=True, return_dict=True)
        self._cache = returned_cache(out)
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device).long()
        if self.is_encoder_decoder:
            encoder = self.model.get_encoder()
            states = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]
            return self._start_decoder(states, attention_mask)
        self._cache = self._new_cache()
        self._row_request = torch.arange(input_ids.shape[0], device=device)
        self._shared_length = input_ids.shape[1]  # the prompt: shared by every beam of a request
        position_ids = left_padded_positions(attention_mask)
        self._mask = attention_mask
        self._next_pos = position_ids[:, -1] + 1
        logits = self._forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.kv_policy is not None:
            self._cache.prune_prompt(self.kv_policy, attention_mask)
        return logits

    @torch.inference_mode()
    def step(self, beam_index: torch.Tensor, tokens: torch.Tensor, *, request_major: bool = False) -> torch.Tensor:
        """:meth:`BeamModel.step`. ``request_major``: the caller guarantees that the new rows are
        grouped by request, equally many per request, each continuing a row of its own request
        (``beam_search``'s layout), so no check has to read the device."""
        device = self.device
        beam_index = beam_index.to(device)
        tokens = tokens.to(device).view(-1, 1)
        # encoder states, masks and positions are equal across a request's rows: reorders that
        # stay within requests leave them as they are
        within = self._reorder(beam_index, request_major)
        if self.is_encoder_decoder:
            if not within:
                self._encoder_states = self._encoder_states.index_select(0, beam_index)
                self._mask = self._mask.index_select(0, beam_index)
            return self._forward(
                decoder_input_ids=tokens,
                encoder_outputs=(self._encoder_states,),
                attention_mask=self._mask,
            )
        mask = self._mask if within else self._mask.index_select(0, beam_index)
        self._mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = self._next_pos if within else self._next_pos.index_select(0, beam_index)
        self._next_pos = pos + 1
        return self._forward(input_ids=tokens, attention_mask=self._mask, position_ids=pos.view(-1, 1))
