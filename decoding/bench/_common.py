"""What every ``decoding-bench`` suite shares: progress logging, timing, the environment record,
the method table and the chart, the synthetic catalog and model most suites run on, and what the
HTTP suites (``vllm-http``, ``serve``) share: concurrent rounds of requests with a bystander
beside them, the beam-search request and its answer, ``decoding-serve``'s recommendation and its
answer, the servers' metrics and the exact judge."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def log_round(label: str, round_: int, repeats: int, wall_s: float) -> None:
    log(f"  {label}: {'warm-up' if round_ == 0 else f'run {round_}/{repeats}'} {wall_s * 1e3:,.1f} ms")


def _tree_cpu_s(root_pids) -> float:
    """CPU seconds (user + system) used so far by the processes ``root_pids`` and their
    descendants, read from ``/proc`` (Linux)."""
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = set(root_pids), list(root_pids)
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parent.items() if pp == pid and p not in tree]
        tree.update(children)
        frontier += children
    return sum(used.get(p, 0.0) for p in tree)


def wait_idle(pids, window_s: float = 0.25, busy_fraction: float = 0.1, max_s: float = 10.0) -> float:
    """Wait until the server processes ``pids`` (and their children) use less than
    ``busy_fraction`` of a core over ``window_s``, at most ``max_s``; returns the seconds waited.
    vLLM's engine keeps a core busy for about a second after its last request, which would
    otherwise fall on whichever method runs next. Without ``/proc``: a fixed 2 s pause."""
    start = time.perf_counter()
    if not os.path.isdir("/proc"):
        time.sleep(2.0)
        return time.perf_counter() - start
    while time.perf_counter() - start < max_s:
        before = _tree_cpu_s(pids)
        time.sleep(window_s)
        if _tree_cpu_s(pids) - before < busy_fraction * window_s:
            break
    return time.perf_counter() - start


def in_turn(plan, repeats: int, before_each=None) -> tuple[dict, list]:
    """Each ``(label, measure)`` of ``plan`` run in turn, round by round: a warm-up round (round
    0), then ``repeats`` timed rounds; ``measure()`` returns ``(wall_s, ...)``; ``before_each()``,
    when given, runs (untimed) before every round of every method. Returns ``{label: [what
    measure returned in each timed round]}`` and every round in the order it ran (``{"round",
    "method", "wall_ms"}``)."""
    runs, rounds = {label: [] for label, _ in plan}, []
    for round_ in range(repeats + 1):
        for label, measure in plan:
            if before_each is not None:
                before_each()
            measured = measure()
            log_round(label, round_, repeats, measured[0])
            rounds.append({"round": round_, "method": label, "wall_ms": measured[0] * 1e3})
            if round_:
                runs[label].append(measured)
    return runs, rounds


def alternated(plan, device, repeats: int) -> dict:
    """Each ``(label, fn)`` of ``plan`` timed in turn, round by round: a warm-up round, then
    ``repeats`` timed rounds, so that a machine that speeds up or slows down during the run weighs
    on every method alike. Returns ``{label: (median_s, runs_s, last output)}`` and, under
    ``"paired"``, ``{label: median over rounds of the first method's time / this one's}``."""

    def timed_call(fn):
        def measure():
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            return time.perf_counter() - t0, out
        return measure

    measured, _ = in_turn([(label, timed_call(fn)) for label, fn in plan], repeats)
    runs = {label: [wall for wall, _ in m] for label, m in measured.items()}
    base = runs[plan[0][0]]
    out = {label: (statistics.median(r), r, measured[label][-1][1]) for label, r in runs.items()}
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


def served_workload(args):
    """The HTTP suites' setup: :func:`catalog_and_model`, ``args.batch`` random prompts of
    ``args.prompt_len`` semantic-ID tokens, and their exact top-K (``decoding.beam_search`` on
    the same weights in transformers) to judge every method's answers by."""
    from decoding.testing.exactness import ExactReference

    setup = catalog_and_model(args)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(bm.SPECIAL_TOKENS, bm.sid_vocab_size(args.levels, args.codes),
                            (args.batch, args.prompt_len), generator=g)
    log(f"[{args.suite}] exact top-K: decoding.beam_search on the same weights in transformers")
    return setup, prompts, ExactReference(setup.model, prompts, setup.trie, args.beams, setup.seqs)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def server_metrics(client, prefix: str, suffix: str = "") -> dict:
    """The samples of the server's ``/metrics`` named ``prefix...suffix``, by name less both."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            if name.endswith(suffix):
                out[name[len(prefix): len(name) - len(suffix)]] = float(value)
    return out


def plain_completion(model: str, prompt: list[int]) -> dict:
    """A plain 4-token completion (greedy): the vLLM server's bystander."""
    return {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def timed_post(client, route: str, body: dict, who: str = "server") -> tuple[float, dict]:
    """``body`` posted to ``route``: its latency and its JSON answer; RuntimeError (``who``
    answered ...) for any status but 200."""
    t0 = time.perf_counter()
    response = client.post(route, json=body)
    elapsed = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"{who} answered {response.status_code}: {response.text[:500]}")
    return elapsed, response.json()


