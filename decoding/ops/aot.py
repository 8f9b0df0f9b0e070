"""Ahead-of-time compilation of every Triton kernel of the package for real GPU targets, on a
machine without a GPU (Triton's interpreter accepts code its compiler rejects, so interpreted
tests alone prove nothing about a GPU).

Each op's Triton backend runs on CPU tensors at serving shapes with the kernel launches
intercepted: the launcher code picks the block sizes it would pick on a GPU, and each launch
(kernel, argument types, constexprs, launch options) is recorded instead of run. Every recorded
configuration is then compiled with Triton's own pipeline to a cubin for each target
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``), and ``ptxas -v`` (shipped
with Triton) reports registers, spills and shared memory.

    python -m decoding.ops.aot [--targets 80,90,100] [--json out.json]

Run it without ``TRITON_INTERPRET`` (the test does, in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch

TARGETS = (80, 90, 100)
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


@contextmanager
def recorded_launches():
    """Within the block, Triton kernel launches are recorded (``list`` of dicts), not run."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        constexpr_names = {names[i] for i in self.constexprs}
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(names, args))
        bound.update(kwargs)
        signature = {n: "constexpr" if n in constexpr_names else _arg_type(bound[n]) for n in names}
        constexprs = {n: bound[n] for n in names if n in constexpr_names}
        launches.append({"kernel": self, "name": self.__name__, "signature": signature, "constexprs": constexprs,
                         "options": options})

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _serving_launches() -> list[dict]:
    """Drive every op's Triton path at the shapes a GPU serves (a ~0.5B recommender: 32k text
    tokens + 1,024 semantic-ID tokens, K from 1 to 1,024 beams)."""
    import numpy as np

    from decoding.ops.catalog_topk import run_catalog_topk_codes, run_catalog_topk_embedding
    from decoding.ops.compact_kv import run_compact_kv
    from decoding.ops.tree_attention import run_tree_attention
    from decoding.ops.trie_beam_step import run_trie_beam_step
    from decoding.ops.verify import run_match_keys, run_verify_relaxed
    from decoding.trie import ItemTrie

    g = torch.Generator().manual_seed(0)
    # 20,000 items of 4 semantic-ID tokens (256 codes per level, each level its own tokens)
    # after 32k text tokens
    vocab = 32_000 + 4 * 256
    codes = np.random.default_rng(0).integers(0, 256, size=(20_000, 4)) + 32_000 + 256 * np.arange(4)
    trie = ItemTrie.from_sequences(codes, vocab_size=vocab, on_duplicate="first")
    with recorded_launches() as launches:
        for W, normalize, extras in ((1, "full", False), (20, "valid", True), (256, "none", False),
                                     (1024, "full", True)):
            C = 256
            nodes = torch.zeros((16, W), dtype=torch.long)
            excluded = torch.sort(torch.randint(0, 20_000, (16, 50), generator=g), dim=1).values if extras else None
            bias = torch.zeros((16, W, C)) if extras else None
            run_trie_beam_step(torch.zeros((16, W, vocab)), torch.zeros((16, W)), nodes, trie, 2 * W,
                               normalize=normalize, excluded_ranks=excluded, child_bias=bias, max_children=C,
                               backend="triton", logprob_weight=1.0)
        N = 8192
        for table_dtype in (torch.float16, torch.bfloat16, torch.float32):
            run_catalog_topk_embedding(torch.zeros((16, 3, 64)), torch.zeros((3, N, 64), dtype=table_dtype), 20, None,
                                       None, "triton")
        run_catalog_topk_embedding(torch.zeros((16, 1, 128)), torch.zeros((1, N, 128)), 20,
                                   torch.zeros((16, 30), dtype=torch.long), torch.ones((16, N), dtype=torch.bool),
                                   "triton")
        for code_dtype in (torch.uint8, torch.int16, torch.int32):
            run_catalog_topk_codes(torch.zeros((16, 16, 256)), torch.zeros((N, 16), dtype=code_dtype), 20, None,
                                   torch.ones(N, dtype=torch.bool), "triton")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for M, D in ((20, 64), (140, 128)):
                run_tree_attention(torch.zeros((4, 8, M, D), dtype=dtype), torch.zeros((4, 2, 512 + M, D), dtype=dtype),
                                   torch.zeros((4, 2, 512 + M, D), dtype=dtype), 512,
                                   torch.ones((4, 512), dtype=torch.bool), torch.ones((4, M, M), dtype=torch.bool),
                                   0.125, "triton")
            for D in (64, 128):
                run_compact_kv(torch.zeros((4, 8, 1024, D), dtype=dtype), torch.zeros((4, 8, 1024, D), dtype=dtype),
                               torch.zeros((4, 8, 256), dtype=torch.long), "triton")
        for N_keys in (40, 2000):
            run_match_keys(torch.zeros((16, 20), dtype=torch.long), torch.zeros((16, N_keys), dtype=torch.long),
                           "triton")
        for K, N, M in ((20, 40, 800), (256, 512, 4096)):
            run_verify_relaxed(torch.zeros((16, M)), torch.zeros((16, M)), torch.zeros((16, N)),
                               torch.zeros((16, N), dtype=torch.long), K, 1, 0, "triton")
    unique = {}
    for launch in launches:
        key = (launch["name"], json.dumps(launch["signature"], sort_keys=True),
               json.dumps(launch["constexprs"], sort_keys=True, default=str), json.dumps(launch["options"]))
        unique.setdefault(key, launch)
    return list(unique.values())


