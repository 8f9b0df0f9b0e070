"""``decoding-bench --engine vllm-http``: constrained beam search through vLLM's OpenAI server.

A real server on localhost (``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve``
runs) with the package installed and the catalog registered; ``--clients`` concurrent HTTP
clients send ``--batch`` beam requests (``use_beam_search``, ``n`` = beams, ``max_tokens`` = the
identifier length) per run:

(a) vLLM's own server beam search, unconstrained, then post-filtering the returned sequences to
    catalog items (what a vLLM user can do today: a catalog in ``vllm_xargs`` is dropped);
(b) the same requests naming the catalog (``vllm_xargs: {"decoding_catalog": ...}``), served by
    the package's exact path.

Columns: requests/s, p50 and p99 latency, invalid-item rate, agreement with the exact top-K
(``decoding.beam_search`` on the same weights in transformers). A last row measures the model work
any beam search must do, as plain requests over HTTP (each prompt prefilled, then ``beams`` rows
decoding the identifier's other tokens; no ranking): the most any beam search on this server could gain.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from decoding import beam_search
from decoding import testing as bm
from decoding.bench._common import catalog_and_model, log


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args, device) -> dict:
    try:
        import httpx
        import vllm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"decoding-bench --engine vllm-http needs vLLM and httpx: {exc}")
    from decoding.testing.serving import vllm_server

    K, L, N, C = args.beams, args.levels, args.batch, args.clients
    log(f"[vllm-http] catalog: {args.items:,} semantic IDs; {N} requests of {args.prompt_len} tokens per run, "
        f"{C} concurrent clients, {K} beams")
    V, _, trie, model, _ = catalog_and_model(args)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(bm.SPECIAL_TOKENS, V, (N, args.prompt_len), generator=g)
    log("[vllm-http] exact top-K: decoding.beam_search on the same weights in transformers")
    exact = [set(beam_search(model, prompts[i: i + 16], None, trie=trie, num_beams=K).items[j].tolist())
             for i in range(0, N, 16) for j in range(min(16, N - i))]
    prompt_lists = prompts.tolist()

    def score(item_lists):
        rows = [it for items in item_lists for it in items]
        invalid = sum(i < 0 for i in rows) / max(len(rows), 1)
        agree = sum({i for i in items if i >= 0} == exact[b] for b, items in enumerate(item_lists)) / N
        return invalid, agree

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
                httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=C)) as client:
            model_name = model_dir

            def beam(i, catalog):
                body = {"model": model_name, "prompt": prompt_lists[i], "max_tokens": L, "use_beam_search": True,
                        "n": K, "temperature": 0.0, "length_penalty": 0.0, "return_token_ids": True}
                if catalog:
                    body["vllm_xargs"] = {"decoding_catalog": "items"}
                t0 = time.perf_counter()
                response = client.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - t0
                if response.status_code != 200:
                    raise RuntimeError(f"server answered {response.status_code}: {response.text[:500]}")
                tokens = [c["token_ids"][:L] + [-1] * (L - len(c["token_ids"][:L]))
                          for c in response.json()["choices"]]
                items = trie.lookup(torch.tensor(tokens)).tolist() if tokens else []
                return elapsed, items

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
                return time.perf_counter() - t0, []

            def measure(label, fn):
                walls, latencies, results = [], [], None
                with ThreadPoolExecutor(C) as pool:
                    for r in range(args.repeats + 1):
                        t0 = time.perf_counter()
                        results = list(pool.map(fn, range(N)))
                        wall = time.perf_counter() - t0
                        log(f"  {label}: {'warm-up' if r == 0 else f'run {r}/{args.repeats}'} {wall * 1e3:,.0f} ms")
                        if r:
                            walls.append(wall)
                            latencies += [t for t, _ in results]
                wall = statistics.median(walls)
                return {"requests_per_s": N / wall, "wall_ms": wall * 1e3, "runs_ms": [w * 1e3 for w in walls],
                        "p50_ms": _percentile(latencies, 0.5) * 1e3, "p99_ms": _percentile(latencies, 0.99) * 1e3,
                        "items": [items for _, items in results]}

            for name, catalog in (("vLLM server beam search, unconstrained + post-filter", False),
                                  ("decoding exact beam search (vllm_xargs catalog)", True)):
                row = measure(name, lambda i, catalog=catalog: beam(i, catalog))
                row["invalid_item_rate"], row["agreement_with_exact_topk"] = score(row.pop("items"))
                methods.append({"method": name, **row})
            floor = measure("model work alone (plain requests)", model_work)
            floor.pop("items")

    base = methods[0]["requests_per_s"]
    for row in methods:
        row["speedup_vs_baseline"] = row["requests_per_s"] / base
    floor["max_speedup_vs_baseline"] = floor["requests_per_s"] / base
    return {"suite": "vllm-http",
            "config": {k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "clients", "beams",
                                                     "prompt_len", "hidden", "layers", "heads", "repeats", "seed")},
            "methods": methods, "engine_floor": floor}


def show(res: dict) -> None:
    cfg = res["config"]
    print(f"\nConstrained beam search over vLLM's OpenAI server: {cfg['items']:,} items, {cfg['batch']} requests of "
          f"{cfg['prompt_len']} tokens per run from {cfg['clients']} concurrent clients, {cfg['beams']} beams, "
          f"{cfg['levels']}-token identifiers")
    header = f"{'method':<56} {'req/s':>8} {'vs vLLM':>8} {'p50 ms':>9} {'p99 ms':>9} {'invalid':>8} {'exact':>7}"
    print(header)
    print("-" * len(header))
    for row in res["methods"]:
        print(f"{row['method']:<56} {row['requests_per_s']:>8.2f} {row['speedup_vs_baseline']:>7.2f}x "
              f"{row['p50_ms']:>9,.0f} {row['p99_ms']:>9,.0f} {row['invalid_item_rate']:>8.0%} "
              f"{row['agreement_with_exact_topk']:>7.0%}")
    floor = res["engine_floor"]
    print(f"{'model work alone (prefill + beams x rest of the ID; no ranking)':<56} {floor['requests_per_s']:>8.2f} "
          f"{floor['max_speedup_vs_baseline']:>7.2f}x {floor['p50_ms']:>9,.0f} {floor['p99_ms']:>9,.0f}")
