"""Every Triton kernel of the package compiles ahead of time for real GPU targets (sm_80, sm_90,
sm_100) at the block sizes its launcher picks on a GPU, with no register spill: the interpreter
the other tests use accepts code the compiler rejects. Runs decoding.ops.aot in a fresh
process without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import need

need("triton")


def test_every_kernel_compiles_for_gpu_targets_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "decoding.ops.aot", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    errors = [f"{r['kernel']} {r['target']} {r['config']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "kernels that do not compile:\n" + "\n".join(errors)
    spills = [f"{r['kernel']} {r['target']} {r['config']}: {r['spill_stores']} bytes" for r in rows
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels that spill registers:\n" + "\n".join(spills)
    assert set(data["kernels_in_package"]) == set(data["kernels_covered"]), "kernels never compiled"
    assert {r["target"] for r in rows} == {"sm_80", "sm_90", "sm_100"}
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows), "a configuration needs more shared memory than H100"
    assert len(data["kernels_in_package"]) >= 7 and res.returncode == 0


def test_the_tool_imports_every_module_of_the_triton_backend():
    from decoding.ops import aot

    imported = {m.__name__.rsplit(".", 1)[1] for m in aot.kernel_modules()}
    assert imported == aot.backend_modules(), "add the new Triton backend module to decoding.ops.aot.kernel_modules"
