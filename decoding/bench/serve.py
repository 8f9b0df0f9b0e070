"""``decoding-bench serve``: ``decoding-serve`` against vLLM's OpenAI server and against the
package's beam search in process, on the same weights and prompts.

Two servers on localhost stay up for the whole run: ``decoding-serve`` (the package's beam search
behind an OpenAI-compatible ``/v1/completions``, on ``--device``, its ``--max-batch-rows`` large
enough to batch every request of a run, its ``--max-wait-ms`` the bench's) and, when vLLM is
installed, vLLM's OpenAI server with the catalog registered (as ``decoding-bench vllm-http``
starts it). ``--clients`` concurrent HTTP clients send ``--batch`` beam requests
(``use_beam_search``, ``n`` = beams, ``max_tokens`` = the identifier length) per run:

(a) vLLM's own server beam search, unconstrained, then post-filtering the returned sequences to
    catalog items (the baseline; vLLM only);
(b) the same requests naming the catalog (``vllm_xargs: {"decoding_catalog": ...}``) on vLLM's
    server: the package's exact route inside vLLM (vLLM only);
(c) the same requests as (b), sent to ``decoding-serve``;
(d) the in-process limit: ``decoding.beam_search`` on the model as ``decoding-serve`` loads it,
    every prompt of a run in one batch, no HTTP.

Columns: requests/s; ``vs vLLM``, the throughput over (a)'s; ``paired``, the median over rounds of
(a)'s time over the method's in the same round; p50 and p99 latency (HTTP methods); the
invalid-item rate; agreement with the exact top-K (``decoding.beam_search`` in transformers,
float32) as exact, near-tie and wrong (``decoding.testing.exactness``); and a bystander's median
and longest latency while the method runs: vLLM's plain 4-token completion beside (a) and (b), a
``/v1/recommendations`` request with ``k`` = 1 beside (c) (``decoding-serve`` serves only beam
search over a catalog), read from one more round of each HTTP method after the timed ones (the
bystander's work is not the method's, so the timed rounds run without it). Below the table:
``decoding-serve``'s throughput as a fraction of (d)'s (the server's own cost: batching, HTTP,
JSON) and its batches over the timed rounds (from its ``/metrics``: requests per batch). The methods
take turns, round by round (round 0 is each one's warm-up), and each row reports the median of
its ``--repeats`` timed rounds; ``rounds`` in the JSON lists every round in the order it ran.
Every round starts with both servers idle (the bench waits until their processes use under a
tenth of a core): vLLM's engine keeps a core busy for about a second after its last request,
which would otherwise fall on the method that runs after it.

Without vLLM (a GPU machine without it) only (c) and (d) run; the output says so and the JSON
reads ``"vllm": "not installed"``, without ratios to vLLM.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import torch

from decoding import testing as bm
from decoding.bench._common import (
    Bystander,
    NoBystander,
    add_paired,
    beam_request,
    http_round,
    http_summary,
    in_turn,
    items_of,
    judged,
    log,
    paired_speedups,
    percentile,
    plain_completion,
    post_beam_request,
    print_methods,
    served_workload,
    server_metrics,
    sync,
    wait_idle,
)
from decoding.bench.vllm_http import add_route_stats, route_counters, vllm_server_for

VLLM_OWN = "vLLM server beam search, unconstrained + post-filter"
VLLM_ROUTE = "decoding exact route in vLLM's server (vllm_xargs)"
SERVE = "decoding-serve beam search (/v1/completions)"
IN_PROCESS = "decoding.beam_search in process (one batch, no HTTP)"
ACCEPTANCE = 0.8  # decoding-serve's throughput over the in-process limit's that the server aims at


def _serve_batches(client) -> dict:
    """decoding-serve's batch histograms (``decoding_serve_batch_{requests,rows}_{sum,count}``)."""
    metrics = server_metrics(client, "decoding_serve_batch_")
    return {k: metrics.get(k, 0.0) for k in ("requests_sum", "requests_count", "rows_sum", "rows_count")}


def _batch_stats(diff: dict, max_batch_rows: int) -> dict:
    """decoding-serve's batches over the timed rounds of (c) (no bystander runs beside them)."""
    batches, requests, rows = (diff.get(k, 0) for k in ("requests_count", "requests_sum", "rows_sum"))
    return {"max_batch_rows": max_batch_rows, "batches": int(batches), "requests": int(requests),
            "mean_requests_per_batch": requests / batches if batches else None,
            "mean_rows_per_batch": rows / batches if batches else None}


