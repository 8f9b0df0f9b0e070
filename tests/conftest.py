"""Shared fixtures: small random models saved and reloaded with save_pretrained (nothing is
downloaded), synthetic catalogs, and helpers to read transformers' own beam-search results.

And the guard that keeps the suite from passing by not running. A test module that needs an
optional package starts with ``vllm = need("vllm")`` (or ``need("triton")``); a test that needs
one is marked ``@pytest.mark.needs("recbole")`` beside its skip condition. Where the package is
not installed they are skipped; where it is installed but does not import, the module fails with
the package's own error (never a skip, as ``pytest.importorskip`` would make it).
``DECODING_REQUIRE=vllm,triton,recbole`` names the packages a stack has (CI sets it for each
stack); for those, a skip is a failure, a whole-suite run fails unless every module that needs
one passed tests, and with ``vllm`` the supported releases' own code must be unpacked (see
``tests/vllm_releases.py``) before anything runs.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import pathlib

import numpy as np
import pytest
import torch

# Without a GPU the Triton backend runs in its interpreter; set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from decoding import ItemTrie
from decoding import testing as bm

EOS = 2

REQUIRE_ENV = "DECODING_REQUIRE"
TESTS = pathlib.Path(__file__).resolve().parent
# what importing a package must reach for its tests to count as able to run: vLLM's top level is
# lazy, so its own imports run only past it
_IMPORT_CHECK = {"vllm": "vllm.sampling_params"}


def required() -> set[str]:
    """The packages this stack has, so every test that needs one must run (``DECODING_REQUIRE``)."""
    return {p.strip() for p in os.environ.get(REQUIRE_ENV, "").split(",") if p.strip()}


def need(package: str):
    """``package`` for a test module that needs it, called at the module's top level
    (``vllm = need("vllm")``). Not installed: the module is skipped (a failure where the package
    is required). Installed: imported with nothing caught, so an error inside the package's own
    imports (a dependency missing or broken) fails the module's collection with that error."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)
    module = importlib.import_module(package)
    if package in _IMPORT_CHECK:
        importlib.import_module(_IMPORT_CHECK[package])
    return module


@functools.lru_cache(maxsize=None)
def _module_needs(path: str) -> frozenset:
    """The packages a test module needs: its top-level ``need("...")`` calls, read from its source
    (so a module that never got collected is still known)."""
    p = pathlib.Path(path)
    if p.suffix != ".py" or not p.name.startswith("test_"):
        return frozenset()
    found = set()
    for node in ast.parse(p.read_text()).body:
        call = getattr(node, "value", None)
        if (isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", None)) == "need"
                and call.args and isinstance(call.args[0], ast.Constant)):
            found.add(call.args[0].value)
    return frozenset(found)


def modules_needing(packages) -> list[pathlib.Path]:
    """The test modules that need any of ``packages``."""
    return sorted(p for p in TESTS.glob("test_*.py") if _module_needs(str(p)) & set(packages))


def _required_by(item) -> set[str]:
    marked = {m.args[0] for m in item.iter_markers("needs") if m.args}
    return (set(_module_needs(str(item.path))) | marked) & required()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(package): the test needs an optional package; "
                                       f"a failure to skip where {REQUIRE_ENV} names it")


def pytest_sessionstart(session):
    if "vllm" not in required():
        return
    import vllm_releases

    missing = [r for r in vllm_releases.RELEASES if vllm_releases.source_dir(r) is None]
    if missing:
        pytest.exit(f"{REQUIRE_ENV} names vllm but vLLM {', '.join(missing)}'s own code is not unpacked (the "
                    "contract tests need it): run `python tests/vllm_releases.py fetch`", returncode=1)


_REQUIRED_SKIP = "skipped on a stack where it must run ({env} names {packages}): {reason}"
_passed_in: dict[str, int] = {}  # test module path -> tests passed in this run
_IDLE_MODULES = pytest.StashKey[list]()


def _fail_skip(report, packages) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = _REQUIRED_SKIP.format(env=REQUIRE_ENV, packages=", ".join(sorted(packages)), reason=reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module):
        packages = set(_module_needs(str(collector.path))) & required()
        if packages:
            _fail_skip(report, packages)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.passed and report.when == "call":
        _passed_in[str(item.path)] = _passed_in.get(str(item.path), 0) + 1
    elif report.skipped and not hasattr(report, "wasxfail"):  # an expected failure is no skip
        packages = _required_by(item)
        if packages:
            _fail_skip(report, packages)


def pytest_sessionfinish(session, exitstatus):
    """A whole-suite run (no paths, ``-k`` or ``-m`` given) that otherwise passed fails unless
    every module needing a required package passed tests: a module that was not collected at all,
    or whose tests were all deselected, is caught here."""
    needed = required()
    config = session.config
    if not needed or exitstatus != pytest.ExitCode.OK or config.option.collectonly:
        return
    if not (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
            and not config.option.markexpr):
        return
    idle = [p.name for p in modules_needing(needed) if not _passed_in.get(str(p))]
    if idle:
        config.stash[_IDLE_MODULES] = idle
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    idle = config.stash.get(_IDLE_MODULES, None)
    if idle:
        terminalreporter.write_line(f"{REQUIRE_ENV}={','.join(sorted(required()))}: these test modules need a "
                                    f"required package and ran no passing test: {', '.join(idle)}", red=True)


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


@pytest.fixture(scope="session")
def served_hf_model(served_model_dir):
    """The served model, loaded in-process as a server loads it (float32), to judge its answers."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served_model_dir, dtype=torch.float32).eval()


def saved_catalog(tmp_path_factory, name: str, num_items: int, seed: int) -> dict:
    """A random semantic-ID catalog over SID_VOCAB saved for a server:
    ``{"root", "trie", "seqs", "path"}``."""
    root = tmp_path_factory.mktemp(name)
    seqs = bm.random_semantic_ids(num_items, seed=seed)
    trie = ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)
    trie.save(root / "items.trie")
    return {"root": root, "trie": trie, "seqs": seqs, "path": str(root / "items.trie")}


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

