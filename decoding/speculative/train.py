"""Aligning a draft model to a target on the target's own beams (AtSpeed's teacher data)."""

from __future__ import annotations

import torch

from decoding._transformers import left_padded_positions
from decoding._validate import check_choice
from decoding.search.beam import beam_search
from decoding.speculative.losses import relaxed_alignment_loss, strict_alignment_loss


class AlignmentResult(tuple):
    """``(loss_before, loss_after)`` (mean alignment loss over the prompts, unpacks as a pair),
    with ``acceptance_before`` / ``acceptance_after``: strict speculative acceptance on the
    validation prompts (None without them), and ``losses``: the mean loss of each epoch."""

    def __new__(cls, before, after, acceptance_before=None, acceptance_after=None, losses=()):
        self = super().__new__(cls, (before, after))
        self.acceptance_before, self.acceptance_after, self.losses = acceptance_before, acceptance_after, list(losses)
        return self


def _teacher_rows(target, trie, prompts, mask, num_beams):
    """The target's top beams for one slice of prompts as training rows: (sequences, mask,
    positions, the target's logits at the identifier positions)."""
    teacher = beam_search(target, prompts, mask, trie=trie, num_beams=num_beams)
    B, K, L = teacher.sequences.shape
    seqs = torch.cat([prompts.repeat_interleave(K, 0), teacher.sequences.reshape(B * K, L).clamp(min=0)], dim=1)
    full_mask = torch.cat([mask.repeat_interleave(K, 0), torch.ones((B * K, L), dtype=mask.dtype)], dim=1)
    positions = left_padded_positions(full_mask)
    span = slice(prompts.shape[1] - 1, prompts.shape[1] + L - 1)  # logits that predict identifier tokens
    with torch.no_grad():
        target_logits = target(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits[:, span]
    return seqs, full_mask, positions, target_logits, span


def _strict_acceptance(target, draft, trie, prompts, mask, num_beams, batch_size):
    from decoding.speculative.search import speculative_beam_search

    drafted = accepted = 0
    for lo in range(0, prompts.shape[0], batch_size):
        out = speculative_beam_search(target, draft, prompts[lo: lo + batch_size], mask[lo: lo + batch_size],
                                      trie=trie, num_beams=num_beams, num_drafts=2 * num_beams, draft_steps=1)
        accepted += sum(a for r in out.stats.accepted_levels for a in r if a > 0)
        drafted += sum(d for r in out.stats.drafted_levels for d in r if d > 0)
    return accepted / drafted if drafted else 0.0


def align_draft(draft, target, trie, prompts, mask, *, num_beams: int, steps: int | None = None, epochs: int = 1,
                batch_size: int = 32, lr: float = 1e-3, loss: str = "strict", validation=None, seed: int = 0,
                log=print) -> AlignmentResult:
    """Fine-tune ``draft`` in place on the target's top-``num_beams`` beams for ``prompts``
    (int64 ``[B, T]``, left-padded, ``mask`` 0/1 ``[B, T]``) with :func:`strict_alignment_loss`
    (``loss="strict"``, for strict verification) or :func:`relaxed_alignment_loss`
    (``loss="relaxed"``) at the identifier positions.

    A mini-batched loop with one Adam optimiser: each mini-batch is ``batch_size`` prompts with
    their beams, shuffled every epoch (``seed``); ``epochs`` passes, or exactly ``steps``
    optimiser steps when ``steps`` is given. The target's beams and logits are computed once, a
    mini-batch at a time (memory: ``B * K * L * V`` floats). ``validation``: ``(prompts, mask)`` on
    which strict acceptance (γ=1, ``2K`` drafts) is measured before and after.
    Both models are Hugging Face decoder-only models over the trie's vocabulary.
    """
    check_choice("loss", loss, {"strict", "relaxed"})
    if steps is not None and steps < 0 or epochs < 1 or batch_size < 1:
        raise ValueError(f"steps, epochs, batch_size: expected steps >= 0, epochs >= 1, batch_size >= 1, got "
                         f"{steps}, {epochs}, {batch_size}")
    chunks = [_teacher_rows(target, trie, prompts[lo: lo + batch_size], mask[lo: lo + batch_size], num_beams)
              for lo in range(0, prompts.shape[0], batch_size)]

    def loss_of(chunk):
        seqs, full_mask, positions, target_logits, span = chunk
        logits = draft(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits[:, span]
        if loss == "strict":
            return strict_alignment_loss(logits, target_logits, k=num_beams)
        return relaxed_alignment_loss(logits, target_logits)

    def mean_loss():
        with torch.no_grad():
            return sum(float(loss_of(c)) * c[0].shape[0] for c in chunks) / sum(c[0].shape[0] for c in chunks)

    acceptance_before = (_strict_acceptance(target, draft, trie, *validation, num_beams, batch_size)
                         if validation is not None else None)
    draft.eval()
    before = mean_loss()
    draft.train()
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    total_steps = steps if steps is not None else epochs * len(chunks)
    done, epoch_losses = 0, []
    while done < total_steps:
        running, seen = 0.0, 0
        for index in torch.randperm(len(chunks), generator=gen).tolist():
            if done == total_steps:
                break
            value = loss_of(chunks[index])
            opt.zero_grad()
            value.backward()
            opt.step()
            done += 1
            running, seen = running + float(value.detach()), seen + 1
        epoch_losses.append(running / max(seen, 1))
        log(f"  align: {done}/{total_steps} steps, mean loss {epoch_losses[-1]:.4f}")
    draft.eval()
    after = mean_loss()
    acceptance_after = (_strict_acceptance(target, draft, trie, *validation, num_beams, batch_size)
                        if validation is not None else None)
    return AlignmentResult(before, after, acceptance_before, acceptance_after, epoch_losses)
