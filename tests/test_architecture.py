"""The package's layering, read from its source, as the explicit rules of the README's
Architecture section:

- dependencies run one way, through the layers helpers -> catalog and data (the workloads' data
  sets, semantic IDs and metrics) -> ops -> kv ->
  search -> speculative, setid -> the face (``decoding``), testing, workloads -> the serving core
  (``decoding.serving``) -> integrations -> bench; nothing imports in a circle;
- the library (everything but ``integrations`` and ``bench``) never imports an integration;
- an op's backends (``ops/_torch``, ``ops/_cpu``, ``ops/_triton``, the packages themselves
  included) are imported only by that op (and the AOT tool, which compiles every Triton kernel),
  and import nothing but the shared helpers;
- nothing is loaded by name at run time: no ``importlib`` (other than ``importlib.metadata``,
  which reads installed packages' metadata) and no ``__import__`` outside the vLLM seam, which
  looks up vLLM's names (never the package's) for its table of what it relies on.

Every rule is shown failing on an injected violation."""

from __future__ import annotations

import ast
import pathlib

import pytest

import decoding

ROOT = pathlib.Path(decoding.__file__).resolve().parent
# a module's layer is that of the longest matching prefix
LAYERS = {
    "decoding._ext": 0, "decoding._validate": 0, "decoding._transformers": 0,
    # the catalog, and the workloads' data modules (the recipes in decoding.workloads sit above the decoders)
    "decoding.trie": 1, "decoding.workloads.datasets": 1, "decoding.workloads.semantic_ids": 1,
    "decoding.workloads.metrics": 1,
    "decoding.ops": 2,
    "decoding.kv": 3,
    "decoding.search": 4,
    "decoding.speculative": 5, "decoding.setid": 5,
    "decoding": 6, "decoding.testing": 6, "decoding.workloads": 6,
    "decoding.serving": 7,
    "decoding.integrations": 8,
    "decoding.bench": 9,
}
# layers whose packages are peers: none of them imports another (within one package is fine)
PEER_LAYERS = (0, 5, 6)
BACKEND_PACKAGES = ("decoding.ops._torch", "decoding.ops._cpu", "decoding.ops._triton")
EXTENSIONS = {"decoding._C"}  # compiled: imports nothing of the package
BACKEND_MAY_IMPORT = {"decoding._ext", "decoding._validate", "decoding.ops._helpers", "decoding.ops._triton._lib"}
AOT_TOOL = "decoding.ops.aot"  # compiles every Triton kernel: imports the whole Triton backend
LIBRARY_EXCLUDES = ("decoding.integrations", "decoding.bench")
VLLM_SEAM = "decoding.integrations.vllm._compat"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package module an import names (the module itself, or the package a name is taken from)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every ``decoding`` module ``module`` imports, function-local imports and package-level
    imports included, ``if TYPE_CHECKING:`` blocks excluded."""
    tree = ast.parse(MODULES[module].read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
                     if f"{base}.{a.name}" not in EXTENSIONS]
        else:
            continue
        found.update(r for n in names if n.startswith("decoding") and (r := _resolve(n)) and r != module)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    key = max((k for k in LAYERS if _within(module, k)), key=len)
    return LAYERS[key]


def _backend(module: str) -> str | None:
    return next((b for b in BACKEND_PACKAGES if _within(module, b)), None)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` (module -> the package modules it imports) that a rule forbids."""
    wrong = []
    for module, deps in graph.items():
        library = not any(_within(module, x) for x in LIBRARY_EXCLUDES)
        for dep in sorted(deps):
            lm, ld = _layer(module), _layer(dep)
            peers = lm == ld and lm in PEER_LAYERS and module.split(".")[:2] != dep.split(".")[:2]
            if ld > lm or (peers and not (lm == 0 and dep == "decoding._validate")):
                wrong.append(f"layering: {module} (layer {lm}) -> {dep} (layer {ld})")
            if library and _within(dep, "decoding.integrations"):
                wrong.append(f"the library imports an integration: {module} -> {dep}")
            if _backend(dep) and dep not in BACKEND_MAY_IMPORT and not _backend(module):
                op = dep[len(_backend(dep)) + 1:].split(".")[0] if dep != _backend(dep) else None
                if module != AOT_TOOL and (op is None or module != f"decoding.ops.{op}"):
                    wrong.append(f"a backend imported outside its op: {module} -> {dep}")
        if _backend(module) and module not in BACKEND_MAY_IMPORT and not deps <= BACKEND_MAY_IMPORT:
            extra = sorted(deps - BACKEND_MAY_IMPORT)
            wrong.append(f"a backend imports more than the shared helpers: {module} -> {extra}")
    return wrong


