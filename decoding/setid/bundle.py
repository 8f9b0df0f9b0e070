"""Set-identifier bundles: a trained set-identifier recommender in one directory, as
``decoding-serve --setid DIR`` loads it.

A bundle is a folder holding::

    setid.json           {"format": "decoding.setid-bundle", "version": 1, "kind": "setrec" | "rpg",
                          "name": <catalog name>, "num_items": N, ...kind's fields}
    model/               the transformers model (save_pretrained)
    tables.safetensors   the kind's tensors (below)

* ``"setrec"`` (:func:`decoding.setid_generate`): ``queries [S, d]``, ``item_embeddings
  [S, N, d]`` (float32, float16 or bfloat16) and ``slot_weights [S]`` float32. A user's history
  is the prompt: its ``g``-th item, item id ``i``, is the ``S`` table vectors
  ``item_embeddings[:, i]`` with group id ``g`` (:mod:`decoding.setid.setrec`); the ``S`` queries
  follow.
* ``"rpg"`` (:func:`decoding.setid.rpg_topk`; a decoder-only model): ``item_codes [N, S]``
  (uint8 / int16 / int32 / int64), ``codebooks [S, C, d]`` and ``heads [S, d, d]`` (float), plus
  ``"temperature"`` in ``setid.json``. A history item is the mean of its codes' embeddings; the model's last hidden
  state ``h`` gives digit ``s`` the vector ``heads[s] @ h``, scored against that digit's
  codebook by cosine over ``temperature`` (:func:`decoding.setid.cosine_digit_logits`); every
  item is then ranked by its mean per-digit log-probability.

:func:`save_setrec_bundle` and :func:`save_rpg_bundle` write a bundle; :func:`load_setid_bundle`
reads one and checks every shape, so a bundle that does not fit its model fails at load time,
never inside a request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from decoding.setid.rpg import cosine_digit_logits, digit_logprobs, rpg_topk
from decoding.setid.setrec import ORDINARY, SetIdCatalog, setid_generate

FORMAT = "decoding.setid-bundle"
VERSION = 1
MANIFEST = "setid.json"
TABLES = "tables.safetensors"
MODEL = "model"
_CODE_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _left_padded(rows: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        if row.shape[0]:
            out[b, width - row.shape[0]:] = row
    return out


def _positions(model) -> int:
    """The longest input the model's positions allow (no limit for relative positions)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)


def _histories(histories, num_items: int) -> list[list[int]]:
    if not histories or any(not h for h in histories):
        raise ValueError("histories: expected one non-empty list of item ids per request")
    rows = [[int(i) for i in h] for h in histories]
    if any(not 0 <= i < num_items for h in rows for i in h):
        raise ValueError(f"histories: item ids must be in [0, {num_items})")
    return rows


@dataclass
class SetRecBundle:
    """A SETRec recommender: ``model``, ``queries [S, d]`` and ``catalog`` (its item tables)."""

    name: str
    model: torch.nn.Module
    queries: torch.Tensor
    catalog: SetIdCatalog
    kind: str = "setrec"

    @property
    def num_items(self) -> int:
        return self.catalog.num_items

    @property
    def vectors_per_item(self) -> int:
        """Input vectors per history item (``S``)."""
        return int(self.catalog.item_embeddings.shape[0])

    @property
    def max_history(self) -> int:
        """Most history items the model's positions hold (one per item, plus the ``S`` queries)."""
        return max(0, _positions(self.model) - self.vectors_per_item)

    def inputs(self, histories) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts for ``histories`` (lists of item ids): ``(inputs_embeds [B, T, d],
        group_ids [B, T] int64, attention_mask [B, T] int64)``, left-padded, ``T`` the longest
        history times ``S``."""
        rows = _histories(histories, self.num_items)
        table = self.catalog.item_embeddings  # [S, N, d]
        S = table.shape[0]
        dtype = self.queries.dtype
        embeds = [table[:, torch.tensor(h, device=table.device)].transpose(0, 1).reshape(-1, table.shape[2])
                  .to(dtype).cpu() for h in rows]
        groups = [torch.arange(len(h)).repeat_interleave(S) for h in rows]
        width = max(e.shape[0] for e in embeds)
        mask = _left_padded([torch.ones(e.shape[0], dtype=torch.long) for e in embeds], width, 0)
        device = self.queries.device
        return (_left_padded(embeds, width, 0.0).to(device), _left_padded(groups, width, ORDINARY).to(device),
                mask.to(device))

    def topk(self, histories, k: int, *, exclude_items=None, backend: str = "auto"):
        """:func:`decoding.setid_generate` on the histories' prompts: ``(items, scores)`` ``[B, k]``."""
        embeds, groups, mask = self.inputs(histories)
        out = setid_generate(self.model, embeds, groups, self.queries, self.catalog, k, attention_mask=mask,
                             exclude_items=exclude_items, backend=backend)
        return out.items, out.scores


