"""``decoding-bench serve``: ``decoding-serve`` against vLLM's OpenAI server and against the
package's beam search in process, on the same weights and prompts, and every decoder
``decoding-serve`` serves, over the same HTTP.

Two servers on localhost stay up for the whole run: ``decoding-serve`` (the package's decoders
behind an OpenAI-compatible ``/v1/completions`` and its own ``/v1/recommendations``, on
``--device``, its ``--max-batch-rows`` large enough to batch every beam request of a run, its
``--max-wait-ms`` the bench's; with a draft of the model's first ``--draft-layers`` layers, three
KV policies and a SETRec bundle, for the decoder rows below) and, when vLLM is installed, vLLM's
OpenAI server with the catalog registered (as ``decoding-bench vllm-http`` starts it).
``--clients`` concurrent HTTP clients send ``--batch`` beam requests (``use_beam_search``, ``n`` =
beams, ``max_tokens`` = the identifier length) per run:

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
beam ``/v1/recommendations`` request with ``k`` = 1 beside (c), read from one more round of each
HTTP method after the timed ones (the bystander's work is not the method's, so the timed rounds
run without it). Below the table: ``decoding-serve``'s throughput as a fraction of (d)'s (the
server's own cost: batching, HTTP, JSON) and its batches over the timed rounds (from its
``/metrics``: requests per batch).

A second table, "served decoders" (``--decoders``, default all): the same ``--batch`` prompts
from the same ``--clients`` clients, as ``decoding-serve`` ``/v1/recommendations`` requests
(``k`` = beams), one row per decoder:

- beam search on ``/v1/recommendations`` (the base of this table: the decoder rows' route);
- speculative beam search, strict and relaxed (``num_drafts`` 2K, at most ``--items``;
  ``draft_steps`` 2), the draft being the model's first ``--draft-layers`` layers
  (``--draft-layers`` on the server, ``--max-beams`` raised to the drafts): a round of strict
  requests runs as two batches (2K rows each against the beam rows' budget), relaxed requests
  (``seed`` = their index) one batch each, as the server runs them;
- SETRec set identifiers: a random bundle (:func:`decoding.setid.bundle.save_setrec_bundle`) of
  ``--items`` items, 3 slots of the model's hidden size (float16 tables, slot weights 0.9/0.1/0.1,
  the ``setid`` bench's layout), its model the bench model's layers and weights (a 32-token
  vocabulary: SETRec feeds vectors, never tokens); each request a random ``history`` of
  ``--prompt-len`` / 3 items, so that its prompt holds about ``--prompt-len`` vectors;
- beam search under each KV policy (``options.kv_policy``), each keeping a quarter of the prompt
  (``keep`` = ``--prompt-len`` / 4, at least 2): StreamingLLM (``min(4, keep / 2)`` sinks, the
  rest recent), SnapKV (window ``min(8, keep)``, capacity ``keep``) and EARN (cut at layer
  ``--layers`` / 2, the same sinks and recent positions as registers).

Each row: requests/s, ``vs beam`` (the median over rounds of the beam row's time over the
row's), p50/p99 latency, requests per batch (``/metrics``), and its correctness where one is
defined: every row's invalid-item rate (items outside the catalog, or whose identifier is not the
item's, and repeats within an answer); beam and strict speculative search against the exact top-K
as (c) is judged (they must be exact or near-tie); relaxed speculative search and set identifiers
by their invalid items only (their answers are samples / another model's); the KV policies'
agreement with the exact unpruned top-K (the share of its items returned, and of requests with
its whole item set), informative only (pruning changes the answer by design).

Every method and decoder row takes turns, round by round (round 0 is each one's warm-up), and
each row reports the median of its ``--repeats`` timed rounds; ``rounds`` in the JSON lists every
round in the order it ran. Every round starts with both servers idle (the bench waits until their
processes use under a tenth of a core): vLLM's engine keeps a core busy for about a second after
its last request, which would otherwise fall on the method that runs after it.

Without vLLM (a GPU machine without it) only (c), (d) and the decoder rows run; the output says
so and the JSON reads ``"vllm": "not installed"``, without ratios to vLLM.
"""

