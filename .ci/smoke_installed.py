"""Smoke test of an installed genrec-decoding (sdist or wheel) in a fresh environment, run from
outside the source tree: the compiled extension loads, an exact beam search runs on a tiny random
model, and the console scripts start (decoding-serve without its extra says which to install)."""

import importlib.util
import pathlib
import subprocess
import sys

import torch

import decoding
from decoding import ItemTrie, beam_search
from decoding import testing as bm

here = pathlib.Path(decoding.__file__).resolve()
assert "site-packages" in here.parts, f"imported the source tree, not the installed package: {here}"
import decoding._C  # noqa: E402,F401  the C++ extension was built and installed

vocab = bm.sid_vocab_size(4, 16)
trie = ItemTrie.from_sequences(bm.random_semantic_ids(200, levels=4, codes=16, seed=1), vocab_size=vocab)
model = bm.tiny_llama(vocab, seed=2)
ids, mask = bm.left_padded_prompts(3, vocab, 3, 8, seed=3)
out = beam_search(model, ids, mask, trie=trie, num_beams=4, backend="cpu")
assert out.items.shape == (3, 4) and bool((out.items >= 0).all()), out.items
assert torch.equal(trie.lookup(out.sequences.view(-1, trie.depth)).view(3, 4), out.items)
subprocess.run([pathlib.Path(sys.executable).with_name("decoding-bench"), "--help"], check=True,
               stdout=subprocess.DEVNULL)
serve = subprocess.run([pathlib.Path(sys.executable).with_name("decoding-serve"), "--help"], capture_output=True,
                       text=True)
if importlib.util.find_spec("fastapi") is None:  # the wheel alone, without the serve extra
    assert serve.returncode != 0 and "genrec-decoding[serve]" in serve.stderr, serve.stderr
else:
    assert serve.returncode == 0, serve.stderr
print(f"smoke test passed: genrec-decoding from {here.parent}")
