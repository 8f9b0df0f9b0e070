"""transformers drop-ins.

- :class:`TrieLogitsProcessor`: replaces a ``prefix_allowed_tokens_fn`` in transformers' own
  search (beam, greedy, sampling) with one vectorised call per step: same masking semantics
  (applied to the log-softmax output, no renormalisation), no per-beam Python callback.
- :func:`generate`: a ``custom_generate`` callable. ``model.generate(**inputs,
  custom_generate=decoding.integrations.hf.generate, trie=trie, num_beams=K)`` runs
  :func:`decoding.beam_search` (prompt prefilled once per request, not once per beam) and returns
  what transformers' constrained beam search returns for the same settings
  (``num_return_sequences``, ``length_penalty``, ``early_stopping``, ``return_dict_in_generate``,
  ``output_scores``).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput

from decoding._validate import check_positive_int
from decoding.integrations._constrain import mask_to_children
from decoding.search.beam import beam_search
from decoding.search.model import HFBeamModel

__all__ = ["TrieLogitsProcessor", "generate"]


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that does not continue a catalog identifier.

    Args:
        trie: :class:`decoding.ItemTrie` built with the model's vocabulary size.
        prompt_length: number of tokens before the identifier in the rows transformers passes:
            the (padded) prompt length ``input_ids.shape[1]`` for decoder-only models, 1 (the
            decoder start token) for encoder-decoder models.

    Rows whose generated tokens leave the trie (possible only once the catalog is exhausted)
    get all scores -inf.
    """

    def __init__(self, trie, *, prompt_length: int):
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"prompt_length: expected a non-negative int, got {prompt_length!r}")
        self.trie = trie
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] != self.trie.vocab_size:
            raise ValueError(
                f"scores: vocabulary size {scores.shape[-1]} does not match the trie's vocab_size "
                f"{self.trie.vocab_size}"
            )
        if input_ids.shape[1] < self.prompt_length:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens, fewer than prompt_length={self.prompt_length}")
        trie = self.trie.to(scores.device)
        nodes = trie.walk(input_ids[:, self.prompt_length:])
        return mask_to_children(scores, trie, nodes)


class _PreEncoded(HFBeamModel):
    """Encoder-decoder adapter that starts from encoder states transformers already computed."""

    def __init__(self, model, encoder_states: torch.Tensor):
        super().__init__(model)
        self._given_states = encoder_states

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask):
        states = self._given_states.to(self.device)
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device) if attention_mask is None \
            else attention_mask.to(states.device).long()
        return self._start_decoder(states, mask)


# generate()'s per-step outputs this decoder does not produce: it never materialises the
# [beams, vocabulary] scores of every step (what makes it fast), so it refuses to be asked for them
_NOT_PRODUCED = ("output_logits", "output_attentions", "output_hidden_states")


