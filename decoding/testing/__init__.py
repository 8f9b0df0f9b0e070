"""Small random transformers models and synthetic catalogs, built locally (nothing downloads)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from decoding.workloads.semantic_ids import SPECIAL_TOKENS  # noqa: F401 - re-exported: the tests' and suites' convention


def sid_vocab_size(levels: int, codes: int) -> int:
    return SPECIAL_TOKENS + levels * codes


def random_semantic_ids(num_items: int, levels: int = 4, codes: int = 256, seed: int = 0) -> np.ndarray:
    """``[N, levels]`` distinct semantic IDs; level ``l`` uses tokens ``SPECIAL + l*codes + code``.

    The first levels are skewed (as RQ-VAE codes are) so the trie has shared prefixes.
    """
    rng = np.random.default_rng(seed)
    capacity = codes ** levels
    if num_items > capacity:
        raise ValueError(f"num_items: {num_items} exceeds the {capacity} possible identifiers")
    picked = np.empty(0, dtype=np.int64)
    while picked.size < num_items:
        need = int((num_items - picked.size) * 1.2) + 16
        draws = rng.integers(0, capacity, size=need, dtype=np.int64)
        picked = np.unique(np.concatenate([picked, draws]))
    picked = rng.permutation(picked)[:num_items]
    digits = np.stack([(picked // codes ** (levels - 1 - lv)) % codes for lv in range(levels)], axis=1)
    return digits + SPECIAL_TOKENS + np.arange(levels) * codes


def random_title_ids(num_items: int, vocab_size: int, eos_token_id: int, min_len: int = 2, max_len: int = 6,
                     seed: int = 0) -> list[list[int]]:
    """Distinct variable-length identifiers ending with ``eos_token_id`` (item titles)."""
    rng = np.random.default_rng(seed)
    words = np.arange(SPECIAL_TOKENS, vocab_size)
    seen, out = set(), []
    while len(out) < num_items:
        n = int(rng.integers(min_len, max_len + 1))
        # a small head vocabulary makes titles share prefixes, as real titles do
        head = rng.choice(words[:12], size=1)
        tail = rng.choice(words, size=n - 1)
        row = tuple(int(x) for x in np.concatenate([head, tail])) + (eos_token_id,)
        if row not in seen:
            seen.add(row)
            out.append(list(row))
    return out


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
               intermediate_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_t5(vocab_size: int, *, d_model: int = 64, layers: int = 2, heads: int = 2, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def left_padded_prompts(batch_size: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0,
                        pad_token_id: int = 0):
    """Random prompts of unequal lengths, left-padded: ``(input_ids, attention_mask)`` ``[B, max_len]``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=g)
    lengths[0] = max_len
    ids = torch.randint(SPECIAL_TOKENS, vocab_size, (batch_size, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_token_id), mask


def save_for_serving(model, path) -> str:
    """``save_pretrained`` the model with a word-level tokenizer over its vocabulary (``t0``,
    ``t1``, ...), which serving engines such as vLLM need beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = model.config.vocab_size
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                        eos_token="t2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # for chat endpoints
    tokenizer.save_pretrained(path)
    return str(path)


def layer_draft(target, layers: int):
    """A copy of the target's first ``layers`` decoder layers with its embeddings, norm and head
    (weights of its own, to be trained; :func:`decoding.speculative.draft.truncated_draft`
    shares them)."""
    from decoding.speculative.draft import truncated_draft

    return copy.deepcopy(truncated_draft(target, layers)).eval()
