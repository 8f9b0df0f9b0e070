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
import tempfile
import time

from decoding import testing as bm
from decoding.bench._common import (
    Bystander,
    add_paired,
    beam_request,
    http_round,
    http_summary,
    in_turn,
    items_of,
    judged,
    log,
    plain_completion,
    post_beam_request,
    served_workload,
    server_metrics,
)


def vllm_server_for(model_dir: str, trie_path: str, args, log_path: str):
    """vLLM's OpenAI server on ``model_dir`` with the catalog at ``trie_path`` registered as
    ``items`` (the package's exact route), sized for ``args``' prompts."""
    from decoding.testing.serving import vllm_server

    return vllm_server(model_dir, log_path, additional_config={"decoding": {"catalogs": {"items": trie_path}}},
                       max_model_len=max(512, args.prompt_len + args.levels + 8),
                       env={"VLLM_CPU_KVCACHE_SPACE": "4"})


def route_counters(client) -> dict:
    """The exact route's ``decoding_beam_*`` counters on the vLLM server."""
    return server_metrics(client, "decoding_beam_", "_total")


def add_route_stats(row: dict, diff: dict) -> None:
    """The exact route's work per search (engine requests, log-probs, wide and fallback rows),
    from its counters' growth ``diff`` over the method's rounds."""
    searches = diff.get("searches", 0)
    if searches:
        row["per_search"] = {k: diff.get(k, 0) / searches for k in
                             ("engine_requests", "logprobs", "wide_rows", "fallback_rows")}
        row["fallback_rows"] = int(diff.get("fallback_rows", 0))
        row["wide_rows"] = int(diff.get("wide_rows", 0))


def run(args, device) -> dict:
    try:
        import httpx
        import vllm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"decoding-bench vllm-http needs vLLM and httpx: {exc}")

    K, L, N, C = args.beams, args.levels, args.batch, args.clients
    (V, seqs, trie, model, _), prompts, reference = served_workload(args)
    log(f"[vllm-http] catalog: {args.items:,} semantic IDs, vocabulary {V:,} tokens; {N} requests of "
        f"{args.prompt_len} tokens per run, {C} concurrent clients, {K} beams")
    prompt_lists = prompts.tolist()

    methods, floor = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bm.save_for_serving(model, os.path.join(tmp, "model"))
        trie_path = os.path.join(tmp, "catalog.trie")
        trie.save(trie_path)
        os.makedirs(args.out, exist_ok=True)
        server_log = os.path.join(args.out, "vllm-server.log")
        log(f"[vllm-http] starting the server (its log: {server_log})")
        with vllm_server_for(model_dir, trie_path, args, server_log) as (url, _), \
                httpx.Client(base_url=url, timeout=600,
                             limits=httpx.Limits(max_connections=C + 2, keepalive_expiry=1.0)) as client:
            model_name = model_dir
            bystander_body = plain_completion(model_name, prompt_lists[0][: max(4, args.prompt_len // 2)])
            bystander_alone = Bystander(client, bystander_body).alone()

            def beam(i, catalog):
                return post_beam_request(client, beam_request(model_name, prompt_lists[i], L, K, catalog))

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

            def timed_round(fn):
                """One run of ``fn`` over the ``N`` requests from ``C`` clients, a bystander beside it."""
                return lambda: http_round(fn, N, C, lambda: Bystander(client, bystander_body),
                                          lambda: route_counters(client))

            plan = [("vLLM server beam search, unconstrained + post-filter", lambda i: beam(i, None)),
                    ("decoding exact beam search (vllm_xargs catalog)", lambda i: beam(i, "items")),
                    ("model work alone (plain requests)", model_work)]
            # the methods take turns, round by round, so that a machine that slows down or speeds up
            # during the run weighs on each alike; each method's first round is its warm-up
            runs, rounds = in_turn([(label, timed_round(fn)) for label, fn in plan], args.repeats)
            for label, _ in plan[:2]:
                row, diff = http_summary(runs[label], N)
                row.update(judged(reference, items_of(row.pop("answers"), trie)))
                add_route_stats(row, diff)
                methods.append({"method": label, **row})
            floor, _ = http_summary(runs[plan[2][0]], N)
            floor.pop("answers")

    base = methods[0]["requests_per_s"]
    for row in methods:
        row["speedup_vs_baseline"] = row["requests_per_s"] / base
    floor["max_speedup_vs_baseline"] = floor["requests_per_s"] / base
    # paired: each timed round's baseline wall over the method's in the same round, median over rounds
    for row in (*methods, floor):
        add_paired(row, methods[0]["runs_ms"])
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
