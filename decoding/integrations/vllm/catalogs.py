"""Catalogs a vLLM request can name: only those the operator registered.

A request names a catalog (``extra_args={"decoding_catalog": "items"}``); it never names a file.
The operator registers catalogs when the engine starts,

    additional_config={"decoding": {"catalogs": {"items": "/srv/items.trie", ...},
                                    "catalog_dir": "/srv/catalogs",      # optional
                                    "max_catalog_bytes": 4 << 30,        # optional
                                    "allow_untested_vllm": false,       # optional
                                    "max_beams": 1024, "max_exclude": 100000,  # caps on a request
                                    "max_requests_per_search": None}}   # default 2 x max_num_seqs

(``vllm serve ... --additional-config '{"decoding": {...}}'``), or in-process with
:func:`register_catalog`. With ``catalog_dir`` a request may also name a plain file name inside
that directory, resolved strictly inside it (no separators, no ``..``, no symlink that leads out).
A name that is none of these, a path included, gets :data:`UNKNOWN_CATALOG`, one fixed message
that does not depend on what exists on disk.

Files are loaded on first use and cached, least recently used first out, under
``max_catalog_bytes`` (default 4 GiB). Each use checks the file's identity (inode, size,
modification time): a file replaced on disk (write a new file, then rename it over the old one)
is loaded anew for the next request, while requests already running keep the ItemTrie they were
given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from decoding.integrations.vllm import _compat
from decoding.serving.requests import (  # noqa: F401 - one definition, shared with decoding-serve
    CATALOG_KEY,
    DEFAULT_MAX_BEAMS,
    DEFAULT_MAX_EXCLUDE,
    UNKNOWN_CATALOG,
    CatalogError,
)
from decoding.trie import ItemTrie

CONFIG_KEY = "decoding"
DEFAULT_MAX_CATALOG_BYTES = 4 << 30
_CONFIG_FIELDS = ("catalog", "offset", "catalogs", "catalog_dir", "max_catalog_bytes", "max_beams", "max_exclude",
                  "max_requests_per_search", _compat.OPT_IN_KEY)

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")

logger = logging.getLogger("decoding.integrations.vllm")
_registered: dict[str, ItemTrie | str] = {}
_lock = threading.Lock()


def register_catalog(name: str, catalog) -> None:
    """Serve ``catalog`` (an :class:`ItemTrie`, or the path of a saved one) to requests as
    ``extra_args={"decoding_catalog": name}``, in this process. With vLLM's multiprocess engine
    or ``vllm serve``, register through ``additional_config`` instead (every process reads it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(catalog, (ItemTrie, str, os.PathLike)):
        raise TypeError(f"catalog: expected an ItemTrie or a path, got {type(catalog).__name__}")
    if not isinstance(catalog, ItemTrie):
        catalog = os.fspath(catalog)
        if not os.path.isfile(catalog):
            raise FileNotFoundError(f"catalog: no ItemTrie file at {catalog!r}")
    with _lock:
        _registered[name] = catalog


@dataclass(frozen=True)
class CatalogOptions:
    """The operator's ``additional_config["decoding"]``, checked."""

    catalogs: tuple = ()  # ((name, path), ...)
    catalog_dir: str | None = None  # real path
    max_catalog_bytes: int = DEFAULT_MAX_CATALOG_BYTES
    default: str | None = None  # engine-wide catalog: a registered name or an operator path
    default_offset: int | None = None
    allow_untested_vllm: bool = False  # run on a vLLM outside the supported range (one warning)
    max_beams: int = DEFAULT_MAX_BEAMS  # most beams (n) one beam-search request may ask
    max_exclude: int = DEFAULT_MAX_EXCLUDE  # most item ids one request may exclude
    max_requests_per_search: int | None = None  # requests one search keeps in the engine (None: 2 x max_num_seqs)


def _config_error(field: str, expected: str, got) -> ValueError:
    return ValueError(f'additional_config["{CONFIG_KEY}"]["{field}"]: expected {expected}, got {got!r}')


def _positive(conf: dict, key: str, default, expected: str):
    value = conf.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise _config_error(key, expected, value)
    return value


def catalog_options(vllm_config) -> CatalogOptions:
    """Parse ``vllm_config.additional_config["decoding"]``; raises ValueError naming the field
    (an operator error, reported when the engine starts)."""
    conf = _compat.additional_config(vllm_config).get(CONFIG_KEY)
    if conf is None:
        return CatalogOptions()
    if not isinstance(conf, dict) or set(conf) - set(_CONFIG_FIELDS):
        raise ValueError(f'additional_config["{CONFIG_KEY}"]: expected a dict with keys among {list(_CONFIG_FIELDS)}, '
                         f"got {conf!r}")
    catalogs = conf.get("catalogs") or {}
    if not isinstance(catalogs, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                 for k, v in catalogs.items()):
        raise _config_error("catalogs", "a dict of catalog name -> ItemTrie file path", catalogs)
    for name, path in catalogs.items():
        if not os.path.isfile(path):
            raise _config_error("catalogs", f"an existing ItemTrie file for {name!r}", path)
    directory = conf.get("catalog_dir")
    if directory is not None:
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise _config_error("catalog_dir", "an existing directory", directory)
        directory = os.path.realpath(directory)
    budget = _positive(conf, "max_catalog_bytes", DEFAULT_MAX_CATALOG_BYTES, "a positive number of bytes")
    limits = {key: _positive(conf, key, default, "a positive int")
              for key, default in (("max_beams", DEFAULT_MAX_BEAMS), ("max_exclude", DEFAULT_MAX_EXCLUDE),
                                   ("max_requests_per_search", None))}
    default, offset = conf.get("catalog"), conf.get("offset")
    if default is not None and (not isinstance(default, str) or not default):
        raise _config_error("catalog", "a catalog name or an ItemTrie file path", default)
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise _config_error("offset", "a non-negative int (a token index)", offset)
    if offset is not None and default is None:
        raise _config_error("offset", '"catalog" beside it', offset)
    return CatalogOptions(tuple(sorted(catalogs.items())), directory, budget, default, offset,
                          _compat.opt_in_of(conf), **limits)


class _FileCache:
    """Loaded ItemTrie files, least recently used first out under a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[tuple, ItemTrie]] = OrderedDict()  # real path -> (identity, trie)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(trie.nbytes for _, trie in self._entries.values())

    def get(self, path: str, name: str) -> ItemTrie:
        real = os.path.realpath(path)
        st = os.stat(real)  # raises OSError: the caller decides what a client may learn
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            entry = self._entries.get(real)
            if entry is not None and entry[0] == identity:
                self._entries.move_to_end(real)
                return entry[1]
        trie = ItemTrie.load(real)
        if trie.nbytes > self.max_bytes:
            raise CatalogError(f"{CATALOG_KEY}: catalog {name!r} needs {trie.nbytes} bytes, more than the server's "
                             f"max_catalog_bytes ({self.max_bytes})")
        with self._lock:
            self._entries[real] = (identity, trie)
            self._entries.move_to_end(real)
            while len(self._entries) > 1 and self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)  # running requests keep their own reference
        return trie


class CatalogSet:
    """What the requests of one engine may name: its configured catalogs, the catalogs
    registered in this process, and (opt-in) files of its ``catalog_dir``."""

    def __init__(self, options: CatalogOptions):
        self.options = options
        self._named = dict(options.catalogs)
        self.files = _FileCache(options.max_catalog_bytes)

    def _load_registered(self, name: str, path: str) -> ItemTrie:
        try:
            return self.files.get(path, name)
        except CatalogError:
            raise
        except (OSError, ValueError) as exc:
            # the operator's file is missing or corrupt: the detail goes to the server log only
            logger.error("decoding catalog %r (%s) cannot be loaded: %s", name, path, exc)
            raise CatalogError(f"{CATALOG_KEY}: catalog {name!r} cannot be loaded; the server log says why") from None

    def _in_directory(self, name: str) -> str | None:
        directory = self.options.catalog_dir
        if directory is None or not _FILE_NAME.fullmatch(name) or ".." in name:
            return None
        real = os.path.realpath(os.path.join(directory, name))
        if os.path.dirname(real) != directory or not os.path.isfile(real):
            return None
        return real

    def resolve(self, name) -> ItemTrie:
        """The catalog a request names; CatalogError(:data:`UNKNOWN_CATALOG`) for anything else."""
        if not isinstance(name, str) or not name:
            raise CatalogError(UNKNOWN_CATALOG)
        if name in self._named:
            return self._load_registered(name, self._named[name])
        with _lock:
            registered = _registered.get(name)
        if isinstance(registered, ItemTrie):
            return registered
        if registered is not None:
            return self._load_registered(name, registered)
        path = self._in_directory(name)
        if path is None:
            raise CatalogError(UNKNOWN_CATALOG)
        return self._load_registered(name, path)

    def resolve_default(self) -> ItemTrie | None:
        """The engine-wide catalog (``additional_config["decoding"]["catalog"]``): a registered
        name, or a path the operator gave."""
        default = self.options.default
        if default is None:
            return None
        try:
            return self.resolve(default)
        except CatalogError as exc:
            if str(exc) != UNKNOWN_CATALOG:
                raise
            if not os.path.isfile(default):
                raise _config_error("catalog", "a registered catalog name or an ItemTrie file path", default) from None
            return self._load_registered(default, default)


_sets: dict[str, CatalogSet] = {}


def catalogs_for(vllm_config=None) -> CatalogSet:
    """The :class:`CatalogSet` of an engine's config: one per distinct configuration and process,
    so the front end's admission checks and the engine's processor share loaded files, and the
    configuration is checked once, not per request."""
    key = json.dumps(_compat.additional_config(vllm_config).get(CONFIG_KEY), sort_keys=True, default=repr)
    with _lock:
        found = _sets.get(key)
    if found is None:
        found = CatalogSet(catalog_options(vllm_config))
        with _lock:
            found = _sets.setdefault(key, found)
    return found


def resolve_catalog(name, vllm_config=None) -> ItemTrie:
    """The catalog ``name`` as a request of the engine configured by ``vllm_config`` would get it
    (registered names only; see the module docstring). Raises ValueError naming ``decoding_catalog``."""
    return catalogs_for(vllm_config).resolve(name)
