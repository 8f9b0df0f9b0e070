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

import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from decoding.bench._common import log

D3_WEIGHTS = (0.0, 0.1, 0.3, 0.5)  # 0: plain beam search, so validation can also choose no assistant
METRICS = tuple(f"{name}@{k}" for k in (10, 20) for name in ("recall", "ndcg"))


def _batches(n: int, size: int):
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _timed_batches(fn, n: int, size: int):
    """``fn(slice)`` over all batches: (outputs, mean seconds per batch of ``size`` requests: the
    one latency statistic of every row, continuous batching's included)."""
    outs = []
    t0 = time.perf_counter()
    for sl in _batches(n, size):
        outs.append(fn(sl))
    return outs, (time.perf_counter() - t0) * size / n


def _same_items(ref_items, ref_scores, items, scores, tol: float = 1e-5) -> tuple[int, int]:
    """Requests whose top-K lists are identical, and those identical up to near-ties: every rank
    where the items differ has scores within ``tol`` (two items whose scores differ by float
    rounding can come in either order, at the boundary of the top-K too)."""
    equal = (ref_items == items).all(1)
    tied = ((ref_items == items) | (np.abs(ref_scores - scores) <= tol)).all(1)
    return int(equal.sum()), int(tied.sum())


def _transformers_baselines(folder, ids, num_beams, batch, run_batch, n, fresh: bool, weights: str) -> dict:
    """transformers' constrained and unconstrained beam search over every batch: items, the
    constrained scores, mean latency per batch. They take minutes and depend only on the model's
    weights, the prompts, K, the batch and transformers' version, so their results are kept
    beside the trained pair (``folder``) under a key of all of these and reused unless
    ``fresh``; reused results say so. A cache entry like the pair's (written atomically, checked
against its manifest, rebuilt when it does not match)."""
    import hashlib

    import transformers

    from decoding.workloads.movielens import read_entry, write_entry

    key = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    entry = None if folder is None else os.path.join(
        folder, f"transformers-{transformers.__version__}-w{weights}-k{num_beams}-b{batch}-{key}")
    if entry is not None and not fresh and read_entry(entry, log) is not None:
        with np.load(os.path.join(entry, "baselines.npz")) as saved:
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
    if entry is not None:
        write_entry(entry, lambda tmp: np.savez(os.path.join(tmp, "baselines.npz"), **result), {})
    return result | {"cached": False}


def _per_user(items: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Each of :data:`METRICS` per user, float ``[users]``."""
    from decoding.workloads.metrics import ndcg_per_user, recall_per_user

    return {f"{metric}@{k}": fn(items, targets, k) for k in (10, 20)
            for metric, fn in (("recall", recall_per_user), ("ndcg", ndcg_per_user))}


class _Quality:
    """Recall and NDCG@10/20 of each decoder on the test users, with 95% bootstrap intervals over
    users, and each option's paired difference from plain beam search (the same users
    resampled for both)."""

    def __init__(self, targets: np.ndarray):
        self.targets = targets
        self.per_user: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, name: str, items: np.ndarray, baseline: str | None = None) -> dict:
        from decoding.workloads.metrics import bootstrap_interval, paired_difference

        per_user = _per_user(items, self.targets)
        self.per_user[name] = per_user
        row = {}
        for metric, values in per_user.items():
            row[metric] = float(values.mean())
            row[f"{metric}_ci95"] = list(bootstrap_interval(values))
        if baseline is not None and baseline != name:
            row["vs_beam_search"] = {metric: paired_difference(per_user[metric], self.per_user[baseline][metric])
                                     for metric in ("recall@20", "ndcg@20")}
        return row


SEED_ROWS = ("decoding.beam_search", "decoding.beam_search, history excluded")


def _seed_rows(recipe, data_all, seeds: int, cache, K: int, B: int, main_methods: list[dict]) -> dict:
    """The main rows (:data:`SEED_ROWS`) for ``seeds`` training seeds, the first being the main
    run's (its figures are taken from ``main_methods``; the others train a target each): each
    metric's values, mean and standard deviation."""
    from decoding import beam_search
    from decoding.workloads.movielens import load_or_train, prompts_for, seeds_of

    by_name = {m["method"]: m for m in main_methods}
    rows = {label: {metric: [by_name[label][metric]] for metric in METRICS} for label in SEED_ROWS}
    for r in seeds_of(recipe, seeds)[1:]:
        pair = load_or_train(data_all, r, cache_dir=cache, log=log, with_draft=False)
        inputs, targets = pair.data.split("test")
        ids, mask = prompts_for(inputs, pair.sids, r.max_items)
        history = [list(map(int, h)) for h in inputs]
        for label, exclude in zip(SEED_ROWS, (False, True)):
            outs, _ = _timed_batches(lambda sl, exclude=exclude: beam_search(
                pair.target, ids[sl], mask[sl], trie=pair.trie, num_beams=K,
                exclude_items=history[sl] if exclude else None), len(targets), B)
            for metric, values in _per_user(torch.cat([o.items for o in outs]).numpy(), targets).items():
                rows[label][metric].append(float(values.mean()))
    return {"seeds": [r.seed for r in seeds_of(recipe, seeds)],
            "rows": {label: {metric: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))
                                      if len(v) > 1 else 0.0} for metric, v in metrics.items()}
                     for label, metrics in rows.items()}}


