"""ItemTrie: the catalog of valid item identifiers as a level-ordered CSR trie.

Layout (all int32 unless noted; ``U`` = number of distinct identifiers, ``N`` = rows given):

- nodes are numbered level by level in lexicographic order; node 0 is the root;
- ``indptr [num_nodes + 1]``: the children of node ``v`` are the edges ``indptr[v] .. indptr[v+1]``,
  sorted by token, and edge ``e`` leads to node ``e + 1`` (so ``child_node`` is implicit);
- ``node_token [num_nodes]``: the token on the edge into each node (-1 for the root), so the
  CSR ``child_token[e]`` is ``node_token[e + 1]``;
- ``item_lo, item_hi [num_nodes]``: every node owns the contiguous range of sorted item ranks
  ``[item_lo, item_hi)``; a leaf owns exactly one rank;
- ``sorted_items [U]`` (int64): item id (row index of the input) of each sorted rank;
- ``rank_of_item [N]`` (int64): sorted rank of each row (duplicate rows kept with
  ``on_duplicate="first"`` alias the rank of the first occurrence);
- ``level_offsets [depth + 2]`` (int64): the nodes of level ``d`` are
  ``level_offsets[d] .. level_offsets[d+1]``; ``max_branch [depth]``: the widest node of each level.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from typing import Sequence

import numpy as np
import torch

from decoding._ext import _C
from decoding._validate import check_choice, check_positive_int, exclusion_ids

_COMPACT_LOCK = threading.Lock()
_FORMAT = "decoding.ItemTrie"
_VERSION = 1
_ARRAYS = (
    "level_offsets",
    "indptr",
    "node_token",
    "item_lo",
    "item_hi",
    "max_branch",
    "sorted_items",
    "rank_of_item",
)


def _as_rows(seqs) -> tuple[np.ndarray, np.ndarray, bool]:
    """Flatten ``seqs`` into (tokens int64 [T], offsets int64 [N+1], fixed_length)."""
    if isinstance(seqs, torch.Tensor):
        seqs = seqs.detach().cpu().numpy()
    if isinstance(seqs, np.ndarray):
        if seqs.ndim != 2:
            raise ValueError(f"seqs: expected a 2-D array [N, L] or a list of int lists, got shape {seqs.shape}")
        if not np.issubdtype(seqs.dtype, np.integer):
            raise TypeError(f"seqs: expected an integer array, got dtype {seqs.dtype}")
        n, length = seqs.shape
        if n == 0 or length == 0:
            raise ValueError(f"seqs: the catalog is empty (shape {seqs.shape})")
        tokens = np.ascontiguousarray(seqs, dtype=np.int64).reshape(-1)
        offsets = np.arange(n + 1, dtype=np.int64) * length
        return tokens, offsets, True
    if not isinstance(seqs, Sequence) or isinstance(seqs, (str, bytes)):
        raise TypeError(f"seqs: expected an int array/tensor [N, L] or a list of int lists, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError("seqs: the catalog is empty")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if (lengths == 0).any():
        raise ValueError(f"seqs: row {int(np.argmax(lengths == 0))} is empty")
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    try:
        tokens = np.fromiter((int(t) for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"seqs: every row must be a list of ints ({exc})") from None
    return tokens, offsets, bool((lengths == lengths[0]).all())


class ItemTrie:
    """Catalog index over item identifiers. Build with :meth:`from_sequences` or :meth:`load`."""

    def __init__(self, arrays: dict[str, torch.Tensor], *, vocab_size: int, eos_token_id: int | None, depth: int):
        self.vocab_size = int(vocab_size)
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self._depth = int(depth)
        self._arrays = dict(arrays)
        for name in _ARRAYS:
            setattr(self, name, self._arrays[name])
        # Host copies of the small per-level tables: shapes of kernels are chosen from these
        # without a device sync.
        self._max_branch_host = [int(x) for x in self._arrays["max_branch"].cpu().tolist()]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sequences(
        cls,
        seqs,
        *,
        vocab_size: int,
        eos_token_id: int | None = None,
        on_duplicate: str = "error",
    ) -> "ItemTrie":
        """Build the trie from item identifiers; the item id of a row is its index.

        Args:
            seqs: int array/tensor ``[N, L]`` (fixed-length semantic IDs) or a list of ``N`` int
                lists (variable length; each must end with ``eos_token_id``).
            vocab_size: size of the model's vocabulary; every token must be in ``[0, vocab_size)``.
            eos_token_id: the token that ends an identifier. Required for variable-length rows;
                when given, every row must end with it and contain it nowhere else.
            on_duplicate: ``"error"`` (default) raises on two equal identifiers; ``"first"``
                keeps the first row and makes later equal rows aliases of it.
        """
        check_positive_int("vocab_size", vocab_size)
        check_choice("on_duplicate", on_duplicate, {"error", "first"})
        if eos_token_id is not None:
            if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
                raise TypeError(f"eos_token_id: expected an int or None, got {type(eos_token_id).__name__}")
            if not 0 <= eos_token_id < vocab_size:
                raise ValueError(f"eos_token_id: {eos_token_id} is outside the vocabulary [0, {vocab_size})")
        tokens, offsets, fixed = _as_rows(seqs)
        bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
        if bad.size:
            row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            raise ValueError(
                f"seqs: row {row} has token id {int(tokens[bad[0]])} outside the vocabulary [0, {vocab_size})"
            )
        if eos_token_id is None:
            if not fixed:
                raise ValueError("eos_token_id: variable-length identifiers need an eos_token_id that ends each one")
        else:
            is_eos = tokens == eos_token_id
            ends = offsets[1:] - 1
            if not is_eos[ends].all():
                row = int(np.flatnonzero(~is_eos[ends])[0])
                raise ValueError(f"seqs: row {row} does not end with eos_token_id={eos_token_id}")
            if int(is_eos.sum()) != len(ends):
                pos = np.flatnonzero(is_eos)
                inner = pos[~np.isin(pos, ends)][0]
                row = int(np.searchsorted(offsets, inner, side="right") - 1)
                raise ValueError(f"seqs: row {row} contains eos_token_id={eos_token_id} before its end")
        raw = _C.build_trie(tokens, offsets, vocab_size, on_duplicate == "first")
        arrays = {name: torch.from_numpy(np.asarray(raw[name])) for name in _ARRAYS}
        return cls(arrays, vocab_size=vocab_size, eos_token_id=eos_token_id, depth=raw["depth"])

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def depth(self) -> int:
        """Length of the longest identifier (EOS included): the number of decoding steps."""
        return self._depth

    @property
    def num_nodes(self) -> int:
        return int(self.node_token.shape[0])

    @property
    def num_items(self) -> int:
        """Number of distinct identifiers: the items beam search can return."""
        return int(self.sorted_items.shape[0])

    @property
    def num_ids(self) -> int:
        """Number of rows the trie was built from: item ids are in ``[0, num_ids)``."""
        return int(self.rank_of_item.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in self._arrays.values())

    def max_branch_at(self, level: int) -> int:
        """Most children of any node at ``level`` (0 = root); 0 past the deepest level."""
        return self._max_branch_host[level] if 0 <= level < len(self._max_branch_host) else 0

    def __repr__(self) -> str:
        return (
            f"ItemTrie(num_items={self.num_items}, num_nodes={self.num_nodes}, depth={self.depth}, "
            f"vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, device={self.device}, "
            f"nbytes={self.nbytes})"
        )

    def to(self, device) -> "ItemTrie":
        """A copy of the trie on ``device`` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        arrays = {k: v.to(device) for k, v in self._arrays.items()}
        return ItemTrie(arrays, vocab_size=self.vocab_size, eos_token_id=self.eos_token_id, depth=self.depth)

    def compact(self) -> tuple["ItemTrie", torch.Tensor]:
        """The same trie over a compact vocabulary: the catalog's distinct tokens, in order,
        renumbered ``0 .. C-1`` (the nodes, items and ranks are unchanged, and so is the order of
        every node's children). For a search whose scores only ever touch catalog tokens, so that
        a beam row is ``C`` numbers instead of the model's vocabulary.

        Returns:
            ``(trie, tokens)``: the compact trie (``vocab_size = C``, on this trie's device) and
            ``tokens`` int64 ``[C]``, the real token of each compact id (sorted). Computed once
            per trie.
        """
        with _COMPACT_LOCK:
            found = getattr(self, "_compact_view", None)
        if found is not None:
            return found
        node_token = self.node_token.long()
        tokens = torch.unique(node_token[1:]) if self.num_nodes > 1 else node_token[:0]
        remapped = torch.searchsorted(tokens, node_token.clamp(min=0))
        remapped = torch.where(node_token >= 0, remapped, node_token).to(self.node_token.dtype)
        arrays = {**self._arrays, "node_token": remapped}
        eos = None
        if self.eos_token_id is not None:
            at = int(torch.searchsorted(tokens, torch.tensor(self.eos_token_id, device=tokens.device)))
            eos = at if at < tokens.numel() and int(tokens[at]) == self.eos_token_id else None
        view = (ItemTrie(arrays, vocab_size=max(int(tokens.numel()), 1), eos_token_id=eos, depth=self.depth), tokens)
        with _COMPACT_LOCK:
            self._compact_view = view
        return view

    # ------------------------------------------------------------------ queries
    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        """``nodes [...]`` int -> bool ``[...]``: True where the node ends an identifier."""
        safe = nodes.clamp(0, self.num_nodes - 1).long()
        childless = self.indptr[safe + 1] == self.indptr[safe]
        return childless & (nodes > 0)

    def leaf_items(self, nodes: torch.Tensor) -> torch.Tensor:
        """``nodes [...]`` int -> item ids int64 ``[...]``; -1 where the node is not a leaf."""
        safe = nodes.clamp(0, self.num_nodes - 1).long()
        items = self.sorted_items[self.item_lo[safe].long()]
        return torch.where(self.is_leaf(nodes), items, torch.full_like(items, -1))

    def walk(self, prefixes: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Follow token prefixes, vectorised over rows.

        Args:
            prefixes: int ``[R, T]``; -1 entries are padding and leave the node unchanged.
            start: int ``[R]`` nodes to start from (default: the root); -1 stays -1.
        Returns:
            int64 ``[R]``: the node reached, -1 where the path leaves the trie.
        """
        if prefixes.dim() != 2:
            raise ValueError(f"prefixes: expected shape [R, T], got {tuple(prefixes.shape)}")
        prefixes = prefixes.to(self.device).long()
        rows = prefixes.shape[0]
        if start is None:
            node = torch.zeros(rows, dtype=torch.long, device=self.device)
        else:
            if start.shape != (rows,):
                raise ValueError(f"start: expected shape [{rows}], got {tuple(start.shape)}")
            node = start.to(self.device).long()
        indptr = self.indptr  # indexed per row, then widened: never a copy of the whole array
        tokens = self.node_token
        # bisection steps that cover the widest node of any level
        steps = max(1, int(max(self._max_branch_host, default=1)).bit_length())
        for level in range(prefixes.shape[1]):
            tok = prefixes[:, level]
            pad = tok < 0
            alive = node >= 0
            safe = node.clamp(min=0)
            lo = indptr[safe].long()
            end = indptr[safe + 1].long()
            hi = end.clone()
            # binary search of tok among the sorted child tokens node_token[lo+1 .. end+1)
            for _ in range(steps):
                open_ = lo < hi
                mid = (lo + hi) // 2
                right = tokens[(mid + 1).clamp(max=self.num_nodes - 1)] < tok
                lo = torch.where(open_ & right, mid + 1, lo)
                hi = torch.where(open_ & ~right, mid, hi)
            found = (lo < end) & (tokens[(lo + 1).clamp(max=self.num_nodes - 1)] == tok)
            stepped = torch.where(found, lo + 1, torch.full_like(lo, -1))
            node = torch.where(pad, node, torch.where(alive, stepped, node))
        return node

    def has_prefix(self, tokens) -> bool:
        """Whether the int sequence ``tokens`` starts some identifier: a host-side walk for a single
        short sequence (microseconds; :meth:`walk` is the vectorised form for many rows)."""
        indptr, node_token = self.indptr.cpu().numpy(), self.node_token.cpu().numpy()
        node = 0
        for tok in tokens:
            lo, hi = int(indptr[node]) + 1, int(indptr[node + 1]) + 1  # children are nodes lo..hi-1
            at = lo + int(np.searchsorted(node_token[lo:hi], tok))
            if at >= hi or int(node_token[at]) != int(tok):
                return False
            node = at
        return True

    def lookup(self, seqs) -> torch.Tensor:
        """Item ids of identifiers: ``seqs`` as in :meth:`from_sequences` -> int64 ``[N]``, -1 where absent."""
        if isinstance(seqs, torch.Tensor) and seqs.dim() == 2:
            padded = seqs
        else:
            tokens, offsets, _ = _as_rows(seqs)
            lengths = np.diff(offsets)
            width = int(lengths.max())
            grid = np.full((len(lengths), width), -1, dtype=np.int64)
            mask = np.arange(width)[None, :] < lengths[:, None]
            grid[mask] = tokens
            padded = torch.from_numpy(grid)
        if padded.numel() == 0:
            return torch.empty(padded.shape[0], dtype=torch.long, device=self.device)
        out_of_vocab = (padded >= self.vocab_size).any(dim=1)
        nodes = self.walk(padded)
        nodes = torch.where(out_of_vocab.to(nodes.device), torch.full_like(nodes, -1), nodes)
        return self.leaf_items(nodes)

    def identifiers(self, items) -> list[list[int]]:
        """The identifier of each item id (the inverse of :meth:`lookup`): ``items`` a sequence
        of ids in ``[0, num_ids)`` -> one token list each (ending with the EOS where identifiers
        have one). A duplicate row kept with ``on_duplicate="first"`` gives its first row's
        identifier. Walks down by ranks: each level's nodes own sorted, contiguous rank ranges."""
        items = torch.as_tensor(list(items), dtype=torch.long).reshape(-1)
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_ids):
            raise ValueError(f"items: item ids must be in [0, {self.num_ids})")
        rank_of_item, item_lo, node_token, offsets = self._host_tables()
        ranks = rank_of_item[items].to(item_lo.dtype)
        out: list[list[int]] = [[] for _ in range(items.numel())]
        live = torch.arange(items.numel())
        for level in range(1, self.depth + 1):
            if live.numel() == 0:
                break
            lo, hi = offsets[level], offsets[level + 1]
            node = lo + torch.searchsorted(item_lo[lo:hi], ranks[live], right=True) - 1
            tokens = node_token[node]
            for row, token in zip(live.tolist(), tokens.tolist()):
                out[row].append(token)
            live = live[tokens != self.eos_token_id] if self.eos_token_id is not None else live
        return out

    def _host_tables(self):
        """Host copies of the tables :meth:`identifiers` walks, made once per trie (a served
        request's prompt costs its items' walk, never a copy of the catalog)."""
        with _COMPACT_LOCK:
            found = getattr(self, "_host_view", None)
        if found is None:
            found = (self.rank_of_item.cpu(), self.item_lo.cpu(), self.node_token.cpu(),
                     self.level_offsets.cpu().tolist())
            with _COMPACT_LOCK:
                self._host_view = found
        return found

    def excluded_ranks(self, exclude_items, batch_size: int) -> torch.Tensor | None:
        """Per-request item ids to exclude -> sorted unique ranks ``[B, X]`` int64, padded with
        ``num_items`` (past every range). Accepts a list of ``B`` id lists or an int tensor
        ``[B, X]`` padded with -1. Returns None when nothing is excluded."""
        ids = exclusion_ids(exclude_items, batch_size, self.num_ids, self.device)
        if ids is None:
            return None
        sentinel = self.num_items
        ranks = torch.where(ids >= 0, self.rank_of_item[ids.clamp(min=0)], torch.full_like(ids, sentinel))
        ranks, _ = ranks.sort(dim=1)
        dup = torch.zeros_like(ranks, dtype=torch.bool)
        dup[:, 1:] = ranks[:, 1:] == ranks[:, :-1]
        ranks = torch.where(dup, torch.full_like(ranks, sentinel), ranks).sort(dim=1).values
        return ranks.contiguous()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the trie to one safetensors file (with a checksum per array)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self._arrays.items()}
        meta = {
            "format": _FORMAT,
            "version": str(_VERSION),
            "vocab_size": str(self.vocab_size),
            "eos_token_id": "" if self.eos_token_id is None else str(self.eos_token_id),
            "depth": str(self.depth),
            "crc32": json.dumps({k: zlib.crc32(v.numpy().tobytes()) for k, v in tensors.items()}),
        }
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu") -> "ItemTrie":
        """Read a file written by :meth:`save`; raises ValueError on any corruption."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no ItemTrie file at {path!r}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"path: {path!r} is not a readable ItemTrie file ({exc})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path!r} is not an ItemTrie file (format={meta.get('format')!r})")
        if meta.get("version") != str(_VERSION):
            raise ValueError(f"path: {path!r} has ItemTrie format version {meta.get('version')}, expected {_VERSION}")
        missing = [k for k in _ARRAYS if k not in tensors]
        if missing:
            raise ValueError(f"path: {path!r} is corrupt: missing arrays {missing}")
        try:
            sums = json.loads(meta["crc32"])
            vocab_size = int(meta["vocab_size"])
            depth = int(meta["depth"])
            eos = int(meta["eos_token_id"]) if meta.get("eos_token_id") else None
        except (KeyError, ValueError) as exc:
            raise ValueError(f"path: {path!r} is corrupt: bad metadata ({exc})") from None
        for name in _ARRAYS:
            if zlib.crc32(tensors[name].numpy().tobytes()) != sums.get(name):
                raise ValueError(f"path: {path!r} is corrupt: checksum mismatch in array {name!r}")
        arrays = {k: tensors[k] for k in _ARRAYS}
        problem = _structure_problem(arrays, vocab_size, depth)
        if problem:
            raise ValueError(f"path: {path!r} is corrupt: {problem}")
        return cls(arrays, vocab_size=vocab_size, eos_token_id=eos, depth=depth).to(device)


def _structure_problem(a: dict[str, torch.Tensor], vocab_size: int, depth: int) -> str | None:
    """Returns a description of the first broken invariant of the CSR layout, or None."""
    expect = {
        "level_offsets": torch.int64, "indptr": torch.int32, "node_token": torch.int32,
        "item_lo": torch.int32, "item_hi": torch.int32, "max_branch": torch.int32,
        "sorted_items": torch.int64, "rank_of_item": torch.int64,
    }
    for name, dtype in expect.items():
        if a[name].dtype != dtype or a[name].dim() != 1:
            return f"array {name!r} has dtype {a[name].dtype} and shape {tuple(a[name].shape)}"
    n = a["node_token"].numel()
    if n < 2 or a["indptr"].numel() != n + 1 or a["item_lo"].numel() != n or a["item_hi"].numel() != n:
        return "array lengths disagree with the node count"
    if a["level_offsets"].numel() != depth + 2 or a["max_branch"].numel() != depth:
        return "per-level arrays disagree with the depth"
    indptr = a["indptr"].long()
    if indptr[0] != 0 or indptr[-1] != n - 1 or bool((indptr.diff() < 0).any()):
        return "indptr is not a valid CSR offset array"
    lv = a["level_offsets"]
    if lv[0] != 0 or lv[1] != 1 or lv[-1] != n or bool((lv.diff() < 0).any()):
        return "level_offsets are inconsistent"
    tok = a["node_token"]
    if tok[0] != -1 or bool(((tok[1:] < 0) | (tok[1:] >= vocab_size)).any()):
        return f"node tokens outside the vocabulary [0, {vocab_size})"
    u = a["sorted_items"].numel()
    lo, hi = a["item_lo"].long(), a["item_hi"].long()
    if bool(((lo < 0) | (hi > u) | (lo >= hi)).any()):
        return "item ranges are invalid"
    if bool(((a["sorted_items"] < 0) | (a["sorted_items"] >= a["rank_of_item"].numel())).any()):
        return "sorted_items hold ids outside the catalog"
    if bool(((a["rank_of_item"] < 0) | (a["rank_of_item"] >= u)).any()):
        return "rank_of_item holds ranks outside the catalog"
    # children sorted by token, and child ranges inside the parent's range
    parent = torch.repeat_interleave(torch.arange(n), indptr.diff())
    if bool(((lo[1:] < lo[parent]) | (hi[1:] > hi[parent])).any()):
        return "a child's item range leaves its parent's"
    same_parent = parent[1:] == parent[:-1]
    if bool((tok[2:][same_parent] <= tok[1:-1][same_parent]).any()):
        return "children are not sorted by token"
    counts = indptr.diff()
    for d in range(depth):
        widest = int(counts[lv[d] : lv[d + 1]].max()) if lv[d + 1] > lv[d] else 0
        if widest != int(a["max_branch"][d]):
            return "max_branch disagrees with the CSR"
    return None
