"""``decoding-bench vllm``: constrained beam search on a vLLM engine, three ways.

1. vLLM's ``LLM.beam_search``, unconstrained, then post-filtering the returned sequences;
2. vLLM's ``LLM.beam_search`` with the package's trie logits processor (engine-wide catalog,
   ``logprobs_mode="processed_logprobs"``);
3. the package's driver, ``decoding.integrations.vllm.beam_search``.

Columns: latency, throughput, invalid-item rate, agreement with the exact top-K (computed by
``decoding.beam_search`` on the same weights in transformers). Methods 1 and 3 and the engine's
model-work floor share one engine and take turns round by round (:func:`alternated`); method 2
needs an engine configured for it and runs in a child process after them. Prompts all have ``--prompt-len``
tokens: vLLM's beam search resubmits prompt + beam tokens each step, and the engine-wide
catalog needs one identifier offset for all requests.
"""

from __future__ import annotations

import os
import tempfile

import torch

from decoding import testing as bm
from decoding.bench._common import METHOD_COLUMNS, alternated, catalog_and_model, log, print_methods
from decoding.testing.exactness import ExactReference


def _engine(model_dir, **kwargs):
    import vllm

    return vllm.LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=max(512, kwargs.pop("max_len")),
                    enable_prefix_caching=True, seed=0, **kwargs)


def run(args, device) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    try:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import BeamSearchParams

        from decoding.integrations import vllm as dv
    except ImportError as exc:
        raise SystemExit(f"decoding-bench vllm: {exc}")

    device = torch.device("cpu")
    K, L, B = args.beams, args.levels, args.batch
    log(f"[vllm] catalog: {args.items:,} semantic IDs; {B} prompts of {args.prompt_len} tokens; {K} beams")
    V, seqs, trie, model, _ = catalog_and_model(args)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(bm.SPECIAL_TOKENS, V, (B, args.prompt_len), generator=g)
    prompts = [TokensPrompt(prompt_token_ids=row) for row in ids.tolist()]

    log("[vllm] exact top-K: decoding.beam_search on the same weights in transformers")
    reference = ExactReference(model, ids, trie, K, seqs)

    def score(item_lists, score_lists=None):
        rows = [it for items in item_lists for it in items]
        invalid = sum(i < 0 for i in rows) / max(len(rows), 1)
        score_lists = score_lists or [[0.0] * len(items) for items in item_lists]
        topk, differences = reference.judge(list(zip(item_lists, score_lists)))
        return invalid, topk["exact"] + topk["near-tie"], topk, differences

    def items_of(outputs):
        gen = [[s.tokens[args.prompt_len: args.prompt_len + L] for s in o.sequences] for o in outputs]
        return [trie.lookup(torch.tensor(rows)).tolist() for rows in gen]  # -1: not a catalog item

    params = BeamSearchParams(beam_width=K, max_tokens=L, ignore_eos=True, length_penalty=0.0)
    methods = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bm.save_for_serving(model, os.path.join(tmp, "model"))
        trie_path = os.path.join(tmp, "catalog.trie")
        trie.save(trie_path)
        max_logprobs = max(2 * K, 128)

        log("[vllm] engine without the processor's engine-wide catalog")
        # max_logprobs=-1 is only a limit: vLLM's beam_search still asks for 2K log-probs per
        # beam, and the driver may ask for the whole vocabulary at nodes with >128 children
        llm = _engine(model_dir, max_len=args.prompt_len + L + 8, max_logprobs=-1)
        own, driver, work = ("vLLM beam_search, unconstrained + post-filter", "decoding.integrations.vllm.beam_search",
                             "engine floor (model work only)")
        timings = alternated([(own, lambda: llm.beam_search(prompts, params)),
                              (driver, lambda: dv.beam_search(llm, ids.tolist(), trie=trie, num_beams=K)),
                              (work, lambda: _engine_floor(llm, prompts, trie, K, L))], device, args.repeats)
        t, runs, out = timings[own]
        methods.append((own, t, runs, *score(items_of(out))))
        t, runs, out = timings[driver]
        methods.append((driver, t, runs, *score(out.items.tolist(), out.scores.tolist())))
        floor, floor_runs, _ = timings[work]
        paired = timings["paired"]
        llm = None  # release this engine before the next one starts
        # a second engine in this process would inherit torn-down parallel state: run it in a child
        log("[vllm] engine with the trie processor as engine-wide catalog (separate process)")
        t, runs, item_lists = _constrained_in_child(model_dir, trie_path, ids.tolist(), K, L, args, max_logprobs)
        methods.append(("vLLM beam_search + decoding processor", t, runs, *score(item_lists)))

    base = methods[0][1]
    rows = [{"method": name, "latency_ms": t * 1e3, "runs_ms": [r * 1e3 for r in runs], "requests_per_s": B / t,
             "speedup_vs_baseline": base / t, "invalid_item_rate": inv, "agreement_with_exact_topk": agr,
             "topk": topk, "exact_topk": topk["exact"], "near_tie": topk["near-tie"], "wrong": topk["wrong"],
             "differences": differences}
            for name, t, runs, inv, agr, topk, differences in methods]
    for row in rows:
        if row["method"] in paired:  # the methods that took turns on one engine
            row["paired_speedup_median"] = paired[row["method"]]
    return {"suite": "vllm", "config": {k: getattr(args, k) for k in ("items", "levels", "codes", "batch", "beams",
                                                                         "prompt_len", "hidden", "layers", "heads",
                                                                         "repeats", "seed")},
            "methods": rows,
            "engine_floor": {"latency_ms": floor * 1e3, "runs_ms": [r * 1e3 for r in floor_runs],
                             "max_speedup_vs_baseline": base / floor, "paired_speedup_median": paired[work]}}


