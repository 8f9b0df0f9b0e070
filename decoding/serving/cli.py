"""``decoding-serve``: the package's beam search behind an OpenAI-compatible HTTP server.

    decoding-serve --model DIR --catalog NAME=FILE [--catalog ...] [--device cuda] [--host HOST]
                   [--port PORT] [--api-key KEY] [--max-batch-rows N] ...

``DIR`` is a transformers causal LM (``save_pretrained``; a tokenizer beside it serves text
prompts), each ``FILE`` an :class:`~decoding.ItemTrie` saved with ``ItemTrie.save`` for the
model's vocabulary; requests name catalogs by ``NAME`` only. SIGTERM (or Ctrl-C) stops taking
connections and answers every request already accepted before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decoding-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers causal LM directory (save_pretrained)")
    p.add_argument("--catalog", action="append", type=_catalog, required=True, metavar="NAME=FILE",
                   help="serve the ItemTrie saved at FILE to requests naming NAME (repeatable)")
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
    p.add_argument("--shutdown-timeout-s", type=_positive, default=600,
                   help="on SIGTERM, the longest the server waits for the requests it accepted")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def build_app(args):
    """The app ``args`` describe: the model and catalogs loaded, checked against each other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoding.serving.app import create_app
    from decoding.serving.decoders import BeamDecoder
    from decoding.serving.requests import Caps
    from decoding.trie import ItemTrie

    if not os.path.isdir(args.model):
        raise SystemExit(f"decoding-serve: --model: no model directory at {args.model}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("decoding-serve: --device: CUDA is not available on this machine")
    catalogs = {}
    for name, path in args.catalog:
        if name in catalogs:
            raise SystemExit(f"decoding-serve: --catalog: {name!r} is given twice")
        try:
            catalogs[name] = ItemTrie.load(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"decoding-serve: --catalog {name}={path}: cannot be loaded: {exc}") from None
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    has_tokenizer = any(os.path.isfile(os.path.join(args.model, name))
                        for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
    try:
        decoder = BeamDecoder(model, catalogs, device=device, backend=args.backend)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"decoding-serve: --catalog: {exc}") from None
    max_prompt = args.max_prompt_tokens
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_prompt is None and positions:
        max_prompt = max(1, int(positions) - max(t.depth for t in catalogs.values()))
    caps = Caps(max_beams=args.max_beams, max_exclude=args.max_exclude, max_prompt_tokens=max_prompt,
                max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)
    eos = {t.eos_token_id for t in catalogs.values()} - {None}
    if len(eos) > 1:
        raise SystemExit("decoding-serve: --catalog: the catalogs end identifiers with different EOS tokens")
    return create_app(decoder, model_name=args.served_model_name or args.model, caps=caps, tokenizer=tokenizer,
                      eos_token_id=eos.pop() if eos else None,
                      api_key=args.api_key or os.environ.get("DECODING_SERVE_API_KEY") or None,
                      max_batch_rows=args.max_batch_rows, max_batch_tokens=args.max_batch_tokens,
                      max_wait_s=args.max_wait_ms / 1e3, arrival_gap_s=args.arrival_gap_ms / 1e3)


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
