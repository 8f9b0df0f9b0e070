"""Trie-constrained logits processor for vLLM.

A request opts in with ``SamplingParams(extra_args=trie_extra_args("items"))``, i.e.
``{"decoding_catalog": <a catalog the operator registered>, "decoding_offset": <int, optional>}``
(see :mod:`decoding.integrations.vllm.catalogs`): from token ``decoding_offset`` of
prompt+output (default: the end of the prompt) the request's tokens must spell a catalog
identifier; once it is complete, only EOS is allowed. Requests that do not opt in are untouched.

vLLM has two model runners with two processor interfaces, and one implementation serves each:

- :class:`V2TrieProcessor`, the current runner (MRV2): the walk reads the token history on the
  device (the runner's token buffers plus this step's draft tokens), with no per-row Python;
- :class:`LegacyTrieProcessor`, the legacy runner (``VLLM_USE_V2_MODEL_RUNNER=0`` and vLLM's CPU
  build, up to vLLM 0.33): that interface hands token histories over as Python lists, so the new
  tokens of each opted-in row are read in Python; node walking and masking are vectorised.

The entry point (``vllm.logits_processors``, or ``LLM(logits_processors=[TrieLogitsProcessor])``)
is :class:`TrieLogitsProcessor`, a class both runners' loaders accept: it subclasses each
interface this vLLM has, and constructing it builds the implementation of the runner that asks.

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

Importing this module never fails on a vLLM version that has moved the interfaces; outside the
supported range the processor is inert unless the operator opts in (see :mod:`._compat`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from decoding.integrations._constrain import mask_to_children
from decoding.integrations.vllm import _compat
from decoding.integrations.vllm.arguments import OFFSET_KEY, parse, request_catalog
from decoding.integrations.vllm.catalogs import CATALOG_KEY

logger = logging.getLogger("decoding.integrations.vllm")

ENGINE_DEFAULT_KEY = "decoding"


def trie_extra_args(catalog: str, *, offset: int | None = None) -> dict:
    """``SamplingParams.extra_args`` that constrain a request to the registered ``catalog``, the
    identifier starting at token ``offset`` (default: after the prompt)."""
    args = {CATALOG_KEY: str(catalog)}
    if offset is not None:
        args[OFFSET_KEY] = offset
    return args


class _Catalogs:
    """The engine's side of request binding, shared by both implementations: which ItemTrie (on
    the processor's device) each new request gets, and dropping device copies no request uses."""

    def __init__(self, vllm_config, device: torch.device):
        self.vllm_config, self.device = vllm_config, device
        self.vocab_size = _compat.vocab_size(vllm_config)
        self.eos_token_id = _compat.eos_token_id(vllm_config)
        self._on_device: dict[int, tuple] = {}  # id(host trie) -> (host trie, trie on device)
        request_catalog(None, vllm_config)  # the engine-wide catalog fails at engine start, not per request

    def bind(self, sampling_params):
        """``(device trie or None, offset)`` for a new request, None if it does not opt in. A
        request that admission should have refused (plugins disabled) gets a None trie: EOS only."""
        extra = _compat.extra_args(sampling_params)
        try:
            found = request_catalog(extra, self.vllm_config)
        except ValueError as exc:
            logger.warning("decoding: a request reached the engine with arguments admission refuses (%s); it may "
                           "only end", exc)
            offset = extra.get(OFFSET_KEY) if isinstance(extra, dict) else None
            return None, offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        if found is None:
            return None
        trie, offset = found
        if trie.vocab_size != self.vocab_size:
            return None, offset
        key = id(trie)
        if key not in self._on_device:
            self._on_device[key] = (trie, trie.to(self.device))  # the host trie keeps id(trie) unique
        return self._on_device[key][1], offset

    def keep_only(self, used) -> None:
        """Forget the device copies that no trie in ``used`` is."""
        for key in [k for k, (_, dev) in self._on_device.items() if not any(dev is u for u in used)]:
            del self._on_device[key]

    def eos_only(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows that may only end: every token -inf but EOS, scored 0 as ``mask_to_children``
        scores a finished identifier's EOS."""
        out = torch.full_like(logits, float("-inf"))
        if self.eos_token_id is not None:
            out[:, self.eos_token_id] = 0.0
        return out

    def mask(self, logits: torch.Tensor, trie, nodes: torch.Tensor) -> torch.Tensor:
        return mask_to_children(logits, trie, nodes, fallback_token=self.eos_token_id)


@dataclass
class _LegacyRow:
    trie: object  # ItemTrie on the processor's device, or None: confined to EOS
    offset: int
    prompt: list
    output: list  # live reference owned by vLLM
    node: int = 0
    consumed: int = 0


_LegacyBase = _compat.LegacyProcessorBase or object
_V2Base = _compat.V2ProcessorBase or object


class LegacyTrieProcessor(_LegacyBase):
    """The legacy runner's implementation: ``__init__(vllm_config, device, is_pin_memory)``,
    ``update_state(BatchUpdate)``, ``apply(logits)``."""

    def __init__(self, vllm_config, device, is_pin_memory=False):
        self.catalogs = _Catalogs(vllm_config, torch.device(device))
        self._rows: dict[int, _LegacyRow] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        removed, added, moved = _compat.legacy_batch_changes(batch_update)
        for index in removed:
            self._rows.pop(index, None)
        for index, params, prompt_ids, output_ids in added:
            bound = self.catalogs.bind(params)
            if bound is None:
                self._rows.pop(index, None)
                continue
            prompt = list(prompt_ids or [])
            offset = len(prompt) if bound[1] is None else bound[1]
            self._rows[index] = _LegacyRow(bound[0], offset, prompt, output_ids)
        for a, b, swap in moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if swap and row_b is not None:
                self._rows[a] = row_b
        if added:
            self.catalogs.keep_only({row.trie for row in self._rows.values()})

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        by_trie: dict[int, list[int]] = {}
        for index, row in self._rows.items():
            if index < logits.shape[0]:
                by_trie.setdefault(id(row.trie), []).append(index)
        for indices in by_trie.values():
            rows = [self._rows[i] for i in indices]
            trie = rows[0].trie
            index = torch.as_tensor(indices, device=logits.device)
            if trie is None:
                logits[index] = self.catalogs.eos_only(logits[index])
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
            logits[index] = self.catalogs.mask(logits[index], trie, nodes.to(logits.device))
        return logits


class V2TrieProcessor(_V2Base):
    """The current runner's implementation: ``__init__(vllm_config, req_states)``,
    ``add_request``, ``apply_staged_writes``, ``apply(logits, ctx)``."""

    def __init__(self, vllm_config, req_states):
        self.slots = _compat.v2_slots(req_states)
        self.device = torch.device(self.slots.device)
        self.catalogs = _Catalogs(vllm_config, self.device)
        n = self.slots.max_num_reqs
        self._catalog = np.full(n, -1, dtype=np.int64)  # key into self._tries; -1: not opted in
        self._offset = np.full(n, -1, dtype=np.int64)  # -1: the prompt's end
        self._tries: dict[int, object] = {}  # key -> device trie, None: confined to EOS
        self._next_key = 0
        self._catalog_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self._offset_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self._dirty = False

    def add_request(self, req_idx: int, sampling_params) -> bool:
        bound = self.catalogs.bind(sampling_params)
        self._dirty = True
        if bound is None:
            self._catalog[req_idx] = -1
            return False
        key = next((k for k, t in self._tries.items() if t is bound[0]), None)
        if key is None:
            key, self._next_key = self._next_key, self._next_key + 1
            self._tries[key] = bound[0]
        self._catalog[req_idx] = key
        self._offset[req_idx] = -1 if bound[1] is None else bound[1]
        used = set(self._catalog[self._catalog >= 0].tolist())
        self._tries = {k: t for k, t in self._tries.items() if k in used}
        self.catalogs.keep_only(set(self._tries.values()))
        return True

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self._catalog_dev.copy_(torch.from_numpy(self._catalog), non_blocking=True)
            self._offset_dev.copy_(torch.from_numpy(self._offset), non_blocking=True)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        batch = _compat.v2_batch(ctx)
        present = np.unique(self._catalog[batch.slots_host])  # host: no device sync
        present = present[present >= 0]
        if present.size == 0:
            return logits
        slots = self.slots
        rows_slot = batch.row_slot.long()
        row_catalog = self._catalog_dev[rows_slot]
        tokens_all = slots.all_token_ids
        total_len = slots.total_len.long()[rows_slot]
        prompt_len = slots.prompt_len.long()[rows_slot]
        offset = self._offset_dev[rows_slot]
        offset = torch.where(offset < 0, prompt_len, offset)
        pos = batch.pos.long()
        row_ids = torch.arange(rows_slot.numel(), device=logits.device)
        for k in present.tolist():
            trie = self._tries[k]
            mine = row_catalog == k
            if trie is None:
                logits = torch.where(mine[:, None], self.catalogs.eos_only(logits), logits)
                continue
            depth = max(trie.depth, 1)
            j = torch.arange(depth + 1, device=logits.device)
            q = offset[:, None] + j  # absolute positions of identifier tokens
            count = pos + 1 - offset  # identifier tokens visible to this row
            seen = j[None, :] < count[:, None]
            # committed tokens come from the history, this step's drafts from the rows before
            committed = tokens_all[rows_slot[:, None], q.clamp(max=tokens_all.shape[1] - 1)]
            draft_row = (row_ids[:, None] - (pos[:, None] - q)).clamp(0, rows_slot.numel() - 1)
            drafted = batch.input_ids.long()[draft_row]
            toks = torch.where(q < total_len[:, None], committed.long(), drafted)
            toks = torch.where(seen, toks, torch.full_like(toks, -1))
            nodes = trie.walk(toks[:, :depth])
            too_long = (count > depth) | (count < 0) | (offset > prompt_len)
            nodes = torch.where(too_long, torch.full_like(nodes, -1), nodes)
            logits = torch.where(mine[:, None], self.catalogs.mask(logits, trie, nodes), logits)
        return logits


class _InertProcessor:
    """What an engine on an unsupported vLLM gets (no opt-in): touches nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False

    def apply_staged_writes(self) -> None:
        pass

    def apply(self, logits, ctx=None):
        return logits


class InertLegacyProcessor(_InertProcessor, _LegacyBase):
    pass


class InertV2Processor(_InertProcessor, _V2Base):
    pass


# a newer base may declare abstract methods the package does not know: the inert processors must
# still be constructible, or vLLM cannot start
InertLegacyProcessor.__abstractmethods__ = InertV2Processor.__abstractmethods__ = frozenset()

_IMPLEMENTATIONS = {"legacy": (LegacyTrieProcessor, InertLegacyProcessor),
                    "v2": (V2TrieProcessor, InertV2Processor)}


class TrieLogitsProcessor(*_compat.combined_processor_bases()):
    """Masks every token that does not continue the request's catalog identifier.

    The class vLLM's loaders load; constructing it returns the implementation of the runner that
    constructs it (:class:`LegacyTrieProcessor` or :class:`V2TrieProcessor`), or an inert one on
    an unsupported vLLM whose engine did not opt in."""

    def __new__(cls, vllm_config, *args, **kwargs):
        active, inert = _IMPLEMENTATIONS[_compat.runner_interface(args)]
        if not _compat.enabled(vllm_config):
            return inert(vllm_config, *args, **kwargs)
        try:
            return active(vllm_config, *args, **kwargs)
        except TypeError as exc:
            if _compat.is_supported(_compat.installed_version()):
                raise
            raise RuntimeError(f"decoding: this vLLM's logits-processor interface has changed ({exc}); remove "
                               f'additional_config["decoding"]["{_compat.OPT_IN_KEY}"] or install a supported '
                               "vLLM") from exc

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Malformed arguments, and (outside the supported range, without the engine's opt-in)
        any request that names a catalog, are refused at admission. The catalog itself is
        resolved by the plugin's admission check, which has the engine's config."""
        extra = _compat.extra_args(sampling_params)
        if isinstance(extra, dict) and any(isinstance(k, str) and k.startswith("decoding_") for k in extra):
            if not _compat.admitting_engine_enabled():
                raise ValueError(_compat.untested_message())
        parse(extra, "sampling")


for _impl in (LegacyTrieProcessor, V2TrieProcessor, InertLegacyProcessor, InertV2Processor):
    if hasattr(TrieLogitsProcessor, "register"):  # ABCMeta: isinstance(processor, TrieLogitsProcessor) holds
        TrieLogitsProcessor.register(_impl)
