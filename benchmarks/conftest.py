"""pytest-benchmark suites. Run with `python -m pytest benchmarks --benchmark-enable` (the
project's default options disable timing so that CI only smoke-runs them). Compare backends by
the ratios in one run's table, never by absolute numbers across machines."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _copy_bandwidth(device: str) -> float:
    """Achievable bandwidth (GB/s) of a 256 MiB tensor copy on ``device``, measured now."""
    import time

    x = torch.empty(1 << 26, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9


def pytest_terminal_summary(terminalreporter, config):
    """Each op benchmark that records the bytes its op must move (``extra_info["bytes"]``, from
    the op's docstring): achieved GB/s and the fraction of this machine's copy bandwidth."""
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.extra_info.get("bytes") and b.stats]
    if not benchmarks or getattr(session, "disabled", True):
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    copy = _copy_bandwidth(device)
    terminalreporter.section(f"bandwidth (copy: {copy:.1f} GB/s on {device})")
    for b in benchmarks:
        gbs = b.extra_info["bytes"] / b.stats.mean / 1e9
        b.extra_info.update(GB_s=gbs, fraction_of_copy_bandwidth=gbs / copy)
        terminalreporter.write_line(f"{b.fullname[:80]:80} {gbs:8.2f} GB/s {gbs / copy:7.1%}")
