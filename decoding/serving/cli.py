"""``decoding-serve``: the package's decoders behind an OpenAI-compatible HTTP server.

    decoding-serve DIR
    decoding-serve --model DIR --catalog NAME=FILE [--catalog ...] [--draft DIR | --draft-layers N]
                   [--setid [NAME=]DIR] [--kv-policy NAME=JSON] [--device cuda] [--host HOST] ...

``DIR`` alone is a directory with ``decoding-serve.json`` (:mod:`decoding.serving.directory`;
``decoding-bench workload --export DIR`` writes one). Otherwise ``--model`` is a transformers
causal LM (``save_pretrained``; a tokenizer beside it serves text prompts), each ``FILE`` an
:class:`~decoding.ItemTrie` saved with ``ItemTrie.save`` for the model's vocabulary; requests name
catalogs by ``NAME`` only. ``--draft`` / ``--draft-layers`` serve speculative beam search,
``--setid`` set-identifier bundles (:mod:`decoding.setid.bundle`), ``--kv-policy`` the KV pruning
policies requests may name. SIGTERM (or Ctrl-C) stops taking connections and answers every
request already accepted before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

logger = logging.getLogger("decoding.serving")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _catalog(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def _setid(text: str) -> tuple[str | None, str]:
    name, sep, path = text.partition("=")
    if sep and name and path:
        return name, path
    if sep:
        raise argparse.ArgumentTypeError(f"expected [NAME=]DIR, got {text!r}")
    return None, text  # the bundle's own name


KV_POLICY_KINDS = {"streamingllm": ("StreamingLLM", ("sink", "recent")),
                   "snapkv": ("SnapKV", ("window", "capacity", "kernel", "pooling")),
                   "earn": ("EarnCut", ("layer", "registers"))}


def _kv_policy(text: str):
    """``NAME=JSON``: a KV policy requests may name, e.g. ``recent={"kind": "streamingllm",
    "sink": 4, "recent": 64}``."""
    import json

    from decoding import kv

    name, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name) or name == "shared":
        raise argparse.ArgumentTypeError(f"expected NAME=JSON (NAME a name requests can give: letters, digits and "
                                         f"'_', not 'shared'), got {text!r}")
    try:
        fields = json.loads(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a JSON object after '='") from None
    kind = fields.pop("kind", None) if isinstance(fields, dict) else None
    if kind not in KV_POLICY_KINDS:
        raise argparse.ArgumentTypeError(f"{name}: \"kind\" must be one of {', '.join(KV_POLICY_KINDS)}")
    cls, allowed = KV_POLICY_KINDS[kind]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"{name}: {kind} takes {', '.join(allowed)}, not {', '.join(unknown)}")
    if "registers" in fields and isinstance(fields["registers"], list):
        fields["registers"] = tuple(fields["registers"])
    try:
        return name, getattr(kv, cls)(**fields)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from None


def _history_prompt(text: str):
    """``NAME=JSON``: how a catalog's requests turn a history into a prompt, e.g.
    ``movies={"prefix": [1], "max_items": 20}``."""
    import json

    from decoding.serving.decoders import HistoryPrompt

    name, sep, spec = text.partition("=")
    try:
        fields = json.loads(spec) if sep and name else None
        if not isinstance(fields, dict) or set(fields) - {"prefix", "max_items"}:
            raise ValueError("expected a JSON object with prefix and max_items")
        return name, HistoryPrompt(tuple(fields.get("prefix", ())), fields.get("max_items", 20))
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"expected NAME={{\"prefix\": [...], \"max_items\": N}}: {exc}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decoding-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("directory", nargs="?", default=None, metavar="DIR",
                   help="a directory with decoding-serve.json (its model, draft, catalogs, titles and history "
                        "prompts); --catalog, --setid, --kv-policy and --history-prompt add to it, --draft and "
                        "--draft-layers replace its draft")
    p.add_argument("--model", default=None, help="a transformers causal LM directory (save_pretrained)")
    p.add_argument("--catalog", action="append", type=_catalog, default=[], metavar="NAME=FILE",
                   help="serve the ItemTrie saved at FILE to requests naming NAME (repeatable)")
    draft = p.add_mutually_exclusive_group()
    draft.add_argument("--draft", default=None, metavar="DIR",
                       help="a draft model (same vocabulary) for speculative beam search (decoder: speculative)")
    draft.add_argument("--draft-layers", type=_positive, default=None, metavar="N",
                       help="speculative beam search with the target's first N layers as its draft")
    p.add_argument("--setid", action="append", type=_setid, default=[], metavar="[NAME=]DIR",
                   help="serve the set-identifier bundle in DIR (decoding.setid.bundle) to requests with decoder "
                        "setid naming NAME (default: the bundle's own name; repeatable)")
    p.add_argument("--kv-policy", action="append", type=_kv_policy, default=[], metavar="NAME=JSON",
                   help="a KV pruning policy beam requests may name as options.kv_policy, e.g. "
                        "'recent={\"kind\": \"streamingllm\", \"sink\": 4, \"recent\": 64}' (kinds: "
                        + ", ".join(KV_POLICY_KINDS) + "); 'shared' (no pruning) is always allowed")
    p.add_argument("--history-prompt", action="append", type=_history_prompt, default=[], metavar="NAME=JSON",
                   help="let requests to catalog NAME give a history (item ids) for a prompt: the prefix tokens, "
                        "then the identifiers of the last max_items items, e.g. "
                        "'items={\"prefix\": [1], \"max_items\": 20}'")
    p.add_argument("--served-model-name", default=None, help="the name requests give as `model` (default: --model)")
    p.add_argument("--device", default="cpu", help="where the model and search run: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the model's weights and activations")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton"),
                   help="the beam-step op's backend")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (default: the DECODING_SERVE_API_KEY "
                        "environment variable, which keeps the key out of the process list; none: no key)")
    p.add_argument("--max-batch-rows", type=_positive, default=2048,
                   help="beam rows per batched search (a larger request runs alone); the step's logits are "
                        "rows x vocabulary floats")
    p.add_argument("--max-batch-tokens", type=_positive, default=1 << 17,
                   help="prompt tokens per batched search, counted as padded (requests x the longest prompt)")
    p.add_argument("--max-wait-ms", type=float, default=100.0,
                   help="longest the oldest waiting request waits for others to fill a batch")
    p.add_argument("--arrival-gap-ms", type=float, default=20.0,
                   help="a batch stops waiting once no request arrived for this long")
    p.add_argument("--max-beams", type=_positive, default=1024, help="most beams (n / k) per request")
    p.add_argument("--max-exclude", type=_positive, default=100_000, help="most excluded item ids per request")
    p.add_argument("--max-prompt-tokens", type=_positive, default=None,
                   help="longest prompt (default: the model's positions less the longest identifier)")
    p.add_argument("--max-queue", type=_positive, default=1024,
                   help="requests waiting for a batch before the server answers 429")
    p.add_argument("--max-body-bytes", type=_positive, default=16 << 20,
                   help="largest request body (413 above it, before it is parsed)")
    p.add_argument("--max-history", type=_positive, default=1024, help="most history item ids per request")
    p.add_argument("--shutdown-timeout-s", type=_positive, default=600,
                   help="on SIGTERM, the longest the server waits for the requests it accepted")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def _fail(message: str):
    raise SystemExit(f"decoding-serve: {message}")


def _load_model(path: str, dtype, device, what: str):
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        _fail(f"{what}: no model directory at {path}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def build_app(args):
    """The app ``args`` describe: the models, catalogs and bundles loaded, checked against each other."""
    import torch
    from transformers import AutoTokenizer

    from decoding.serving.app import create_app
    from decoding.serving.decoders import BeamDecoder, Decoders, SetIdDecoder, SpeculativeDecoder
    from decoding.serving.directory import load_titles, read_server_directory
    from decoding.serving.requests import Caps
    from decoding.trie import ItemTrie

    served = None
    if args.directory is not None:
        if args.model is not None:
            _fail("--model: the directory names the model; give one or the other")
        try:
            served = read_server_directory(args.directory)
        except ValueError as exc:
            _fail(f"DIR: {exc}")
    model_dir = served.model if served is not None else args.model
    if model_dir is None:
        _fail("give a directory (decoding-serve DIR) or --model and --catalog")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device: CUDA is not available on this machine")
    catalogs, titles, prompts = {}, {}, {}
    sources = [(name, c.trie, "DIR") for name, c in (served.catalogs.items() if served else ())]
    sources += [(name, path, f"--catalog {name}=") for name, path in args.catalog]
    for name, path, flag in sources:
        if name in catalogs:
            _fail(f"--catalog: {name!r} is given twice")
        try:
            catalogs[name] = ItemTrie.load(path)
        except (OSError, ValueError) as exc:
            _fail(f"{flag}{path}: cannot be loaded: {exc}")
    if not catalogs:
        _fail("--catalog: give at least one catalog (NAME=FILE)")
    for name, entry in (served.catalogs.items() if served else ()):
        if entry.history_prompt is not None:
            prompts[name] = entry.history_prompt
        if entry.titles is not None:
            try:
                titles[name] = load_titles(entry.titles, catalogs[name].num_ids)
            except (OSError, ValueError) as exc:
                _fail(f"DIR: catalogs.{name}.titles: {exc}")
    for name, prompt in args.history_prompt:
        if name not in catalogs:
            _fail(f"--history-prompt: {name!r} is not a catalog")
        prompts[name] = prompt
    policies = {}
    for name, policy in args.kv_policy:
        if name in policies:
            _fail(f"--kv-policy: {name!r} is given twice")
        policies[name] = policy
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = _load_model(model_dir, dtype, device, "--model")
    has_tokenizer = any(os.path.isfile(os.path.join(model_dir, name))
                        for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None
    try:
        beam = BeamDecoder(model, catalogs, device=device, backend=args.backend, kv_policies=policies,
                           history_prompts=prompts)
    except (TypeError, ValueError) as exc:
        _fail(f"--catalog / --kv-policy: {exc}")
    speculative = None
    draft_dir = args.draft or (served.draft if served is not None else None)
    if args.draft_layers is not None:
        from decoding.speculative.draft import truncated_draft

        try:
            draft = truncated_draft(model, args.draft_layers)
        except ValueError as exc:
            _fail(f"--draft-layers: {exc}")
    else:
        draft = None if draft_dir is None else _load_model(draft_dir, dtype, device, "--draft")
    if draft is not None:
        try:
            speculative = SpeculativeDecoder(beam, draft, max_drafts=args.max_beams)
        except ValueError as exc:
            _fail(f"--draft: {exc}")
    setid = None
    bundles_given = [(name, path, f"--setid {path}") for name, path in args.setid]
    bundles_given += [(name, path, f"DIR: setid.{name}") for name, path in (served.setid.items() if served else ())]
    if bundles_given:
        from decoding.setid.bundle import load_setid_bundle

        bundles = {}
        for name, path, flag in bundles_given:
            try:
                bundle = load_setid_bundle(path, device=device, dtype=dtype)
            except (OSError, ValueError) as exc:
                _fail(f"{flag}: {exc}")
            name = name or bundle.name
            if name in bundles:
                _fail(f"--setid: {name!r} is given twice")
            bundles[name] = bundle
            if name in titles and len(titles[name]) != bundle.num_items:  # titles are per catalog name
                _fail(f"{flag}: the bundle has {bundle.num_items} items, the titles of catalog {name!r} "
                      f"{len(titles[name])}")
        setid = SetIdDecoder(bundles, backend=args.backend)
    max_prompt = args.max_prompt_tokens
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_prompt is None and positions:
        max_prompt = max(1, int(positions) - max(t.depth for t in catalogs.values()))
    for name, prompt in prompts.items():  # the longest prompt a history builds is the operator's to fit
        longest = len(prompt.prefix) + prompt.max_items * catalogs[name].depth
        if max_prompt is not None and longest > max_prompt:
            _fail(f"history prompt of {name!r}: up to {longest} tokens, above the longest prompt served ({max_prompt}, "
                  "--max-prompt-tokens)")
    caps = Caps(max_beams=args.max_beams, max_exclude=args.max_exclude, max_prompt_tokens=max_prompt,
                max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, max_history=args.max_history)
    eos = {t.eos_token_id for t in catalogs.values()} - {None}
    if len(eos) > 1:
        _fail("--catalog: the catalogs end identifiers with different EOS tokens")
    name = args.served_model_name or (served.served_model_name if served is not None else None) or model_dir
    return create_app(Decoders(beam, speculative, setid), model_name=name, caps=caps, tokenizer=tokenizer,
                      eos_token_id=eos.pop() if eos else None,
                      api_key=args.api_key or os.environ.get("DECODING_SERVE_API_KEY") or None,
                      max_batch_rows=args.max_batch_rows, max_batch_tokens=args.max_batch_tokens,
                      max_wait_s=args.max_wait_ms / 1e3, arrival_gap_s=args.arrival_gap_ms / 1e3, titles=titles)


def main(argv=None) -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f"decoding-serve needs the serve extra (pip install 'genrec-decoding[serve]'): {exc}")
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    # on SIGTERM uvicorn closes its sockets, then waits for every request in flight (at most
    # --shutdown-timeout-s, so a client that never finishes sending cannot hold it forever); the
    # app's lifespan then drains the batcher (nothing accepted is lost)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout_s, access_log=False)
    uvicorn.Server(config).run()


if __name__ == "__main__":  # pragma: no cover - python -m decoding.serving.cli
    sys.exit(main())
