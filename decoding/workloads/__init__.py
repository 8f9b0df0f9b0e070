"""Real workloads: trained generative recommenders on real data, to measure what decoding options
cost in recall (see :mod:`decoding.workloads.movielens`)."""
