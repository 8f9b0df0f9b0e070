"""``decoding-bench step`` (``trie_beam_step``: each backend against the torch reference,
same inputs, same run) and ``decoding-bench build`` (ItemTrie build time and size)."""

from __future__ import annotations

import time

import numpy as np
import torch

from decoding import ItemTrie
from decoding import testing as bm
from decoding.bench._common import log, timed
from decoding.ops import available_backends, trie_beam_step


def run_step(args, device) -> dict:
    V = bm.sid_vocab_size(args.levels, args.codes)
    seqs = bm.random_semantic_ids(args.items, args.levels, args.codes, seed=args.seed)
    trie = ItemTrie.from_sequences(seqs, vocab_size=V).to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    B, W = args.batch, args.beams
    rows = []
    for level in range(1, args.levels):
        lo, hi = int(trie.level_offsets[level]), int(trie.level_offsets[level + 1])
        nodes = torch.randint(lo, hi, (B, W), generator=g).to(device)
        logits = torch.randn(B, W, V, generator=g).to(device)
        scores = (-torch.rand(B, W, generator=g) * 5).to(device)
        C = trie.max_branch_at(level)
        result = {"level": level, "max_children": C}
        for backend in available_backends(device):
            if backend == "triton" and device.type != "cuda":
                continue  # the interpreter is a correctness tool, not a timing target

            def fn(backend=backend):
                return trie_beam_step(logits, scores, nodes, trie, W, max_children=C, backend=backend)

            t, _, _ = timed(fn, device, args.step_repeats, f"level {level} {backend}")
            result[backend + "_ms"] = t * 1e3
        rows.append(result)
    return {"suite": "step", "config": {"items": args.items, "batch": B, "beams": W, "vocab": V}, "levels": rows}


def show_step(res: dict) -> None:
    cfg = res["config"]
    print(f"\ntrie_beam_step, batch {cfg['batch']} x {cfg['beams']} beams, vocab {cfg['vocab']}, "
          f"{cfg['items']:,} items (ratio = torch reference / backend, same run)")
    for row in res["levels"]:
        ref = row["torch_ms"]
        parts = [f"{k[:-3]} {v:.3f} ms ({ref / v:.1f}x)" for k, v in row.items() if k.endswith("_ms")]
        print(f"  level {row['level']} (<= {row['max_children']} children): " + ", ".join(parts))


def run_build(args, device) -> dict:
    rows = []
    for n in args.build_sizes:
        log(f"[build] {n:,} random identifiers x {args.levels}")
        data = np.random.default_rng(args.seed).integers(0, args.codes, size=(n, args.levels))
        t0 = time.perf_counter()
        trie = ItemTrie.from_sequences(data, vocab_size=args.codes, on_duplicate="first")
        rows.append({"items": n, "levels": args.levels, "seconds": time.perf_counter() - t0,
                     "nodes": trie.num_nodes, "mbytes": trie.nbytes / 2**20})
        del trie, data
    return {"suite": "build", "sizes": rows}


def show_build(res: dict) -> None:
    print("\nItemTrie build (C++, single file layout)")
    for r in res["sizes"]:
        print(f"  {r['items']:>12,} x {r['levels']}: {r['seconds']:.2f} s, {r['nodes']:,} nodes, {r['mbytes']:.0f} MiB")
