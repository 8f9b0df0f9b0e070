"""The benchmark CLI (`decoding-bench`): one module per suite, registered in `__main__.SUITES`,
and `_common` for what they share. Nothing outside the bench imports it."""
