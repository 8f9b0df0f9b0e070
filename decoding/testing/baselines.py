"""What users run today, kept faithful so comparisons are honest.

``PythonTriePrefixFn``: a nested-dict trie queried per beam per step through transformers'
``prefix_allowed_tokens_fn`` (MiniOneRec keys a dict on the generated prefix; LETTER-TIGER walks a
nested dict); ``transformers_trie_beam_search`` runs ``generate`` with it: the tests' oracle for
exactness and the bench's baseline. ``knn_graph_materialised``: RPG's item graph built the way
its released code does (``N x N``), for the memory comparison.
"""

from __future__ import annotations

import torch


class PythonTriePrefixFn:
    """``prefix_allowed_tokens_fn`` over a dict keyed by the generated prefix.

    Args:
        seqs: the catalog identifiers (lists of ints).
        prompt_length: tokens before the identifier in the rows transformers passes (the
            padded prompt length for decoder-only models, 1 for an encoder-decoder's start token).
        fallback_token: returned where a prefix is not in the catalog (transformers rejects an
            empty list); such beams only exist once the catalog is exhausted.
    """

    def __init__(self, seqs, prompt_length: int, fallback_token: int = 0):
        self.prompt_length = int(prompt_length)
        self.fallback = [int(fallback_token)]
        allowed: dict[tuple, set] = {}
        for row in seqs:
            row = [int(t) for t in row]
            for i in range(len(row)):
                allowed.setdefault(tuple(row[:i]), set()).add(row[i])
        self.allowed = {k: sorted(v) for k, v in allowed.items()}

    def __call__(self, batch_id: int, sent: torch.Tensor) -> list[int]:
        key = tuple(sent[self.prompt_length:].tolist())
        return self.allowed.get(key, self.fallback)


def transformers_trie_beam_search(model, input_ids, attention_mask, seqs, *, num_beams, max_new_tokens,
                                  eos_token_id=None, prefix_fn=None, **generate_kwargs):
    """transformers' own beam search constrained by a Python trie callback.

    Returns the ``generate`` output (``sequences [B*K, T']``, ``sequences_scores [B*K]``).
    """
    prompt_length = 1 if model.config.is_encoder_decoder else input_ids.shape[1]
    if prefix_fn is None:
        prefix_fn = PythonTriePrefixFn(seqs, prompt_length)
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        length_penalty=0.0,
        max_new_tokens=max_new_tokens,
        early_stopping=False,
        output_scores=True,
        return_dict_in_generate=True,
        prefix_allowed_tokens_fn=prefix_fn,
    )
    kwargs.update(generate_kwargs)
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def knn_graph_materialised(k: int, features: torch.Tensor):
    """Baseline: the ``N x N`` similarity matrix, then ``topk`` (what RPG's released code does, in
    one piece): ``O(N²)`` memory. Same results as :func:`knn_graph` up to ties."""
    with torch.no_grad():
        sims = features.float() @ features.float().T
        sims.fill_diagonal_(float("-inf"))
        top = sims.topk(k, dim=1)
    return top.indices, top.values