def run(args, device) -> dict:
    try:
        import fastapi  # noqa: F401
        import httpx
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"decoding-bench serve needs httpx and decoding-serve's packages "
                         f"(pip install 'genrec-decoding[serve]'): {exc}")
    try:
        import vllm
        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    from transformers import AutoModelForCausalLM

    from decoding import beam_search
    from decoding.testing.serving import decoding_server

    K, L, N, C = args.beams, args.levels, args.batch, args.clients
    max_batch_rows = N * K
    labels = ([VLLM_OWN, VLLM_ROUTE] if vllm_version else []) + [SERVE, IN_PROCESS]
    ran = (f"methods: {', '.join(labels)}" + ("" if vllm_version else
           "; vLLM is not installed: its beam search and the vLLM route are left out, and so are the "
           "ratios to vLLM"))
    log(f"[serve] {ran}")
    (V, seqs, trie, model, _), prompts, reference = served_workload(args)
    log(f"[serve] catalog: {args.items:,} semantic IDs, vocabulary {V:,} tokens; {N} requests of "
        f"{args.prompt_len} tokens per run, {C} concurrent clients, {K} beams; decoding-serve on {device}")
    prompt_lists = prompts.tolist()
    # idle connections are dropped before the servers (uvicorn: 5 s) close them, so a round never
    # reuses one that the server is closing (a race that answers "Server disconnected")
    limits = httpx.Limits(max_connections=C + 2, keepalive_expiry=1.0)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        model_dir = bm.save_for_serving(model, os.path.join(tmp, "model"))
        trie_path = os.path.join(tmp, "catalog.trie")
        trie.save(trie_path)
        os.makedirs(args.out, exist_ok=True)
        serve_log = os.path.join(args.out, "decoding-serve.log")
        log(f"[serve] starting decoding-serve (its log: {serve_log})")
        serve_url, serve_proc = servers.enter_context(decoding_server(
            model_dir, {"items": trie_path}, serve_log,
            args=("--device", str(device), "--max-batch-rows", str(max_batch_rows), "--max-beams", str(K),
                  "--max-queue", str(max(1024, 2 * N)),
                  *(() if args.max_wait_ms is None else ("--max-wait-ms", str(args.max_wait_ms))))))
        serve = servers.enter_context(httpx.Client(base_url=serve_url, timeout=600, limits=limits))
        model_name = model_dir  # both servers serve the model under its directory's name
        bystander_prompt = prompt_lists[0][: max(4, args.prompt_len // 2)]
        serve_bystander = {"catalog": "items", "prompt_token_ids": bystander_prompt, "k": 1}
        alone = {"decoding-serve": Bystander(serve, serve_bystander, "/v1/recommendations").alone()}

        def over_http(client, catalog, counters):
            """A round of the method: ``N`` requests from ``C`` clients; a bystander beside them
            only when given (the timed rounds run without one)."""
            def one(i):
                return post_beam_request(client, beam_request(model_name, prompt_lists[i], L, K, catalog))
            return lambda bystander=NoBystander: http_round(one, N, C, bystander, counters)

        plan, server_pids, bystanders = [], [serve_proc.pid], {}
        if vllm_version:
            vllm_log = os.path.join(args.out, "vllm-server.log")
            log(f"[serve] starting vLLM's server (its log: {vllm_log})")
            vllm_url, vllm_proc = servers.enter_context(vllm_server_for(model_dir, trie_path, args, vllm_log))
            server_pids.append(vllm_proc.pid)
            client = servers.enter_context(httpx.Client(base_url=vllm_url, timeout=600, limits=limits))
            vllm_bystander = plain_completion(model_name, bystander_prompt)
            alone["vLLM"] = Bystander(client, vllm_bystander).alone()
            for label, catalog in ((VLLM_OWN, None), (VLLM_ROUTE, "items")):
                plan.append((label, over_http(client, catalog, lambda: route_counters(client))))
                bystanders[label] = lambda: Bystander(client, vllm_bystander)
        plan.append((SERVE, over_http(serve, "items", lambda: _serve_batches(serve))))
        bystanders[SERVE] = lambda: Bystander(serve, serve_bystander, "/v1/recommendations")

        # (d): the model as decoding-serve loads it, on the same device, every prompt in one batch
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        local_trie, local_ids = trie.to(device), prompts.to(device)

        def in_process():
            sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = beam_search(local, local_ids, None, trie=local_trie, num_beams=K)
            sync(device)
            return time.perf_counter() - start, out

        plan.append((IN_PROCESS, in_process))
        # the methods take turns, round by round (round 0: each one's warm-up)
        # every round starts with both servers idle: vLLM's engine keeps a core busy for about a
        # second after its last request, which would otherwise fall on the method after it
        runs, rounds = in_turn(plan, args.repeats, before_each=lambda: wait_idle(server_pids))
        # the bystander row: one more round of each HTTP method with a bystander beside it (its work
        # is not the method's: the timed rounds, and the server's overhead, leave it out)
        beside = {}
        for label, measure in plan[:-1]:
            wait_idle(server_pids)
            beside[label] = measure(bystanders[label])[2]
            log(f"  {label}: a round with the bystander beside it")
        methods, batches = [], None
        for label, _ in plan[:-1]:
            row, diff = http_summary(runs[label], N)
            row.update(bystander_p50_ms=percentile(beside[label], 0.5) * 1e3,
                       bystander_max_ms=max(beside[label]) * 1e3)
            row.update(judged(reference, items_of(row.pop("answers"), trie)))
            if label == SERVE:
                batches = _batch_stats(diff, max_batch_rows)
            else:
                add_route_stats(row, diff)
            methods.append({"method": label, **row})

    walls = [wall for wall, _ in runs[IN_PROCESS]]
    out = runs[IN_PROCESS][-1][1]
    limit = {"method": IN_PROCESS, "requests_per_s": N / statistics.median(walls),
             "wall_ms": statistics.median(walls) * 1e3, "runs_ms": [w * 1e3 for w in walls],
             **judged(reference, list(zip(out.items.tolist(), out.scores.tolist())))}
    methods.append(limit)
    if vllm_version:
        base = methods[0]
        for row in methods:
            row["speedup_vs_baseline"] = row["requests_per_s"] / base["requests_per_s"]
            add_paired(row, base["runs_ms"])
    served = next(row for row in methods if row["method"] == SERVE)
    # each round's in-process wall over decoding-serve's: the server's throughput as a fraction of the limit's
    paired = paired_speedups(limit["runs_ms"], served["runs_ms"])
    overhead = {"fraction_of_in_process": served["requests_per_s"] / limit["requests_per_s"],
                "paired_fraction_median": statistics.median(paired), "paired_fractions": paired,
                "acceptance": ACCEPTANCE}
    return {"suite": "serve", "vllm": vllm_version or "not installed", "methods_run": labels,
            "config": {**{k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "clients", "beams",
                                                        "prompt_len", "hidden", "layers", "heads", "repeats", "seed",
                                                        "text_vocab")},
                       "vocab_size": V, "device": str(device), "max_batch_rows": max_batch_rows,
                       "max_wait_ms": args.max_wait_ms},
            "bystander_alone_ms": {k: v * 1e3 for k, v in alone.items()}, "methods": methods,
            "server_overhead": overhead, "serve_batches": batches, "rounds": rounds}


_COLUMNS = [("req/s", "requests_per_s", "{:.2f}"), ("vs vLLM", "speedup_vs_baseline", "{:.2f}x"),
            ("paired", "paired_speedup_median", "{:.2f}x"), ("p50 ms", "p50_ms", "{:,.0f}"),
            ("p99 ms", "p99_ms", "{:,.0f}"), ("invalid", "invalid_item_rate", "{:.0%}"), ("exact", "exact", "{:.0%}"),
            ("tie", "near-tie", "{:.0%}"), ("wrong", "wrong", "{:.0%}"), ("bystander ms", "bystander", "{}")]


def show(res: dict) -> None:
    cfg = res["config"]
    rows = [{**row, **row["topk"], "bystander": f"{row['bystander_p50_ms']:,.0f}/{row['bystander_max_ms']:,.0f}"
             if "bystander_p50_ms" in row else None} for row in res["methods"]]
    print_methods(f"decoding-serve over HTTP: {cfg['items']:,} items, a {cfg['vocab_size']:,}-token vocabulary, "
                  f"{cfg['batch']} requests of {cfg['prompt_len']} tokens per run from {cfg['clients']} concurrent "
                  f"clients, {cfg['beams']} beams, {cfg['levels']}-token identifiers; decoding-serve and the "
                  f"in-process search on {cfg['device']}", rows, _COLUMNS)
    if res["vllm"] == "not installed":
        print("vLLM is not installed: only decoding-serve and the in-process search ran (no ratios to vLLM)")
    else:
        print(f"vLLM {res['vllm']} (its CPU or GPU build); vs vLLM: throughput over vLLM's own beam search; paired: "
              "each round's vLLM time over the method's in the same round, median of rounds")
    alone = ", ".join(f"{name} {ms:,.0f} ms" for name, ms in res["bystander_alone_ms"].items())
    print(f"bystander: median/max ms while each method runs, in a round of its own (vLLM: a plain 4-token "
          f"completion; decoding-serve: a k = 1 recommendation); alone: {alone}")
    over = res["server_overhead"]
    verdict = "meets" if over["paired_fraction_median"] >= over["acceptance"] else "is below"
    print(f"server overhead: decoding-serve's throughput is {over['fraction_of_in_process']:.2f} of the in-process "
          f"search's (paired, median of rounds: {over['paired_fraction_median']:.2f}); {verdict} the "
          f"{over['acceptance']:.1f} it aims at")
    batches = res["serve_batches"]
    if batches and batches["batches"]:
        print(f"decoding-serve batches over the timed rounds: {batches['batches']} for {batches['requests']} requests, "
              f"{batches['mean_requests_per_batch']:.1f} requests ({batches['mean_rows_per_batch']:,.0f} rows) per "
              f"batch (--max-batch-rows {batches['max_batch_rows']}, --max-wait-ms "
              f"{'default' if cfg.get('max_wait_ms') is None else cfg['max_wait_ms']})")
