"""Trie-constrained logits processor for vLLM.

A request opts in with ``SamplingParams(extra_args=trie_extra_args("items"))``, i.e.
``{"decoding_catalog": <a catalog the operator registered>, "decoding_offset": <int, optional>}``
(see :mod:`decoding.integrations.vllm.catalogs`): from token ``decoding_offset`` of
prompt+output (default: the end of the prompt) the request's tokens must spell a catalog
identifier; once it is complete, only EOS is allowed. Requests that do not opt in are untouched.

One class serves both vLLM runners, which pick it through the ``vllm.logits_processors`` entry
point or ``LLM(logits_processors=[TrieLogitsProcessor])``:

- the current model runner (MRV2): ``__init__(vllm_config, req_states)``, ``add_request``,
  ``apply_staged_writes``, ``apply(logits, ctx)``; the walk reads the token history on the
  device (``req_states.all_token_ids`` plus this step's draft tokens), with no per-row Python;
- the legacy runner (``VLLM_USE_V2_MODEL_RUNNER=0``, and vLLM's CPU build):
  ``__init__(vllm_config, device, is_pin_memory)``, ``update_state(BatchUpdate)``,
  ``apply(logits)``. That interface hands token histories over as Python lists, so the new
  tokens of each opted-in row are read in Python; node walking and masking are vectorised.

Each request is bound to the ItemTrie its catalog resolved to when it was added: a catalog file
replaced on disk serves the next requests, and running ones finish on the catalog they began.

An engine can also constrain every request that names no catalog itself:
``additional_config={"decoding": {"catalog": <name or operator path>, "offset": <int>}}``. That
is how vLLM's own ``LLM.beam_search`` (whose per-step requests carry no ``extra_args``) is
constrained; its per-step prompts include the beam's tokens, so ``offset`` must be the original
prompt length (equal-length prompts), and ``logprobs_mode="processed_logprobs"`` makes its
ranking see the masked distribution.

Arguments are validated at request admission: ``validate_params`` rejects malformed arguments;
the package's vLLM general plugin (:mod:`decoding.integrations.vllm.plugin`) rejects catalogs the
operator did not register, an offset beyond the prompt, prompt tokens that start no identifier,
and a catalog built for another vocabulary than the model's. A request that still reaches the
processor with such arguments (plugins disabled) is confined to EOS, never left unconstrained.

Importing this module never fails on a vLLM version that has moved the interfaces, and on an
untested vLLM the processor is inert (see :mod:`decoding.integrations.vllm._version`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from decoding.integrations._constrain import mask_to_children
from decoding.integrations.vllm._version import untested_message, warn_if_untested
from decoding.integrations.vllm.catalogs import CATALOG_KEY, CatalogError, catalogs_for

logger = logging.getLogger("decoding.integrations.vllm")

OFFSET_KEY = "decoding_offset"
ENGINE_DEFAULT_KEY = "decoding"

# The runners' base classes, as far as this vLLM has them: the entry point must import on any
# version, and a vLLM that insists on one base (MRV2's loader does) finds it.
_bases = []
try:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as _LegacyBase

    _bases.append(_LegacyBase)
except Exception:  # noqa: BLE001 - any failure means: this vLLM has no such interface
    BatchUpdate = MoveDirectionality = None
try:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2Base

    _bases.append(_V2Base)
except Exception:  # noqa: BLE001
    pass


def _processor_bases() -> tuple:
    """Both runners' bases when they combine; else the last (MRV2's, which its loader requires)."""
    for bases in (tuple(_bases), tuple(_bases[-1:]), ()):
        try:
            type("_Probe", bases, {})
            return bases
        except TypeError:
            continue
    return ()


def trie_extra_args(catalog: str, *, offset: int | None = None) -> dict:
    """``SamplingParams.extra_args`` that constrain a request to the registered ``catalog``, the
    identifier starting at token ``offset`` (default: after the prompt)."""
    args = {CATALOG_KEY: str(catalog)}
    if offset is not None:
        args[OFFSET_KEY] = offset
    return args


def _request_args(params) -> tuple[str, int | None] | None:
    """The request's ``(catalog, offset)``, None if it names no catalog; ValueError if malformed."""
    extra = getattr(params, "extra_args", None) or {}
    if CATALOG_KEY not in extra:
        if OFFSET_KEY in extra:
            raise ValueError(f"{OFFSET_KEY}: given without {CATALOG_KEY}")
        return None
    offset = extra.get(OFFSET_KEY)
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise ValueError(f"{OFFSET_KEY}: expected a non-negative int (a token index), got {offset!r}")
    if not isinstance(extra[CATALOG_KEY], str):
        raise CatalogError(f"{CATALOG_KEY}: expected the name of a catalog (a string), got {extra[CATALOG_KEY]!r}")
    return extra[CATALOG_KEY], offset


