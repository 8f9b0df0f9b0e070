"""``decoding-bench speculative``: target-only beam search vs strict and relaxed
speculative beam search, on the same catalog, prompts and target.

The draft is the target's first ``--draft-layers`` layers (embeddings, final norm and output
head shared by copy); one copy is aligned on the target's own beams for ``--align-steps`` Adam
steps with :func:`decoding.speculative.strict_alignment_loss` (used for strict speculation),
another with :func:`decoding.speculative.relaxed_alignment_loss` (used for relaxed), teacher data
from prompts other than the timed ones. Columns: latency, speedup over target-only beam search
(default layout), whether the items equal the target's, the recall of the target's exact top-K
(relaxed mode samples, so below 100%), and the acceptance statistics of each speculative run.
"""

from __future__ import annotations

import torch

from decoding import beam_search, speculative_beam_search
from decoding import testing as bm
from decoding.bench._common import catalog_and_model, log, print_methods, timed
from decoding.speculative import align_draft


def top_k_recall(items: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over requests of |items ∩ reference| / |reference| (valid ids only)."""
    hits = total = 0
    for got, ref in zip(items.tolist(), reference.tolist()):
        ref_set = {i for i in ref if i >= 0}
        hits += len(ref_set & {i for i in got if i >= 0})
        total += len(ref_set)
    return hits / total if total else 1.0


def invalid_rate(items: torch.Tensor, trie) -> float:
    """Fraction of returned slots that are not catalog items (-1 padding counts as invalid)."""
    return float(((items < 0) | (items >= trie.num_items)).float().mean())


def run(args, device) -> dict:
    K, N, L = args.beams, args.drafts or 2 * args.beams, args.levels
    log(f"[speculative] catalog: {args.items:,} semantic IDs; target: hidden={args.hidden} layers={args.layers}; "
        f"draft: its first {args.draft_layers} layer(s); K={K}, N={N}, gamma={args.draft_steps}")
    V, seqs, trie, target, _ = catalog_and_model(args)
    trie, target = trie.to(device), target.to(device)
    ids, mask = bm.left_padded_prompts(args.batch, V, args.prompt_len // 2, args.prompt_len, seed=args.seed)
    train_ids, train_mask = bm.left_padded_prompts(args.batch, V, args.prompt_len // 2, args.prompt_len,
                                                   seed=args.seed + 1)
    ids, mask, train_ids, train_mask = (t.to(device) for t in (ids, mask, train_ids, train_mask))
    raw = bm.layer_draft(target, args.draft_layers)
    aligned = bm.layer_draft(target, args.draft_layers)
    aligned_relaxed = bm.layer_draft(target, args.draft_layers)
    log(f"[speculative] aligning the draft on the target's beams ({args.align_steps} steps, strict loss)")
    before, after = align_draft(aligned, target, trie, train_ids, train_mask, num_beams=K, steps=args.align_steps,
                                log=log)
    log(f"[speculative] aligning the draft on the target's beams ({args.align_steps} steps, relaxed loss)")
    before_r, after_r = align_draft(aligned_relaxed, target, trie, train_ids, train_mask, num_beams=K,
                                    steps=args.align_steps, loss="relaxed", log=log)

    def target_only():
        return beam_search(target, ids, mask, trie=trie, num_beams=K, backend=args.backend)

    def target_tree():
        return beam_search(target, ids, mask, trie=trie, num_beams=K, backend=args.backend, layout="tree")

    def target_tree_op():
        return beam_search(target, ids, mask, trie=trie, num_beams=K, backend=args.backend, layout="tree",
                           tree_attention="op")

    def spec(draft, mode):
        return lambda: speculative_beam_search(target, draft, ids, mask, trie=trie, num_beams=K, num_drafts=N,
                                               draft_steps=args.draft_steps, mode=mode, seed=args.seed,
                                               backend=args.backend)

    base_s, base_runs, ref = timed(target_only, device, args.repeats, "target beam_search")
    methods = [("target beam_search (default layout)", base_s, base_runs, ref, None)]
    t, runs, out = timed(target_tree, device, args.repeats, "target beam_search, tree layout")
    methods.append(("target beam_search (tree layout)", t, runs, out, None))
    t, runs, out = timed(target_tree_op, device, args.repeats, "target beam_search, tree layout, tree attention op")
    methods.append(("target beam_search (tree layout, tree_attention op)", t, runs, out, None))
    for name, draft, mode in (("speculative strict, first-layers draft", raw, "strict"),
                              ("speculative strict, draft aligned by strict loss", aligned, "strict"),
                              ("speculative relaxed, first-layers draft", raw, "relaxed"),
                              ("speculative relaxed, draft aligned by relaxed loss", aligned_relaxed, "relaxed")):
        t, runs, out = timed(spec(draft, mode), device, args.repeats, name)
        methods.append((name, t, runs, out, out.stats))
    rows = []
    for name, t, runs, out, stats in methods:
        row = {"method": name, "latency_ms": t * 1e3, "runs_ms": [r * 1e3 for r in runs],
               "requests_per_s": args.batch / t, "speedup_vs_baseline": base_s / t,
               "same_items_as_target": float(torch.equal(out.items, ref.items)),
               "recall_of_target_top_k": top_k_recall(out.items, ref.items),
               "invalid_item_rate": invalid_rate(out.items, trie)}
        if stats is not None:
            row.update(rounds=stats.rounds, acceptance_rate=stats.acceptance_rate,
                       target_forwards=stats.target_forwards, draft_forwards=stats.draft_forwards,
                       accepted_levels=stats.accepted_levels)
        else:
            row.update(rounds=None, acceptance_rate=None, target_forwards=L, draft_forwards=0)
        rows.append(row)
    return {"suite": "speculative",
            "config": {k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "beams", "drafts",
                                                      "draft_steps", "draft_layers", "align_steps", "prompt_len",
                                                      "hidden", "layers", "heads", "repeats", "seed")}
            | {"drafts": N},
            "alignment_loss": {"before": before, "after": after},
            "relaxed_alignment_loss": {"before": before_r, "after": after_r},
            "methods": rows}


def show(res: dict) -> None:
    c = res["config"]
    shown = res["methods"]
    print_methods(f"Speculative beam search (strict and relaxed): {c['items']:,} items, batch {c['batch']}, "
                  f"K={c['beams']}, "
                  f"N={c['drafts']}, gamma={c['draft_steps']}, target {c['layers']} layers, draft {c['draft_layers']}",
                  shown,
                  [("latency ms", "latency_ms", "{:.1f}"), ("speedup", "speedup_vs_baseline", "{:.2f}x"),
                   ("exact", "same_items_as_target", "{:.0%}"), ("top-K recall", "recall_of_target_top_k", "{:.0%}"),
                   ("invalid", "invalid_item_rate", "{:.0%}"), ("rounds", "rounds", "{}"),
                   ("accepted", "acceptance_rate", "{:.0%}"), ("target fwd", "target_forwards", "{}"),
                   ("draft fwd", "draft_forwards", "{}")])
    a = res["alignment_loss"]
    r = res["relaxed_alignment_loss"]
    print(f"Draft alignment on the target's beams: strict loss {a['before']:.4f} -> {a['after']:.4f}, "
          f"relaxed loss {r['before']:.4f} -> {r['after']:.4f}")