def dynamic_loading(module: str, source: str) -> list[str]:
    """Where ``source`` loads modules by name at run time: ``importlib`` (but its metadata) or
    ``__import__`` (the vLLM seam excepted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{module}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "importlib" and a.name != "importlib.metadata"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "importlib":
            if node.module != "importlib.metadata":
                found.append(f"{module}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and module != VLLM_SEAM:
            found.append(f"{module}: __import__(...)")
    return found


def test_the_package_follows_the_rules():
    wrong = violations(GRAPH)
    assert not wrong, "imports against the README's Architecture rules:\n" + "\n".join(wrong)


def test_nothing_is_loaded_by_name():
    wrong = [w for m, path in MODULES.items() for w in dynamic_loading(m, path.read_text())]
    assert not wrong, "modules loaded by name (import them explicitly, lazily where needed):\n" + "\n".join(wrong)


@pytest.mark.parametrize("module, dep, rule", [
    ("decoding.search.beam", "decoding.ops._triton", "a backend imported outside its op"),  # a backend package
    ("decoding.kv.shared_prefix", "decoding.ops._cpu.compact_kv", "a backend imported outside its op"),
    ("decoding.testing.serving", "decoding.integrations.vllm.driver", "the library imports an integration"),
    ("decoding.workloads.movielens", "decoding.integrations.hf", "the library imports an integration"),
    ("decoding.ops.verify", "decoding.ops._torch.compact_kv", "a backend imported outside its op"),
    ("decoding.ops._torch.verify", "decoding.ops._torch.compact_kv", "a backend imports more than"),
    ("decoding.ops.verify", "decoding.search.beam", "layering"),
    ("decoding.speculative.search", "decoding.setid", "layering"),
    ("decoding.integrations.hf", "decoding.bench", "layering"),
])
def test_each_rule_fails_on_an_injected_violation(module, dep, rule):
    assert not [w for w in violations({module: GRAPH[module]}) if rule in w]
    assert [w for w in violations({module: GRAPH[module] | {dep}}) if w.startswith(rule) and dep in w]


@pytest.mark.parametrize("source", ["import importlib\n", "import importlib.util\n",
                                    "from importlib import import_module\n", "__import__('decoding.ops')\n"])
def test_loading_by_name_fails_the_check(source):
    assert dynamic_loading("decoding.search.beam", source)
    assert not dynamic_loading("decoding.search.beam", "from importlib.metadata import version\n")


def test_no_import_cycle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checks_see_the_imports():
    """The graph is not vacuous: known edges are found."""
    assert "decoding.ops._torch.trie_beam_step" in GRAPH["decoding.ops.trie_beam_step"]
    assert "decoding.ops._helpers" in GRAPH["decoding.ops._torch.trie_beam_step"]
    assert "decoding.kv.shared_prefix" in GRAPH["decoding.search.model"]  # a function-local import
    assert "decoding.trie" not in GRAPH["decoding.ops._torch.trie_beam_step"]  # TYPE_CHECKING only
    assert "decoding.ops._triton" in GRAPH[AOT_TOOL]  # a package-level import


# vLLM's public API (what its docs show users); everything else of vLLM is internal
VLLM_PUBLIC = {"vllm": {"LLM", "SamplingParams"}, "vllm.inputs": {"TokensPrompt"},
               "vllm.sampling_params": {"BeamSearchParams", "SamplingParams"}}


def _vllm_imports(module: str) -> list[tuple[str, set[str]]]:
    """(vLLM module, names taken from it) for every import of vLLM in ``module``."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, set()) for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
            found.append((node.module, {a.name for a in node.names}))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("__import__", "import_module"):
            found += [(a.value, set()) for a in node.args[:1] if isinstance(a, ast.Constant)
                      and str(a.value).split(".")[0] == "vllm"]
    return found


def test_vllm_internals_are_reached_only_through_the_seam():
    """Every vLLM import of the package is in integrations/vllm/_compat.py, except vLLM's public API."""
    wrong = []
    for module in MODULES:
        if module == VLLM_SEAM:
            continue
        for vllm_module, names in _vllm_imports(module):
            public = VLLM_PUBLIC.get(vllm_module)
            inside = module.startswith("decoding.integrations.vllm")
            if inside or public is None or not names <= public:
                wrong.append(f"{module}: {vllm_module} {sorted(names)}")
    assert not wrong, "vLLM imports outside the seam:\n" + "\n".join(wrong)
    assert any(m for m, _ in _vllm_imports(VLLM_SEAM)), "the seam check sees no import at all"


def test_the_vllm_seam_check_sees_a_violation(monkeypatch, tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text("from vllm.v1.engine import EngineCoreRequest\n")
    monkeypatch.setitem(MODULES, "decoding.integrations.vllm.offender", offender)
    try:
        test_vllm_internals_are_reached_only_through_the_seam()
    except AssertionError as exc:
        assert "decoding.integrations.vllm.offender: vllm.v1.engine ['EngineCoreRequest']" in str(exc)
    else:
        raise AssertionError("the seam check let an internal vLLM import through")