def run(args, device) -> dict:
    from decoding import beam_search, speculative_beam_search
    from decoding.testing.baselines import transformers_trie_beam_search
    from decoding.workloads.datasets import movielens_100k
    from decoding.workloads.movielens import RECIPES, aligned_draft, load_or_train, prompts_for, weights_fingerprint

    cache = None if args.cache_dir == "none" else os.path.expanduser(args.cache_dir)
    recipe = replace(RECIPES[args.recipe], max_users=args.max_users,
                     **({"epochs": args.train_epochs, "draft_epochs": args.train_epochs}
                        if args.train_epochs is not None else {}))
    try:
        data_all = movielens_100k()
    except FileNotFoundError as exc:  # one line, no traceback: what to install
        print(f"decoding-bench workload: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    t0 = time.perf_counter()
    pair = load_or_train(data_all, recipe, cache_dir=cache, log=log)
    setup_s = time.perf_counter() - t0
    if args.export:
        return export(pair, args.export)
    data, trie, sids, target, draft = pair.data, pair.trie, pair.sids, pair.target, pair.draft
    K, B, L = args.beams, args.batch, trie.depth
    seqs = sids.tokens.tolist()

    def split(which):
        inputs, targets = data.split(which)
        ids, mask = prompts_for(inputs, sids, recipe.max_items)
        return inputs, targets, ids, mask

    results = {"config": {"users": data.num_users, "items": data.num_items, "beams": K, "batch": B,
                          "identifier_tokens": L, "recipe_name": args.recipe, "recipe": recipe.__dict__,
                          "parameters": sum(p.numel() for p in target.parameters()),
                          "cached": pair.loaded_from_cache, "train_seconds": pair.train_seconds,
                          "setup_seconds": setup_s, "latency": f"mean ms per batch of {B} requests",
                          "intervals": "95% bootstrap over test users (2,000 resamples); vs_beam_search: the "
                                       "paired difference from decoding.beam_search and its interval"}}
    inputs, targets, ids, mask = split("test")
    n = len(targets)
    quality = _Quality(targets)
    BASE = "decoding.beam_search"
    log(f"[ml-100k] {n} test users, K={K}, {L}-token identifiers, batches of {B}")

    def ours(sl, prompts=(ids, mask), **kw):
        return beam_search(target, prompts[0][sl], prompts[1][sl], trie=trie, num_beams=K, **kw)

    outs, t_ours = _timed_batches(ours, n, B)
    exact_items = torch.cat([o.items for o in outs]).numpy()
    exact_scores = torch.cat([o.scores for o in outs]).numpy()
    methods = [{"method": BASE, "latency_ms": t_ours * 1e3, **quality(BASE, exact_items)}]

    def hf(sl, constrained=True):
        width = ids.shape[1]
        gen = transformers_trie_beam_search(target, ids[sl], mask[sl], seqs, num_beams=K, max_new_tokens=L,
                                            **({} if constrained else {"prefix_allowed_tokens_fn": None}))
        rows = gen.sequences[:, width: width + L]
        return trie.lookup(rows).reshape(-1, K), gen.sequences_scores.reshape(-1, K)

    baselines = _transformers_baselines(pair.folder, ids, K, B, hf, n, fresh=args.fresh_baselines,
                                        weights=weights_fingerprint(target))
    hf_items = baselines["constrained"]
    same, near = _same_items(exact_items, exact_scores, hf_items, baselines["constrained_scores"])
    cached_note = {"cached_from_an_earlier_run": True} if baselines["cached"] else {}
    methods.append({"method": "transformers beam search + Python trie", "latency_ms": baselines["constrained_ms"],
                    "same_items_as_beam_search": same, "same_up_to_near_ties": near, **cached_note,
                    **quality("transformers beam search + Python trie", hf_items, BASE)})
    free_items = baselines["unconstrained"]
    methods.append({"method": "transformers beam search, unconstrained", "latency_ms": baselines["unconstrained_ms"],
                    "invalid_item_rate": float((free_items < 0).mean()), **cached_note,
                    **quality("transformers beam search, unconstrained", free_items, BASE)})

    log("[ml-100k] excluding each user's history")
    history = [list(map(int, h)) for h in inputs]
    excl, t_excl = _timed_batches(lambda sl: ours(sl, exclude_items=history[sl]), n, B)
    name = "decoding.beam_search, history excluded"
    methods.append({"method": name, "latency_ms": t_excl * 1e3,
                    **quality(name, torch.cat([o.items for o in excl]).numpy(), BASE)})

    # D3: a popularity assistant (training interactions), its weight chosen on validation
    counts = np.bincount(np.concatenate(data.train_sequences), minlength=trie.num_ids).astype(np.float64) + 1.0
    popularity = torch.from_numpy(np.log(counts / counts.sum())).float()
    _, v_targets, v_ids, v_mask = split("valid")

    from decoding.workloads.metrics import recall_at_k

    def d3(prompts, masks, sl, weight):
        if weight == 0:
            return beam_search(target, prompts[sl], masks[sl], trie=trie, num_beams=K)
        lp = popularity.expand(prompts[sl].shape[0], -1)
        return beam_search(target, prompts[sl], masks[sl], trie=trie, num_beams=K, assistant_logprobs=lp,
                           assistant_weight=weight)

    valid_recall = {}
    for w in D3_WEIGHTS:
        vouts, _ = _timed_batches(lambda sl, w=w: d3(v_ids, v_mask, sl, w), len(v_targets), B)
        valid_recall[w] = recall_at_k(torch.cat([o.items for o in vouts]).numpy(), v_targets, 20)
    best = max(D3_WEIGHTS, key=lambda w: (valid_recall[w], -w))  # a tie: the smaller weight
    d3_outs, t_d3 = _timed_batches(lambda sl: d3(ids, mask, sl, best), n, B)
    name = (f"D3, popularity assistant, weight {best} (chosen on validation)" if best else
            "D3, popularity assistant: validation chose weight 0 (plain beam search)")
    methods.append({"method": name, "latency_ms": t_d3 * 1e3, "weight": best,
                    "validation_recall20_by_weight": {str(w): r for w, r in valid_recall.items()},
                    **quality(name, torch.cat([o.items for o in d3_outs]).numpy(), BASE)})

    # KV pruning on long prompts: each user's last window_items items (the longest prompt the model
    # was trained on; the whole history for users with no more), pruned to 25% of the prompt width
    from decoding.kv import EarnCut, SnapKV, StreamingLLM

    long_ids, long_mask = prompts_for(inputs, sids, recipe.window_items)
    whole = float(np.mean([len(h) <= recipe.window_items for h in inputs]))
    label = f"last {recipe.window_items} items (whole history for {whole:.0%} of users)"
    log(f"[ml-100k] long prompts: {label}")
    long_outs, t_long = _timed_batches(lambda sl: ours(sl, (long_ids, long_mask)), n, B)
    long_items = torch.cat([o.items for o in long_outs]).numpy()
    name = f"decoding.beam_search, {label}"
    methods.append({"method": name, "latency_ms": t_long * 1e3,
                    "prompt_positions": int(long_ids.shape[1]), **quality(name, long_items, BASE)})
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
        row_name = f"KV 25% of the long prompt: {name}"
        methods.append({"method": row_name, "latency_ms": t_kv * 1e3,
                        "prompt_positions_kept": keep, "prompt_positions": int(long_ids.shape[1]),
                        "mean_fraction_of_own_prompt_kept": float((keep / real).clamp(max=1.0).mean()),
                        "agreement_with_unpruned_topk": float(np.mean([set(r) == set(e) for r, e in
                                                                       zip(items.tolist(), long_items.tolist())])),
                        **quality(row_name, items, BASE)})

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
            souts, t_spec = _timed_batches(spec, n, n)
            t_spec *= B / n
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
               **quality(name, items, BASE)}
        if continuous:
            row["prefills_per_batch"] = souts[0].stats.admissions / batches
        if mode == "strict":
            row["same_items_as_beam_search"], row["same_up_to_near_ties"] = _same_items(
                exact_items, exact_scores, items, scores)
        methods.append(row)
    results["methods"] = methods
    if args.seeds > 1:
        log(f"[ml-100k] the main rows for {args.seeds} training seeds")
        results["seeds"] = _seed_rows(recipe, data_all, args.seeds, cache, K, B, methods)
    results["suite"] = "ml-100k"
    return results


