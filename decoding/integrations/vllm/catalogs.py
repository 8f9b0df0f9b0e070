"""Catalogs a vLLM request can name: a registered name or a saved ItemTrie file (cached)."""

from __future__ import annotations

import os
import threading

from decoding.trie import ItemTrie

_REGISTERED: dict[str, ItemTrie | str] = {}
_LOADED: dict[tuple, ItemTrie] = {}
_LOCK = threading.Lock()


def register_catalog(name: str, catalog) -> None:
    """Make ``catalog`` (an :class:`ItemTrie` or a path to a saved one) available to requests as
    ``extra_args={"decoding_catalog": name}``. Registration is per process: with vLLM's
    multiprocessing engine, register in the engine process too, or name the file path."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if not isinstance(catalog, (ItemTrie, str, os.PathLike)):
        raise TypeError(f"catalog: expected an ItemTrie or a path, got {type(catalog).__name__}")
    with _LOCK:
        _REGISTERED[name] = catalog if isinstance(catalog, ItemTrie) else os.fspath(catalog)


def resolve_catalog(spec) -> ItemTrie:
    """The catalog named by ``spec`` (registered name or ItemTrie file path), on CPU.

    Raises ValueError naming ``decoding_catalog`` for unknown names, missing or corrupt files.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"decoding_catalog: expected a registered catalog name or a file path, got {spec!r}")
    with _LOCK:
        target = _REGISTERED.get(spec, spec)
        if isinstance(target, ItemTrie):
            return target
        if not os.path.isfile(target):
            known = ", ".join(sorted(_REGISTERED)) or "none"
            raise ValueError(
                f"decoding_catalog: {spec!r} is neither a registered catalog (registered: {known}) nor an existing file"
            )
        stat = os.stat(target)
        key = (os.path.realpath(target), stat.st_mtime_ns, stat.st_size)
        if key not in _LOADED:
            try:
                _LOADED[key] = ItemTrie.load(target)
            except ValueError as exc:
                raise ValueError(f"decoding_catalog: {exc}") from None
        return _LOADED[key]
