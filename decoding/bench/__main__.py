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
import importlib
import json
import os
import sys

import torch

from decoding.bench._common import environment, log, write_chart


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="decoding-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=["e2e", "step", "build", "all"], default="e2e")
    p.add_argument("--items", type=int, default=100_000, help="catalog size")
    p.add_argument("--levels", type=int, default=4, help="semantic ID length")
    p.add_argument("--codes", type=int, default=256, help="codes per level")
    p.add_argument("--engine", choices=["transformers", "vllm", "vllm-http"], default="transformers",
                   help="e2e suite: compare on transformers (default), on an in-process vLLM engine, or through "
                        "a vLLM OpenAI server on localhost with concurrent HTTP clients (vllm-http); the vLLM "
                        "engines need the vllm extra")
    p.add_argument("--clients", type=int, default=64, help="vllm-http: concurrent HTTP clients")
    p.add_argument("--workload", choices=["ml-100k"], default=None,
                   help="a trained recommender on real data instead of random weights: MovieLens-100K "
                        "(needs `pip install --no-deps recbole==1.2.1` for the data); trains once, then caches")
    p.add_argument("--cache-dir", default="~/.cache/decoding",
                   help="workload: where the trained models are cached ('none': train, cache nothing)")
    p.add_argument("--max-users", type=int, default=None, help="workload: the first users only (a toy run)")
    p.add_argument("--train-epochs", type=int, default=None, help="workload: training epochs (default: the recipe's)")
    p.add_argument("--fresh-baselines", action="store_true",
                   help="workload: rerun transformers' beam searches even where their results are cached")
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
    p.add_argument("--batch", type=int, default=None,
                   help="requests per batch (default 16; 64 with --engine vllm; 64 per run with vllm-http)")
    p.add_argument("--beams", default="20", help="beams = items returned per request; a comma-separated list "
                   "(e.g. 20,64,256,1024) runs the end-to-end comparison once per width")
    p.add_argument("--text-vocab", type=int, default=0,
                   help="ordinary text tokens in the model's vocabulary besides the semantic-ID tokens")
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
    try:
        args.beam_widths = [int(x) for x in str(args.beams).split(",")]
    except ValueError:
        p.error("--beams must be an integer or comma-separated integers")
    args.beams = max(args.beam_widths)
    if args.text_vocab < 0:
        p.error("--text-vocab must be non-negative")
    if args.batch is None:
        args.batch = 16 if args.engine == "transformers" and args.workload is None else 64
    if args.workload is not None and (args.engine != "transformers" or args.decoder != "beam" or args.kv):
        p.error("--workload runs every decoder on transformers models itself (no --engine, --decoder or --kv)")
    if args.max_users is not None and args.max_users < 1 or args.train_epochs is not None and args.train_epochs < 1:
        p.error("--max-users and --train-epochs must be positive")
    if args.engine != "transformers" and args.device != "cpu" and args.suite in ("e2e", "all"):
        p.error(f"--engine {args.engine} runs the CPU build of vLLM here; pass --device cpu")
    if min(args.beam_widths) < 1:
        p.error("--beams must be positive")
    for name in ("items", "levels", "codes", "batch", "beams", "prompt_len", "hidden", "layers", "heads", "repeats",
                 "step_repeats", "clients"):
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


# Every suite is a module with run(args, device) -> dict and show(result); nothing imports this
# file. vLLM's suite loads only when asked for (it needs the vllm extra).
SUITES = {
    "e2e": "decoding.bench.e2e",
    "speculative": "decoding.bench.speculative",
    "setid": "decoding.bench.setid",
    "kv": "decoding.bench.kv",
    "vllm": "decoding.bench.vllm",
    "vllm-http": "decoding.bench.vllm_http",
    "ml-100k": "decoding.bench.workload",
    "step": "decoding.bench.ops:step",
    "build": "decoding.bench.ops:build",
}


def selected_suites(args) -> list[str]:
    """``--suite e2e`` is the end-to-end comparison the other flags pick (``--decoder``,
    ``--engine``, ``--kv``); ``all`` adds the step and build suites."""
    if args.workload is not None:
        e2e = args.workload
    elif args.engine != "transformers":
        e2e = args.engine
    elif args.kv:
        e2e = "kv"
    else:
        e2e = {"beam": "e2e"}.get(args.decoder, args.decoder)
    return {"e2e": [e2e], "all": [e2e, "step", "build"]}.get(args.suite, [args.suite])


def load_suite(name: str):
    """``(run, show)`` of a registered suite."""
    module, _, prefix = SUITES[name].partition(":")
    mod = importlib.import_module(module)
    return (getattr(mod, f"run_{prefix}"), getattr(mod, f"show_{prefix}")) if prefix else (mod.run, mod.show)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decoding-bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    suites = selected_suites(args)
    results = []
    runs = [(suite, width) for suite in suites for width in (args.beam_widths if suite not in ("step", "build")
                                                             else [args.beams])]
    for i, (suite, width) in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] suite {suite}" + (f", {width} beams" if len(args.beam_widths) > 1 else ""))
        run, show = load_suite(suite)
        res = run(argparse.Namespace(**{**vars(args), "beams": width}), device)
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
