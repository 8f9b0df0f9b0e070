"""Moved to :mod:`decoding.ops.aot` (beside the Triton backend it compiles); this name stays for
``python -m decoding.testing.aot`` and imports of it."""

from decoding.ops.aot import TARGETS, compile_all, main, package_kernels  # noqa: F401

if __name__ == "__main__":
    import sys

    sys.exit(main())