class Bystander:
    """Small requests (``body`` to ``route``), one after another, while something else runs:
    their latencies."""

    def __init__(self, client, body: dict, route: str = "/v1/completions"):
        self.client, self.body, self.route = client, body, route
        self.latencies, self._stop = [], threading.Event()

    def once(self) -> float:
        return timed_post(self.client, self.route, self.body, "bystander")[0]

    def alone(self) -> float:
        """The median of 5 requests with nothing else running, after a warm-up."""
        self.once()
        return statistics.median(self.once() for _ in range(5))

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.latencies.append(self.once())
                time.sleep(0.05)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class NoBystander:
    """A round without a bystander (:func:`http_round`'s ``bystander``): no latencies."""

    latencies: tuple = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def beam_request(model: str, prompt: list[int], levels: int, beams: int, catalog: str | None) -> dict:
    """An OpenAI ``/v1/completions`` beam search for one identifier (``max_tokens`` = its
    ``levels`` tokens, ``n`` = ``beams``), naming ``catalog`` in ``vllm_xargs`` unless None."""
    body = {"model": model, "prompt": prompt, "max_tokens": levels, "use_beam_search": True, "n": beams,
            "temperature": 0.0, "length_penalty": 0.0, "return_token_ids": True, "logprobs": 0}
    if catalog is not None:
        body["vllm_xargs"] = {"decoding_catalog": catalog}
    return body


def post_beam_request(client, body: dict) -> tuple[float, tuple[list, list]]:
    """``body`` (:func:`beam_request`) sent: its latency and its answer ``(identifiers, scores)``,
    best first: each choice's first ``max_tokens`` tokens (padded with -1), its score the sum of
    their log-probs. The identifiers are looked up in the catalog after the round
    (:func:`items_of`), so the client's own work stays out of the timed wall."""
    L = body["max_tokens"]
    elapsed, answer = timed_post(client, "/v1/completions", body)
    choices = answer["choices"]
    tokens = [c["token_ids"][:L] + [-1] * (L - len(c["token_ids"][:L])) for c in choices]
    scores = [sum(c["logprobs"]["token_logprobs"][:L]) for c in choices]
    return elapsed, (tokens, scores)


def post_recommendation(client, body: dict) -> tuple[float, tuple[list, list, list]]:
    """``body`` (a ``decoding-serve`` ``/v1/recommendations`` request) sent: its latency and its
    answer ``(items, scores, identifiers)``, best first, as the server returned them."""
    elapsed, answer = timed_post(client, "/v1/recommendations", body)
    return elapsed, (answer["items"], answer["scores"], answer["identifiers"])


def items_of(answers, trie) -> list:
    """Per request ``(identifiers, scores)`` -> ``(items, scores)``: the identifiers looked up in
    ``trie`` (-1: not a catalog item)."""
    return [(trie.lookup(torch.tensor(tokens)).tolist() if tokens else [], scores) for tokens, scores in answers]


def http_round(fn, requests: int, clients: int, bystander, counters):
    """One run of ``fn`` over ``range(requests)`` from ``clients`` concurrent threads, a fresh
    ``bystander()`` (a :class:`Bystander`) beside it, ``counters()`` read before and after.
    Returns ``(wall_s, [fn's results], bystander latencies, counters before, after)``."""
    before = counters()
    with ThreadPoolExecutor(clients) as pool, bystander() as beside:
        t0 = time.perf_counter()
        results = list(pool.map(fn, range(requests)))
        wall = time.perf_counter() - t0
    return wall, results, beside.latencies, before, counters()


def http_summary(runs, requests: int) -> tuple[dict, dict]:
    """The timed :func:`http_round` runs of one method (the warm-up left out) as one row
    (medians, percentiles, the last round's ``answers``), and its counters' growth over them."""
    walls = [wall for wall, *_ in runs]
    latencies = [t for _, results, *_ in runs for t, _ in results]
    waits = [t for *_, latencies_, _, _ in runs for t in latencies_]
    wall = statistics.median(walls)
    row = {"requests_per_s": requests / wall, "wall_ms": wall * 1e3, "runs_ms": [w * 1e3 for w in walls],
           "p50_ms": percentile(latencies, 0.5) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3,
           "answers": [a for _, a in runs[-1][1]]}
    if waits:  # rounds with a bystander beside them
        row.update(bystander_p50_ms=percentile(waits, 0.5) * 1e3, bystander_max_ms=max(waits) * 1e3)
    diff = {}
    for *_, before, after in runs:
        for k in after:
            diff[k] = diff.get(k, 0) + after.get(k, 0) - before.get(k, 0)
    return row, diff


def judged(reference, answers) -> dict:
    """``answers`` (per request ``(items, scores)``) against the exact top-K (an
    :class:`~decoding.testing.exactness.ExactReference`): the invalid-item rate, the share of
    exact, near-tie and wrong requests, and what differed."""
    rows = [it for items, _ in answers for it in items]
    topk, differences = reference.judge(answers)
    return {"invalid_item_rate": sum(i < 0 for i in rows) / max(len(rows), 1), "topk": topk,
            "differences": differences, "agreement_with_exact_topk": topk["exact"] + topk["near-tie"]}


def add_paired(row: dict, base_runs_ms) -> None:
    """``row``'s paired ratios to a baseline measured in the same rounds: each round's baseline
    time over the row's, and their median."""
    row["paired_speedups"] = paired_speedups(base_runs_ms, row["runs_ms"])
    row["paired_speedup_median"] = statistics.median(row["paired_speedups"])


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
