"""``decoding-bench kv``: KV-cache memory and latency of beam search at long prompts.

Same catalog, prompts (``--prompt-len`` tokens, default 1,024) and model for every method:
transformers' beam search (a prompt KV copy per beam) with a Python trie callback,
``decoding.beam_search`` with a prompt KV per beam, with the shared-prefix cache, and with the
shared cache pruned by each policy of :mod:`decoding.kv`. Columns: latency, peak memory of the
whole search measured in a child process (:mod:`decoding.testing.memory`), prompt KV bytes held
(where the cache reports them), and the top-K agreement with the unpruned shared-cache run.
"""

from __future__ import annotations

import torch

from decoding import BeamSearchOutput, beam_search
from decoding import testing as bm
from decoding.bench._common import catalog_and_model, log, print_methods, timed
from decoding.kv import EarnCut, SnapKV, StreamingLLM
from decoding.testing.baselines import PythonTriePrefixFn, transformers_trie_beam_search
from decoding.testing.memory import peak_memory_bytes, run_job

KEEP = 256  # prompt positions kept by each pruning policy


def policies() -> dict:
    return {
        "StreamingLLM (4 sinks + 252 recent)": StreamingLLM(sink=4, recent=KEEP - 4),
        "SnapKV (window 32, capacity 256)": SnapKV(window=32, capacity=KEEP),
        "EARN cut at layer 2 (first/last 128 as registers)": EarnCut(
            layer=2, registers=tuple(range(KEEP // 2)) + tuple(range(-KEEP // 2, 0))),
    }


def build(args):
    """Catalog, model and prompts, the same in the parent and in the measuring children."""
    V, seqs, trie, model, _ = catalog_and_model(args)
    ids, mask = bm.left_padded_prompts(args.batch, V, args.prompt_len - args.prompt_len // 8, args.prompt_len,
                                       seed=args.seed)
    return seqs, trie, model, ids, mask


def method_calls(args, seqs, trie, model, ids, mask) -> dict:
    K, L = args.beams, args.levels
    prefix_fn = PythonTriePrefixFn(seqs.tolist(), ids.shape[1])
    calls = {
        "transformers beam search (prompt KV per beam)": lambda: transformers_trie_beam_search(
            model, ids, mask, None, num_beams=K, max_new_tokens=L, prefix_fn=prefix_fn),
        "decoding.beam_search, prompt KV per beam": lambda: beam_search(model, ids, mask, trie=trie, num_beams=K,
                                                                        kv_cache="per_beam"),
        "decoding.beam_search, shared prompt KV": lambda: beam_search(model, ids, mask, trie=trie, num_beams=K,
                                                                      kv_cache="shared"),
    }
    for name, policy in policies().items():
        calls[f"shared + {name}"] = (lambda p: lambda: beam_search(model, ids, mask, trie=trie, num_beams=K,
                                                                   kv_policy=p))(policy)
    return calls


def _job(args, name):
    seqs, trie, model, ids, mask = build(args)
    return method_calls(args, seqs, trie, model, ids, mask)[name]


def run(args, device) -> dict:
    log(f"[kv] {args.items:,} items, {args.batch} prompts of ~{args.prompt_len} tokens, K={args.beams}, model "
        f"hidden={args.hidden} layers={args.layers}")
    seqs, trie, model, ids, mask = build(args)
    calls = method_calls(args, seqs, trie, model, ids, mask)
    rows, reference = [], None
    for name, call in calls.items():
        t, runs, out = timed(call, torch.device("cpu"), args.repeats, name)
        log(f"  {name}: peak memory in a child process")
        peak = peak_memory_bytes(run_job, args, name, setup=_job)
        row = {"method": name, "latency_ms": t * 1e3, "runs_ms": [r * 1e3 for r in runs],
               "peak_memory_mb": peak / 2**20}
        ours = isinstance(out, BeamSearchOutput)
        kv = out.kv_bytes if ours else None
        row["prompt_kv_mb"] = None if kv is None else kv["prompt"] / 2**20
        if name == "decoding.beam_search, shared prompt KV":
            reference = out.items
        row["items"] = out.items if ours else None
        rows.append(row)
    base = rows[0]["latency_ms"]
    for row in rows:
        items = row.pop("items")
        row["speedup_vs_baseline"] = base / row["latency_ms"]
        if items is None:
            row["top_k_agreement"] = None
        else:
            same = sum(len(set(a) & set(b)) for a, b in zip(items.tolist(), reference.tolist()))
            row["top_k_agreement"] = same / reference.numel()
    return {"suite": "kv", "config": {k: getattr(args, k) for k in ("items", "batch", "beams", "prompt_len", "hidden",
                                                                     "layers", "heads", "repeats", "seed")}
            | {"kept_positions": KEEP}, "methods": rows}


def show(res: dict) -> None:
    c = res["config"]
    print_methods(f"KV cache at long prompts: {c['batch']} prompts of ~{c['prompt_len']} tokens, K={c['beams']}, "
                  f"{c['items']:,} items, model hidden {c['hidden']} x {c['layers']} layers; "
                  f"policies keep {c['kept_positions']}", res["methods"],
                  [("latency ms", "latency_ms", "{:.1f}"), ("speedup", "speedup_vs_baseline", "{:.2f}x"),
                   ("peak MB", "peak_memory_mb", "{:.1f}"), ("prompt KV MB", "prompt_kv_mb", "{:.1f}"),
                   ("top-K agree", "top_k_agreement", "{:.0%}")])
