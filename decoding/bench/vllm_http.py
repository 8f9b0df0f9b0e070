"""``decoding-bench vllm-http``: constrained beam search through vLLM's OpenAI server.

A real server on localhost (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve``
runs) with the package installed and the catalog registered; ``--clients`` concurrent HTTP
clients send ``--batch`` beam requests (``use_beam_search``, ``n`` = beams, ``max_tokens`` = the
identifier length) per run:

(a) vLLM's own server beam search, unconstrained, then post-filtering the returned sequences to
    catalog items (what a vLLM user can do today: a catalog in ``vllm_xargs`` is dropped);
(b) the same requests naming the catalog (``vllm_xargs: {"decoding_catalog": ...}``), served by
    the package's exact path.

Columns: requests/s, p50 and p99 latency, invalid-item rate, and agreement with the exact top-K
(``decoding.beam_search`` on the same weights in transformers), split into exact (the same item
set), near-tie (every differing item scores within 1e-5 relative of the K-th score, or its prefix
scored within 1e-5 of the reference's beam cut at some step, on a beam one engine kept and the
other dropped: a tie that float rounding between the two engines decides;
``decoding.testing.exactness``) and wrong; ``differences`` in the JSON lists what differed.
While each method runs, a bystander sends plain 4-token completions one after another; their
latency is reported beside the same completion's alone. For the exact path, the engine requests
and log-probs it asked per search and how many wide rows fell back (the server's
``decoding_beam_*`` counters). ``--text-vocab`` adds text tokens to the model's vocabulary (an
LLM recommender's: Qwen3's 151,936 tokens is ``--text-vocab 150904``). A last row measures the
model work any beam search must do, as plain requests over HTTP (each prompt prefilled, then
``beams`` rows decoding the identifier's other tokens; no ranking): the most any beam search on
this server could gain. The three methods take turns, round by round (round 0 is each one's
warm-up), and each row reports the median of its ``--repeats`` timed rounds; ``rounds`` in the
JSON lists every round in the order it ran.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from decoding import testing as bm
from decoding.bench._common import catalog_and_model, log, paired_speedups
from decoding.testing.exactness import ExactReference


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _server_counters(client) -> dict:
    text = client.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("decoding_beam_") and "_total " in line:
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("decoding_beam_").removesuffix("_total")] = float(value)
    return out


class Bystander:
    """Plain 4-token completions, one after another, while something else runs: their latencies."""

    def __init__(self, client, model, prompt):
        self.client, self.body = client, {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0,
                                          "ignore_eos": True}
        self.latencies, self._stop = [], threading.Event()

    def once(self) -> float:
        t0 = time.perf_counter()
        response = self.client.post("/v1/completions", json=self.body)
        if response.status_code != 200:
            raise RuntimeError(f"bystander answered {response.status_code}: {response.text[:300]}")
        return time.perf_counter() - t0

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


def run(args, device) -> dict:
    try:
        import httpx
        import vllm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"decoding-bench vllm-http needs vLLM and httpx: {exc}")
    from decoding.testing.serving import vllm_server

    K, L, N, C = args.beams, args.levels, args.batch, args.clients
    V, seqs, trie, model, _ = catalog_and_model(args)
    log(f"[vllm-http] catalog: {args.items:,} semantic IDs, vocabulary {V:,} tokens; {N} requests of "
        f"{args.prompt_len} tokens per run, {C} concurrent clients, {K} beams")
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(bm.SPECIAL_TOKENS, bm.sid_vocab_size(L, args.codes), (N, args.prompt_len), generator=g)
    log("[vllm-http] exact top-K: decoding.beam_search on the same weights in transformers")
    reference = ExactReference(model, prompts, trie, K, seqs)
    prompt_lists = prompts.tolist()

    def score(answers):
        rows = [it for items, _ in answers for it in items]
        invalid = sum(i < 0 for i in rows) / max(len(rows), 1)
        return (invalid, *reference.judge(answers))

    methods, floor = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bm.save_for_serving(model, os.path.join(tmp, "model"))
        trie_path = os.path.join(tmp, "catalog.trie")
        trie.save(trie_path)
        config = {"decoding": {"catalogs": {"items": trie_path}}}
        os.makedirs(args.out, exist_ok=True)
        server_log = os.path.join(args.out, "vllm-server.log")
        log(f"[vllm-http] starting the server (its log: {server_log})")
        with vllm_server(model_dir, server_log, additional_config=config,
                         max_model_len=max(512, args.prompt_len + L + 8),
                         env={"VLLM_CPU_KVCACHE_SPACE": "4"}) as (url, _), \
                httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=C + 2)) as client:
            model_name = model_dir
            bystander_prompt = prompt_lists[0][: max(4, args.prompt_len // 2)]
            alone = Bystander(client, model_name, bystander_prompt)
            alone.once()  # warm-up
            bystander_alone = statistics.median(alone.once() for _ in range(5))

            def beam(i, catalog):
                body = {"model": model_name, "prompt": prompt_lists[i], "max_tokens": L, "use_beam_search": True,
                        "n": K, "temperature": 0.0, "length_penalty": 0.0, "return_token_ids": True, "logprobs": 0}
                if catalog:
                    body["vllm_xargs"] = {"decoding_catalog": "items"}
                t0 = time.perf_counter()
                response = client.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - t0
                if response.status_code != 200:
                    raise RuntimeError(f"server answered {response.status_code}: {response.text[:500]}")
                choices = response.json()["choices"]
                tokens = [c["token_ids"][:L] + [-1] * (L - len(c["token_ids"][:L])) for c in choices]
                scores = [sum(c["logprobs"]["token_logprobs"][:L]) for c in choices]
                items = trie.lookup(torch.tensor(tokens)).tolist() if tokens else []
                return elapsed, (items, scores)

            def model_work(i):
                t0 = time.perf_counter()
                first = client.post("/v1/completions", json={"model": model_name, "prompt": prompt_lists[i],
                                                             "max_tokens": 1, "temperature": 0.0,
                                                             "return_token_ids": True})
                token = first.json()["choices"][0]["token_ids"][0]
                if L > 1:
                    client.post("/v1/completions", json={"model": model_name, "prompt": prompt_lists[i] + [token],
                                                         "max_tokens": L - 1, "n": K, "temperature": 1.0,
                                                         "ignore_eos": True})
                return time.perf_counter() - t0, None

            def timed_round(label, fn, round_):
                """One run of ``fn`` over the ``N`` requests from ``C`` clients, a bystander beside it."""
                before = _server_counters(client)
                with ThreadPoolExecutor(C) as pool, Bystander(client, model_name, bystander_prompt) as bystander:
                    t0 = time.perf_counter()
                    results = list(pool.map(fn, range(N)))
                    wall = time.perf_counter() - t0
                log(f"  {label}: {'warm-up' if round_ == 0 else f'run {round_}/{args.repeats}'} {wall * 1e3:,.0f} ms")
                return wall, results, bystander.latencies, before, _server_counters(client)

            def summary(runs) -> dict:
                """The timed runs of one method (the warm-up left out) as one row: medians, percentiles."""
                walls = [wall for wall, *_ in runs]
                latencies = [t for _, results, *_ in runs for t, _ in results]
                waits = [t for *_, latencies_, _, _ in runs for t in latencies_]
                wall = statistics.median(walls)
                row = {"requests_per_s": N / wall, "wall_ms": wall * 1e3, "runs_ms": [w * 1e3 for w in walls],
                       "p50_ms": _percentile(latencies, 0.5) * 1e3, "p99_ms": _percentile(latencies, 0.99) * 1e3,
                       "bystander_p50_ms": _percentile(waits, 0.5) * 1e3, "bystander_max_ms": max(waits) * 1e3,
                       "answers": [a for _, a in runs[-1][1]]}
                diff = {}
                for *_, before, after in runs:
                    for k in after:
                        diff[k] = diff.get(k, 0) + after.get(k, 0) - before.get(k, 0)
                searches = diff.get("searches", 0)
                if searches:
                    row["per_search"] = {k: diff.get(k, 0) / searches for k in
                                         ("engine_requests", "logprobs", "wide_rows", "fallback_rows")}
                    row["fallback_rows"] = int(diff.get("fallback_rows", 0))
                    row["wide_rows"] = int(diff.get("wide_rows", 0))
                return row

            plan = [("vLLM server beam search, unconstrained + post-filter", lambda i: beam(i, False)),
                    ("decoding exact beam search (vllm_xargs catalog)", lambda i: beam(i, True)),
                    ("model work alone (plain requests)", model_work)]
            # the methods take turns, round by round, so that a machine that slows down or speeds up
            # during the run weighs on each alike; each method's first round is its warm-up
            runs, rounds = {label: [] for label, _ in plan}, []
            for round_ in range(args.repeats + 1):
                for label, fn in plan:
                    measured = timed_round(label, fn, round_)
                    rounds.append({"round": round_, "method": label, "wall_ms": measured[0] * 1e3})
                    if round_:
                        runs[label].append(measured)
            for label, _ in plan[:2]:
                row = summary(runs[label])
                row["invalid_item_rate"], row["topk"], row["differences"] = score(row.pop("answers"))
                row["agreement_with_exact_topk"] = row["topk"]["exact"] + row["topk"]["near-tie"]
                methods.append({"method": label, **row})
            floor = summary(runs[plan[2][0]])
            floor.pop("answers")

    base = methods[0]["requests_per_s"]
    for row in methods:
        row["speedup_vs_baseline"] = row["requests_per_s"] / base
    floor["max_speedup_vs_baseline"] = floor["requests_per_s"] / base
    # paired: each timed round's baseline wall over the method's in the same round, median over rounds
    base_runs = methods[0]["runs_ms"]
    for row in (*methods, floor):
        row["paired_speedups"] = paired_speedups(base_runs, row["runs_ms"])
        row["paired_speedup_median"] = statistics.median(row["paired_speedups"])
    return {"suite": "vllm-http",
            "config": {**{k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "clients", "beams",
                                                        "prompt_len", "hidden", "layers", "heads", "repeats", "seed",
                                                        "text_vocab")}, "vocab_size": V},
            "bystander_alone_ms": bystander_alone * 1e3, "methods": methods, "engine_floor": floor,
            "rounds": rounds}


def show(res: dict) -> None:
    cfg = res["config"]
    print(f"\nConstrained beam search over vLLM's OpenAI server: {cfg['items']:,} items, a {cfg['vocab_size']:,}-token "
          f"vocabulary, {cfg['batch']} requests of {cfg['prompt_len']} tokens per run from {cfg['clients']} concurrent "
          f"clients, {cfg['beams']} beams, {cfg['levels']}-token identifiers")
    header = (f"{'method':<56} {'req/s':>8} {'vs vLLM':>8} {'p50 ms':>9} {'p99 ms':>9} {'invalid':>8} "
              f"{'exact':>6} {'tie':>5} {'wrong':>6} {'bystander ms':>13}")
    print(header)
    print("-" * len(header))
    for row in res["methods"]:
        topk = row["topk"]
        print(f"{row['method']:<56} {row['requests_per_s']:>8.2f} {row['speedup_vs_baseline']:>7.2f}x "
              f"{row['p50_ms']:>9,.0f} {row['p99_ms']:>9,.0f} {row['invalid_item_rate']:>8.0%} "
              f"{topk['exact']:>6.0%} {topk['near-tie']:>5.0%} {topk['wrong']:>6.0%} "
              f"{row['bystander_p50_ms']:>6,.0f}/{row['bystander_max_ms']:>6,.0f}")
    floor = res["engine_floor"]
    print(f"{'model work alone (prefill + beams x rest of the ID; no ranking)':<56} {floor['requests_per_s']:>8.2f} "
          f"{floor['max_speedup_vs_baseline']:>7.2f}x {floor['p50_ms']:>9,.0f} {floor['p99_ms']:>9,.0f}")
    paired = ", ".join(f"{row['paired_speedup_median']:.2f}x" for row in (*res["methods"][1:], floor))
    print(f"paired (each round's vLLM time over the method's in the same round, median of rounds): exact path, "
          f"model work: {paired}")
    print(f"bystander: a plain 4-token completion, median/max ms while each method runs; alone "
          f"{res['bystander_alone_ms']:,.0f} ms")
    exact = res["methods"][1]
    if "per_search" in exact:
        per = exact["per_search"]
        print(f"exact path per search: {per['engine_requests']:.1f} engine requests, {per['logprobs']:.0f} log-probs "
              f"returned; {exact['wide_rows']} wide rows, of which {exact['fallback_rows']} fell back "
              "(asked again by id)")
