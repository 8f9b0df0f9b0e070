"""Thin adapters to serving stacks: transformers (:mod:`decoding.integrations.hf`), vLLM
(:mod:`decoding.integrations.vllm`) and Ray Serve (:mod:`decoding.integrations.ray_serve`)."""