from __future__ import annotations

import contextlib
import json
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
    post_recommendation,
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
RECS_BEAM = "decoding-serve beam search (/v1/recommendations)"
DECODERS = ("strict", "relaxed", "setid", "streamingllm", "snapkv", "earn")  # --decoders' names
SETREC_SLOTS, SETREC_WEIGHTS = 3, (0.9, 0.1, 0.1)  # the setid bench's SETRec layout
SETREC_CATALOG = "setrec"


def kv_policies(prompt_len: int, layers: int) -> tuple[int, dict]:
    """The KV policies of the decoder rows, each keeping about a quarter of a ``prompt_len``
    prompt: ``(keep, {name: (label, decoding-serve --kv-policy JSON)})``."""
    keep = max(2, prompt_len // 4)
    sink = min(4, keep // 2)
    window = max(1, min(8, keep, prompt_len - 1))  # SnapKV needs prompts longer than its window
    layer = layers // 2
    return keep, {
        "streamingllm": (f"StreamingLLM ({sink} sinks + {keep - sink} recent)",
                         {"kind": "streamingllm", "sink": sink, "recent": keep - sink}),
        "snapkv": (f"SnapKV (window {window}, capacity {keep})",
                   {"kind": "snapkv", "window": window, "capacity": keep}),
        "earn": (f"EARN (cut at layer {layer}, registers first {sink} + last {keep - sink})",
                 {"kind": "earn", "layer": layer, "registers": [*range(sink), *range(sink - keep, 0)]}),
    }


def setrec_bundle(path: str, model, args) -> dict:
    """A random SETRec bundle of ``args.items`` items in the folder ``path``: 3 slots of the
    model's hidden size (float16 tables), its model the bench model's layers and weights with a
    32-token vocabulary (SETRec feeds vectors, never tokens). Returns what the JSON records."""
    from decoding.setid import SetIdCatalog
    from decoding.setid.bundle import save_setrec_bundle

    body = bm.tiny_llama(32, hidden_size=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed,
                         intermediate_size=4 * args.hidden)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(("model.embed_tokens.", "lm_head."))}
    missing, unexpected = body.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith(("model.embed_tokens.", "lm_head.")) for k in missing):
        raise RuntimeError(f"SETRec bundle: the bench model's layers do not fit ({missing}, {unexpected})")
    g = torch.Generator().manual_seed(args.seed + 1)
    table = torch.stack([torch.randn(args.items, args.hidden, generator=g).half() for _ in range(SETREC_SLOTS)])
    queries = torch.randn(SETREC_SLOTS, args.hidden, generator=g)
    save_setrec_bundle(path, body, queries, SetIdCatalog(table, torch.tensor(SETREC_WEIGHTS)), name=SETREC_CATALOG)
    return {"kind": "setrec", "num_items": args.items, "slots": SETREC_SLOTS, "dim": args.hidden,
            "slot_weights": list(SETREC_WEIGHTS), "table_dtype": "float16",
            "history_items": max(1, args.prompt_len // SETREC_SLOTS),
            "model": "the bench model's layers and weights, a 32-token vocabulary"}


def num_drafts(args) -> int:
    """The speculative rows' draft beams: decoding-serve's default 2K, at most the catalog."""
    return min(2 * args.beams, args.items)


def decoder_rows(args, prompt_lists) -> list[dict]:
    """The served-decoders table's rows (``--decoders``): each a label, the ``/v1/recommendations``
    body of request ``i`` and how its answers are judged (``exact``: against the exact top-K;
    ``invalid``: invalid items only; ``kv``: agreement with the exact unpruned top-K, informative)."""
    K, chosen = args.beams, set(args.decoders)
    if not chosen:
        return []
    drafts = {"num_drafts": num_drafts(args), "draft_steps": 2}
    spec = f"{args.draft_layers}-layer draft"

    def body(decoder, options, i, history=None):
        out = {"catalog": SETREC_CATALOG if decoder == "setid" else "items", "k": K, "decoder": decoder,
               "options": options}
        out.update({"history": history[i]} if history is not None else {"prompt_token_ids": prompt_lists[i]})
        return out

    rows = [{"method": RECS_BEAM, "decoder": "beam", "options": {}, "judge": "exact",
             "body": lambda i: body("beam", {}, i)}]
    if "strict" in chosen:
        options = {"mode": "strict", **drafts}
        rows.append({"method": f"decoding-serve speculative strict ({spec})", "decoder": "speculative",
                     "options": options, "judge": "exact", "body": lambda i, o=options: body("speculative", o, i)})
    if "relaxed" in chosen:
        options = {"mode": "relaxed", **drafts}
        rows.append({"method": f"decoding-serve speculative relaxed ({spec})", "decoder": "speculative",
                     "options": {**options, "seed": "the request's index"}, "judge": "invalid",
                     "body": lambda i, o=options: body("speculative", {**o, "seed": i}, i)})
    if "setid" in chosen:
        g = torch.Generator().manual_seed(args.seed + 2)
        history = torch.randint(0, args.items, (args.batch, max(1, args.prompt_len // SETREC_SLOTS)),
                                generator=g).tolist()
        rows.append({"method": f"decoding-serve SETRec set identifiers ({SETREC_SLOTS} slots)", "decoder": "setid",
                     "options": {}, "judge": "invalid", "body": lambda i, h=history: body("setid", {}, i, h)})
    _, policies = kv_policies(args.prompt_len, args.layers)
    for name, (label, spec_json) in policies.items():
        if name in chosen:
            rows.append({"method": f"decoding-serve beam + {label}", "decoder": "beam",
                         "options": {"kv_policy": name}, "kv_policy": spec_json, "judge": "kv",
                         "body": lambda i, n=name: body("beam", {"kv_policy": n}, i)})
    return rows


def _faults(answers, num_items: int, k: int, trie=None) -> dict:
    """The invalid items of ``answers`` (per request ``(items, scores, identifiers)``): items
    outside ``[0, num_items)`` or, with ``trie``, whose identifier does not look up to the item;
    repeats within an answer; and answers with fewer than ``k`` items."""
    returned = outside = repeats = short = 0
    for items, _, identifiers in answers:
        returned += len(items)
        found = items
        if trie is not None and items:
            if all(len(t) == len(identifiers[0]) for t in identifiers):
                found = trie.lookup(torch.tensor(identifiers)).tolist()
            else:
                found = [-1] * len(items)
        outside += sum(not 0 <= i < num_items or i != f for i, f in zip(items, found))
        repeats += len(items) - len(set(items))
        short += len(items) < k
    return {"invalid_item_rate": (outside + repeats) / max(returned, 1), "items_outside_catalog": outside,
            "repeated_items": repeats, "short_answers": short}


def _kv_agreement(reference, answers) -> dict:
    """Informative: how much of the exact unpruned top-K each answer keeps."""
    overlap, same = [], []
    for b, (items, _, _) in enumerate(answers):
        exact = set(i for i in reference.items[b][0] if i >= 0)
        overlap.append(len(exact & set(items)) / max(len(exact), 1))
        same.append(set(items) == exact)
    return {"overlap_with_exact_topk": statistics.mean(overlap), "same_items_as_exact": statistics.mean(same)}


def _serve_batches(client) -> dict:
    """decoding-serve's batch histograms (``decoding_serve_batch_{requests,rows}_{sum,count}``)."""
    metrics = server_metrics(client, "decoding_serve_batch_")
    return {k: metrics.get(k, 0.0) for k in ("requests_sum", "requests_count", "rows_sum", "rows_count")}


def _batch_stats(diff: dict, max_batch_rows: int) -> dict:
    """decoding-serve's batches over a method's timed rounds (no bystander runs beside them)."""
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
    max_batch_rows = N * K  # every beam request of a round in one batch (speculative rounds: two, at 2K drafts)
    labels = ([VLLM_OWN, VLLM_ROUTE] if vllm_version else []) + [SERVE, IN_PROCESS]
    ran = (f"methods: {', '.join(labels)}" + ("" if vllm_version else
           "; vLLM is not installed: its beam search and the vLLM route are left out, and so are the "
           "ratios to vLLM"))
    log(f"[serve] {ran}")
    (V, seqs, trie, model, _), prompts, reference = served_workload(args)
    log(f"[serve] catalog: {args.items:,} semantic IDs, vocabulary {V:,} tokens; {N} requests of "
        f"{args.prompt_len} tokens per run, {C} concurrent clients, {K} beams; decoding-serve on {device}")
    prompt_lists = prompts.tolist()
    decoders = decoder_rows(args, prompt_lists)
    if decoders:
        log(f"[serve] served decoders: {', '.join(row['method'] for row in decoders)}")
    keep, policies = kv_policies(args.prompt_len, args.layers)
    policies = {name: spec for name, (_, spec) in policies.items() if name in args.decoders}
    # idle connections are dropped before the servers (uvicorn: 5 s) close them, so a round never
    # reuses one that the server is closing (a race that answers "Server disconnected")
    limits = httpx.Limits(max_connections=C + 2, keepalive_expiry=1.0)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        model_dir = bm.save_for_serving(model, os.path.join(tmp, "model"))
        trie_path = os.path.join(tmp, "catalog.trie")
        trie.save(trie_path)
        os.makedirs(args.out, exist_ok=True)
        # the decoder rows' flags: a draft, the KV policies, a SETRec bundle (--max-beams: the drafts)
        extra, setrec, max_beams = [], None, K
        if any(row["decoder"] == "speculative" for row in decoders):
            extra += ["--draft-layers", str(args.draft_layers)]
            max_beams = max(K, num_drafts(args))
        for name, spec in policies.items():
            extra += ["--kv-policy", f"{name}={json.dumps(spec)}"]
        if "setid" in args.decoders:
            log(f"[serve] a random SETRec bundle of {args.items:,} items")
            setrec = setrec_bundle(os.path.join(tmp, "setrec"), model, args)
            extra += ["--setid", os.path.join(tmp, "setrec")]
        serve_log = os.path.join(args.out, "decoding-serve.log")
        log(f"[serve] starting decoding-serve (its log: {serve_log})")
        serve_url, serve_proc = servers.enter_context(decoding_server(
            model_dir, {"items": trie_path}, serve_log,
            args=("--device", str(device), "--max-batch-rows", str(max_batch_rows),
                  "--max-beams", str(max_beams), "--max-queue", str(max(1024, 2 * N)),
                  *(() if args.max_wait_ms is None else ("--max-wait-ms", str(args.max_wait_ms))), *extra)))
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

        def recommending(body):
            """A round of a decoder row: ``N`` ``/v1/recommendations`` requests from ``C`` clients."""
            return lambda: http_round(lambda i: post_recommendation(serve, body(i)), N, C, NoBystander,
                                      lambda: _serve_batches(serve))

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

        http_plan = list(plan)
        plan.append((IN_PROCESS, in_process))
        plan += [(row["method"], recommending(row["body"])) for row in decoders]
        # the methods take turns, round by round (round 0: each one's warm-up)
        # every round starts with both servers idle: vLLM's engine keeps a core busy for about a
        # second after its last request, which would otherwise fall on the method after it
        runs, rounds = in_turn(plan, args.repeats, before_each=lambda: wait_idle(server_pids))
        # the bystander row: one more round of each HTTP method with a bystander beside it (its work
        # is not the method's: the timed rounds, and the server's overhead, leave it out)
        beside = {}
        for label, measure in http_plan:
            wait_idle(server_pids)
            beside[label] = measure(bystanders[label])[2]
            log(f"  {label}: a round with the bystander beside it")
        methods, batches = [], None
        for label, _ in http_plan:
            row, diff = http_summary(runs[label], N)
            row.update(bystander_p50_ms=percentile(beside[label], 0.5) * 1e3,
                       bystander_max_ms=max(beside[label]) * 1e3)
            row.update(judged(reference, items_of(row.pop("answers"), trie)))
            if label == SERVE:
                batches = _batch_stats(diff, max_batch_rows)
            else:
                add_route_stats(row, diff)
            methods.append({"method": label, **row})
        served_decoders = [_decoder_row(spec, runs[spec["method"]], N, K, args.items, trie, reference,
                                        max_batch_rows) for spec in decoders]

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
    if served_decoders:
        base = served_decoders[0]
        for row in served_decoders:
            row["vs_beam"] = row["requests_per_s"] / base["requests_per_s"]
            row["paired_vs_beam"] = paired_speedups(base["runs_ms"], row["runs_ms"])
            row["paired_vs_beam_median"] = statistics.median(row["paired_vs_beam"])
    return {"suite": "serve", "vllm": vllm_version or "not installed", "methods_run": labels,
            "decoders_run": [row["method"] for row in decoders],
            "config": {**{k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "clients", "beams",
                                                        "prompt_len", "hidden", "layers", "heads", "repeats", "seed",
                                                        "text_vocab", "decoders", "draft_layers")},
                       "vocab_size": V, "device": str(device), "max_batch_rows": max_batch_rows,
                       "max_wait_ms": args.max_wait_ms, "kv_policies": policies, "kv_kept_positions": keep,
                       "setrec_bundle": setrec},
            "bystander_alone_ms": {k: v * 1e3 for k, v in alone.items()}, "methods": methods,
            "server_overhead": overhead, "serve_batches": batches, "decoders": served_decoders, "rounds": rounds}


def _decoder_row(spec: dict, runs, N: int, K: int, num_items: int, trie, reference, max_batch_rows: int) -> dict:
    """A served decoder's row: throughput, latency, batches, and its answers judged as
    ``spec["judge"]`` says (see :func:`decoder_rows`)."""
    row, diff = http_summary(runs, N)
    answers = row.pop("answers")
    row = {"method": spec["method"], "decoder": spec["decoder"], "options": spec["options"],
           **({"kv_policy": spec["kv_policy"]} if "kv_policy" in spec else {}), "judged_by": {
               "exact": "the exact top-K (must be exact or near-tie)", "invalid": "invalid items only",
               "kv": "agreement with the exact unpruned top-K (informative)"}[spec["judge"]], **row,
           "batches": _batch_stats(diff, max_batch_rows)}
    setid = spec["decoder"] == "setid"
    row.update(_faults(answers, num_items, K, None if setid else trie))
    if spec["judge"] == "exact":
        exact = judged(reference, [(items, scores) for items, scores, _ in answers])
        exact.pop("invalid_item_rate")  # _faults' (it also counts repeats and mismatched identifiers)
        row.update(exact)
    elif spec["judge"] == "kv":
        row.update(_kv_agreement(reference, answers))
    return row


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
    show_decoders(res)


_DECODER_COLUMNS = [("req/s", "requests_per_s", "{:.2f}"), ("vs beam", "paired_vs_beam_median", "{:.2f}x"),
                    ("p50 ms", "p50_ms", "{:,.0f}"), ("p99 ms", "p99_ms", "{:,.0f}"),
                    ("req/batch", "per_batch", "{:.1f}"), ("invalid", "invalid_item_rate", "{:.0%}"),
                    ("exact", "exact", "{:.0%}"), ("tie", "near-tie", "{:.0%}"), ("wrong", "wrong", "{:.0%}"),
                    ("top-K kept", "overlap_with_exact_topk", "{:.0%}")]


def show_decoders(res: dict) -> None:
    rows = [{**row, **row.get("topk", {}), "per_batch": row["batches"]["mean_requests_per_batch"]}
            for row in res.get("decoders") or ()]
    if not rows:
        return
    cfg = res["config"]
    print_methods(f"served decoders on decoding-serve's /v1/recommendations: the same {cfg['batch']} prompts from "
                  f"{cfg['clients']} concurrent clients, k = {cfg['beams']}", rows, _DECODER_COLUMNS)
    print("vs beam: each round's beam-search time on /v1/recommendations over the row's, median of rounds; invalid: "
          "items outside the catalog (or whose identifier is not the item's) and repeats; exact/tie/wrong: beam and "
          "strict speculative search against the exact top-K (must be exact or near-tie); relaxed speculative search "
          "and SETRec are judged by invalid items only; top-K kept: the share of the exact unpruned top-K each KV "
          f"policy returns (informative; each keeps {cfg['kv_kept_positions']} of {cfg['prompt_len']} prompt "
          "positions)")