@dataclass
class RPGBundle:
    """An RPG recommender: ``model``, ``item_codes [N, S]``, ``codebooks [S, C, d]``, ``heads
    [S, d, d]`` and the cosine ``temperature``."""

    name: str
    model: torch.nn.Module
    item_codes: torch.Tensor
    codebooks: torch.Tensor
    heads: torch.Tensor
    temperature: float
    kind: str = "rpg"

    @property
    def num_items(self) -> int:
        return int(self.item_codes.shape[0])

    vectors_per_item = 1  # input vectors per history item

    @property
    def max_history(self) -> int:
        """Most history items the model's positions hold."""
        return _positions(self.model)

    def inputs(self, histories) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds [B, T, d], attention_mask [B, T])``, left-padded: one vector per
        history item, the mean of its codes' embeddings."""
        rows = _histories(histories, self.num_items)
        S = self.codebooks.shape[0]
        digits = torch.arange(S, device=self.codebooks.device)
        embeds = [self.codebooks[digits, self.item_codes[torch.tensor(h, device=self.item_codes.device)].long()]
                  .mean(dim=1).cpu() for h in rows]  # [len(h), S, d] -> [len(h), d]
        width = max(len(h) for h in rows)
        mask = _left_padded([torch.ones(len(h), dtype=torch.long) for h in rows], width, 0)
        device = self.codebooks.device
        return _left_padded(embeds, width, 0.0).to(device), mask.to(device)

    def code_logprobs(self, histories) -> torch.Tensor:
        """float32 ``[B, S, C]``: each digit's log-probabilities over its codebook."""
        embeds, mask = self.inputs(histories)
        base = getattr(self.model, "base_model", self.model)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: a history's positions start at 0
        hidden = base(inputs_embeds=embeds.to(self.model.dtype), attention_mask=mask,
                      position_ids=positions).last_hidden_state[:, -1]
        digit_hidden = torch.einsum("sde,be->bsd", self.heads.float(), hidden.float())
        return digit_logprobs(cosine_digit_logits(digit_hidden, self.codebooks.float(), self.temperature))

    def topk(self, histories, k: int, *, exclude_items=None, backend: str = "auto"):
        """:func:`decoding.setid.rpg_topk` on the histories: ``(items, scores)`` ``[B, k]``."""
        top = rpg_topk(self.code_logprobs(histories), self.item_codes, k, exclude_items=exclude_items,
                       backend=backend)
        return top.items, top.scores


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name: expected a catalog name of letters, digits, '-' and '_', got {name!r}")
    return name


def _write(path, model, kind: str, name: str, num_items: int, tensors: dict, fields: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.save_pretrained(os.path.join(path, MODEL))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(path, TABLES))
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "name": _check_name(name),
                "num_items": int(num_items), **fields}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def save_setrec_bundle(path, model, queries: torch.Tensor, catalog: SetIdCatalog, *, name: str = "setid") -> None:
    """Write a SETRec bundle to the folder ``path``: ``model`` (a transformers model),
    ``queries [S, d]`` and ``catalog`` (:class:`decoding.SetIdCatalog`); requests name it ``name``."""
    if not isinstance(catalog, SetIdCatalog):
        raise TypeError(f"catalog: expected a decoding.SetIdCatalog, got {type(catalog).__name__}")
    S, N, d = catalog.item_embeddings.shape
    if tuple(queries.shape) != (S, d):
        raise ValueError(f"queries: expected shape [{S}, {d}] (one per catalog slot), got {tuple(queries.shape)}")
    weights = catalog.slot_weights if catalog.slot_weights is not None else torch.ones(S)
    _write(path, model, "setrec", name, N, {"queries": queries, "item_embeddings": catalog.item_embeddings,
                                            "slot_weights": weights.float()}, {"slots": S})


