"""Train a small draft on a target's beams, then decode speculatively: strict (exact target top-K)
and relaxed (sampled beams, draft aligned with the total-variation loss).

    python examples/train_draft.py

Random models stand in for a trained recommender; swap in your own target (a Hugging Face
decoder-only model), its catalog and real user prompts.
"""


import torch

from decoding import ItemTrie, beam_search, speculative_beam_search
from decoding import testing as bm
from decoding.speculative import align_draft

V = bm.sid_vocab_size(4, 256)
trie = ItemTrie.from_sequences(bm.random_semantic_ids(20_000, 4, 256, seed=0), vocab_size=V)
target = bm.tiny_llama(V, hidden_size=128, layers=4, heads=4, seed=0)

draft = bm.layer_draft(target, 1)  # a cheap draft: the target's first layer

train_ids, train_mask = bm.left_padded_prompts(16, V, 16, 32, seed=1)
before, after = align_draft(draft, target, trie, train_ids, train_mask, num_beams=10, steps=20)
print(f"strict alignment loss: {before:.4f} -> {after:.4f}")

ids, mask = bm.left_padded_prompts(8, V, 16, 32, seed=2)
exact = beam_search(target, ids, mask, trie=trie, num_beams=10)
out = speculative_beam_search(target, draft, ids, mask, trie=trie, num_beams=10, num_drafts=20, draft_steps=3)
assert torch.equal(out.items, exact.items)
s = out.stats
print(f"same items as the target's beam search; {s.rounds} rounds, {s.acceptance_rate:.0%} of drafted levels "
      f"accepted, {s.target_forwards} target forwards (beam search: {trie.depth})")

# relaxed mode: a draft aligned with the total-variation loss, sampled beams (seeded)
relaxed_draft = bm.layer_draft(target, 1)
before, after = align_draft(relaxed_draft, target, trie, train_ids, train_mask, num_beams=10, steps=20,
                            loss="relaxed")
print(f"relaxed alignment loss: {before:.4f} -> {after:.4f}")
sampled = speculative_beam_search(target, relaxed_draft, ids, mask, trie=trie, num_beams=10, num_drafts=20,
                                  draft_steps=3, mode="relaxed", seed=0)
s = sampled.stats
print(f"relaxed: {s.rounds} rounds, {s.acceptance_rate:.0%} of drafted levels accepted, "
      f"{s.target_forwards} target forwards; every returned id is a catalog item: {bool((sampled.items >= 0).all())}")
