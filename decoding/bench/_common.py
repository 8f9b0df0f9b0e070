"""What every ``decoding-bench`` suite shares: progress logging, timing, the environment record,
the method table and the chart, and the synthetic catalog and model most suites run on."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

from decoding import ItemTrie
from decoding import testing as bm


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


def alternated(plan, device, repeats: int) -> dict:
    """Each ``(label, fn)`` of ``plan`` timed in turn, round by round: a warm-up round, then
    ``repeats`` timed rounds, so that a machine that speeds up or slows down during the run weighs
    on every method alike. Returns ``{label: (median_s, runs_s, last output)}`` and, under
    ``"paired"``, ``{label: median over rounds of the first method's time / this one's}``."""
    runs = {label: [] for label, _ in plan}
    outputs = {}
    for round_ in range(repeats + 1):
        for label, fn in plan:
            sync(device)
            t0 = time.perf_counter()
            outputs[label] = fn()
            sync(device)
            wall = time.perf_counter() - t0
            log(f"  {label}: {'warm-up' if round_ == 0 else f'run {round_}/{repeats}'} {wall * 1e3:,.1f} ms")
            if round_:
                runs[label].append(wall)
    base = runs[plan[0][0]]
    out = {label: (statistics.median(r), r, outputs[label]) for label, r in runs.items()}
    out["paired"] = {label: statistics.median(paired_speedups(base, r)) for label, r in runs.items()}
    return out


def paired_speedups(base_runs, runs) -> list[float]:
    """Each round's baseline time over the method's time in the same round (rounds in order)."""
    return [b / t for b, t in zip(base_runs, runs)]


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


class Setup(NamedTuple):
    vocab_size: int
    seqs: np.ndarray  # [N, L] the catalog's identifiers
    trie: ItemTrie
    model: torch.nn.Module
    trie_build_s: float


def catalog_and_model(args) -> Setup:
    """The suites' shared setup, on CPU: ``args.items`` random semantic IDs, their trie (build
    time measured) and a Llama-style model of ``args``' size."""
    V = bm.sid_vocab_size(args.levels, args.codes) + getattr(args, "text_vocab", 0)
    seqs = bm.random_semantic_ids(args.items, args.levels, args.codes, seed=args.seed)
    t0 = time.perf_counter()
    trie = ItemTrie.from_sequences(seqs, vocab_size=V)
    build_s = time.perf_counter() - t0
    model = bm.tiny_llama(V, hidden_size=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed,
                          intermediate_size=4 * args.hidden)
    return Setup(V, seqs, trie, model, build_s)


METHOD_COLUMNS = [("latency ms", "latency_ms", "{:.1f}"), ("req/s", "requests_per_s", "{:.1f}"),
                  ("speedup", "speedup_vs_baseline", "{:.1f}x"), ("invalid items", "invalid_item_rate", "{:.1%}")]


def print_methods(title: str, methods: list[dict], columns=METHOD_COLUMNS) -> None:
    """One row per method: the name, then each (header, key, format) column right-aligned; a
    missing value (None) shows as ``-``."""
    name_width = max(len(m["method"]) for m in methods) + 2
    widths = [max(len(h), 8) + 2 for h, _, _ in columns]
    header = f"{'method':<{name_width}}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths))
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for m in methods:
        cells = "".join(f"{'-' if m.get(key) is None else fmt.format(m[key]):>{w}}"
                        for (_, key, fmt), w in zip(columns, widths))
        print(f"{m['method']:<{name_width}}{cells}")


def write_chart(results: list[dict], path: str) -> None:
    """A PNG of the latency panels; skipped (with a note) without matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib
    except ImportError:
        log("no chart: matplotlib is not installed (pip install 'genrec-decoding[bench]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in results if r["suite"] in ("e2e", "vllm", "speculative")]
    step = [r for r in results if r["suite"] == "step"]
    workloads = [r for r in results if r["suite"] == "ml-100k"]
    panels = len(e2e) + len(step) + len(workloads)
    if panels == 0:
        return
    rows = max([len(r["methods"]) for r in workloads], default=0)  # one legend line per decoder
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 5 * len(workloads), max(4.0, 0.16 * rows + 2.0)),
                             squeeze=False)
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
            label = f"{m['latency_ms']:.0f} ms\n{m['speedup_vs_baseline']:.1f}x"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2,
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
    for r in workloads:  # recall against latency, one numbered point per decoding option
        ax = next(ax_iter)
        short = ((" (chosen on validation)", ""), ("KV 25% of the long prompt: ", "KV 25%: "), ("gamma=", "γ="),
                 ("transformers beam search", "transformers"), (" in flight", ""),
                 ("decoding.beam_search", "beam_search"))
        legend = []
        for i, m in enumerate(r["methods"], 1):
            name = m["method"]
            for old, new in short:
                name = name.replace(old, new)
            ours = m["method"].startswith(("decoding", "speculative", "D3", "KV"))
            lo, hi = m.get("recall@20_ci95", (m["recall@20"], m["recall@20"]))
            ax.errorbar(m["latency_ms"], m["recall@20"], yerr=[[m["recall@20"] - lo], [hi - m["recall@20"]]],
                        fmt="o", color="tab:green" if ours else "tab:gray", capsize=3)
            ax.annotate(str(i), (m["latency_ms"], m["recall@20"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
            legend.append(f"{i}. {name}")
        ax.set_xscale("log")
        ax.set_xlabel(f"latency, mean ms per batch of {r['config']['batch']} users (log)")
        ax.set_ylabel("Recall@20, 95% interval over users")
        ax.set_title(f"MovieLens-100K ({r['config'].get('recipe_name', 'default')} recipe), "
                     f"{r['config']['users']} users, K={r['config']['beams']}")
        ax.text(1.02, 1.0, "\n".join(legend), transform=ax.transAxes, va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the workload legend sits beside its axes
    plt.close(fig)