def _engine_floor(llm, prompts, trie, K, L):
    """The model work any beam search on this engine must do, and nothing else: prefill every
    prompt once, then K persistent rows per prompt decoding L-1 tokens (no ranking, no forks, no
    per-step requests). Its time bounds what even an in-engine beam search could reach."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)
    if L > 1:
        first = trie.node_token[1: 1 + trie.max_branch_at(0)].tolist()  # root children: real first tokens
        rows = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"] + [first[j % len(first)]])
                for p in prompts for j in range(K)]
        llm.generate(rows, SamplingParams(max_tokens=L - 1, temperature=0.0, ignore_eos=True, detokenize=False),
                     use_tqdm=False)


_CHILD = r'''
import json, os, statistics, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
import torch, vllm
from vllm.inputs import TokensPrompt
from vllm.sampling_params import BeamSearchParams
from decoding import ItemTrie
model_dir, trie_path, prompts, K, L, repeats, max_logprobs, max_len = json.loads(sys.argv[1])
trie = ItemTrie.load(trie_path)
T = len(prompts[0])
llm = vllm.LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=max(512, max_len),
               enable_prefix_caching=True,
               seed=0, max_logprobs=max_logprobs, logprobs_mode="processed_logprobs",
               additional_config={"decoding": {"catalog": trie_path, "offset": T}})
tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
params = BeamSearchParams(beam_width=K, max_tokens=L, ignore_eos=True, length_penalty=0.0)
llm.beam_search(tp, params)
runs = []
for _ in range(repeats):
    t0 = time.perf_counter(); out = llm.beam_search(tp, params); runs.append(time.perf_counter() - t0)
items = [trie.lookup(torch.tensor([s.tokens[T:T + L] for s in o.sequences])).tolist() for o in out]
print("RESULT" + json.dumps({"median": statistics.median(runs), "runs": runs, "items": items}))
'''


def _constrained_in_child(model_dir, trie_path, prompts, K, L, args, max_logprobs):
    import json
    import subprocess
    import sys

    payload = json.dumps([model_dir, trie_path, prompts, K, L, args.repeats, max_logprobs, args.prompt_len + L + 8])
    res = subprocess.run([sys.executable, "-c", _CHILD, payload], capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"constrained vLLM run failed:\n{res.stderr[-4000:]}")
    data = json.loads(lines[0][len("RESULT"):])
    return data["median"], data["runs"], data["items"]


def show(res: dict) -> None:
    cfg = res["config"]
    print_methods(f"Constrained beam search on vLLM: {cfg['items']:,} items, {cfg['batch']} prompts of "
                  f"{cfg['prompt_len']} tokens, {cfg['beams']} beams, {cfg['levels']}-token identifiers",
                  res["methods"], METHOD_COLUMNS + [("exact", "exact_topk", "{:.0%}"),
                                                    ("near-tie", "near_tie", "{:.0%}"), ("wrong", "wrong", "{:.0%}")])
    floor = res.get("engine_floor")
    if floor:
        print(f"Model work alone (prefill + {cfg['beams']} rows per prompt decoding {cfg['levels'] - 1} tokens, "
              f"as plain requests, no ranking): {floor['latency_ms']:,.0f} ms, "
              f"{floor['max_speedup_vs_baseline']:.1f}x below the "
              f"baseline: roughly the most any beam search on this engine could gain")
    paired = [(m["method"], m["paired_speedup_median"]) for m in res["methods"][1:] if "paired_speedup_median" in m]
    if floor and "paired_speedup_median" in floor:
        paired.append(("model work alone", floor["paired_speedup_median"]))
    if paired:
        print("paired (each round's vLLM beam_search time over the method's in the same round, median of rounds): "
              + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in paired))
