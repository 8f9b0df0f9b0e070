"""KV-cache pruning after prefill: which prompt positions each layer and KV head keeps.

A policy is one :class:`KVPolicy` subclass: ``keep(layer_idx, layer, attention_mask)`` gives,
per layer, int64 ``[B, H or 1, C]`` kept positions of the left-padded prompt and a bool
``[B, H or 1, C]`` saying which slots are real (requests with fewer real positions than ``C``
fill the rest with unused slots); ``capture_window`` asks the prefill to record each layer's
last queries; ``check`` rejects a policy that does not fit the model or the prompts.
:meth:`decoding.kv.SharedPrefixCache.prune_prompt` applies it (``beam_search(kv_policy=...)``).

* :class:`StreamingLLM`: the first ``sink`` and the last ``recent`` real prompt positions, the
  same for every layer and head.
* :class:`SnapKV`: per layer and KV head, the ``capacity - window`` prompt positions with the
  highest attention from the last ``window`` prompt queries (summed over those queries, averaged
  over the query heads of a KV head's group, then pooled over neighbouring positions), plus the
  window itself.
* :class:`EarnCut`: layers below ``layer`` keep every position; layers from ``layer`` up keep
  only the given register positions (EARN's prefix/suffix registers), so KV length differs per
  layer. :func:`earn_attention_mask` is the layer-dependent mask a model is fine-tuned with.

Positions: kept keys keep the rotary embedding of their original position (they are not
re-rotated), and generated tokens continue from the prompt's original length. That is
StreamingLLM without its position shift, which long generation needs and a 3-5 token identifier
does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decoding._transformers import additive_mask


class KVPolicy:
    """The interface of a pruning policy (subclass it; a new policy needs nothing else)."""

    @property
    def capture_window(self) -> int:
        """How many of the prefill's last queries each layer must record (``layer.window_queries``)."""
        return 0

    def check(self, num_layers: int, attention_mask: torch.Tensor) -> None:
        """Raise ValueError if the policy cannot prune this model's cache for these prompts."""

    def keep(self, layer_idx: int, layer, attention_mask: torch.Tensor):
        """``(index [B, H or 1, C] int64, valid [B, H or 1, C] bool)`` for one layer: ``layer``
        has ``prefix_keys [B, Hkv, T, D]`` and, if asked for, ``window_queries``."""
        raise NotImplementedError


@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """The first ``sink`` and the last ``recent`` real prompt positions, in every layer."""

    sink: int = 4
    recent: int = 512

    def __post_init__(self):
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"StreamingLLM: sink must be >= 0 and recent >= 1, got {self.sink}, {self.recent}")

    def keep(self, layer_idx, layer, attention_mask):
        return streaming_keep(self, attention_mask)


@dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Per layer and KV head, the prompt positions most attended by the last ``window`` queries."""

    window: int = 32
    capacity: int = 2048
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self):
        if not 1 <= self.window <= self.capacity:
            raise ValueError(f"SnapKV: need 1 <= window <= capacity, got window={self.window}, "
                             f"capacity={self.capacity}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV: pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def capture_window(self) -> int:
        return self.window

    def check(self, num_layers, attention_mask):
        if attention_mask.shape[1] <= self.window:
            raise ValueError(f"kv_policy: SnapKV window {self.window} needs prompts longer than it")

    def keep(self, layer_idx, layer, attention_mask):
        if layer.window_queries is None:
            raise RuntimeError("kv_policy: SnapKV needs the prefill's window queries (capture_window)")
        return snapkv_keep(self, layer.window_queries, layer.prefix_keys, attention_mask)


@dataclass(frozen=True)
class EarnCut(KVPolicy):
    """Every position below ``layer``; only the ``registers`` from ``layer`` up."""

    layer: int
    registers: tuple  # positions in the real prompt (0 = its first token; negative from its end)

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError(f"EarnCut: layer must be >= 0, got {self.layer}")
        if not self.registers:
            raise ValueError("EarnCut: registers must name at least one prompt position")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in self.registers):
            raise ValueError(f"EarnCut: registers must be ints (prompt positions), got {self.registers!r}")

    def check(self, num_layers, attention_mask):
        if self.layer > num_layers:
            raise ValueError(f"kv_policy: EarnCut.layer {self.layer} is above the model's {num_layers} layers")
        shortest = int(attention_mask.sum(dim=1).min()) if attention_mask.numel() else 0
        if any(not -shortest <= r < shortest for r in self.registers):  # every prompt holds every register
            raise ValueError(f"kv_policy: EarnCut registers {self.registers} need prompts of at least "
                             f"{max(max(self.registers) + 1, -min(self.registers))} tokens")

    def keep(self, layer_idx, layer, attention_mask):
        return earn_keep(self, attention_mask, layer_idx)


def _real_bounds(attention_mask: torch.Tensor):
    """Left padding: request b's real prompt is ``[T - length_b, T)``."""
    T = attention_mask.shape[1]
    length = attention_mask.long().sum(dim=1)
    return T - length, length


