"""The engine-neutral serving core, and ``decoding-serve``, the package's own server.

- :mod:`decoding.serving.requests`: one request schema (:class:`DecodeRequest`) and the
  operator's caps (:class:`Caps`), read from ``/v1/recommendations`` and OpenAI
  ``/v1/completions`` bodies; the vLLM route parses its ``vllm_xargs`` with the same code;
- :mod:`decoding.serving.decoders`: the :class:`Decoder` protocol, the decoders behind it
  (:class:`BeamDecoder`, :class:`SpeculativeDecoder`, :class:`SetIdDecoder`) and
  :class:`Decoders`, which routes each request to the one it names;
- :mod:`decoding.serving.batcher`: :class:`Batcher`, concurrent requests grouped into batched
  decoder calls under a budget of beam rows;
- :mod:`decoding.serving.app` and :mod:`decoding.serving.cli`: the FastAPI server and the
  ``decoding-serve`` command (the ``serve`` extra: FastAPI, uvicorn, prometheus-client).

Nothing here imports FastAPI, uvicorn or an engine but those last two modules.
"""

from decoding.serving.batcher import Batcher, QueueFull
from decoding.serving.decoders import (
    BeamDecoder,
    Decoder,
    Decoders,
    HistoryPrompt,
    Result,
    SetIdDecoder,
    SpeculativeDecoder,
)
from decoding.serving.requests import (
    Caps,
    CatalogError,
    DecodeRequest,
    RequestError,
    completion_request,
    recommendation_request,
)

__all__ = ["BeamDecoder", "Batcher", "Caps", "CatalogError", "DecodeRequest", "Decoder", "Decoders", "HistoryPrompt",
           "QueueFull", "RequestError", "Result", "SetIdDecoder", "SpeculativeDecoder", "completion_request",
           "recommendation_request"]
