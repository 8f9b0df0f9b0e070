"""The package's layering, read from its source: backends are leaves, dependencies run one way
(helpers -> trie, data sets, semantic IDs, metrics -> ops -> kv -> search -> speculative, setid ->
integrations -> the top-level face, testing, workloads -> bench), and nothing imports in a circle."""

from __future__ import annotations

import ast
import pathlib

import decoding

ROOT = pathlib.Path(decoding.__file__).resolve().parent
# a module's layer is that of the longest matching prefix
LAYERS = {
    "decoding._ext": 0, "decoding._validate": 0, "decoding._hf": 0,
    "decoding.trie": 1, "decoding.datasets": 1, "decoding.semantic_ids": 1, "decoding.metrics": 1,
    "decoding.ops": 2,
    "decoding.kv": 3,
    "decoding.search": 4,
    "decoding.speculative": 5, "decoding.setid": 5,
    "decoding.integrations": 6,
    "decoding": 7, "decoding.testing": 7, "decoding.workloads": 7,
    "decoding.bench": 8,
}
BACKENDS = ("decoding.ops._torch.", "decoding.ops._cpu.", "decoding.ops._triton.")
EXTENSIONS = {"decoding._C"}  # compiled: imports nothing of the package
BACKEND_MAY_IMPORT = {"decoding._ext", "decoding._validate", "decoding.ops._helpers", "decoding.ops._triton._lib"}


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
    """Every ``decoding`` module ``module`` imports, function-local imports included and
    ``if TYPE_CHECKING:`` blocks excluded."""
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
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def test_backends_are_leaves_imported_only_by_their_op():
    for module, deps in GRAPH.items():
        for dep in deps:
            if dep.startswith(BACKENDS) and dep not in BACKEND_MAY_IMPORT:
                op = dep.rsplit(".", 1)[1]
                assert module == f"decoding.ops.{op}", f"{module} imports the backend module {dep}"
        if module.startswith(BACKENDS):
            assert deps <= BACKEND_MAY_IMPORT, f"backend {module} imports {sorted(deps - BACKEND_MAY_IMPORT)}"


def test_dependencies_run_one_way():
    wrong = []
    for module, deps in GRAPH.items():
        for dep in deps:
            lm, ld = _layer(module), _layer(dep)
            sibling = lm == ld and module.split(".")[:2] != dep.split(".")[:2] and lm in (0, 5, 7)
            if ld > lm or (sibling and not (lm == 0 and dep == "decoding._validate")):
                wrong.append(f"{module} (layer {lm}) -> {dep} (layer {ld})")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


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


# vLLM's public API (what its docs show users); everything else of vLLM is internal
VLLM_PUBLIC = {"vllm": {"LLM", "SamplingParams"}, "vllm.inputs": {"TokensPrompt"},
               "vllm.sampling_params": {"BeamSearchParams", "SamplingParams"}}
VLLM_SEAM = "decoding.integrations.vllm._compat"


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
