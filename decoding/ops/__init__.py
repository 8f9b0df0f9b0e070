"""Kernel ops: one public function per op, several backends behind one dispatch."""

from decoding.ops._backend import available_backends, resolve_backend
from decoding.ops.catalog_topk import CatalogTopK, catalog_topk
from decoding.ops.compact_kv import compact_kv
from decoding.ops.tree_attention import TreeAttentionOutput, tree_attention
from decoding.ops.trie_beam_step import BeamStepOutput, trie_beam_step
from decoding.ops.verify import RelaxedVerifyOutput, match_keys, philox_uniform, verify_relaxed, verify_strict

__all__ = [
    "CatalogTopK", "catalog_topk", "compact_kv",
    "BeamStepOutput", "RelaxedVerifyOutput", "available_backends", "match_keys", "philox_uniform",
    "TreeAttentionOutput", "resolve_backend", "tree_attention", "trie_beam_step", "verify_relaxed", "verify_strict",
]
