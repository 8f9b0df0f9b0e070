"""Backend choice shared by every op: ``torch`` (reference), ``cpu`` (C++), ``triton``.

Each op module picks its backend function itself, in an explicit ``if``/``elif`` over these
names (so every call site of a backend can be found by name), and calls it with keywords."""

from __future__ import annotations

import functools
import os
import threading

import torch

from decoding._validate import check_choice

BACKENDS = ("torch", "cpu", "triton")


# Triton's interpreter (TRITON_INTERPRET=1, CPU tests) patches triton.language while it runs a
# kernel, so two interpreted launches in different threads break each other; compiled launches
# on a GPU do not share such state. Interpreted launches therefore run one at a time.
_INTERPRETER_LOCK = threading.Lock()


def triton_launcher(fn):
    """``fn`` (a Triton backend function) as the op calls it: under the interpreter, one launch
    at a time."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return run


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on tensors of ``device``."""
    device = torch.device(device)
    names = ["torch"]
    if device.type == "cpu":
        names.append("cpu")
    if _triton_usable(device):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"``: triton for CUDA tensors, cpu for CPU tensors, torch otherwise. An explicit
    backend that cannot run on ``device`` raises instead of falling back."""
    check_choice("backend", backend, {"auto", *BACKENDS})
    if backend == "auto":
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        return "cpu" if device.type == "cpu" else "torch"
    if backend not in available_backends(device):
        why = {
            "cpu": "the cpu backend runs on CPU tensors only",
            "triton": "triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and the triton package",
        }[backend]
        raise ValueError(f"backend: {backend!r} is not available for tensors on {device} ({why})")
    return backend