def package_kernels() -> set[str]:
    """Every top-level Triton kernel (``*_kernel``) defined in the package's Triton backends (a
    backend module missing from the imports here fails ``tests/test_aot_compile.py``)."""
    from triton.runtime.jit import JITFunction

    found = set()
    for module in kernel_modules():
        found |= {name for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    return found


def kernel_modules() -> tuple:
    """The Triton backend's modules, imported by name (never discovered and loaded dynamically)."""
    from decoding.ops._triton import _lib, catalog_topk, compact_kv, tree_attention, trie_beam_step, verify

    return _lib, catalog_topk, compact_kv, tree_attention, trie_beam_step, verify


def backend_modules() -> set[str]:
    """The module names of the package's Triton backend, as found on disk."""
    import pathlib

    import decoding.ops._triton as pkg

    return {p.stem for p in pathlib.Path(pkg.__file__).parent.glob("*.py") if p.stem != "__init__"}


def _ptxas_report(ptx: str, bin_dir: str) -> dict:
    arch = next(line.split()[1] for line in ptx.splitlines() if line.startswith(".target"))
    ptxas = os.path.join(bin_dir, "ptxas-blackwell" if arch.startswith("sm_1") and os.path.exists(
        os.path.join(bin_dir, "ptxas-blackwell")) else "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"arch": arch, "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def _compile_one(job) -> dict:
    index, cap = job
    launch = _serving_launches_cached()[index]
    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": launch["name"], "target": f"sm_{cap}",
           "config": {k: v for k, v in launch["constexprs"].items()} | launch["options"],
           "signature": {k: v for k, v in launch["signature"].items() if v != "constexpr"}}
    try:
        src = ASTSource(launch["kernel"], launch["signature"], constexprs=launch["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(launch["options"]))
    except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        return row
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["num_warps"] = int(compiled.metadata.num_warps)
    row.update(_ptxas_report(compiled.asm["ptx"], os.path.join(os.path.dirname(nvidia.__file__), "bin")))
    return row


_CACHE: list | None = None


def _serving_launches_cached() -> list[dict]:
    global _CACHE  # per worker process: the recording is deterministic
    if _CACHE is None:
        _CACHE = _serving_launches()
    return _CACHE


def compile_all(targets=TARGETS, workers: int | None = None) -> list[dict]:
    """One row per (recorded configuration, target): registers, spills, shared memory, or the error."""
    launches = _serving_launches_cached()
    jobs = [(i, cap) for i in range(len(launches)) for cap in targets]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_one, jobs))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("decoding.ops.aot: unset TRITON_INTERPRET (the interpreter is not a compiler)", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m decoding.ops.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, comma-separated")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = compile_all(tuple(int(t) for t in args.targets.split(",")))
    covered = {r["kernel"] for r in rows}
    print(f"{'kernel':24} {'target':7} {'regs':>5} {'spill st/ld':>12} {'shared':>7}  config")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:24} {r['target']:7} ERROR {r['error']}")
            continue
        print(f"{r['kernel']:24} {r['target']:7} {r['registers']:>5} {r['spill_stores']:>5}/{r['spill_loads']:<6} "
              f"{r['shared_bytes']:>7}  {json.dumps(r['config'])}")
    result = {"rows": rows, "kernels_in_package": sorted(package_kernels()), "kernels_covered": sorted(covered)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r for r in rows if "error" in r or r.get("spill_stores")]
    return 1 if bad or set(result["kernels_in_package"]) - covered else 0


if __name__ == "__main__":
    sys.exit(main())
