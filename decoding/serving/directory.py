"""A recommender in one directory, as ``decoding-serve DIR`` serves it with no other flag.

The directory holds ``decoding-serve.json`` and the files it names, every path relative to the
directory and inside it::

    {"format": "decoding-serve", "version": 1,
     "model": "model",                  # a transformers causal LM (save_pretrained), its tokenizer optional
     "draft": "draft",                  # optional: a draft for speculative search (same vocabulary)
     "served_model_name": "ml-100k",    # optional: the name /v1/models lists
     "catalogs": {"movies": {"trie": "movies.trie",               # ItemTrie.save
                             "titles": "movies.titles.json",      # optional: one title per item id
                             "history_prompt": {"prefix": [1], "max_items": 20}}},  # optional
     "setid": {"movies": "setid"}}      # optional: set-identifier bundles (decoding.setid.bundle)

:func:`write_server_directory` writes one (``decoding-bench workload --export DIR`` uses it for the
trained MovieLens recommender); :func:`read_server_directory` reads and checks it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from decoding.serving.decoders import HistoryPrompt

MANIFEST = "decoding-serve.json"
FORMAT = "decoding-serve"
VERSION = 1


@dataclass
class ServedCatalog:
    """One catalog of a served directory: absolute paths, and its history prompt (or None)."""

    trie: str
    titles: str | None = None
    history_prompt: HistoryPrompt | None = None


@dataclass
class ServerDirectory:
    """What ``decoding-serve.json`` names, as absolute paths."""

    root: str
    model: str
    draft: str | None = None
    served_model_name: str | None = None
    catalogs: dict[str, ServedCatalog] = field(default_factory=dict)
    setid: dict[str, str] = field(default_factory=dict)


def _inside(root: str, relative, what: str) -> str:
    """``root/relative``, refused unless ``relative`` is a relative path that stays inside ``root``."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise ValueError(f"{what}: expected a path relative to the directory, got {relative!r}")
    path = os.path.realpath(os.path.join(root, relative))  # links resolved: one cannot lead out either
    if os.path.commonpath([os.path.realpath(root), path]) != os.path.realpath(root):
        raise ValueError(f"{what}: {relative!r} leaves the directory")
    return path


def read_server_directory(path) -> ServerDirectory:
    """The directory's manifest, checked: ValueError naming the entry that is wrong."""
    root = os.path.abspath(os.fspath(path))
    where = os.path.join(root, MANIFEST)
    try:
        with open(where) as f:
            meta = json.load(f)
    except OSError:
        raise ValueError(f"{root}: no {MANIFEST} (a directory written by decoding-bench workload --export, or "
                         "by decoding.serving.directory.write_server_directory)") from None
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{where}: not a {FORMAT} version {VERSION} manifest")
    out = ServerDirectory(root, _inside(root, meta.get("model"), "model"),
                          _inside(root, meta["draft"], "draft") if meta.get("draft") is not None else None,
                          meta.get("served_model_name"))
    catalogs = meta.get("catalogs") or {}
    if not isinstance(catalogs, dict) or not catalogs:
        raise ValueError(f"{where}: catalogs: expected at least one catalog")
    for name, entry in catalogs.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: catalogs.{name}: expected an object with a trie")
        prompt = entry.get("history_prompt")
        try:
            prompt = None if prompt is None else HistoryPrompt(tuple(prompt.get("prefix", ())),
                                                               prompt.get("max_items", 20))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: catalogs.{name}.history_prompt: {exc}") from None
        out.catalogs[name] = ServedCatalog(
            _inside(root, entry.get("trie"), f"catalogs.{name}.trie"),
            _inside(root, entry["titles"], f"catalogs.{name}.titles") if entry.get("titles") is not None else None,
            prompt)
    bundles = meta.get("setid") or {}
    if not isinstance(bundles, dict):
        raise ValueError(f"{where}: setid: expected an object of catalog name to bundle folder")
    for name, bundle in bundles.items():
        out.setid[name] = _inside(root, bundle, f"setid.{name}")
    return out


def load_titles(path: str, num_ids: int) -> list[str]:
    """A catalog's titles file: a JSON list of ``num_ids`` strings, one per item id."""
    with open(path) as f:
        titles = json.load(f)
    if not isinstance(titles, list) or len(titles) != num_ids or not all(isinstance(t, str) for t in titles):
        raise ValueError(f"{path}: expected a JSON list of {num_ids} titles (one string per item id)")
    return titles


def write_server_directory(path, *, model, catalogs: dict, titles: dict | None = None,
                           history_prompts: dict | None = None, draft=None, tokenizer=None,
                           served_model_name: str | None = None, setid: dict | None = None) -> None:
    """Write a directory ``decoding-serve DIR`` serves.

    Args:
        model: a transformers causal LM (saved with ``save_pretrained`` to ``model/``).
        catalogs: ``{name: ItemTrie}`` for the model's vocabulary (``<name>.trie``).
        titles: ``{name: [title of item 0, ...]}`` (``<name>.titles.json``).
        history_prompts: ``{name: HistoryPrompt}``: how a user's history becomes a prompt.
        draft: a draft model for speculative search (``draft/``).
        tokenizer: saved beside the model (text prompts).
        served_model_name: the name ``/v1/models`` lists.
        setid: ``{name: folder}``: set-identifier bundles already saved inside ``path``
            (:func:`decoding.setid.bundle.save_setrec_bundle`), ``folder`` relative to it.
    """
    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    model.save_pretrained(os.path.join(root, "model"))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(root, "model"))
    meta: dict = {"format": FORMAT, "version": VERSION, "model": "model", "catalogs": {}}
    if draft is not None:
        draft.save_pretrained(os.path.join(root, "draft"))
        meta["draft"] = "draft"
    if served_model_name is not None:
        meta["served_model_name"] = served_model_name
    for name, trie in catalogs.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"catalogs: {name!r} is not a catalog name (letters, digits, '_' and '-')")
        entry: dict = {"trie": f"{name}.trie"}
        trie.save(os.path.join(root, entry["trie"]))
        if titles and name in titles:
            names = [str(t) for t in titles[name]]
            if len(names) != trie.num_ids:
                raise ValueError(f"titles[{name!r}]: {len(names)} titles for {trie.num_ids} item ids")
            entry["titles"] = f"{name}.titles.json"
            with open(os.path.join(root, entry["titles"]), "w") as f:
                json.dump(names, f)
        prompt = (history_prompts or {}).get(name)
        if prompt is not None:
            entry["history_prompt"] = {"prefix": list(prompt.prefix), "max_items": prompt.max_items}
        meta["catalogs"][name] = entry
    for name, folder in (setid or {}).items():
        _inside(os.path.abspath(root), folder, f"setid[{name!r}]")
        if not os.path.isfile(os.path.join(root, folder, "setid.json")):
            raise ValueError(f"setid[{name!r}]: no bundle at {folder!r} inside the directory")
        meta.setdefault("setid", {})[name] = folder
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(meta, f, indent=1)