def save_rpg_bundle(path, model, item_codes: torch.Tensor, codebooks: torch.Tensor, heads: torch.Tensor,
                    temperature: float, *, name: str = "setid") -> None:
    """Write an RPG bundle to the folder ``path``: ``model``, ``item_codes [N, S]``,
    ``codebooks [S, C, d]``, ``heads [S, d, d]`` and ``temperature``; requests name it ``name``."""
    _check_rpg(item_codes, codebooks, heads, temperature)
    _write(path, model, "rpg", name, item_codes.shape[0],
           {"item_codes": item_codes, "codebooks": codebooks, "heads": heads},
           {"digits": int(item_codes.shape[1]), "temperature": float(temperature)})


def _check_rpg(item_codes, codebooks, heads, temperature) -> None:
    if item_codes.dim() != 2 or item_codes.dtype not in _CODE_DTYPES:
        raise ValueError("item_codes: expected an integer tensor [N, S]")
    if codebooks.dim() != 3 or codebooks.shape[0] != item_codes.shape[1]:
        raise ValueError(f"codebooks: expected shape [{item_codes.shape[1]}, C, d], got {tuple(codebooks.shape)}")
    S, C, d = codebooks.shape
    if tuple(heads.shape) != (S, d, d):
        raise ValueError(f"heads: expected shape [{S}, {d}, {d}], got {tuple(heads.shape)}")
    if item_codes.numel() and (int(item_codes.min()) < 0 or int(item_codes.max()) >= C):
        raise ValueError(f"item_codes: codes must be in [0, {C})")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")


def load_setid_bundle(path, *, device="cpu", dtype: torch.dtype = torch.float32) -> SetRecBundle | RPGBundle:
    """Read the bundle in the folder ``path`` (written by :func:`save_setrec_bundle` or
    :func:`save_rpg_bundle`), its model in eval mode on ``device`` in ``dtype``. ValueError
    naming what is wrong when the folder is not a bundle or its shapes do not fit its model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = os.fspath(path)
    where = os.path.join(path, MANIFEST)
    try:
        with open(where) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(path, TABLES))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a set-identifier bundle ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{where}: not a {FORMAT} version {VERSION} manifest")
    kind, name = meta.get("kind"), _check_name(meta.get("name"))
    if kind not in ("setrec", "rpg"):
        raise ValueError(f"{where}: kind must be 'setrec' or 'rpg', got {kind!r}")
    model_dir = os.path.join(path, MODEL)
    config = AutoConfig.from_pretrained(model_dir)
    loader = AutoModel if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = loader.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hidden = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
    need = {"setrec": ("queries", "item_embeddings", "slot_weights"),
            "rpg": ("item_codes", "codebooks", "heads")}[kind]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"{path}: {TABLES} lacks {', '.join(missing)}")
    if kind == "setrec":
        table = tensors["item_embeddings"]
        if table.dim() != 3 or table.shape[2] != hidden:
            raise ValueError(f"{path}: item_embeddings must be [S, N, {hidden}] (the model's hidden size), "
                             f"got {tuple(table.shape)}")
        if table.shape[1] != meta.get("num_items"):
            raise ValueError(f"{where}: num_items {meta.get('num_items')} differs from the table's {table.shape[1]}")
        catalog = SetIdCatalog(table.to(device), tensors["slot_weights"].float().to(device))
        queries = tensors["queries"]
        if tuple(queries.shape) != (table.shape[0], hidden):
            raise ValueError(f"{path}: queries must be [{table.shape[0]}, {hidden}], got {tuple(queries.shape)}")
        return SetRecBundle(name, model, queries.to(device=device, dtype=dtype), catalog)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{where}: an RPG bundle's model must be decoder-only (its last hidden state scores the "
                         "digits)")
    codes, codebooks, heads = tensors["item_codes"], tensors["codebooks"], tensors["heads"]
    temperature = meta.get("temperature")
    _check_rpg(codes, codebooks, heads, temperature)
    if codebooks.shape[2] != hidden:
        raise ValueError(f"{path}: codebooks must have the model's hidden size {hidden}, got {codebooks.shape[2]}")
    if codes.shape[0] != meta.get("num_items"):
        raise ValueError(f"{where}: num_items {meta.get('num_items')} differs from item_codes' {codes.shape[0]}")
    return RPGBundle(name, model, codes.to(device), codebooks.float().to(device), heads.float().to(device),
                     float(temperature))