def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    *,
    trie=None,
    num_beams: int | None = None,
    num_return_sequences: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    exclude_items=None,
    normalize: str = "full",
    assistant_logprobs: torch.Tensor | None = None,
    assistant_weight: float = 0.0,
    backend: str = "auto",
    **model_kwargs,
):
    """``custom_generate`` callable: trie-constrained beam search inside ``model.generate``.

    ``model.generate(ids, attention_mask=mask, custom_generate=hf.generate, trie=trie, num_beams=K,
    max_new_tokens=trie.depth)`` returns what ``model.generate(ids, attention_mask=mask,
    num_beams=K, max_new_tokens=trie.depth, prefix_allowed_tokens_fn=<a trie walk>)`` returns,
    with transformers' defaults and settings:

    - ``num_beams`` (required) reaches this function, so transformers does not copy each prompt
      ``K`` times; it must not also come through the generation config (an error says so);
    - ``num_return_sequences`` (default 1): the best ``n <= K`` sequences per prompt, an error
      above ``K``;
    - ``length_penalty`` (default: the generation config's, 1.0) and ``early_stopping``
      (``False``, ``True`` or ``"never"``; default: the generation config's, ``False``) as in
      transformers' beam search;
    - ``max_new_tokens`` (or ``max_length``) leaves room for the longest identifier: exactly the
      trie's depth for identifiers of one length without EOS (transformers would generate past
      them), at least it for EOS-terminated ones.

    Sampling (``do_sample``) and group beam search (``num_beam_groups``, ``diversity_penalty``)
    are refused.

    Returns ``sequences [B * n, prompt + L]`` (identifier tokens after the prompt, or after the
    decoder start token for encoder-decoders; ``L`` the longest returned identifier; filled after
    an identifier's end as transformers fills). With ``return_dict_in_generate=True``, a
    transformers beam output; with ``output_scores=True`` too, its ``sequences_scores [B * n]``
    are the beam scores (-inf for slots past the catalog's valid items). The per-step ``scores``
    and ``beam_indices`` are not produced (``None``): the decoder never builds ``[beams,
    vocabulary]`` scores; ``output_logits``, ``output_attentions`` and ``output_hidden_states``
    are refused.
    """
    if trie is None or num_beams is None:
        raise ValueError("trie, num_beams: both are required with custom_generate=decoding.integrations.hf.generate")
    if logits_processor:
        names = ", ".join(type(p).__name__ for p in logits_processor)
        raise ValueError(
            f"logits_processor: this decoder applies the trie itself and does not run other processors ({names}); "
            "remove them or use transformers' own beam search with TrieLogitsProcessor"
        )
    if synced_gpus:
        raise ValueError("synced_gpus: not supported by decoding.integrations.hf.generate")
    config = generation_config
    if (config.num_beams or 1) > 1:
        raise ValueError(
            f"generation_config.num_beams: is {config.num_beams} (the model's generation config or "
            "generation_config=), so transformers has already copied each prompt that many times; with "
            "custom_generate=decoding.integrations.hf.generate pass num_beams to generate() and leave "
            "generation_config.num_beams at 1"
        )
    for name in _NOT_PRODUCED:
        if getattr(config, name, False):
            raise ValueError(f"{name}: not produced by decoding.integrations.hf.generate (it never materialises "
                             "per-step outputs); call generate without it")
    check_positive_int("num_beams", num_beams)
    n = (config.num_return_sequences or 1) if num_return_sequences is None else num_return_sequences
    check_positive_int("num_return_sequences", n)
    if n > num_beams:
        raise ValueError(f"num_return_sequences: {n} is larger than num_beams ({num_beams}); beam search returns "
                         "at most num_beams sequences per prompt")
    penalty = config.length_penalty if length_penalty is None else length_penalty
    stopping = config.early_stopping if early_stopping is None else early_stopping
    if config.do_sample:
        raise ValueError("do_sample: decoding.integrations.hf.generate is deterministic beam search; call generate "
                         "without do_sample (or with do_sample=False)")
    if (getattr(config, "num_beam_groups", None) or 1) > 1 or getattr(config, "diversity_penalty", None):
        raise ValueError("num_beam_groups, diversity_penalty: diverse (group) beam search is not what "
                         "decoding.integrations.hf.generate runs; call generate without them")
    # the new tokens transformers allows: max_new_tokens, or max_length less the (decoder) prompt
    budget = config.max_length - input_ids.shape[1] if config.max_length is not None else config.max_new_tokens
    if budget is not None and budget < trie.depth:
        raise ValueError(f"max_new_tokens: {budget} new tokens (max_new_tokens, or max_length less the prompt) is "
                         f"shorter than the trie's depth {trie.depth}")
    if budget is not None and budget > trie.depth and trie.eos_token_id is None:
        raise ValueError(
            f"max_new_tokens: {budget} new tokens, but the catalog's identifiers are {trie.depth} tokens with no EOS "
            f"after them: transformers' beam search would go on for {budget - trie.depth} more tokens past every "
            f"identifier, this decoder stops at its end; pass max_new_tokens={trie.depth}")
    attention_mask = model_kwargs.get("attention_mask")
    if model.config.is_encoder_decoder:
        encoder_outputs = model_kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            raise ValueError("input_ids: an encoder-decoder model needs its encoder inputs (input_ids=...)")
        states = encoder_outputs[0]
        beam_model = _PreEncoded(model, states)
        prompt = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)
        head = input_ids  # the decoder start token
    else:
        beam_model = HFBeamModel(model)
        prompt = input_ids
        head = input_ids
    out = beam_search(
        beam_model, prompt, attention_mask, trie=trie, num_beams=num_beams,
        length_penalty=1.0 if penalty is None else float(penalty), normalize=normalize, exclude_items=exclude_items,
        assistant_logprobs=assistant_logprobs, assistant_weight=assistant_weight, backend=backend,
        early_stopping=False if stopping is None else stopping,
    )
    B = out.items.shape[0]
    # the best n of each prompt's K, as transformers keeps its first num_return_sequences
    tokens = out.sequences[:, :n].reshape(B * n, -1).to(head.device)
    # as transformers' beam search: crop to the longest returned identifier and fill after an
    # identifier's end with `pad_token_id or eos_token_id` (so a pad id of 0 gives EOS), -1 without EOS
    length = int((tokens >= 0).sum(dim=1).max()) if tokens.numel() else 0
    tokens = tokens[:, : max(length, 1)]
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
    fill = (config.pad_token_id or eos) if eos is not None else -1
    tokens = torch.where(tokens >= 0, tokens, torch.full_like(tokens, int(fill)))
    sequences = torch.cat([head.repeat_interleave(n, dim=0), tokens], dim=1)
    if not config.return_dict_in_generate:
        return sequences
    scores = out.scores[:, :n].reshape(-1).to(head.device) if config.output_scores else None
    cls = GenerateBeamEncoderDecoderOutput if model.config.is_encoder_decoder else GenerateBeamDecoderOnlyOutput
    return cls(sequences=sequences, sequences_scores=scores)