CATALOG = "movies"


def export(pair, folder: str) -> dict:
    """The trained pair as a directory ``decoding-serve DIR`` serves: the target, its draft, the
    ``movies`` catalog with each movie's title and year, and the prompt the model was trained on
    (BOS, then the identifiers of a user's last ``max_items`` movies) for requests that give a
    ``history``."""
    from decoding.serving.decoders import HistoryPrompt
    from decoding.serving.directory import write_server_directory
    from decoding.workloads.movielens import BOS

    data = pair.data
    titles = [f"{title} ({year})" if year > 0 else title for title, year in zip(data.titles, data.years.tolist())]
    folder = os.path.abspath(os.path.expanduser(folder))
    write_server_directory(folder, model=pair.target, draft=pair.draft, catalogs={CATALOG: pair.trie},
                           titles={CATALOG: titles},
                           history_prompts={CATALOG: HistoryPrompt((BOS,), pair.recipe.max_items)},
                           served_model_name=data.name)
    log(f"[ml-100k] exported to {folder}: serve it with `decoding-serve {folder}`")
    history = [int(i) for i in data.histories[0][-5:]]
    return {"suite": "ml-100k-export", "export": {"directory": folder, "catalog": CATALOG, "items": data.num_items,
                                           "example_history": history,
                                           "example_titles": [titles[i] for i in history]}}


