"""``decoding-bench workload ml-100k``: the decoders on a trained recommender and real data.

Trains (or loads from ``--cache-dir``) the MovieLens-100K pair of
:mod:`decoding.workloads.movielens`, then decodes every test user's next item (leave-one-out) and
reports, per decoder, Recall@10/20, NDCG@10/20, latency per batch, and where they apply: whether
``decoding.beam_search`` equals transformers' constrained beam search for every user; the
invalid-item rate of transformers' unconstrained beam search; the recall change from excluding the
user's history; D3 with a popularity assistant (its weight chosen on the validation split); each
KV pruning policy keeping 25% of a long prompt (the last ``window_items`` items); speculative
beam search, strict (equality with beam search, acceptance, target and draft forwards per request
and per batch, in static batches and with continuous batching) and relaxed (recall, agreement
with the exact top-K) at γ = 1 and 3.

transformers' two beam searches take most of a run's time and depend only on the cached model,
the prompts, K and transformers' version: their results are cached beside the trained pair
(``--fresh-baselines`` reruns them), and their rows say when they come from the cache.
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


def _same_items(ref_items, ref_scores, items, scores, tol: float = 1e-5) -> tuple[int, int]:
    """Requests whose top-K lists are identical, and those identical up to near-ties: every rank
    where the items differ has scores within ``tol`` (two items whose scores differ by float
    rounding can come in either order, at the boundary of the top-K too)."""
    equal = (ref_items == items).all(1)
    tied = ((ref_items == items) | (np.abs(ref_scores - scores) <= tol)).all(1)
    return int(equal.sum()), int(tied.sum())


def _transformers_baselines(folder, ids, num_beams, batch, run_batch, n, fresh: bool) -> dict:
    """transformers' constrained and unconstrained beam search over every batch: items, the
    constrained scores, median latency per batch. They take minutes and depend only on the
    cached model, the prompts, K and transformers' version, so their results are kept beside the
    trained pair (``folder``) and reused unless ``fresh``; reused results say so."""
    import hashlib

    import transformers

    key = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    path = None if folder is None else os.path.join(
        folder, f"transformers-{transformers.__version__}-k{num_beams}-b{batch}-{key}.npz")
    if path is not None and os.path.isfile(path) and not fresh:
        saved = np.load(path)
        return {name: saved[name] if saved[name].ndim else float(saved[name])
                for name in saved.files} | {"cached": True}
    log("[ml-100k] transformers' constrained beam search (Python trie callback)")
    outs, t_con = _timed_batches(run_batch, n, batch)
    log("[ml-100k] transformers' unconstrained beam search")
    free, t_free = _timed_batches(lambda sl: run_batch(sl, constrained=False), n, batch)
    result = {"constrained": torch.cat([o[0] for o in outs]).numpy(),
              "constrained_scores": torch.cat([o[1] for o in outs]).float().numpy(),
              "unconstrained": torch.cat([o[0] for o in free]).numpy(),
              "constrained_ms": t_con * 1e3, "unconstrained_ms": t_free * 1e3}
    if path is not None:
        np.savez(path, **result)
    return result | {"cached": False}


def _quality(items: np.ndarray, targets: np.ndarray) -> dict:
    from decoding.workloads.metrics import ndcg_at_k, recall_at_k

    return {f"{name}@{k}": fn(items, targets, k) for k in (10, 20)
            for name, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))}


def run(args, device) -> dict:
    from decoding import beam_search, speculative_beam_search
    from decoding.testing.baselines import transformers_trie_beam_search
    from decoding.workloads.datasets import movielens_100k
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

    def ours(sl, prompts=(ids, mask), **kw):
        return beam_search(target, prompts[0][sl], prompts[1][sl], trie=trie, num_beams=K, **kw)

    outs, t_ours = _timed_batches(ours, n, B)
    exact_items = torch.cat([o.items for o in outs]).numpy()
    exact_scores = torch.cat([o.scores for o in outs]).numpy()
    methods = [{"method": "decoding.beam_search", "latency_ms": t_ours * 1e3, **_quality(exact_items, targets)}]

    def hf(sl, constrained=True):
        width = ids.shape[1]
        gen = transformers_trie_beam_search(target, ids[sl], mask[sl], seqs, num_beams=K, max_new_tokens=L,
                                            **({} if constrained else {"prefix_allowed_tokens_fn": None}))
        rows = gen.sequences[:, width: width + L]
        return trie.lookup(rows).reshape(-1, K), gen.sequences_scores.reshape(-1, K)

    baselines = _transformers_baselines(pair.folder, ids, K, B, hf, n, fresh=args.fresh_baselines)
    hf_items = baselines["constrained"]
    same, near = _same_items(exact_items, exact_scores, hf_items, baselines["constrained_scores"])
    cached_note = {"cached_from_an_earlier_run": True} if baselines["cached"] else {}
    methods.append({"method": "transformers beam search + Python trie", "latency_ms": baselines["constrained_ms"],
                    "same_items_as_beam_search": same, "same_up_to_near_ties": near, **cached_note,
                    **_quality(hf_items, targets)})
    free_items = baselines["unconstrained"]
    methods.append({"method": "transformers beam search, unconstrained", "latency_ms": baselines["unconstrained_ms"],
                    "invalid_item_rate": float((free_items < 0).mean()), **cached_note,
                    **_quality(free_items, targets)})

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

    # KV pruning on long prompts: each user's last window_items items (the longest prompt the model
    # was trained on; the whole history for users with no more), pruned to 25% of the prompt width
    from decoding.kv import EarnCut, SnapKV, StreamingLLM

    long_ids, long_mask = prompts_for(inputs, sids, recipe.window_items)
    whole = float(np.mean([len(h) <= recipe.window_items for h in inputs]))
    label = f"last {recipe.window_items} items (whole history for {whole:.0%} of users)"
    log(f"[ml-100k] long prompts: {label}")
    long_outs, t_long = _timed_batches(lambda sl: ours(sl, (long_ids, long_mask)), n, B)
    long_items = torch.cat([o.items for o in long_outs]).numpy()
    methods.append({"method": f"decoding.beam_search, {label}", "latency_ms": t_long * 1e3,
                    "prompt_positions": int(long_ids.shape[1]), **_quality(long_items, targets)})
    keep = long_ids.shape[1] // 4
    real = long_mask.sum(1).float()
    policies = {f"StreamingLLM (4 sinks + {keep - 4} recent)": StreamingLLM(sink=4, recent=keep - 4),
                f"SnapKV (window 8, capacity {keep})": SnapKV(window=8, capacity=keep),
                f"EARN cut at layer 1 (first 4 + last {keep - 4} as registers)": EarnCut(
                    layer=1, registers=tuple(range(4)) + tuple(range(-(keep - 4), 0)))}
    for name, policy in policies.items():
        log(f"[ml-100k] KV pruning: {name}")
        pruned, t_kv = _timed_batches(lambda sl, policy=policy: ours(sl, (long_ids, long_mask), kv_policy=policy),
                                      n, B)
        items = torch.cat([o.items for o in pruned]).numpy()
        methods.append({"method": f"KV 25% of the long prompt: {name}", "latency_ms": t_kv * 1e3,
                        "prompt_positions_kept": keep, "prompt_positions": int(long_ids.shape[1]),
                        "mean_fraction_of_own_prompt_kept": float((keep / real).clamp(max=1.0).mean()),
                        "agreement_with_unpruned_topk": float(np.mean([set(r) == set(e) for r, e in
                                                                       zip(items.tolist(), long_items.tolist())])),
                        **_quality(items, targets)})

    exact_sets = [set(r) for r in exact_items.tolist()]
    log("[ml-100k] aligning a copy of the draft on the target's beams (strict loss)")
    aligned, alignment = aligned_draft(pair, num_beams=K, cache_dir=cache, log=log)
    results["alignment"] = alignment
    # static batches (a batch runs until its slowest request finishes), then continuous batching
    # (finished requests retire, waiting ones take their slots: max_batch_size=B over all users)
    runs = [(mode, gamma, draft, False) for mode in ("strict", "relaxed") for gamma in (1, 3)]
    runs += [("strict", gamma, aligned, False) for gamma in (1, 3)]
    runs += [("strict", 1, draft, True), ("strict", 3, draft, True), ("strict", 3, aligned, True)]
    for mode, gamma, drafter, continuous in runs:
        name = (f"speculative {mode}, gamma={gamma}" + (", aligned draft" if drafter is aligned else "")
                + (f", continuous batching ({B} in flight)" if continuous else ""))
        log(f"[ml-100k] {name}")

        def spec(sl, mode=mode, gamma=gamma, drafter=drafter, continuous=continuous):
            return speculative_beam_search(target, drafter, ids[sl], mask[sl], trie=trie, num_beams=K,
                                           num_drafts=2 * K, draft_steps=gamma, mode=mode, seed=args.seed,
                                           max_batch_size=B if continuous else None)

        if continuous:  # one call over every user; latency and forwards per B requests
            t0 = time.perf_counter()
            souts = [spec(slice(0, n))]
            t_spec = (time.perf_counter() - t0) * B / n
            batches = n / B
        else:
            souts, t_spec = _timed_batches(spec, n, B)
            batches = len(souts)
        items = torch.cat([o.items for o in souts]).numpy()
        scores = torch.cat([o.scores for o in souts]).numpy()
        per_request = [1 + sum(1 for r in o.stats.accepted_levels if r[b] >= 0)
                       for o in souts for b in range(o.items.shape[0])]
        drafted = sum(d for o in souts for r in o.stats.drafted_levels for d in r if d > 0)
        accepted = sum(a for o in souts for r in o.stats.accepted_levels for a in r if a > 0)
        row = {"method": name, "latency_ms": t_spec * 1e3,
               "acceptance_rate": accepted / drafted if drafted else 0.0,
               "target_forwards_per_batch": sum(o.stats.target_forwards for o in souts) / batches,
               "draft_forwards_per_batch": sum(o.stats.draft_forwards for o in souts) / batches,
               "target_forwards_per_request": float(np.mean(per_request)),
               "beam_search_target_forwards_per_batch": L,
               "agreement_with_exact_topk": float(np.mean([set(r) == exact_sets[i]
                                                           for i, r in enumerate(items.tolist())])),
               **_quality(items, targets)}
        if continuous:
            row["prefills_per_batch"] = souts[0].stats.admissions / batches
        if mode == "strict":
            row["same_items_as_beam_search"], row["same_up_to_near_ties"] = _same_items(
                exact_items, exact_scores, items, scores)
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
