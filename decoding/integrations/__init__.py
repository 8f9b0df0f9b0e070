"""Thin adapters to serving stacks: transformers (hf) now, vLLM later."""
