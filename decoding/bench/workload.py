"""``decoding-bench --workload ml-100k``: the decoders on a trained recommender and real data.

Trains (or loads from ``--cache-dir``) the MovieLens-100K pair of
:mod:`decoding.workloads.movielens`, then decodes every test user's next item (leave-one-out) and
reports, per decoder, Recall@10/20, NDCG@10/20, latency per batch, and where they apply: whether
``decoding.beam_search`` equals transformers' constrained beam search for every user; the
invalid-item rate of transformers' unconstrained beam search; the recall change from excluding the
user's history; D3 with a popularity assistant (its weight chosen on the validation split);
speculative beam search, strict (equality with beam search, acceptance per level, target and draft
forwards per request and per batch) and relaxed (recall, agreement with the exact top-K) at
γ = 1 and 3; each KV pruning policy keeping 25% of the prompt.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from decoding.bench._common import log

D3_WEIGHTS = (0.1, 0.3, 0.5)


def _batches(n: int, size: int):
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _timed_batches(fn, n: int, size: int):
    """``fn(slice)`` over all batches: (concatenated outputs, median seconds per batch)."""
    outs, times = [], []
    for sl in _batches(n, size):
        t0 = time.perf_counter()
        outs.append(fn(sl))
        times.append(time.perf_counter() - t0)
    return outs, float(np.median(times))


def _quality(items: np.ndarray, targets: np.ndarray) -> dict:
    from decoding.metrics import ndcg_at_k, recall_at_k

    return {f"{name}@{k}": fn(items, targets, k) for k in (10, 20)
            for name, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))}


def run(args, device) -> dict:
    from decoding import beam_search, speculative_beam_search
    from decoding.datasets import movielens_100k
    from decoding.testing.baselines import transformers_trie_beam_search
    from decoding.workloads.movielens import Recipe, aligned_draft, load_or_train, prompts_for

    cache = None if args.cache_dir == "none" else os.path.expanduser(args.cache_dir)
    recipe = Recipe(max_users=args.max_users, **({"epochs": args.train_epochs, "draft_epochs": args.train_epochs}
                                                 if args.train_epochs is not None else {}))
    t0 = time.perf_counter()
    pair = load_or_train(movielens_100k(), recipe, cache_dir=cache, log=log)
    setup_s = time.perf_counter() - t0
    data, trie, sids, target, draft = pair.data, pair.trie, pair.sids, pair.target, pair.draft
    K, B, L = args.beams, args.batch, trie.depth
    seqs = sids.tokens.tolist()

    def split(which):
        inputs, targets = data.split(which)
        ids, mask = prompts_for(inputs, sids, recipe.max_items)
        return inputs, targets, ids, mask

    results = {"config": {"users": data.num_users, "items": data.num_items, "beams": K, "batch": B,
                          "identifier_tokens": L, "recipe": recipe.__dict__, "cached": pair.loaded_from_cache,
                          "train_seconds": pair.train_seconds, "setup_seconds": setup_s}}
    inputs, targets, ids, mask = split("test")
    n = len(targets)
    log(f"[ml-100k] {n} test users, K={K}, {L}-token identifiers, batches of {B}")

    def ours(sl, **kw):
        return beam_search(target, ids[sl], mask[sl], trie=trie, num_beams=K, **kw)

    outs, t_ours = _timed_batches(ours, n, B)
    exact_items = torch.cat([o.items for o in outs]).numpy()
    methods = [{"method": "decoding.beam_search", "latency_ms": t_ours * 1e3, **_quality(exact_items, targets)}]

    log("[ml-100k] transformers' constrained beam search (Python trie callback)")

    def hf(sl, constrained=True):
        width = ids.shape[1]
        gen = transformers_trie_beam_search(target, ids[sl], mask[sl], seqs, num_beams=K, max_new_tokens=L,
                                            **({} if constrained else {"prefix_allowed_tokens_fn": None}))
        rows = gen.sequences[:, width: width + L]
        return trie.lookup(rows).reshape(-1, K)

    hf_outs, t_hf = _timed_batches(hf, n, B)
    hf_items = torch.cat(hf_outs).numpy()
    same = int((np.sort(hf_items, 1) == np.sort(exact_items, 1)).all(1).sum())
    methods.append({"method": "transformers beam search + Python trie", "latency_ms": t_hf * 1e3,
                    "same_items_as_beam_search": same, **_quality(hf_items, targets)})
    log("[ml-100k] transformers' unconstrained beam search")
    free, t_free = _timed_batches(lambda sl: hf(sl, constrained=False), n, B)
    free_items = torch.cat(free).numpy()
    methods.append({"method": "transformers beam search, unconstrained", "latency_ms": t_free * 1e3,
                    "invalid_item_rate": float((free_items < 0).mean()), **_quality(free_items, targets)})

    log("[ml-100k] excluding each user's history")
    history = [list(map(int, h)) for h in inputs]
    excl, t_excl = _timed_batches(lambda sl: ours(sl, exclude_items=history[sl]), n, B)
    methods.append({"method": "decoding.beam_search, history excluded", "latency_ms": t_excl * 1e3,
                    **_quality(torch.cat([o.items for o in excl]).numpy(), targets)})

    # D3: a popularity assistant (training interactions), its weight chosen on validation
    counts = np.bincount(np.concatenate(data.train_sequences), minlength=trie.num_ids).astype(np.float64) + 1.0
    popularity = torch.from_numpy(np.log(counts / counts.sum())).float()
    _, v_targets, v_ids, v_mask = split("valid")

    def d3(prompts, masks, sl, weight):
        lp = popularity.expand(prompts[sl].shape[0], -1)
        return beam_search(target, prompts[sl], masks[sl], trie=trie, num_beams=K, assistant_logprobs=lp,
                           assistant_weight=weight)

    valid_recall = {}
    for w in D3_WEIGHTS:
        vouts, _ = _timed_batches(lambda sl, w=w: d3(v_ids, v_mask, sl, w), len(v_targets), B)
        valid_recall[w] = _quality(torch.cat([o.items for o in vouts]).numpy(), v_targets)["recall@20"]
    best = max(D3_WEIGHTS, key=lambda w: valid_recall[w])
    d3_outs, t_d3 = _timed_batches(lambda sl: d3(ids, mask, sl, best), n, B)
    methods.append({"method": f"D3, popularity assistant, weight {best} (chosen on validation)",
                    "latency_ms": t_d3 * 1e3, "validation_recall20_by_weight": valid_recall,
                    **_quality(torch.cat([o.items for o in d3_outs]).numpy(), targets)})

    # KV pruning at 25% of the prompt (BOS + the last max_items identifiers): recall it costs
    from decoding.kv import EarnCut, SnapKV, StreamingLLM

    keep = max(4, ids.shape[1] // 4)
    policies = {f"StreamingLLM (4 sinks + {keep - 4} recent)": StreamingLLM(sink=4, recent=keep - 4),
                f"SnapKV (window 8, capacity {keep})": SnapKV(window=8, capacity=keep),
                f"EARN cut at layer 1 (first 4 + last {keep - 4} as registers)": EarnCut(
                    layer=1, registers=tuple(range(4)) + tuple(range(-(keep - 4), 0)))}
    for name, policy in policies.items():
        log(f"[ml-100k] KV pruning: {name}")
        pruned, t_kv = _timed_batches(lambda sl, policy=policy: ours(sl, kv_policy=policy), n, B)
        items = torch.cat([o.items for o in pruned]).numpy()
        methods.append({"method": f"KV 25% of the prompt: {name}", "latency_ms": t_kv * 1e3,
                        "prompt_positions_kept": keep, "prompt_positions": int(ids.shape[1]),
                        "agreement_with_exact_topk": float(np.mean([set(r) == set(e) for r, e in
                                                                    zip(items.tolist(), exact_items.tolist())])),
                        **_quality(items, targets)})

    exact_sets = [set(r) for r in exact_items.tolist()]
    log("[ml-100k] aligning a copy of the draft on the target's beams (strict loss)")
    aligned, alignment = aligned_draft(pair, num_beams=K, cache_dir=cache, log=log)
    results["alignment"] = alignment
    runs = [(mode, gamma, "draft trained on the data", draft) for mode in ("strict", "relaxed") for gamma in (1, 3)]
    runs += [("strict", gamma, "aligned draft", aligned) for gamma in (1, 3)]
    for mode, gamma, which, drafter in runs:
        log(f"[ml-100k] speculative beam search, {mode}, gamma={gamma}, {which}")

        def spec(sl, mode=mode, gamma=gamma, drafter=drafter):
            return speculative_beam_search(target, drafter, ids[sl], mask[sl], trie=trie, num_beams=K,
                                           num_drafts=2 * K, draft_steps=gamma, mode=mode, seed=args.seed)

        souts, t_spec = _timed_batches(spec, n, B)
        items = torch.cat([o.items for o in souts]).numpy()
        per_request = [1 + sum(1 for r in o.stats.accepted_levels if r[b] >= 0)
                       for o in souts for b in range(o.items.shape[0])]
        drafted = sum(d for o in souts for r in o.stats.drafted_levels for d in r if d > 0)
        accepted = sum(a for o in souts for r in o.stats.accepted_levels for a in r if a > 0)
        row = {"method": f"speculative {mode}, gamma={gamma}" + (", aligned draft" if drafter is aligned else ""),
               "latency_ms": t_spec * 1e3,
               "acceptance_rate": accepted / drafted if drafted else 0.0,
               "target_forwards_per_batch": float(np.mean([o.stats.target_forwards for o in souts])),
               "draft_forwards_per_batch": float(np.mean([o.stats.draft_forwards for o in souts])),
               "target_forwards_per_request": float(np.mean(per_request)),
               "beam_search_target_forwards_per_batch": L,
               "agreement_with_exact_topk": float(np.mean([set(r) == exact_sets[i]
                                                           for i, r in enumerate(items.tolist())])),
               **_quality(items, targets)}
        if mode == "strict":
            row["same_items_as_beam_search"] = int((items == exact_items).all(1).sum())
        methods.append(row)
    results["methods"] = methods
    results["suite"] = "ml-100k"
    return results


def show(res: dict) -> None:
    cfg = res["config"]
    print(f"\nMovieLens-100K: {cfg['users']} test users, {cfg['items']} items, K={cfg['beams']}, "
          f"{cfg['identifier_tokens']}-token semantic IDs; model trained in {cfg['train_seconds']:.0f} s"
          + (" (loaded from the cache)" if cfg["cached"] else ""))
    header = f"{'decoder':<58} {'R@10':>6} {'R@20':>6} {'N@10':>6} {'N@20':>6} {'ms/batch':>9}"
    print(header)
    print("-" * len(header))
    for m in res["methods"]:
        print(f"{m['method']:<58} {m['recall@10']:>6.3f} {m['recall@20']:>6.3f} {m['ndcg@10']:>6.3f} "
              f"{m['ndcg@20']:>6.3f} {m['latency_ms']:>9,.0f}")
    if "alignment" in res:
        a = res["alignment"]
        print(f"  draft alignment: loss {a['loss_before']:.3f} -> {a['loss_after']:.3f}; strict acceptance on "
              f"validation {a['validation_acceptance_before']:.3f} -> {a['validation_acceptance_after']:.3f}")
    for m in res["methods"]:
        notes = {k: v for k, v in m.items() if k not in ("method", "latency_ms") and "@" not in k}
        if notes:
            print(f"  {m['method']}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in notes.items()))
