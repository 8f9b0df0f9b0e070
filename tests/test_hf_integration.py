"""transformers drop-ins: TrieLogitsProcessor inside transformers' own beam search gives the same
output as the Python prefix_allowed_tokens_fn it replaces; custom_generate returns the same
sequences and scores as transformers' beam search."""

from __future__ import annotations

import pytest
import torch

from conftest import SID_VOCAB, TITLE_VOCAB, prompts
from decoding.integrations import hf
from decoding.testing.baselines import PythonTriePrefixFn, transformers_trie_beam_search


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
                         num_return_sequences=K, length_penalty=0.0, max_new_tokens=trie.depth,
                         return_dict_in_generate=True, output_scores=True)
    assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)
    plain = model.generate(input_ids=ids, attention_mask=mask, custom_generate=hf.generate, trie=trie,
                           num_beams=K, num_return_sequences=K, length_penalty=0.0, max_new_tokens=trie.depth)
    assert torch.equal(plain, out.sequences)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("catalog", ["sid", "title"])
def test_custom_generate_with_transformers_defaults_returns_what_transformers_returns(request, arch, catalog):
    """No setting but the beams and the length: transformers' defaults (one sequence per prompt,
    length_penalty 1.0, early_stopping False, a plain tensor). The same tensor, shape included."""
    seqs, trie, model, ids, mask = catalog_model_prompts(request, arch, catalog, seed=12)
    K = 5
    fn = PythonTriePrefixFn(seqs, prompt_length(model, ids))
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, num_beams=K, max_new_tokens=trie.depth,
                             prefix_allowed_tokens_fn=fn)
    got = model.generate(input_ids=ids, attention_mask=mask, custom_generate=hf.generate, trie=trie, num_beams=K,
                         max_new_tokens=trie.depth)
    assert ref.shape[0] == ids.shape[0]  # transformers' default: one sequence per prompt
    assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("settings", [
    dict(num_return_sequences=3),
    dict(num_return_sequences=5, early_stopping=True),
    dict(num_return_sequences=4, early_stopping="never", length_penalty=2.0),
    dict(num_return_sequences=2, early_stopping="never", length_penalty=-0.5),
    dict(num_return_sequences=5, early_stopping=True, length_penalty=0.5),
    dict(num_return_sequences=3, extra_tokens=3),  # room past the longest title: every beam ends in EOS first
])
def test_custom_generate_honours_transformers_beam_settings(request, arch, settings):
    """num_return_sequences, early_stopping and length_penalty, on EOS-terminated identifiers of
    1-6 tokens (where the three early-stopping rules differ): transformers' sequences and scores."""
    seqs, trie, model, ids, mask = catalog_model_prompts(request, arch, "title", seed=13)
    K = 5
    fn = PythonTriePrefixFn(seqs, prompt_length(model, ids))
    settings = dict(settings)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=trie.depth + settings.pop("extra_tokens", 0),
                  return_dict_in_generate=True, output_scores=True, **settings)
    with torch.inference_mode():
        ref = model.generate(num_beams=K, prefix_allowed_tokens_fn=fn, **common)
    got = model.generate(custom_generate=hf.generate, trie=trie, num_beams=K, **common)
    assert got.sequences.shape == ref.sequences.shape and torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.sequences_scores, ref.sequences_scores, atol=1e-4)
    assert got.scores is None  # the per-step [beams, vocabulary] scores are never built
    plain = model.generate(custom_generate=hf.generate, trie=trie, num_beams=K,
                           **{**common, "return_dict_in_generate": True, "output_scores": False})
    assert plain.sequences_scores is None and torch.equal(plain.sequences, ref.sequences)  # as transformers


