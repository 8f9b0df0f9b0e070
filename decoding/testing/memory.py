"""Peak memory of a CPU computation, measured: the function runs in a fresh child process
(spawned: forking a process whose OpenMP pool is running can deadlock), and the child's peak
resident set (``ru_maxrss``) minus its resident set just before the call, arguments already
received, is the memory the call needed (Linux). ``fn`` and its arguments must be picklable
(module-level functions, tensors)."""

from __future__ import annotations

import multiprocessing
import os
import resource


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """VmHWM: the peak resident set since the last reset (ru_maxrss cannot be reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    """Start the peak count now, so that start-up (imports, unpickling) does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # older kernels: the peak then includes start-up, an overestimate
        pass


def _warm_up():
    """First use of BLAS, sorting and the thread pool allocates their buffers once; do it before
    the measurement so that it counts the call, not library start-up."""
    import torch

    a = torch.randn(256, 256)
    (a @ a).sort(dim=1)
    torch.einsum("ij,jk->ik", a, a).topk(5, dim=1)


def _child(conn, fn, args, kwargs, setup):
    try:
        if setup is not None:  # inputs built in the child, before the count starts
            args, kwargs = (setup(*args, **kwargs),), {}
        _warm_up()
        _reset_peak()
        before = _resident_bytes()
        fn(*args, **kwargs)
        conn.send(("ok", max(0, _peak_resident_bytes() - before)))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def peak_memory_bytes(fn, *args, setup=None, **kwargs) -> int:
    """Bytes of resident memory ``fn(*args, **kwargs)`` added at its peak, measured in a child
    process. With ``setup``, the child first builds the inputs, ``fn(setup(*args, **kwargs))``,
    so large inputs are made there instead of being copied over."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs, setup))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"peak_memory_bytes: the child process died (exit code {proc.exitcode}); when run "
                           "from a script, call it under `if __name__ == '__main__':`") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"peak_memory_bytes: the measured call failed: {value}")
    return value


def run_job(job) -> None:
    """The ``fn`` for :func:`peak_memory_bytes` when ``setup`` returns the call to measure."""
    job()
