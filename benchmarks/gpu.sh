#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes on one H100 or H200 (bare machine: torch, Triton and
# transformers installed, no network):
#   1. build and install the package (--no-build-isolation: the machine is offline);
#   2. the GPU-marked tests (Triton kernels compiled for this device, no-sync search step);
#   3. the op benchmarks (pytest-benchmark), reported as GB/s and as a fraction of the copy
#      bandwidth measured on this device in the same run;
#   4. decoding-bench end to end against transformers on a ~0.5B random Llama (hidden 1024,
#      24 layers, 32k text tokens + semantic-ID tokens, 1M items) at K = 20 and 256;
#   5. decoding-bench serve: decoding-serve on the GPU over HTTP (64 concurrent requests, K = 20,
#      100k items, the bench's small Llama) against the same search in process, and its served
#      decoders (speculative strict and relaxed, SETRec, the three KV policies); no vLLM here, so
#      the vLLM methods do not run. It needs FastAPI, uvicorn and prometheus-client, which the bare
#      machine lacks: run benchmarks/fetch_serve_wheels.sh here first and carry benchmarks/wheels
#      (git-ignored) with the repository; this step installs from it offline.
# Time budget: step 5 is kept to about a minute and a half of the 8 (imports and the exact
# reference on the CPU ~15 s, decoding-serve's start-up ~20 s, 4 rounds per method of well under a
# second each at this size, the relaxed speculative row's 64 requests one batch each a few
# seconds) and cut at 120 s, so that it cannot push the run past its budget.
# Everything lands in benchmarks/results/gpu-<device>*.json (and $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
dev=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || {
    echo "gpu.sh: no CUDA device"; exit 2; }
res=benchmarks/results
mkdir -p "$res"
status=0

echo "== build ($dev)"
python -m pip install -q --no-build-isolation --no-deps -e . || exit 1

echo "== GPU tests"
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests || status=1

echo "== op benchmarks"
timeout 150 python -m pytest -q -p no:cacheprovider benchmarks --benchmark-enable --benchmark-min-rounds=5 \
    --benchmark-json="$res/gpu-$dev-ops-raw.json" -k "not trie_build" || status=1
python - "$res/gpu-$dev-ops-raw.json" "$res/gpu-$dev-ops.json" <<'PY' || status=1
import json, sys, torch
raw = json.load(open(sys.argv[1]))
x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB copy: the device's achievable bandwidth
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
copy_gbs = 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9
rows = []
for b in raw["benchmarks"]:
    nbytes = b.get("extra_info", {}).get("bytes")
    mean = b["stats"]["mean"]
    gbs = nbytes / mean / 1e9 if nbytes else None
    rows.append({"name": b["fullname"], "group": b["group"], "mean_ms": mean * 1e3, "bytes": nbytes, "GB_s": gbs,
                 "fraction_of_copy_bandwidth": gbs / copy_gbs if gbs else None})
    print(f"{b['fullname'][:70]:70} {mean * 1e3:9.3f} ms" + (f" {gbs:8.1f} GB/s {gbs / copy_gbs:6.1%}" if gbs else ""))
print(f"copy bandwidth measured: {copy_gbs:.0f} GB/s ({torch.cuda.get_device_name(0)})")
json.dump({"device": torch.cuda.get_device_name(0), "copy_GB_s": copy_gbs, "ops": rows}, open(sys.argv[2], "w"), indent=1)
PY

echo "== end to end, ~0.5B random Llama, 1M items, K = 20 and 256"
timeout 270 decoding-bench --device cuda --dtype bfloat16 --items 1000000 --hidden 1024 --layers 24 --heads 16 \
    --text-vocab 32000 --beams 20,256 --batch 16 --prompt-len 128 --repeats 3 --out "$res/gpu-$dev" || status=1
[ -f "$res/gpu-$dev/results.json" ] && cp "$res/gpu-$dev/results.json" "$res/gpu-$dev.json"

echo "== decoding-serve over HTTP vs the same beam search in process (no vLLM here)"
serve_deps() { python -c "import fastapi, uvicorn, prometheus_client, httpx" 2>/dev/null; }
if ! serve_deps; then
    if ls benchmarks/wheels/fastapi-*.whl >/dev/null 2>&1; then
        python -m pip install -q --no-index --find-links benchmarks/wheels fastapi uvicorn prometheus-client httpx \
            || echo "gpu.sh: installing decoding-serve's packages from benchmarks/wheels failed"
    else
        echo "gpu.sh: FastAPI/uvicorn are not installed and benchmarks/wheels holds no wheels: run"
        echo "        benchmarks/fetch_serve_wheels.sh (with network) and carry benchmarks/wheels; serve bench skipped"
    fi
fi
if serve_deps; then
    timeout 120 decoding-bench serve --device cuda --repeats 3 --out "$res/gpu-$dev-serve" || status=1
    [ -f "$res/gpu-$dev-serve/results.json" ] && cp "$res/gpu-$dev-serve/results.json" "$res/gpu-$dev-serve.json"
else
    status=1
fi
if [ -n "${OUT:-}" ]; then cp "$res"/gpu-"$dev"*.json "$OUT"/ 2>/dev/null; fi
exit $status
