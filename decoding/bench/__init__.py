"""The benchmark CLI (`decoding-bench`) and the baselines it compares against."""
