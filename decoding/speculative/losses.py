"""Draft alignment losses (AtSpeed), for users who train their own draft model.

Both take per-position next-token logits of the draft and of the target on the same sequences
(typically the target's own top-K beams, "teacher data"), ``[..., V]``, and an optional boolean
``allowed [..., V]`` (e.g. the trie children at each position); positions are averaged under
``weights [...]`` (1 = count, 0 = ignore). Gradients flow into the draft logits; the target is
a teacher and is detached.

- :func:`strict_alignment_loss` (AtSpeed-S): over the draft's top-``k`` tokens per position,
  both distributions renormalised there with temperature ``τ``, the reverse KL
  ``KL(q_k || p_k)`` plus ``density_weight * H(q_k) * p(t_k)``, where ``t_k`` is the draft's
  ``k``-th token and ``p`` the target's full distribution: it rewards a draft whose top-``k`` set
  holds the target's mass, which is what N-to-K acceptance needs.
- :func:`relaxed_alignment_loss` (AtSpeed-R): the total variation distance
  ``0.5 * sum |q - p|`` between the temperature-scaled distributions over the allowed tokens,
  which bounds the rejection rate of ``min(1, p/q)`` acceptance.
"""

from __future__ import annotations

import torch

from decoding._validate import FLOAT_DTYPES, check_positive_int, check_tensor

_MASKED = -1e30  # finite: fully masked rows stay finite and get weight 0


def _prepare(draft_logits, target_logits, allowed, weights):
    check_tensor("draft_logits", draft_logits, dtypes=FLOAT_DTYPES)
    check_tensor("target_logits", target_logits, dtypes=FLOAT_DTYPES)
    if draft_logits.dim() < 1 or draft_logits.shape != target_logits.shape:
        raise ValueError(f"target_logits: expected the shape of draft_logits {tuple(draft_logits.shape)}, "
                         f"got {tuple(target_logits.shape)}")
    q, p = draft_logits.float(), target_logits.detach().float()
    if allowed is not None:
        if allowed.shape != draft_logits.shape or allowed.dtype != torch.bool:
            raise ValueError(f"allowed: expected a bool tensor of shape {tuple(draft_logits.shape)}")
        q, p = q.masked_fill(~allowed, _MASKED), p.masked_fill(~allowed, _MASKED)
    lead = draft_logits.shape[:-1]
    if weights is None:
        weights = torch.ones(lead, device=q.device)
    elif tuple(weights.shape) != tuple(lead):
        raise ValueError(f"weights: expected shape {tuple(lead)}, got {tuple(weights.shape)}")
    return q, p, weights.float()


def _average(per_position, weights):
    total = weights.sum()
    if float(total) <= 0:
        raise ValueError("weights: no position has a positive weight")
    return (per_position * weights).sum() / total


def strict_alignment_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, *, k: int,
                          temperature: float = 1.0, density_weight: float = 1.0,
                          allowed: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """AtSpeed-S alignment: reverse KL over the draft's top-``k`` plus the density term.

    Args:
        draft_logits, target_logits: float ``[..., V]``.
        k: the top-``k`` set size (the beam width K the draft must cover).
        temperature: softmax temperature over the top-``k`` logits.
        density_weight: weight of ``H(q_k) * p(t_k)``.
        allowed: optional bool ``[..., V]``; weights: optional float ``[...]``.
    Returns:
        A scalar float32 loss.
    """
    q, p, weights = _prepare(draft_logits, target_logits, allowed, weights)
    check_positive_int("k", k)
    if k > q.shape[-1]:
        raise ValueError(f"k: {k} is larger than the vocabulary ({q.shape[-1]})")
    if temperature <= 0:
        raise ValueError(f"temperature: expected a positive value, got {temperature}")
    top = q.detach().topk(k, dim=-1).indices
    log_qk = torch.log_softmax(q.gather(-1, top) / temperature, dim=-1)
    log_pk = torch.log_softmax(p.gather(-1, top) / temperature, dim=-1)
    qk = log_qk.exp()
    reverse_kl = (qk * (log_qk - log_pk)).sum(-1)
    entropy = -(qk * log_qk).sum(-1)
    p_kth = torch.softmax(p, dim=-1).gather(-1, top[..., -1:]).squeeze(-1)
    return _average(reverse_kl + density_weight * entropy * p_kth, weights)


def relaxed_alignment_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, *, temperature: float = 1.0,
                           allowed: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """AtSpeed-R alignment: total variation ``0.5 * sum |q - p|`` of the temperature-scaled
    distributions (over ``allowed`` tokens when given). Shapes as :func:`strict_alignment_loss`."""
    q, p, weights = _prepare(draft_logits, target_logits, allowed, weights)
    if temperature <= 0:
        raise ValueError(f"temperature: expected a positive value, got {temperature}")
    tvd = 0.5 * (torch.softmax(q / temperature, -1) - torch.softmax(p / temperature, -1)).abs().sum(-1)
    return _average(tvd, weights)
