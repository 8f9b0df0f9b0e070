"""``decoding-serve`` on Ray Serve: replicas and autoscaling of the same server, nothing of our own.

Each Serve replica runs the app :func:`decoding.serving.cli.build_app` builds, the one
``decoding-serve`` runs: the same routes, schema, caps, batcher and decoder, so an answer is the
same as ``decoding-serve``'s (and :func:`decoding.beam_search`'s on the same weights). Ray Serve's
proxy routes requests across the replicas; Serve's config sets the replicas (``num_replicas`` or
``autoscaling_config``), ``max_ongoing_requests`` and ``ray_actor_options``.

    serve run decoding.integrations.ray_serve:app_builder argv="--model DIR --catalog items=FILE"
    serve run ray-serve.yaml      # import_path: decoding.integrations.ray_serve:app_builder

The application's one argument, ``argv``, is ``decoding-serve``'s command line (a list of strings,
or one string split as a shell would), parsed by ``decoding-serve``'s own parser: every option of
``decoding-serve`` means the same here. The listening address is Serve's (``http_options``), so
``--host`` and ``--port`` are refused; a replica drains under Serve's ``graceful_shutdown_timeout_s``,
so ``--shutdown-timeout-s`` is refused too.

How a replica runs: the deployment is a :func:`ray.serve.ingress` class with no app of its own;
Serve calls its ``__serve_build_asgi_app__`` once the replica's actor has started, which loads the
model and catalogs there (off the replica's event loop) and returns the FastAPI app. Serve then runs
the app's lifespan inside the replica, which starts its batcher, and runs the lifespan's shutdown
(the batcher drains) when it stops the replica. Every response carries ``x-decoding-replica``, the
replica's Serve id. Serve's health check asks the batcher: a replica whose batcher stopped (where
``decoding-serve``'s ``/health`` answers 503) is replaced.

Needs the ``ray`` extra (``pip install 'genrec-decoding[serve,ray]'``); this module imports Ray
only when an application is built.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shlex

REPLICA_HEADER = "x-decoding-replica"
"""The response header naming the Serve replica that answered."""

DEPLOYMENT_NAME = "DecodingServe"
"""The deployment's name, as a Serve config's ``deployments:`` section names it."""

MAX_ONGOING_REQUESTS = 256
"""Requests one replica holds at a time unless Serve's config says otherwise (Serve's own default,
5, would keep the batcher from batching); the proxy queues the rest and routes each to the first
replica with room."""

_REFUSED = {  # decoding-serve's options that Serve's own config replaces
    "--host": "its http_options (host, port) set where the proxy listens",
    "--port": "its http_options (host, port) set where the proxy listens",
    "--shutdown-timeout-s": "a stopping replica drains under the deployment's graceful_shutdown_timeout_s",
}

logger = logging.getLogger("decoding.serving")


def _serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError("decoding.integrations.ray_serve needs the ray extra "
                          f"(pip install 'genrec-decoding[serve,ray]'): {exc}") from exc
    return serve


def parse_argv(argv):
    """``decoding-serve``'s options from ``argv`` (a list of strings, or one string split as a
    shell would), with ``decoding-serve``'s own parser.

    Raises:
        ValueError: an option ``decoding-serve`` refuses (with its parser's message), ``--host``,
            ``--port`` or ``--shutdown-timeout-s`` (Serve's config sets them), or ``argv`` of another
            type.
    """
    from decoding.serving.cli import parser

    if isinstance(argv, str):
        argv = shlex.split(argv)
    if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv: expected decoding-serve's command line as a list of strings, got {argv!r}")
    for flag, why in _REFUSED.items():  # given at all, even at its default: it would not do what it says
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ValueError(f"argv: {flag} is not used on Ray Serve: {why}")
    p = parser()
    p.prog = "decoding.integrations.ray_serve argv"
    try:
        return p.parse_args(list(argv))
    except SystemExit as exc:  # argparse printed why; argv is not repeated (it may hold an API key)
        raise ValueError("argv: decoding-serve refuses these options (the message above says why)") from exc


class _ReplicaHeader:
    """ASGI middleware: ``x-decoding-replica: <replica>`` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class DecodingServeReplica:
    """One replica: ``decoding-serve``'s app, built once the replica's actor has started."""

    def __init__(self, argv):
        self._argv = argv
        self._app = None

    async def __serve_build_asgi_app__(self):  # Serve calls it after __init__, inside the replica
        args = parse_argv(self._argv)
        # as decoding-serve logs (Serve configures only its own "ray.serve" logger); the replica's
        # stderr goes to its Ray log file and to `serve run`'s console
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logger.setLevel(args.log_level.upper())
        from decoding.serving.cli import build_app

        try:  # loading the model blocks: off the replica's event loop, which answers Serve meanwhile
            app = await asyncio.to_thread(build_app, args)
        except SystemExit as exc:  # decoding-serve's refusal (a missing model, a bad catalog), not an exit
            raise RuntimeError(str(exc)) from None
        replica = _serve().get_replica_context().replica_tag
        app.add_middleware(_ReplicaHeader, replica=replica)
        logger.info("decoding-serve replica %s ready", replica)
        self._app = app
        return app

    def check_health(self):
        """Serve's periodic health check: fails once the batcher stopped (Serve replaces the replica)."""
        batcher = getattr(self._app.state, "batcher", None) if self._app is not None else None
        if batcher is not None and not batcher.alive:
            raise RuntimeError("decoding-serve: the batcher stopped")


@functools.lru_cache(maxsize=None)
def deployment():
    """The Serve deployment (``DecodingServe``): a FastAPI ingress whose app each replica builds.
    Its defaults (one replica, :data:`MAX_ONGOING_REQUESTS`) give way to ``.options(...)`` and to a
    Serve config's ``deployments:`` section."""
    serve = _serve()
    return serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=MAX_ONGOING_REQUESTS)(
        serve.ingress()(DecodingServeReplica))


def app_builder(args: dict):
    """Serve's application builder: ``decoding-serve`` from ``args["argv"]``.

    ``import_path: decoding.integrations.ray_serve:app_builder`` in a Serve config (its ``args:``
    give ``argv``), or ``serve run decoding.integrations.ray_serve:app_builder argv="..."``.

    Args:
        args: ``{"argv": decoding-serve's command line}``, a list of strings or one string split
            as a shell would (``--model DIR --catalog NAME=FILE ...``). Paths are read where the
            replicas run; give absolute paths that exist on every node.

    Returns:
        The Serve application (the deployment bound to ``argv``).

    Raises:
        ValueError: ``args`` without ``argv`` or with other keys, or options ``decoding-serve`` refuses
            (checked here, before any replica starts).
    """
    if not isinstance(args, dict) or set(args) != {"argv"}:
        raise ValueError("args: expected {'argv': decoding-serve's command line}, got "
                         f"{sorted(args) if isinstance(args, dict) else type(args).__name__}")
    argv = args["argv"]
    parse_argv(argv)  # a typo fails `serve run` now, not each replica later
    return deployment().bind(shlex.split(argv) if isinstance(argv, str) else list(argv))