def designed_model(seed: int):
    """A 16-token Llama whose next-token logits depend only on the current token, drawn at random
    and peaked (x4): attention and MLP outputs are zero, embeddings one-hot, so ``lm_head`` row
    ``x`` is the logits after token ``x``. Unlike a random tiny model, its identifiers can end
    in near-free tokens, where transformers' early-stopping rules give different answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = 16
    config = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    design = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 4
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        scale = model.model.norm(torch.eye(V)[:1])[0, 0].item()
        model.lm_head.weight.copy_(design.T / scale)
    return model


def test_custom_generate_early_stopping_as_transformers_where_the_rules_differ():
    """early_stopping False, True and "never" (length_penalty 2.0) on a model where "never"
    returns a better item than False's heuristic: transformers' answer for each."""
    from decoding import ItemTrie, beam_search

    model = designed_model(seed=69)
    seqs = [[4, 2], [4, 12, 2], [5, 6, 5, 2], [8, 11, 11, 15, 10, 2], [8, 15, 15, 2], [9, 2], [9, 9, 2],
            [9, 10, 9, 12, 10, 2]]
    trie = ItemTrie.from_sequences(seqs, vocab_size=16, eos_token_id=2)
    ids = torch.tensor([[1]])
    common = dict(input_ids=ids, max_new_tokens=trie.depth, num_return_sequences=2, length_penalty=2.0,
                  return_dict_in_generate=True, output_scores=True)
    got = {}
    for stop in (False, True, "never"):
        with torch.inference_mode():
            ref = model.generate(num_beams=2, prefix_allowed_tokens_fn=PythonTriePrefixFn(seqs, 1),
                                 early_stopping=stop, **common)
        got[stop] = model.generate(custom_generate=hf.generate, trie=trie, num_beams=2, early_stopping=stop, **common)
        assert torch.equal(got[stop].sequences, ref.sequences), stop
        assert torch.allclose(got[stop].sequences_scores, ref.sequences_scores, atol=1e-5), stop
    # the rules differ here: "never" keeps searching and finds a better first item than False
    assert not torch.equal(got["never"].sequences, got[False].sequences)
    assert got["never"].sequences_scores[0] > got[False].sequences_scores[0] + 0.1
    with pytest.raises(ValueError, match="early_stopping: expected False, True or 'never'"):
        beam_search(model, ids, None, trie=trie, num_beams=2, early_stopping="sometimes")


def test_custom_generate_errors(sid_catalog, sid_models):
    _, trie = sid_catalog
    model = sid_models["llama"]
    ids = torch.full((1, 3), 9)
    with pytest.raises(ValueError, match="trie, num_beams"):
        model.generate(input_ids=ids, custom_generate=hf.generate, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens: 2 new tokens .* shorter than the trie's depth 4"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens: 3 new tokens .* shorter than the trie's depth 4"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_length=6)
    # identifiers of one length without EOS: transformers would go on past them
    with pytest.raises(ValueError, match="transformers' beam search would go on for 2 more tokens.*max_new_tokens=4"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=6)
    with pytest.raises(ValueError, match="do_sample: .* deterministic beam search"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="num_beam_groups, diversity_penalty"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       diversity_penalty=0.5)
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       repetition_penalty=1.3)
    with pytest.raises(ValueError, match=r"num_return_sequences: 3 is larger than num_beams \(2\)"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       num_return_sequences=3)
    with pytest.raises(ValueError, match="num_return_sequences: expected a positive int"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       num_return_sequences=0)
    with pytest.raises(ValueError, match="early_stopping: expected False, True or 'never'"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       early_stopping="always")
    with pytest.raises(ValueError, match="output_hidden_states: not produced"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2, max_new_tokens=4,
                       output_hidden_states=True, return_dict_in_generate=True)
    # beams set in the generation config: transformers copies every prompt that many times first
    from transformers import GenerationConfig

    with pytest.raises(ValueError, match="generation_config.num_beams: is 4"):
        model.generate(input_ids=ids, custom_generate=hf.generate, trie=trie, num_beams=2,
                       generation_config=GenerationConfig(num_beams=4, max_new_tokens=4))


def test_mask_to_children_childless_rows_never_index_the_trie():
    """Rows without children (finished, dead, or a trie for a larger vocabulary) must not gather
    at trie token ids, which can lie past the scores' width."""
    from decoding import ItemTrie
    from decoding.integrations._constrain import mask_to_children

    wide = ItemTrie.from_sequences([[40, 41], [40, 42]], vocab_size=50)
    out = mask_to_children(torch.zeros(2, 10), wide, torch.tensor([-1, -1]), fallback_token=3)
    assert torch.isfinite(out).nonzero().tolist() == [[0, 3], [1, 3]]
