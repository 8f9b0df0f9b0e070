"""Trie-constrained logits processor for vLLM.

A request opts in with ``SamplingParams(extra_args=trie_extra_args("catalog.trie"))``, i.e.
``{"decoding_catalog": <registered name or ItemTrie file>, "decoding_offset": <int, optional>}``:
from token ``decoding_offset`` of prompt+output (default: the end of the prompt) the request's
tokens must spell a catalog identifier; once it is complete, only EOS is allowed. Requests that
do not opt in are untouched.

One class serves both vLLM runners, which pick it through the ``vllm.logits_processors`` entry
point or ``LLM(logits_processors=[TrieLogitsProcessor])``:

- the current model runner (MRV2): ``__init__(vllm_config, req_states)``, ``add_request``,
  ``apply_staged_writes``, ``apply(logits, ctx)``; the walk reads the token history on the
  device (``req_states.all_token_ids`` plus this step's draft tokens), with no per-row Python;
- the legacy runner (``VLLM_USE_V2_MODEL_RUNNER=0``, and vLLM's CPU build):
  ``__init__(vllm_config, device, is_pin_memory)``, ``update_state(BatchUpdate)``,
  ``apply(logits)``. That interface hands token histories over as Python lists, so the new
  tokens of each opted-in row are read in Python; node walking and masking are vectorised.

An engine can also constrain every request that names no catalog itself:
``LLM(..., additional_config={"decoding": {"catalog": <name or file>, "offset": <int>}})``. That
is how vLLM's own ``LLM.beam_search`` (whose per-step requests carry no ``extra_args``) is
constrained; its per-step prompts include the beam's tokens, so ``offset`` must be the original
prompt length (equal-length prompts), and ``logprobs_mode="processed_logprobs"`` makes its
ranking see the masked distribution.

Arguments are validated at request admission: ``validate_params`` rejects an unknown catalog,
a missing or corrupt file and a malformed offset; the package's vLLM general plugin
(``decoding.integrations.vllm.plugin``) rejects an offset beyond the prompt, prompt tokens that
start no identifier, and a catalog built for another vocabulary than the model's. A request that
still reaches the processor with such arguments (plugins disabled) is confined to EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as LegacyLogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from decoding.integrations.vllm.catalogs import resolve_catalog
from decoding.search.constrain import mask_to_children

CATALOG_KEY = "decoding_catalog"
OFFSET_KEY = "decoding_offset"

def trie_extra_args(catalog: str, *, offset: int | None = None) -> dict:
    """``SamplingParams.extra_args`` that constrain a request to ``catalog`` (a registered name or
    a saved ItemTrie path), the identifier starting at token ``offset`` (default: after the prompt)."""
    args = {CATALOG_KEY: str(catalog)}
    if offset is not None:
        args[OFFSET_KEY] = offset
    return args


def _request_args(params) -> tuple[str, int | None] | None:
    extra = getattr(params, "extra_args", None) or {}
    if CATALOG_KEY not in extra:
        if OFFSET_KEY in extra:
            raise ValueError(f"{OFFSET_KEY}: given without {CATALOG_KEY}")
        return None
    offset = extra.get(OFFSET_KEY)
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise ValueError(f"{OFFSET_KEY}: expected a non-negative int (a token index), got {offset!r}")
    return extra[CATALOG_KEY], offset


ENGINE_DEFAULT_KEY = "decoding"


def _engine_default(vllm_config) -> tuple[str, int | None] | None:
    """The engine-wide catalog of ``additional_config={"decoding": {"catalog": ..., "offset": ...}}``."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    conf = extra.get(ENGINE_DEFAULT_KEY) if isinstance(extra, dict) else None
    if conf is None:
        return None
    if not isinstance(conf, dict) or "catalog" not in conf or set(conf) - {"catalog", "offset"}:
        raise ValueError(
            f'additional_config["{ENGINE_DEFAULT_KEY}"]: expected {{"catalog": <name or path>, "offset": <int>}}, '
            f"got {conf!r}"
        )
    args = _request_args(type("P", (), {"extra_args": {CATALOG_KEY: conf["catalog"], OFFSET_KEY: conf.get("offset")}}))
    resolve_catalog(args[0])  # fail at engine start, not per request
    return args