def show(res: dict) -> None:
    if "export" in res:
        e = res["export"]
        body = json.dumps({"catalog": e["catalog"], "history": e["example_history"], "k": 5})
        print(f"\nExported MovieLens-100K's recommender ({e['items']} movies) to {e['directory']}.\n"
              f"Serve it:   decoding-serve {e['directory']}\n"
              f"Ask it (a user who watched {', '.join(e['example_titles'])}):\n"
              f"  curl -s localhost:8000/v1/recommendations -H 'Content-Type: application/json' -d '{body}'")
        return
    cfg = res["config"]
    print(f"\nMovieLens-100K, recipe {cfg.get('recipe_name', 'default')} ({cfg.get('parameters', 0):,} parameters): "
          f"{cfg['users']} test users, {cfg['items']} items, K={cfg['beams']}, {cfg['identifier_tokens']}-token "
          f"semantic IDs; model trained in {cfg['train_seconds']:.0f} s"
          + (" (loaded from the cache)" if cfg["cached"] else ""))
    print("R@20 and N@20 with 95% bootstrap intervals over users; diff: the paired difference of R@20 from "
          "decoding.beam_search (* where its interval excludes 0); ms: mean per batch")
    header = f"{'decoder':<62} {'R@10':>6} {'R@20':>18} {'N@20':>18} {'R@20 diff':>18} {'ms/batch':>9}"
    print(header)
    print("-" * len(header))

    def ci(m, key):
        lo, hi = m[f"{key}_ci95"]
        return f"{m[key]:.3f} [{lo:.3f},{hi:.3f}]"

    for m in res["methods"]:
        diff = m.get("vs_beam_search", {}).get("recall@20")
        dtext = "" if diff is None else (f"{diff['difference']:+.3f}{'*' if diff['measurable'] else ' '}"
                                         f"[{diff['interval'][0]:+.2f},{diff['interval'][1]:+.2f}]")
        print(f"{m['method'][:62]:<62} {m['recall@10']:>6.3f} {ci(m, 'recall@20'):>18} {ci(m, 'ndcg@20'):>18} "
              f"{dtext:>18} {m['latency_ms']:>9,.0f}")
    if "alignment" in res:
        a = res["alignment"]
        print(f"  draft alignment: loss {a['loss_before']:.3f} -> {a['loss_after']:.3f}; strict acceptance on "
              f"validation {a['validation_acceptance_before']:.3f} -> {a['validation_acceptance_after']:.3f}")
    skip = ("method", "latency_ms", "vs_beam_search")
    for m in res["methods"]:
        notes = {k: v for k, v in m.items() if k not in skip and "@" not in k}
        if notes:
            print(f"  {m['method']}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in notes.items()))
    if "seeds" in res:
        seeds = res["seeds"]
        print(f"  training seeds {seeds['seeds']} (mean +/- standard deviation over seeds):")
        for label, metrics in seeds["rows"].items():
            print(f"    {label}: " + ", ".join(f"{k} {v['mean']:.3f} +/- {v['std']:.3f}" for k, v in metrics.items()))
