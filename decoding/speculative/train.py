"""Aligning a draft model to a target on the target's own beams (AtSpeed's teacher data)."""

from __future__ import annotations

import torch

from decoding._hf import left_padded_positions
from decoding._validate import check_choice
from decoding.search.beam import beam_search
from decoding.speculative.losses import relaxed_alignment_loss, strict_alignment_loss


def align_draft(draft, target, trie, prompts, mask, *, num_beams: int, steps: int, lr: float = 1e-3,
                loss: str = "strict", log=print):
    """Fine-tune ``draft`` in place on the target's top-``num_beams`` beams for ``prompts``
    (int64 ``[B, T]``, left-padded, ``mask`` 0/1 ``[B, T]``) with
    :func:`strict_alignment_loss` (``loss="strict"``, for strict verification) or
    :func:`relaxed_alignment_loss` (``loss="relaxed"``) at the identifier positions, ``steps``
    full-batch Adam steps.
    Both are Hugging Face decoder-only models over the trie's vocabulary. Returns the loss
    (float) before and after."""
    check_choice("loss", loss, {"strict", "relaxed"})
    teacher = beam_search(target, prompts, mask, trie=trie, num_beams=num_beams)
    B, K, L = teacher.sequences.shape
    seqs = torch.cat([prompts.repeat_interleave(K, 0), teacher.sequences.reshape(B * K, L).clamp(min=0)], dim=1)
    full_mask = torch.cat([mask.repeat_interleave(K, 0), torch.ones((B * K, L), dtype=mask.dtype)], dim=1)
    positions = left_padded_positions(full_mask)
    span = slice(prompts.shape[1] - 1, prompts.shape[1] + L - 1)  # logits that predict identifier tokens
    with torch.no_grad():
        target_logits = target(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits[:, span]
    draft.train()
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    losses = []
    for i in range(steps + 1):
        logits = draft(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits[:, span]
        if loss == "strict":
            value = strict_alignment_loss(logits, target_logits, k=num_beams)
        else:
            value = relaxed_alignment_loss(logits, target_logits)
        losses.append(float(value.detach()))
        if i == steps:
            break
        opt.zero_grad()
        value.backward()
        opt.step()
        if (i + 1) % max(1, steps // 4) == 0:
            log(f"  align step {i + 1}/{steps}: loss {losses[-1]:.4f}")
    draft.eval()
    return losses[0], losses[-1]
