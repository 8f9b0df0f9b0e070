"""``decoding-serve``'s HTTP face: FastAPI routes over the serving core.

Routes: ``POST /v1/completions`` (OpenAI-compatible beam search over a catalog, the request the
vLLM route takes), ``POST /v1/recommendations``, ``GET /health``, ``GET /v1/models`` and
``GET /metrics`` (Prometheus). Errors come in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``: 400 naming the argument (never repeating a path or what exists on the
server), 401 without the operator's API key, 404 for a model the server does not serve, 413 for
a body above ``max_body_bytes``, 429 with ``Retry-After`` when ``max_queue`` requests wait.

A handler watches its connection while its request waits: a client that disconnects withdraws
the request (never decoded if its batch had not started; its result dropped otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from decoding.serving.batcher import Batcher, BatchStats, QueueFull, ShuttingDown
from decoding.serving.requests import Caps, RequestError, completion_request, recommendation_request, shown_tokens

logger = logging.getLogger("decoding.serving")


class UnknownModel(LookupError):
    """A completions request names a model this server does not serve (HTTP 404)."""


_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics(BatchStats):
    """The server's Prometheus metrics, in a registry of its own (``GET /metrics``)."""

    def __init__(self, batcher_ref):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("decoding_serve_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=registry)
        self.latency = Histogram("decoding_serve_request_latency_seconds", "Time to answer, by route", ("route",),
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_requests = Histogram("decoding_serve_batch_requests", "Requests per batched decoder call",
                                        buckets=_SIZE_BUCKETS, registry=registry)
        self.batch_rows = Histogram("decoding_serve_batch_rows", "Beam rows per batched decoder call",
                                    buckets=_SIZE_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("decoding_serve_batch_seconds", "Time of a batched decoder call",
                                       buckets=_LATENCY_BUCKETS, registry=registry)
        self.accepted_requests = Counter("decoding_serve_accepted_requests", "Requests accepted into the queue",
                                         registry=registry)
        self.decoded_requests = Counter("decoding_serve_decoded_requests", "Requests that ran in a batch",
                                        registry=registry)
        self.cancelled_requests = Counter("decoding_serve_cancelled_requests",
                                          "Requests whose client left: before their batch (never decoded) or while "
                                          "it ran (result dropped)", ("stage",), registry=registry)
        queue = Gauge("decoding_serve_queue_depth", "Requests waiting for a batch", registry=registry)
        queue.set_function(lambda: batcher_ref().waiting if batcher_ref() else 0)
        running = Gauge("decoding_serve_running_requests", "Requests in the batch being decoded", registry=registry)
        running.set_function(lambda: batcher_ref().running if batcher_ref() else 0)

    def accepted(self) -> None:
        self.accepted_requests.inc()

    def batch(self, requests: int, rows: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def decoded(self, requests: int) -> None:
        self.decoded_requests.inc(requests)

    def cancelled(self, stage: str) -> None:
        self.cancelled_requests.labels(stage).inc()


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
            429: "RateLimitError", 500: "InternalServerError",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(decoder, *, model_name: str, caps: Caps | None = None, tokenizer=None, eos_token_id: int | None = None,
               api_key: str | None = None, max_batch_rows: int = 2048, max_batch_tokens: int | None = 1 << 17,
               max_wait_s: float = 0.1, arrival_gap_s: float = 0.02, titles: dict | None = None) -> FastAPI:
    """The server's FastAPI app around ``decoder`` (a :class:`~decoding.serving.decoders.Decoder`).

    Args:
        model_name: the name requests give as ``model`` (``/v1/models`` lists it).
        caps: the operator's :class:`~decoding.serving.requests.Caps`.
        tokenizer: a transformers tokenizer for text prompts and choices' text (None: token ids only).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        max_batch_rows, max_batch_tokens, max_wait_s, arrival_gap_s: the batcher's budgets and bounded wait
            (:class:`~decoding.serving.batcher.Batcher`).
        titles: ``{catalog name: [title of item 0, ...]}``: ``/v1/recommendations`` answers for
            these catalogs carry ``titles`` beside ``items``.
    """
    caps = caps or Caps()
    titles = dict(titles or {})
    state: dict = {}
    metrics = ServerMetrics(lambda: state.get("batcher"))
    vocab_size = getattr(decoder, "vocab_size", None)
    tokenize = (lambda text: tokenizer.encode(text)) if tokenizer is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(decoder, max_batch_rows=max_batch_rows, max_batch_tokens=max_batch_tokens,
                          max_queue=caps.max_queue, max_wait_s=max_wait_s, arrival_gap_s=arrival_gap_s, stats=metrics)
        state["batcher"] = app.state.batcher = batcher  # app.state: for an embedding process to inspect
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()  # every accepted request is answered (uvicorn drains connections first)

    app = FastAPI(title="decoding-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def serve(request: Request, route: str, parse, reply):
        started = time.monotonic()
        try:
            response = await _serve(request, parse, reply)
        except Exception:  # the server failed on this request: the log says why, the client gets a 500
            logger.exception("decoding-serve: a request to %s failed", route)
            response = _error(500, "the server failed to answer this request; its log says why", None)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.monotonic() - started)
        return response

    async def _serve(request: Request, parse, reply):
        if not authorised(request):
            return _error(401, "authorization: expected the server's API key as a Bearer token", "authorization")
        raw = bytearray()
        async for chunk in request.stream():  # read under the cap: an oversized body is never held whole
            raw += chunk
            if len(raw) > caps.max_body_bytes:
                return _error(413, f"body: larger than this server's max_body_bytes ({caps.max_body_bytes}); the "
                                   f"operator raises it with {caps.hint('max_body_bytes')}", "body")
        try:
            # JSON, the schema and the tokenizer run off the event loop: a large body or a long
            # text prompt never holds up accepting, refusing or cancelling other requests
            decode_request, extra = await asyncio.to_thread(admitted, raw, parse)
        except RequestError as exc:
            return _error(400, str(exc), exc.parameter)
        except UnknownModel as exc:
            return _error(404, str(exc), "model")
        batcher: Batcher = state["batcher"]
        work = asyncio.ensure_future(batcher.submit(decode_request))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (uvicorn's shutdown timeout): withdraw the request
            gone.cancel()
            if not work.done():
                work.cancel()
        if work not in done:  # the client left
            return Response(status_code=499)
        try:
            result = work.result()
        except QueueFull as exc:
            return _error(429, str(exc), None, headers={"Retry-After": str(exc.retry_after_s)})
        except ShuttingDown as exc:
            return _error(503, str(exc), None)
        return JSONResponse(reply(decode_request, extra, result))

    def admitted(raw: bytes, parse):
        try:
            body = json.loads(raw)
        except ValueError:
            raise RequestError("body: expected a JSON object", "body") from None
        decode_request, extra = parse(body)
        return decoder.admit(decode_request, extra.pop("parameters")), extra

    def parse_completion(body):
        if isinstance(body, dict) and body.get("model") != model_name:
            raise UnknownModel("model: not a model this server serves; GET /v1/models lists them")
        request, options = completion_request(body, caps, tokenize=tokenize, vocab_size=vocab_size)
        # errors name vllm_xargs, the field the vLLM route names for its catalog arguments
        options["parameters"] = {"catalog": "vllm_xargs", "k": "n", "exclude": "vllm_xargs"}
        return request, options

    def texts(identifiers, skip_special_tokens=True) -> list[str]:
        if tokenizer is None:
            return [""] * len(identifiers)
        return tokenizer.batch_decode(identifiers, skip_special_tokens=skip_special_tokens)  # one call per answer

    def token_names(ids) -> list[str]:
        if tokenizer is None:
            return [f"token_id:{t}" for t in ids]
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]

    def completion_reply(request, options, result) -> dict:
        choices = []
        shown_ids = [shown_tokens(tokens, eos_token_id, options["include_stop_str_in_output"])
                     for tokens in result.identifiers]
        decoded = texts([shown for shown, _ in shown_ids], options["skip_special_tokens"])
        for j, ((shown, ended), text, token_scores) in enumerate(zip(shown_ids, decoded, result.token_scores)):
            choice = {"index": j, "text": text, "logprobs": None, "finish_reason": "stop" if ended else "length",
                      "stop_reason": None}
            if options["logprobs"] is not None:
                names, values = token_names(shown), token_scores[:len(shown)]
                offsets, at = [], 0
                for name in names:
                    offsets.append(at)
                    at += len(name)
                choice["logprobs"] = {"text_offset": offsets, "token_logprobs": values, "tokens": names,
                                      "top_logprobs": [{n: v} for n, v in zip(names, values)]}
            if options["return_token_ids"]:
                choice["token_ids"] = shown
                choice["prompt_token_ids"] = list(request.prompt_ids) if j == 0 else None
            choices.append(choice)
        completion_tokens = sum(len(c.get("token_ids") or t) for c, t in zip(choices, result.identifiers))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(request.prompt_ids) + completion_tokens}}

    def parse_recommendation(body):
        request = recommendation_request(body, caps, tokenize=tokenize, vocab_size=vocab_size)
        return request, {"parameters": {"catalog": "catalog", "k": "k", "exclude": "exclude_items"}}

    def recommendation_reply(request, options, result) -> dict:
        reply = {"items": result.items, "scores": result.scores, "identifiers": result.identifiers}
        names = titles.get(request.catalog)
        if names is not None:  # the operator's titles, beside the items
            reply["titles"] = [names[i] for i in result.items]
        return reply

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "/v1/completions", parse_completion, completion_reply)

    @app.post("/v1/recommendations")
    async def recommendations(request: Request):
        return await serve(request, "/v1/recommendations", parse_recommendation, recommendation_reply)

    @app.get("/health")
    async def health():
        batcher = state.get("batcher")  # 503 once the batcher stopped: the process should be restarted
        return Response(status_code=200 if batcher is not None and batcher.alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return _error(401, "authorization: expected the server's API key as a Bearer token", "authorization")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "decoding"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
