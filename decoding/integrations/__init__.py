"""Thin adapters to serving stacks: transformers (:mod:`decoding.integrations.hf`) and vLLM
(:mod:`decoding.integrations.vllm`)."""