def streaming_keep(policy: StreamingLLM, attention_mask: torch.Tensor):
    """``(index [B, 1, C], valid [B, 1, C])`` with ``C = min(T, sink + recent)``."""
    B, T = attention_mask.shape
    start, length = _real_bounds(attention_mask)
    C = min(T, policy.sink + policy.recent)
    j = torch.arange(C, device=attention_mask.device)[None, :]
    short = length[:, None] <= C  # keeps all of its real positions
    sink = min(policy.sink, C)
    index_long = torch.where(j < sink, start[:, None] + j, T - (C - j))
    index_short = start[:, None] + j
    index = torch.where(short, index_short, index_long)
    valid = torch.where(short, j < length[:, None], torch.ones_like(j, dtype=torch.bool))
    index = torch.where(valid, index, T - 1).clamp(0, T - 1)
    return index[:, None], valid[:, None]


def snapkv_keep(policy: SnapKV, window_queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor,
                scale: float | None = None):
    """One layer. ``window_queries [B, Hq, W, D]`` (the last ``W`` prompt queries, rotary
    applied), ``keys [B, Hkv, T, D]``. Returns ``(index [B, Hkv, C], valid [B, Hkv, C])``,
    ``C = min(T, capacity)``, positions in ascending order."""
    B, Hq, W, D = window_queries.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    if W != policy.window:
        raise ValueError(f"window_queries: expected {policy.window} queries, got {W}")
    scale = D ** -0.5 if scale is None else scale
    C = min(T, policy.capacity)
    start, length = _real_bounds(attention_mask)
    groups = Hq // Hkv
    k = keys.float().repeat_interleave(groups, dim=1)
    scores = window_queries.float() @ k.transpose(-1, -2) * scale  # [B, Hq, W, T]
    pos = torch.arange(T, device=keys.device)
    q_pos = T - W + torch.arange(W, device=keys.device)
    visible = (pos[None, None, :] <= q_pos[None, :, None]) & attention_mask.bool()[:, None, :]  # [B, W, T]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    votes = attn.sum(dim=2)  # [B, Hq, T]
    votes = votes.view(B, Hkv, groups, T).mean(dim=2)
    pool = F.avg_pool1d if policy.pooling == "avg" else F.max_pool1d
    votes = pool(votes.reshape(B * Hkv, 1, T), policy.kernel, stride=1, padding=policy.kernel // 2)
    votes = votes.view(B, Hkv, T)
    window = pos >= T - W
    real = pos[None, :] >= start[:, None]  # [B, T]
    # outside the window, real positions compete on votes; the window is always kept
    candidates = real[:, None, :] & ~window[None, None, :]
    ranked = torch.where(candidates, votes, float("-inf"))
    n_select = C - min(W, C)
    chosen = ranked.topk(n_select, dim=-1).indices if n_select else ranked[..., :0].long()
    chosen_ok = ranked.gather(-1, chosen) > float("-inf")
    win = (T - min(W, C) + torch.arange(min(W, C), device=keys.device)).expand(B, Hkv, -1)
    win_ok = real[:, None, T - min(W, C):].expand(B, Hkv, -1)
    index = torch.cat([torch.where(chosen_ok, chosen, T - 1), win], dim=-1)
    valid = torch.cat([chosen_ok, win_ok], dim=-1)
    order = torch.where(valid, index, T).sort(dim=-1).indices  # ascending positions, unused slots last
    return index.gather(-1, order), valid.gather(-1, order)


def earn_keep(policy: EarnCut, attention_mask: torch.Tensor, layer: int):
    """One layer: every position below ``policy.layer``; the registers from it up."""
    B, T = attention_mask.shape
    device = attention_mask.device
    if layer < policy.layer:
        return torch.arange(T, device=device).expand(B, 1, T), attention_mask.bool()[:, None, :]
    start, length = _real_bounds(attention_mask)
    regs = torch.tensor(policy.registers, device=device)
    rel = torch.where(regs < 0, length[:, None] + regs[None, :], regs[None, :])  # [B, R]
    if bool(((rel < 0) | (rel >= length[:, None])).any()):
        raise ValueError("registers: a register position is outside a request's prompt")
    return (start[:, None] + rel)[:, None], torch.ones_like(rel, dtype=torch.bool)[:, None]


def earn_attention_mask(attention_mask: torch.Tensor, registers, num_layers: int, cut_layer: int,
                        dtype=torch.float32) -> list[torch.Tensor]:
    """EARN's layer-dependent training mask: per layer, an additive ``[B, 1, T, T]`` mask.
    Layers below ``cut_layer``: causal over real tokens. From ``cut_layer`` up: the same, except
    that a prompt position that is not a register is seen by no query but itself, so nothing
    above the cut reads it and its KV can be dropped there. ``attention_mask [B, T]`` covers the
    sequence (prompt positions are the real ones)."""
    B, T = attention_mask.shape
    device = attention_mask.device
    real = attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    base = causal[None] & real[:, None, :]
    keep = earn_keep(EarnCut(cut_layer, tuple(registers)), attention_mask, cut_layer)[0][:, 0]
    is_register = torch.zeros(B, T, dtype=torch.bool, device=device).scatter_(1, keep, True)
    upper = base & (is_register[:, None, :] | torch.eye(T, dtype=torch.bool, device=device)[None])
    masks = []
    for layer in range(num_layers):
        visible = (base if layer < cut_layer else upper) | torch.eye(T, dtype=torch.bool, device=device)[None]
        masks.append(additive_mask(visible[:, None], dtype))
    return masks
