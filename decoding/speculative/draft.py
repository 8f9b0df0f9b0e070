"""Drafts made from the target itself."""

from __future__ import annotations

import copy

import torch


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def truncated_draft(target: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A draft that is the target's first ``layers`` decoder layers with its embeddings, final
    norm and LM head, for a speculative search without a separately trained draft.

    The draft is a model of the target's class built from the target's config cut to ``layers``
    layers (its modules, config and hooks are its own, so attention dispatch and caches see a
    ``layers``-layer model); its parameters and buffers are the target's own tensors, shared, not
    copied: no extra weight memory, and the target is not changed. Cast or move the target, never
    the draft (the weights are one). ``target.model.layers`` must hold the decoder layers (Llama,
    Qwen2, Mistral and most decoder-only models of transformers)."""
    inner = getattr(target, "model", None)
    stack = getattr(inner, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(f"target: {type(target).__name__} keeps no decoder layers at .model.layers; "
                         "give a draft model instead")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= len(stack):
        raise ValueError(f"layers: expected an int in [1, {len(stack)}] (the target's layers), got {layers!r}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):  # the structure only: every tensor is the target's, assigned below
        draft = type(target)(config)
    tensors = dict(target.named_parameters(remove_duplicate=False))
    for name, _ in list(draft.named_parameters(remove_duplicate=False)):
        owner, leaf = _owner(draft, name)
        owner._parameters[leaf] = tensors[name]
    buffers = dict(target.named_buffers(remove_duplicate=False))
    for name, _ in list(draft.named_buffers(remove_duplicate=False)):
        owner, leaf = _owner(draft, name)
        owner._buffers[leaf] = buffers[name]
    return draft.train(target.training)
