"""transformers drop-ins: TrieLogitsProcessor inside transformers' own beam search gives the same
output as the Python prefix_allowed_tokens_fn it replaces; custom_generate returns the same
sequences and scores as transformers' beam search."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, TITLE_VOCAB, prompts
from decoding.integrations import hf
from decoding.testing.baselines import transformers_trie_beam_search


def prompt_length(model, ids):
    return 1 if model.config.is_encoder_decoder else ids.shape[1]


def catalog_model_prompts(request, arch, catalog, seed):
    seqs, trie = request.getfixturevalue(f"{catalog}_catalog")
    model = request.getfixturevalue(f"{catalog}_models")[arch]
    ids, mask = prompts(SID_VOCAB if catalog == "sid" else TITLE_VOCAB, batch=3, seed=seed)
    return seqs, trie, model, ids, mask


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("catalog", ["sid", "title"])
def test_logits_processor_replaces_prefix_allowed_tokens_fn(request, arch, catalog):
    seqs, trie, model, ids, mask = catalog_model_prompts(request, arch, catalog, seed=4)
    ref = transformers_trie_beam_search(model, ids, mask, seqs, num_beams=6, max_new_tokens=trie.depth,
                                        eos_token_id=trie.eos_token_id)
    proc = hf.TrieLogitsProcessor(trie, prompt_length=prompt_length(model, ids))
    got = transformers_trie_beam_search(model, ids, mask, seqs, num_beams=6, max_new_tokens=trie.depth,
                                        eos_token_id=trie.eos_token_id, prefix_allowed_tokens_fn=None,
                                        logits_processor=[proc])
    assert torch.equal(ref.sequences, got.sequences)
    assert torch.allclose(ref.sequences_scores, got.sequences_scores, atol=1e-6)


def test_logits_processor_masks_exactly_the_valid_children(sid_catalog):
    seqs, trie = sid_catalog
    proc = hf.TrieLogitsProcessor(trie, prompt_length=2)
    rows = torch.tensor([[5, 5, *seqs[0][:2]], [5, 5, *seqs[1][:2]], [5, 5, 3, 3]])
    scores = torch.randn(3, SID_VOCAB)
    out = proc(rows, scores)
    for r in range(2):
        prefix = tuple(rows[r, 2:].tolist())
        allowed = sorted({int(s[2]) for s in seqs if tuple(int(x) for x in s[:2]) == prefix})
        assert torch.nonzero(torch.isfinite(out[r])).flatten().tolist() == allowed
        assert torch.equal(out[r, allowed], scores[r, allowed])
    assert bool(torch.isinf(out[2]).all())  # a prefix outside the catalog allows nothing
    with pytest.raises(ValueError, match="prompt_length"):
        hf.TrieLogitsProcessor(trie, prompt_length=-1)
    with pytest.raises(ValueError, match="scores: vocabulary size"):
        proc(rows, torch.randn(3, 7))


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("catalog", ["sid", "title"])
def test_custom_generate_matches_transformers_beam_search(request, arch, catalog):
    seqs, trie, model, ids, mask = catalog_model_prompts(request, arch, catalog, seed=8)
    K = 5
    ref = transformers_trie_beam_search(model, ids, mask, seqs, num_beams=K, max_new_tokens=trie.depth,
                                        eos_token_id=trie.eos_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=hf.generate, trie=trie, num_beams=K,
                         length_penalty=0.0, max_new_tokens=trie.depth, return_dict_in_generate=True)
    assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    plain = model.generate(input_ids=ids, attention_mask=mask, custom_generate=hf.generate, trie=trie,
                           num_beams=K, length_penalty=0.0, max_new_tokens=trie.depth)
    assert torch.equal(plain, out.sequences)


def test_custom_generate_errors(sid_catalog, sid_models):
    _, trie = sid_catalog
    model = sid_models["llama"]
    ids = torch.full((1, 3), 9)
    with pytest.raises(ValueError, match="trie, num_beams"):
        model.generate(input_ids=ids, custom_generate=hf.generate, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens: 2 is shorter"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       repetition_penalty=1.3)


def test_mask_to_children_childless_rows_never_index_the_trie():
    """Rows without children (finished, dead, or a trie for a larger vocabulary) must not gather
    at trie token ids, which can lie past the scores' width."""
    from decoding import ItemTrie
    from decoding.integrations._constrain import mask_to_children

    wide = ItemTrie.from_sequences([[40, 41], [40, 42]], vocab_size=50)
    out = mask_to_children(torch.zeros(2, 10), wide, torch.tensor([-1, -1]), fallback_token=3)
    assert torch.isfinite(out).nonzero().tolist() == [[0, 3], [1, 3]]
