"""Shared fixtures: small random models saved and reloaded with save_pretrained (nothing is
downloaded), synthetic catalogs, and helpers to read transformers' own beam-search results."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without a GPU the Triton backend runs in its interpreter; set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from decoding import ItemTrie
from decoding import testing as bm

EOS = 2


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _reloaded(model, tmp_path_factory, name):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    cls = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


SID_VOCAB = bm.sid_vocab_size(4, 256)
TITLE_VOCAB = 300


@pytest.fixture(scope="session")
def sid_catalog():
    """5,000 random 4-token semantic IDs, 256 codes per level."""
    seqs = bm.random_semantic_ids(5000, levels=4, codes=256, seed=1)
    return seqs, ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)


@pytest.fixture(scope="session")
def title_catalog():
    """5,000 variable-length EOS-terminated identifiers."""
    seqs = bm.random_title_ids(5000, TITLE_VOCAB, EOS, min_len=1, max_len=6, seed=2)
    return seqs, ItemTrie.from_sequences(seqs, vocab_size=TITLE_VOCAB, eos_token_id=EOS)


@pytest.fixture(scope="session")
def sid_models(tmp_path_factory):
    return {
        "llama": _reloaded(bm.tiny_llama(SID_VOCAB, seed=3), tmp_path_factory, "llama_sid"),
        "t5": _reloaded(bm.tiny_t5(SID_VOCAB, seed=4), tmp_path_factory, "t5_sid"),
    }


@pytest.fixture(scope="session")
def title_models(tmp_path_factory):
    return {
        "llama": _reloaded(bm.tiny_llama(TITLE_VOCAB, seed=5), tmp_path_factory, "llama_title"),
        "t5": _reloaded(bm.tiny_t5(TITLE_VOCAB, seed=6), tmp_path_factory, "t5_title"),
    }


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory):
    """A random Llama-style model over the semantic-ID vocabulary and a word-level tokenizer,
    saved for a serving engine (vLLM)."""
    path = tmp_path_factory.mktemp("served_model")
    return bm.save_for_serving(bm.tiny_llama(SID_VOCAB, hidden_size=64, layers=2, heads=2, seed=11), path)


def prompts(vocab, batch=5, seed=0):
    """Left-padded prompts of unequal lengths."""
    return bm.left_padded_prompts(batch, vocab, 3, 11, seed=seed)


def generated_part(model, sequences, prompt_ids):
    start = 1 if model.config.is_encoder_decoder else prompt_ids.shape[1]
    gen = sequences[:, start:]
    # tokens after the first EOS are transformers' padding
    is_eos = gen == EOS
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return gen.masked_fill(after, -1)


def hf_items_and_scores(model, trie, out, prompt_ids, num_beams):
    """Item ids and scores of transformers' output, ``[B, K]`` each."""
    B = prompt_ids.shape[0]
    gen = generated_part(model, out.sequences, prompt_ids)
    items = trie.lookup(gen).view(B, num_beams)
    if num_beams > 1:
        return items, out.sequences_scores.view(B, num_beams)
    # greedy (K=1) has no sequences_scores: sum the full-vocabulary log-probs of its tokens
    logp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], dim=1)
    steps = gen[:, : logp.shape[1]]
    picked = logp.gather(2, steps.clamp(min=0)[..., None]).squeeze(-1).masked_fill(steps < 0, 0.0)
    return items, picked.sum(-1).view(B, 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield

