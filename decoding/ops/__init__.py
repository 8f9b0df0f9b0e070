"""Kernel ops: one public function per op, several backends behind one dispatch."""

from decoding.ops.trie_beam_step import BeamStepOutput, available_backends, trie_beam_step

__all__ = ["BeamStepOutput", "available_backends", "trie_beam_step"]
