"""pytest-benchmark suites. Run with `python -m pytest benchmarks --benchmark-enable` (the
project's default options disable timing so that CI only smoke-runs them). Compare backends by
the ratios in one run's table, never by absolute numbers across machines."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
