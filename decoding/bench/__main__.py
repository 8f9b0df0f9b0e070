"""``decoding-bench``: the package's decoders against what users run today, on the same inputs.

With no arguments: a synthetic catalog of 100,000 semantic IDs (4 levels x 256 codes), a small
random Llama-style model built locally, 16 left-padded prompts, 20 beams; ``decoding.beam_search``
against transformers' beam search with a Python dict-trie ``prefix_allowed_tokens_fn`` (how
LC-Rec / MiniOneRec decode). Prints a table, writes ``results.json`` and ``results.png``.

Suites (``--suite``): ``e2e`` (default), ``step`` (``trie_beam_step`` backends against the torch
reference), ``build`` (ItemTrie build time), ``all``. Every ratio compares against a baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from decoding import ItemTrie, beam_search
from decoding.bench import models as bm
from decoding.bench.baselines import PythonTriePrefixFn, transformers_trie_beam_search


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, label: str):
    """Median wall time of ``repeats`` runs after one warm-up run; returns (median_s, runs, last)."""
    log(f"  {label}: warm-up")
    out = fn()
    runs = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
        log(f"  {label}: run {i + 1}/{repeats} {runs[-1] * 1e3:.1f} ms")
    return statistics.median(runs), runs, out


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


# ---------------------------------------------------------------------------- e2e
def run_e2e(args, device) -> dict:
    V = bm.sid_vocab_size(args.levels, args.codes)
    log(f"[e2e] catalog: {args.items:,} semantic IDs ({args.levels} levels x {args.codes} codes)")
    seqs = bm.random_semantic_ids(args.items, args.levels, args.codes, seed=args.seed)
    t0 = time.perf_counter()
    trie = ItemTrie.from_sequences(seqs, vocab_size=V).to(device)
    build_s = time.perf_counter() - t0
    catalog = {tuple(int(x) for x in row) for row in seqs.tolist()}
    log(f"[e2e] ItemTrie built in {build_s:.2f} s; model: Llama-style hidden={args.hidden} layers={args.layers}")
    model = bm.tiny_llama(V, hidden_size=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed,
                          intermediate_size=4 * args.hidden).to(device)
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


METHOD_COLUMNS = [("latency ms", "latency_ms", "{:.1f}"), ("req/s", "requests_per_s", "{:.1f}"),
                  ("speedup", "speedup_vs_baseline", "{:.1f}x"), ("invalid items", "invalid_item_rate", "{:.1%}")]


def print_methods(title: str, methods: list[dict], columns=METHOD_COLUMNS) -> None:
    """One row per method: the name, then each (header, key, format) column right-aligned."""
    name_width = max(len(m["method"]) for m in methods) + 2
    widths = [max(len(h), 8) + 2 for h, _, _ in columns]
    header = f"{'method':<{name_width}}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths))
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for m in methods:
        cells = "".join(f"{fmt.format(m[key]):>{w}}" for (_, key, fmt), w in zip(columns, widths))
        print(f"{m['method']:<{name_width}}{cells}")


def print_e2e(res: dict) -> None:
    cfg = res["config"]
    print_methods(f"End-to-end constrained beam search: {cfg['items']:,} items, batch {cfg['batch']}, "
                  f"{cfg['beams']} beams, prompts <= {cfg['prompt_len']} tokens", res["methods"])
    a = res["agreement"]
    print(f"agreement with the baseline: identical item sets for {a['same_item_sets']:.0%} of requests, "
          f"max score difference {a['max_score_diff']:.2e}")


# ---------------------------------------------------------------------------- step
def run_step(args, device) -> dict:
    from decoding.ops import available_backends, trie_beam_step

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


def print_step(res: dict) -> None:
    cfg = res["config"]
    print(f"\ntrie_beam_step, batch {cfg['batch']} x {cfg['beams']} beams, vocab {cfg['vocab']}, "
          f"{cfg['items']:,} items (ratio = torch reference / backend, same run)")
    for row in res["levels"]:
        ref = row["torch_ms"]
        parts = [f"{k[:-3]} {v:.3f} ms ({ref / v:.1f}x)" for k, v in row.items() if k.endswith("_ms")]
        print(f"  level {row['level']} (<= {row['max_children']} children): " + ", ".join(parts))


# ---------------------------------------------------------------------------- build
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


def print_build(res: dict) -> None:
    print("\nItemTrie build (C++, single file layout)")
    for r in res["sizes"]:
        print(f"  {r['items']:>12,} x {r['levels']}: {r['seconds']:.2f} s, {r['nodes']:,} nodes, {r['mbytes']:.0f} MiB")


# ---------------------------------------------------------------------------- output
def write_chart(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in results if r["suite"] in ("e2e", "vllm", "speculative")]
    step = [r for r in results if r["suite"] == "step"]
    panels = len(e2e) + len(step)
    if panels == 0:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax_iter = iter(axes[0])
    for r in e2e:
        ax = next(ax_iter)
        names = [m["method"].replace(" + ", "\n+ ").replace(", ", "\n").replace("integrations.", "integrations\n.")
                 for m in r["methods"]]
        lat = [m["latency_ms"] for m in r["methods"]]
        colors = ["tab:green" if m["method"].startswith("decoding") else "tab:gray" for m in r["methods"]]
        bars = ax.bar(names, lat, color=colors)
        ax.tick_params(axis="x", labelsize=8)
        for bar, m in zip(bars, r["methods"]):
            ax.annotate(f"{m['latency_ms']:.0f} ms\n{m['speedup_vs_baseline']:.1f}x", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, max(lat) * 1.25)  # room for the labels
        c = r["config"]
        engine = {"vllm": "vLLM", "speculative": "speculative"}.get(r["suite"], "transformers")
        ax.set_title(f"{engine} beam search, {c['items']:,} items, B={c['batch']}, K={c['beams']}")
        ax.set_ylabel("latency per batch (ms)")
    for r in step:
        ax = next(ax_iter)
        backends = [k[:-3] for k in r["levels"][0] if k.endswith("_ms")]
        x = np.arange(len(r["levels"]))
        for i, be in enumerate(backends):
            ax.bar(x + i * 0.8 / len(backends), [row[be + "_ms"] for row in r["levels"]], 0.8 / len(backends), label=be)
        ax.set_xticks(x + 0.4 - 0.4 / len(backends), [f"level {row['level']}" for row in r["levels"]])
        ax.set_ylabel("ms per step")
        ax.set_title("trie_beam_step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decoding-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=["e2e", "step", "build", "all"], default="e2e")
    p.add_argument("--items", type=int, default=100_000, help="catalog size")
    p.add_argument("--levels", type=int, default=4, help="semantic ID length")
    p.add_argument("--codes", type=int, default=256, help="codes per level")
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="e2e suite: compare on transformers (default) or on a vLLM engine (needs the vllm extra)")
    p.add_argument("--decoder", choices=["beam", "speculative", "setid"], default="beam",
                   help="e2e suite: trie beam search vs baselines, speculative vs target-only beam search, or "
                        "set-identifier whole-catalog scoring (SETRec, RPG) vs materialise + topk and beam search")
    p.add_argument("--kv", action="store_true",
                   help="KV-cache memory and latency at long prompts: transformers vs shared prompt KV vs pruning "
                        "(use with --prompt-len 1024)")
    p.add_argument("--catalog-sizes", default="1000000,10000000",
                   help="setid: comma-separated catalog sizes")
    p.add_argument("--drafts", type=int, default=None, help="speculative: drafted beams N (default 2K)")
    p.add_argument("--draft-steps", type=int, default=3, help="speculative: drafted levels per round (gamma)")
    p.add_argument("--draft-layers", type=int, default=1, help="speculative: the draft keeps the target's first layers")
    p.add_argument("--align-steps", type=int, default=30, help="speculative: draft alignment steps")
    p.add_argument("--batch", type=int, default=None, help="requests per batch (default 16; 64 with --engine vllm)")
    p.add_argument("--beams", type=int, default=20, help="beams = items returned per request")
    p.add_argument("--prompt-len", type=int, default=128, help="longest prompt (others are shorter, left-padded)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size")
    p.add_argument("--layers", type=int, default=4, help="model layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--build-sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="folder for results.json and results.png")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.engine == "vllm" else 16
    if args.engine == "vllm" and args.device != "cpu" and args.suite in ("e2e", "all"):
        p.error("--engine vllm runs the CPU build of vLLM here; pass --device cpu")
    for name in ("items", "levels", "codes", "batch", "beams", "prompt_len", "hidden", "layers", "heads", "repeats",
                 "step_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.beams > args.items:
        p.error("--beams must not exceed --items")
    if args.decoder == "speculative":
        if args.engine != "transformers":
            p.error("--decoder speculative runs on transformers models (--engine transformers)")
        if args.drafts is not None and args.drafts < args.beams:
            p.error("--drafts must be at least --beams")
        if args.draft_steps < 1 or args.align_steps < 0 or not 1 <= args.draft_layers <= args.layers:
            p.error("--draft-steps must be positive, --align-steps non-negative, --draft-layers in 1..--layers")
    if args.kv and (args.decoder != "beam" or args.engine != "transformers"):
        p.error("--kv runs trie beam search on transformers models (no --decoder, no --engine vllm)")
    if args.kv and args.prompt_len <= 256 + 32:
        p.error("--kv needs --prompt-len above 288 (the pruning policies keep 256 positions, SnapKV's window is 32)")
    if args.decoder == "setid":
        if args.engine != "transformers":
            p.error("--decoder setid runs on transformers models (--engine transformers)")
        try:
            sizes = [int(x) for x in args.catalog_sizes.split(",")]
        except ValueError:
            p.error("--catalog-sizes must be comma-separated integers")
        if not sizes or min(sizes) < args.beams:
            p.error("--catalog-sizes must each be at least --beams")
    if args.prompt_len < 2:
        p.error("--prompt-len must be at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decoding-bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    suites = ["e2e", "step", "build"] if args.suite == "all" else [args.suite]
    results = []
    runners = {"e2e": (run_e2e, print_e2e), "step": (run_step, print_step), "build": (run_build, print_build)}
    if args.decoder == "speculative":
        from decoding.bench.speculative_bench import print_speculative, run_speculative

        runners["e2e"] = (lambda a, d: run_speculative(a, d, timed, log), print_speculative)
    if args.kv:
        from decoding.bench.kv_bench import print_kv, run_kv

        runners["e2e"] = (lambda a, d: run_kv(a, d, timed, log), print_kv)
    if args.decoder == "setid":
        from decoding.bench.setid_bench import print_setid, run_setid

        runners["e2e"] = (lambda a, d: run_setid(a, d, timed, log), print_setid)
    if args.engine == "vllm":
        from decoding.bench.vllm_bench import print_vllm, run_vllm

        runners["e2e"] = (lambda a, d: run_vllm(a, timed, log), print_vllm)
    for i, suite in enumerate(suites, 1):
        log(f"[{i}/{len(suites)}] suite {suite}")
        run, show = runners[suite]
        res = run(args, device)
        show(res)
        results.append(res)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump({"environment": environment(device), "results": results}, f, indent=2)
    chart = os.path.join(args.out, "results.png")
    write_chart(results, chart)
    print(f"\nwrote {json_path}" + (f" and {chart}" if os.path.exists(chart) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