def _eos_token_id(vllm_config) -> int | None:
    config = vllm_config.model_config
    text = getattr(config, "hf_text_config", None) or getattr(config, "hf_config", None)
    eos = getattr(text, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


@dataclass
class _LegacyRow:
    catalog: str
    offset: int
    prompt: list
    output: list  # live reference owned by vLLM
    node: int = 0
    consumed: int = 0


class TrieLogitsProcessor(LegacyLogitsProcessor, V2LogitsProcessor):
    """Masks every token that does not continue the request's catalog identifier."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = _request_args(sampling_params)
        if args is None:
            return
        resolve_catalog(args[0])  # the vocabulary and the offset are checked against the prompt by the plugin

    def __init__(self, vllm_config, *args):
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.eos_token_id = _eos_token_id(vllm_config)
        self._default = _engine_default(vllm_config)
        self._tries: dict[str, object] = {}
        if len(args) == 2:  # legacy runner: (device, is_pin_memory)
            self.device = torch.device(args[0])
            self.req_states = None
            self._rows: dict[int, _LegacyRow] = {}
        elif len(args) == 1:  # MRV2: (req_states)
            self.req_states = args[0]
            self.device = torch.device(self.req_states.device)
            n = int(self.req_states.max_num_reqs)
            self._catalog = np.full(n, -1, dtype=np.int64)  # index into self._specs; -1: not opted in
            self._offset = np.full(n, -1, dtype=np.int64)  # -1: the prompt's end
            self._specs: list[str] = []
            self._catalog_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
            self._offset_dev = torch.full((n,), -1, dtype=torch.long, device=self.device)
            self._dirty = False
        else:
            raise TypeError("TrieLogitsProcessor: unexpected constructor arguments from vLLM")

    def _trie(self, spec: str):
        if spec not in self._tries:
            self._tries[spec] = resolve_catalog(spec).to(self.device)
        return self._tries[spec]

    def _usable(self, trie) -> bool:
        # the plugin rejects other vocabularies at admission; a request that slipped past
        # (plugins disabled) is confined to EOS rather than left unconstrained
        return trie.vocab_size == self.vocab_size

    def is_argmax_invariant(self) -> bool:
        return False

    # ------------------------------------------------------------------ legacy runner
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            args = _request_args(params) or self._default
            if args is None:
                self._rows.pop(index, None)
                continue
            prompt = list(prompt_ids or [])
            offset = len(prompt) if args[1] is None else args[1]
            self._rows[index] = _LegacyRow(args[0], offset, prompt, output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self._rows[a] = row_b

    def _apply_legacy(self, logits: torch.Tensor) -> torch.Tensor:
        by_catalog: dict[str, list[int]] = {}
        for index, row in self._rows.items():
            if index < logits.shape[0]:
                by_catalog.setdefault(row.catalog, []).append(index)
        for spec, indices in by_catalog.items():
            trie = self._trie(spec)
            rows = [self._rows[i] for i in indices]
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
            # an offset past the prompt or a foreign vocabulary (admission rejects both when it
            # can see them) leaves the row only EOS
            bad = torch.tensor([row.offset > len(row.prompt) for row in rows], device=nodes.device)
            nodes = torch.where(bad | (not self._usable(trie)), torch.full_like(nodes, -1), nodes)
            for row, node in zip(rows, nodes.tolist()):
                row.node = node
            index = torch.as_tensor(indices, device=logits.device)
            logits[index] = mask_to_children(logits[index], trie, nodes.to(logits.device),
                                              fallback_token=self.eos_token_id)
        return logits

    # ------------------------------------------------------------------ MRV2
    def add_request(self, req_idx: int, sampling_params) -> bool:
        args = _request_args(sampling_params) or self._default
        self._dirty = True
        if args is None:
            self._catalog[req_idx] = -1
            return False
        self._trie(args[0])  # load now, not inside apply
        if args[0] not in self._specs:
            self._specs.append(args[0])
        self._catalog[req_idx] = self._specs.index(args[0])
        self._offset[req_idx] = -1 if args[1] is None else args[1]
        return True

    def apply_staged_writes(self) -> None:
        if self._dirty:
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
            trie = self._trie(self._specs[k])
            mine = row_catalog == k
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
            too_long = (count > depth) | (count < 0) | (offset > prompt_len) | (not self._usable(trie))
            nodes = torch.where(too_long, torch.full_like(nodes, -1), nodes)
            masked = mask_to_children(logits, trie, nodes, fallback_token=self.eos_token_id)
            logits = torch.where(mine[:, None], masked, logits)
        return logits

    # ------------------------------------------------------------------ both
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.req_states is None:
            return self._apply_legacy(logits) if self._rows else logits
        return self._apply_v2(logits, ctx)
