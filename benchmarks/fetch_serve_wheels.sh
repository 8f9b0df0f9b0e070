#!/usr/bin/env bash
# Wheels for `decoding-bench serve` on the GPU machine (bare and offline: Python 3.12, x86-64
# Linux, no FastAPI or uvicorn): decoding-serve's packages (FastAPI, uvicorn, prometheus-client)
# and httpx (the bench's clients and the server's start-up check), with their dependencies;
# pydantic-core is the one compiled wheel, hence the platform tags. The versions are the ones
# installed here, where decoding-serve is tested (the serve extra's ranges where one is missing).
# Run it here, with network, before a GPU run: benchmarks/wheels is git-ignored, so the GPU run
# carries it beside the working tree, and benchmarks/gpu.sh installs from it (--no-index) when
# FastAPI is missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=benchmarks/wheels
mkdir -p "$dest"
mapfile -t specs < <(python - <<'PY'
from importlib.metadata import PackageNotFoundError, version

for name, fallback in (("fastapi", ">=0.136"), ("uvicorn", ">=0.55"), ("prometheus-client", ">=0.26"),
                       ("httpx", "")):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name + fallback)
PY
)
echo "fetch_serve_wheels.sh: ${specs[*]} for CPython 3.12, manylinux x86-64 -> $dest"
python -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dest" "${specs[@]}"
ls -1 "$dest"
du -sh "$dest"
