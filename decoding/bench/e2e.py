"""``decoding-bench`` (the default suite): ``decoding.beam_search`` against transformers' beam
search with a Python dict-trie ``prefix_allowed_tokens_fn`` (how LC-Rec / MiniOneRec decode), on
the same catalog, model and prompts: latency, throughput, invalid items, agreement."""

from __future__ import annotations

import torch

from decoding import beam_search
from decoding import testing as bm
from decoding.bench._common import catalog_and_model, log, print_methods, timed
from decoding.testing.baselines import PythonTriePrefixFn, transformers_trie_beam_search


def run(args, device) -> dict:
    log(f"[e2e] catalog: {args.items:,} semantic IDs ({args.levels} levels x {args.codes} codes); model: "
        f"Llama-style hidden={args.hidden} layers={args.layers}")
    V, seqs, trie, model, build_s = catalog_and_model(args)
    trie, model = trie.to(device), model.to(device)
    log(f"[e2e] ItemTrie built in {build_s:.2f} s")
    catalog = {tuple(int(x) for x in row) for row in seqs.tolist()}
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    ids, mask = bm.left_padded_prompts(args.batch, V, args.prompt_len // 2, args.prompt_len, seed=args.seed)
    ids, mask = ids.to(device), mask.to(device)
    K, L = args.beams, args.levels
    prefix_fn = PythonTriePrefixFn(seqs.tolist(), ids.shape[1])

    def ours():
        return beam_search(model, ids, mask, trie=trie, num_beams=K, backend=args.backend)

    def baseline():
        return transformers_trie_beam_search(model, ids, mask, None, num_beams=K, max_new_tokens=L,
                                             prefix_fn=prefix_fn)

    log("[e2e] decoding.beam_search")
    ours_s, ours_runs, ours_out = timed(ours, device, args.repeats, "decoding.beam_search")
    log("[e2e] transformers generate + Python trie prefix_allowed_tokens_fn")
    base_s, base_runs, base_out = timed(baseline, device, args.repeats, "transformers+python-trie")

    base_seqs = base_out.sequences[:, ids.shape[1]:].cpu().view(args.batch, K, -1)
    base_scores = base_out.sequences_scores.cpu().view(args.batch, K)
    ours_seqs = ours_out.sequences.cpu()

    def invalid_rate(seq):
        rows = seq.reshape(-1, seq.shape[-1]).tolist()
        return sum(tuple(r) not in catalog for r in rows) / max(len(rows), 1)

    same_sets = [
        {tuple(r) for r in ours_seqs[b].tolist()} == {tuple(r) for r in base_seqs[b].tolist()}
        for b in range(args.batch)
    ]
    score_diff = float((ours_out.scores.cpu() - base_scores).abs().max())
    methods = [
        {"method": "decoding.beam_search", "latency_ms": ours_s * 1e3, "runs_ms": [r * 1e3 for r in ours_runs],
         "requests_per_s": args.batch / ours_s, "invalid_item_rate": invalid_rate(ours_seqs)},
        {"method": "transformers + Python trie", "latency_ms": base_s * 1e3,
         "runs_ms": [r * 1e3 for r in base_runs], "requests_per_s": args.batch / base_s,
         "invalid_item_rate": invalid_rate(base_seqs)},
    ]
    for m in methods:
        m["speedup_vs_baseline"] = base_s / (m["latency_ms"] / 1e3)
    return {
        "suite": "e2e",
        "config": {k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "beams", "prompt_len", "hidden",
                                                  "layers", "heads", "dtype", "backend", "repeats", "seed")},
        "trie_build_s": build_s,
        "methods": methods,
        "agreement": {"same_item_sets": sum(same_sets) / len(same_sets), "max_score_diff": score_diff},
    }


def show(res: dict) -> None:
    cfg = res["config"]
    print_methods(f"End-to-end constrained beam search: {cfg['items']:,} items, batch {cfg['batch']}, "
                  f"{cfg['beams']} beams, prompts <= {cfg['prompt_len']} tokens", res["methods"])
    a = res["agreement"]
    print(f"agreement with the baseline: identical item sets for {a['same_item_sets']:.0%} of requests, "
          f"max score difference {a['max_score_diff']:.2e}")
