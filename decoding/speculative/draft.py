"""Drafts made from the target itself."""

from __future__ import annotations

import copy

import torch


def truncated_draft(target: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A draft that is the target's first ``layers`` decoder layers with its own embeddings, final
    norm and LM head (shared, not copied: no extra weights), for a speculative search without a
    separately trained draft. ``target`` is not changed. The decoder layers must sit in
    ``target.model.layers`` (Llama, Qwen2, Mistral and most decoder-only models of transformers)."""
    inner = getattr(target, "model", None)
    stack = getattr(inner, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(f"target: {type(target).__name__} keeps no decoder layers at .model.layers; "
                         "give a draft model instead")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(stack):
        raise ValueError(f"layers: expected an int in [1, {len(stack)}] (the target's layers), got {layers!r}")
    draft = copy.copy(target)  # shallow: the module's parameters stay the target's own
    draft._modules = dict(target._modules)
    body = copy.copy(inner)
    body._modules = dict(inner._modules)
    body.layers = torch.nn.ModuleList(list(stack)[:layers])
    draft.model = body
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    draft.config = body.config = config
    return draft
