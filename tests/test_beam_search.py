"""beam_search against transformers' own generate with a prefix_allowed_tokens_fn: same item
sets, scores within 1e-4 (float32), for decoder-only and encoder-decoder models, left-padded
batches, fixed-length and EOS-terminated identifiers. Exclusion and D3 are checked against
transformers' beam search with a Python constraint / logits processor doing the same thing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from conftest import SID_VOCAB, TITLE_VOCAB, hf_items_and_scores, prompts
from decoding import ItemTrie, beam_search
from decoding.ops import available_backends
from decoding.testing.baselines import PythonTriePrefixFn, transformers_trie_beam_search


def run_hf(model, trie, seqs, ids, mask, K, **kwargs):
    out = transformers_trie_beam_search(
        model, ids, mask, seqs, num_beams=K, max_new_tokens=trie.depth,
        eos_token_id=trie.eos_token_id, output_logits=K == 1, **kwargs,
    )
    return hf_items_and_scores(model, trie, out, ids, K)


def assert_same_results(ours, hf_items, hf_scores):
    finite = hf_scores > -1e8  # transformers pads exhausted slots with ~-1e9 junk
    assert torch.equal(ours.items[finite], hf_items[finite])
    assert torch.allclose(ours.scores[finite], hf_scores[finite], atol=1e-4)
    assert bool((ours.items[~finite] == -1).all())


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_fixed_length_semantic_ids_match_transformers(sid_catalog, sid_models, arch, K):
    seqs, trie = sid_catalog
    model = sid_models[arch]
    ids, mask = prompts(SID_VOCAB, batch=5, seed=K)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=K)
    assert_same_results(ours, *run_hf(model, trie, seqs, ids, mask, K))
    assert ours.items.shape == (5, K) and ours.sequences.shape == (5, K, 4)
    # the returned sequences are the catalog rows of the returned items
    assert torch.equal(ours.sequences, torch.as_tensor(seqs)[ours.items])
    assert bool((ours.scores[:, :-1] >= ours.scores[:, 1:]).all())


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_variable_length_eos_identifiers_match_transformers(title_catalog, title_models, arch, K):
    seqs, trie = title_catalog
    model = title_models[arch]
    ids, mask = prompts(TITLE_VOCAB, batch=4, seed=10 + K)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=K)
    assert_same_results(ours, *run_hf(model, trie, seqs, ids, mask, K))
    for b in range(4):
        for k in range(K):
            item = int(ours.items[b, k])
            row = seqs[item]
            assert ours.sequences[b, k, : len(row)].tolist() == row
            assert bool((ours.sequences[b, k, len(row):] == -1).all())


@pytest.mark.parametrize("length_penalty", [1.0, -0.5])
def test_length_penalty_matches_transformers(title_catalog, title_models, length_penalty):
    seqs, trie = title_catalog
    model = title_models["llama"]
    ids, mask = prompts(TITLE_VOCAB, batch=3, seed=7)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=5, length_penalty=length_penalty)
    hf = run_hf(model, trie, seqs, ids, mask, 5, length_penalty=length_penalty)
    assert_same_results(ours, *hf)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu")])
def test_every_backend_gives_the_same_search(sid_catalog, sid_models, backend):
    seqs, trie = sid_catalog
    ids, mask = prompts(SID_VOCAB, batch=2, seed=3)
    ref = beam_search(sid_models["llama"], ids, mask, trie=trie, num_beams=4, backend="torch")
    got = beam_search(sid_models["llama"], ids, mask, trie=trie, num_beams=4, backend=backend)
    assert torch.equal(ref.items, got.items)
    assert torch.allclose(ref.scores, got.scores, atol=1e-5)


class ExcludingPrefixFn(PythonTriePrefixFn):
    """transformers-side peer for exclusion: a dict trie per request over its allowed items."""

    def __init__(self, seqs, prompt_length, excluded_per_request):
        super().__init__([], prompt_length)
        self.per_request = [
            PythonTriePrefixFn([s for i, s in enumerate(seqs) if i not in set(ex)], prompt_length).allowed
            for ex in excluded_per_request
        ]

    def __call__(self, batch_id, sent):
        key = tuple(sent[self.prompt_length:].tolist())
        return self.per_request[batch_id].get(key, self.fallback)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_exclusion_matches_transformers_with_a_filtered_trie(sid_catalog, sid_models, arch):
    seqs, trie = sid_catalog
    model = sid_models[arch]
    K, B = 5, 3
    ids, mask = prompts(SID_VOCAB, batch=B, seed=21)
    plain = beam_search(model, ids, mask, trie=trie, num_beams=K)
    rng = np.random.default_rng(0)
    # exclude each request's own top results (the hard case) plus random history
    excluded = [plain.items[b, :3].tolist() + rng.choice(len(seqs), 200, replace=False).tolist() for b in range(B)]
    ours = beam_search(model, ids, mask, trie=trie, num_beams=K, exclude_items=excluded)
    prompt_length = 1 if model.config.is_encoder_decoder else ids.shape[1]
    fn = ExcludingPrefixFn([list(s) for s in seqs], prompt_length, excluded)
    assert_same_results(ours, *run_hf(model, trie, seqs, ids, mask, K, prefix_allowed_tokens_fn=fn))
    for b in range(B):
        assert not set(ours.items[b].tolist()) & set(excluded[b])


class D3Processor(LogitsProcessor):
    """transformers-side peer for D3: (1-w) log p + w log(m(h.t)/m(h)) from per-prefix masses."""

    def __init__(self, seqs, prompt_length, assistant_logprobs, weight, num_beams):
        self.prompt_length, self.weight, self.num_beams = prompt_length, weight, num_beams
        self.mass = []
        for lp in assistant_logprobs.double():
            mass = {}
            for s, p in zip(seqs, lp.exp().tolist()):
                for i in range(len(s) + 1):
                    mass[tuple(s[:i])] = mass.get(tuple(s[:i]), 0.0) + p
            self.mass.append(mass)

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        for r in range(input_ids.shape[0]):
            mass = self.mass[r // self.num_beams]
            prefix = tuple(input_ids[r, self.prompt_length:].tolist())
            if prefix not in mass:
                continue
            for t in range(scores.shape[1]):
                child = prefix + (t,)
                if child in mass:
                    out[r, t] = (1 - self.weight) * scores[r, t] + self.weight * math.log(mass[child] / mass[prefix])
        return out


def test_d3_assistant_mixing_matches_transformers_with_a_python_processor(sid_models):
    from decoding.testing import random_semantic_ids

    seqs = random_semantic_ids(400, seed=9)
    trie = ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)
    model = sid_models["llama"]
    K, B, w = 4, 2, 0.4
    ids, mask = prompts(SID_VOCAB, batch=B, seed=5)
    assistant = torch.log_softmax(torch.randn(B, len(seqs)) * 2, dim=-1)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=K, assistant_logprobs=assistant, assistant_weight=w)
    proc = D3Processor([list(s) for s in seqs], ids.shape[1], assistant, w, K)
    out = transformers_trie_beam_search(model, ids, mask, seqs, num_beams=K, max_new_tokens=4,
                                        prefix_allowed_tokens_fn=None, logits_processor=[proc])
    hf_items, hf_scores = hf_items_and_scores(model, trie, out, ids, K)
    assert_same_results(ours, hf_items, hf_scores)
    plain = beam_search(model, ids, mask, trie=trie, num_beams=K)
    assert not torch.equal(plain.scores, ours.scores)


class TinyGRU(torch.nn.Module):
    """A plain PyTorch model implementing the BeamModel protocol (no transformers)."""

    def __init__(self, vocab, hidden=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.cell = torch.nn.GRUCell(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.state = None

    def run(self, tokens, state):
        for t in range(tokens.shape[1]):
            state = self.cell(self.emb(tokens[:, t]), state)
        return state

    def prefill(self, input_ids, attention_mask):
        self.state = self.run(input_ids, None)
        return self.head(self.state)

    def step(self, beam_index, tokens):
        self.state = self.cell(self.emb(tokens), self.state.index_select(0, beam_index))
        return self.head(self.state)


def test_protocol_model_exhaustive_search_equals_brute_force():
    """With as many beams as items, beam search is exhaustive: it must rank every item by its
    exact full-vocabulary log-probability, computed here by teacher forcing each item."""
    torch.manual_seed(0)
    vocab = 12
    rng = np.random.default_rng(0)
    seqs = np.unique(rng.integers(3, vocab, (30, 3)), axis=0)
    trie = ItemTrie.from_sequences(seqs, vocab_size=vocab)
    model = TinyGRU(vocab).eval()
    prompt = torch.randint(0, vocab, (2, 5))
    with torch.no_grad():
        out = beam_search(model, prompt, trie=trie, num_beams=len(seqs))
        for b in range(2):
            state = model.run(prompt[b : b + 1].expand(len(seqs), -1), None)
            total = torch.zeros(len(seqs))
            for t in range(3):
                step = torch.log_softmax(model.head(state), -1)
                total += step.gather(1, torch.as_tensor(seqs[:, t : t + 1])).squeeze(1)
                state = model.cell(model.emb(torch.as_tensor(seqs[:, t])), state)
            expected = torch.sort(total, descending=True)
            assert torch.equal(out.items[b], expected.indices)
            assert torch.allclose(out.scores[b], expected.values, atol=1e-5)


def test_returned_items_are_always_valid_and_never_excluded(title_catalog, title_models):
    """Property over random requests: items exist, match their sequences, avoid exclusions."""
    seqs, trie = title_catalog
    model = title_models["llama"]
    rng = np.random.default_rng(1)
    for trial in range(4):
        B = int(rng.integers(1, 4))
        ids, mask = prompts(TITLE_VOCAB, batch=B, seed=100 + trial)
        excluded = torch.as_tensor(rng.integers(-1, len(seqs), (B, 300)))
        out = beam_search(model, ids, mask, trie=trie, num_beams=int(rng.integers(1, 12)), exclude_items=excluded)
        for b in range(B):
            got = [i for i in out.items[b].tolist() if i >= 0]
            assert not set(got) & set(excluded[b].tolist())
            assert trie.lookup(out.sequences[b, : len(got)]).tolist() == got


def test_num_beams_larger_than_valid_items_pads_with_minus_one(sid_models):
    seqs = [[10, 300, 600, 900], [10, 300, 600, 901], [11, 300, 600, 900]]
    trie = ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)
    ids, mask = prompts(SID_VOCAB, batch=2)
    out = beam_search(sid_models["llama"], ids, mask, trie=trie, num_beams=3, exclude_items=[[1], []])
    assert sorted(out.items[0].tolist()) == [-1, 0, 2]
    assert out.scores[0, -1].item() == float("-inf")
    assert out.sequences[0, -1].tolist() == [-1, -1, -1, -1]
    assert sorted(out.items[1].tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(num_beams=6000), ValueError, "num_beams: 6000 is larger than the catalog"),
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(input_ids=torch.zeros(2, 3)), TypeError, "input_ids: expected dtype"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "input_ids: expected a non-empty"),
        (dict(input_ids=torch.full((2, 3), SID_VOCAB)), ValueError, "input_ids: token ids must be in"),
        (dict(input_ids=torch.full((2, 3), -1)), ValueError, "input_ids: token ids must be in"),
        (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "attention_mask: expected shape"),
        (dict(attention_mask=torch.zeros(2, 3, dtype=torch.long)), ValueError, "attention_mask: a request has no"),
        (dict(attention_mask=torch.full((2, 3), 2)), ValueError, "attention_mask: expected 0/1"),
        (dict(trie="catalog"), TypeError, "trie: expected a decoding.ItemTrie"),
        (dict(normalize="softmax"), ValueError, "normalize"),
        (dict(assistant_weight=0.5), ValueError, "assistant_weight: is non-zero but assistant_logprobs"),
        (dict(assistant_logprobs=torch.zeros(2, 7), assistant_weight=0.5), ValueError,
         "assistant_logprobs: expected shape"),
        (dict(exclude_items=[[1]]), ValueError, "exclude_items: expected 2 lists"),
        (dict(exclude_items=[[10**7], []]), ValueError, "exclude_items: item ids must be in"),
        (dict(model=object()), TypeError, "model: expected a Hugging Face model"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(sid_catalog, sid_models, change, error, match):
    _, trie = sid_catalog
    args = dict(model=sid_models["llama"], input_ids=torch.full((2, 3), 9, dtype=torch.long),
                attention_mask=None, trie=trie, num_beams=2)
    args.update(change)
    model, input_ids, attention_mask = args.pop("model"), args.pop("input_ids"), args.pop("attention_mask")
    with pytest.raises(error, match=match):
        beam_search(model, input_ids, attention_mask, **args)


def test_trie_for_another_vocabulary_is_refused(sid_models):
    trie = ItemTrie.from_sequences([[1, 2]], vocab_size=50)
    with pytest.raises(ValueError, match="trie: built for vocab_size 50"):
        beam_search(sid_models["llama"], torch.ones(1, 2, dtype=torch.long), trie=trie, num_beams=1)


@pytest.mark.parametrize("K", [128, 512, 1024])
def test_wide_beams_match_transformers(sid_catalog, sid_models, K):
    """Generative recommenders decode with wide beams (50 to 5,000): exact at K up to 1,024."""
    seqs, trie = sid_catalog
    model = sid_models["llama"]
    ids, mask = prompts(SID_VOCAB, batch=2, seed=K)
    ours = beam_search(model, ids, mask, trie=trie, num_beams=K)
    hf_items, hf_scores = run_hf(model, trie, seqs, ids, mask, K)
    # the contract: the same item set per request, scores within 1e-4 (among 1,024 beams two
    # scores 2e-6 apart can swap places between the two engines' float32 sums)
    for b in range(2):
        assert set(ours.items[b].tolist()) == set(hf_items[b].tolist())
    assert torch.allclose(ours.scores, hf_scores.sort(dim=1, descending=True).values, atol=1e-4)
    assert bool((ours.items >= 0).all()) and all(len(set(row.tolist())) == K for row in ours.items)


@pytest.mark.parametrize("length_penalty", [0.0, 1.3])
def test_token_scores_are_each_tokens_term_of_the_score(title_catalog, title_models, length_penalty):
    """Served per-token log-probs: on EOS-terminated identifiers of unequal lengths, each token's
    term sums (over the identifier, its EOS included) to the score times length ** length_penalty,
    and each is the model's own log-prob of that token after the prompt and the tokens before it."""
    seqs, trie = title_catalog
    model = title_models["llama"]
    ids, mask = prompts(TITLE_VOCAB, batch=3, seed=21)
    out = beam_search(model, ids, mask, trie=trie, num_beams=6, length_penalty=length_penalty)
    live = out.scores > float("-inf")
    lengths = (out.sequences >= 0).sum(-1).float()
    assert len(set(lengths[live].tolist())) > 1  # identifiers of several lengths
    total = out.token_scores.sum(-1) / lengths.clamp(min=1) ** length_penalty
    torch.testing.assert_close(total[live], out.scores[live], rtol=0, atol=1e-5)
    assert bool((out.token_scores[out.sequences < 0] == 0).all())
    b, j = 1, 2  # one answer, read token by token from the model itself
    assert bool(live[b, j])
    tokens = [t for t in out.sequences[b, j].tolist() if t >= 0]
    prompt = ids[b][mask[b].bool()].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1]
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    torch.testing.assert_close(out.token_scores[b, j, :len(tokens)], expected, rtol=0, atol=1e-4)