def request_catalog(params, vllm_config):
    """``(ItemTrie, offset)`` for a request: its own catalog, else the engine-wide one, else
    None. Raises ValueError (safe to show the client) for bad arguments or unknown catalogs."""
    catalogs = catalogs_for(vllm_config)
    args = _request_args(params)
    if args is not None:
        return catalogs.resolve(args[0]), args[1]
    default = catalogs.resolve_default()
    return None if default is None else (default, catalogs.options.default_offset)


def _eos_token_id(vllm_config) -> int | None:
    config = vllm_config.model_config
    text = getattr(config, "hf_text_config", None) or getattr(config, "hf_config", None)
    eos = getattr(text, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


@dataclass
class _LegacyRow:
    trie: object  # ItemTrie on the processor's device, or None: confined to EOS
    offset: int
    prompt: list
    output: list  # live reference owned by vLLM
    node: int = 0
    consumed: int = 0


class TrieLogitsProcessor(*_processor_bases()):
    """Masks every token that does not continue the request's catalog identifier."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if CATALOG_KEY in extra or OFFSET_KEY in extra:
            message = untested_message()
            if message is not None:
                raise ValueError(message)
        _request_args(sampling_params)  # the catalog itself is resolved by the plugin, which has the config

    def __init__(self, vllm_config, *args, **kwargs):
        self._inert = warn_if_untested()
        if self._inert:
            return
        self.vllm_config = vllm_config
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.eos_token_id = _eos_token_id(vllm_config)
        self._device_tries: dict[int, tuple] = {}  # id(trie) -> (trie, trie on self.device)
        request_catalog(None, vllm_config)  # the engine-wide catalog fails at engine start, not per request
        if len(args) == 2:  # legacy runner: (device, is_pin_memory)
            self.device = torch.device(args[0])
            self.req_states = None
            self._rows: dict[int, _LegacyRow] = {}
        elif len(args) == 1:  # MRV2: (req_states)
            self.req_states = args[0]
            self.device = torch.device(self.req_states.device)
            n = int(self.req_states.max_num_reqs)
            self._catalog = np.full(n, -1, dtype=np.int64)  # key into self._slot_tries; -1: not opted in
            self._offset = np.full(n, -1, dtype=np.int64)  # -1: the prompt's end
            self._slot_tries: dict[int, object] = {}  # key -> device trie, None: confined to EOS
            self._keys = itertools.count()
            self._catalog_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
            self._offset_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
            self._dirty = False
        else:
            raise TypeError("TrieLogitsProcessor: unexpected constructor arguments from vLLM")

    def _bind(self, params):
        """``(device trie or None, offset)`` for a new request, None if it does not opt in. A
        request that admission should have refused (plugins disabled) gets a None trie: EOS only."""
        try:
            found = request_catalog(params, self.vllm_config)
        except ValueError as exc:
            logger.warning("decoding: a request reached the engine with arguments admission refuses (%s); it may "
                           "only end", exc)
            extra = getattr(params, "extra_args", None) or {}
            offset = extra.get(OFFSET_KEY)
            return None, offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        if found is None:
            return None
        trie, offset = found
        if trie.vocab_size != self.vocab_size:
            return None, offset
        key = id(trie)
        if key not in self._device_tries:
            self._device_tries[key] = (trie, trie.to(self.device))  # the host trie keeps id(trie) unique
        return self._device_tries[key][1], offset

    def _forget_unused(self, used: set) -> None:
        for key in [k for k, (_, dev) in self._device_tries.items() if not any(dev is u for u in used)]:
            del self._device_tries[key]

    def is_argmax_invariant(self) -> bool:
        return bool(self._inert)

    # ------------------------------------------------------------------ legacy runner
    def update_state(self, batch_update) -> None:
        if self._inert or batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            bound = self._bind(params)
            if bound is None:
                self._rows.pop(index, None)
                continue
            prompt = list(prompt_ids or [])
            offset = len(prompt) if bound[1] is None else bound[1]
            self._rows[index] = _LegacyRow(bound[0], offset, prompt, output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self._rows[a] = row_b
        if batch_update.added:
            self._forget_unused({row.trie for row in self._rows.values()})

    def _eos_only(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows that may only end: every token -inf but EOS, scored 0 as ``mask_to_children``
        scores a finished identifier's EOS (both runners use this)."""
        out = torch.full_like(logits, float("-inf"))
        if self.eos_token_id is not None:
            out[:, self.eos_token_id] = 0.0
        return out

    def _apply_legacy(self, logits: torch.Tensor) -> torch.Tensor:
        by_trie: dict[int, list[int]] = {}
        for index, row in self._rows.items():
            if index < logits.shape[0]:
                by_trie.setdefault(id(row.trie), []).append(index)
        for indices in by_trie.values():
            rows = [self._rows[i] for i in indices]
            trie = rows[0].trie
            index = torch.as_tensor(indices, device=logits.device)
            if trie is None:
                logits[index] = self._eos_only(logits[index])
                continue
            fresh = []
            for row in rows:  # the interface gives Python lists: read only the new tokens
                start = row.offset + row.consumed
                cut = len(row.prompt)
                new = (row.prompt[start:] if start < cut else []) + row.output[max(0, start - cut):]
                row.consumed += len(new)
                fresh.append(new)
            width = max((len(t) for t in fresh), default=0)
            grid = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
            for r, new in enumerate(fresh):
                if new:
                    grid[r, : len(new)] = torch.as_tensor(new, dtype=torch.long)
            start_nodes = torch.tensor([row.node for row in rows], dtype=torch.long)
            nodes = trie.walk(grid, start=start_nodes) if width else start_nodes.to(trie.device)
            # an offset past the prompt (admission rejects it when it can see it) leaves only EOS
            bad = torch.tensor([row.offset > len(row.prompt) for row in rows], device=nodes.device)
            nodes = torch.where(bad, torch.full_like(nodes, -1), nodes)
            for row, node in zip(rows, nodes.tolist()):
                row.node = node
            logits[index] = mask_to_children(logits[index], trie, nodes.to(logits.device),
                                              fallback_token=self.eos_token_id)
        return logits

    # ------------------------------------------------------------------ MRV2
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self._inert:
            return False
        bound = self._bind(sampling_params)
        self._dirty = True
        if bound is None:
            self._catalog[req_idx] = -1
            return False
        key = next((k for k, t in self._slot_tries.items() if t is bound[0]), None)
        if key is None:
            key = next(self._keys)
            self._slot_tries[key] = bound[0]
        self._catalog[req_idx] = key
        self._offset[req_idx] = -1 if bound[1] is None else bound[1]
        used = set(self._catalog[self._catalog >= 0].tolist())
        self._slot_tries = {k: t for k, t in self._slot_tries.items() if k in used}
        self._forget_unused(set(self._slot_tries.values()))
        return True

    def apply_staged_writes(self) -> None:
        if not self._inert and self._dirty:
            self._catalog_dev.copy_(torch.from_numpy(self._catalog), non_blocking=True)
            self._offset_dev.copy_(torch.from_numpy(self._offset), non_blocking=True)
            self._dirty = False

    def _apply_v2(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        present = np.unique(self._catalog[np.asarray(ctx.idx_mapping_np)])  # host: no device sync
        present = present[present >= 0]
        if present.size == 0:
            return logits
        rows_slot = ctx.expanded_idx_mapping.long()
        row_catalog = self._catalog_dev[rows_slot]
        tokens_all = self.req_states.all_token_ids.gpu
        total_len = self.req_states.total_len.gpu.long()[rows_slot]
        prompt_len = self.req_states.prompt_len.gpu.long()[rows_slot]
        offset = self._offset_dev[rows_slot]
        offset = torch.where(offset < 0, prompt_len, offset)
        pos = ctx.pos.long()
        row_ids = torch.arange(rows_slot.numel(), device=logits.device)
        for k in present.tolist():
            trie = self._slot_tries[k]
            mine = row_catalog == k
            if trie is None:
                logits = torch.where(mine[:, None], self._eos_only(logits), logits)
                continue
            depth = max(trie.depth, 1)
            j = torch.arange(depth + 1, device=logits.device)
            q = offset[:, None] + j  # absolute positions of identifier tokens
            count = pos + 1 - offset  # identifier tokens visible to this row
            seen = j[None, :] < count[:, None]
            # committed tokens come from the history, this step's drafts from the rows before
            committed = tokens_all[rows_slot[:, None], q.clamp(max=tokens_all.shape[1] - 1)]
            draft_row = (row_ids[:, None] - (pos[:, None] - q)).clamp(0, rows_slot.numel() - 1)
            drafted = ctx.input_ids.long()[draft_row]
            toks = torch.where(q < total_len[:, None], committed.long(), drafted)
            toks = torch.where(seen, toks, torch.full_like(toks, -1))
            nodes = trie.walk(toks[:, :depth])
            too_long = (count > depth) | (count < 0) | (offset > prompt_len)
            nodes = torch.where(too_long, torch.full_like(nodes, -1), nodes)
            masked = mask_to_children(logits, trie, nodes, fallback_token=self.eos_token_id)
            logits = torch.where(mine[:, None], masked, logits)
        return logits

    # ------------------------------------------------------------------ both
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if self._inert:
            return logits
        if self.req_states is None:
            return self._apply_legacy(logits) if self._rows else logits
        return self._apply_v2(logits, ctx)


if untested_message() is not None:
    # a newer base may declare abstract methods this class does not know; the inert processor
    # must still be constructible, or vLLM cannot start
    TrieLogitsProcessor.__abstractmethods__ = frozenset()
