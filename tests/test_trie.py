"""ItemTrie: layout against a brute-force Python trie, lookup, persistence, and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decoding import ItemTrie


def brute_force_layout(rows):
    """Expected (per-level sorted prefixes, children, item ranges) from plain Python."""
    uniq = sorted({tuple(r) for r in rows})
    depth = max(len(r) for r in uniq)
    levels = [[()]] + [sorted({r[:d] for r in uniq if len(r) >= d}) for d in range(1, depth + 1)]
    nodes = [p for level in levels for p in level]
    index = {p: i for i, p in enumerate(nodes)}
    children = {p: sorted(q for q in nodes if len(q) == len(p) + 1 and q[: len(p)] == p) for p in nodes}
    ranges = {}
    for p in nodes:
        ranks = [i for i, r in enumerate(uniq) if r[: len(p)] == p]
        ranges[p] = (min(ranks), max(ranks) + 1)
    return uniq, nodes, index, children, ranges


def check_against_brute_force(trie, rows):
    uniq, nodes, index, children, ranges = brute_force_layout(rows)
    assert trie.num_nodes == len(nodes)
    assert trie.num_items == len(uniq)
    indptr = trie.indptr.tolist()
    tokens = trie.node_token.tolist()
    for p, v in index.items():
        kids = list(range(indptr[v] + 1, indptr[v + 1] + 1))
        assert kids == [index[q] for q in children[p]], p
        assert [tokens[k] for k in kids] == [q[-1] for q in children[p]]
        assert (trie.item_lo[v].item(), trie.item_hi[v].item()) == ranges[p]
    for d in range(trie.depth):
        level = [p for p in nodes if len(p) == d]
        assert trie.max_branch_at(d) == max(len(children[p]) for p in level)
    # sorted ranks map back to rows holding that identifier
    for rank, item in enumerate(trie.sorted_items.tolist()):
        assert tuple(rows[item]) == uniq[rank]


@pytest.mark.parametrize("seed", range(4))
def test_fixed_length_layout_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rows = np.unique(rng.integers(0, 4, size=(40, 3)), axis=0)
    rows = rng.permutation(rows)
    trie = ItemTrie.from_sequences(rows, vocab_size=4)
    check_against_brute_force(trie, [tuple(r) for r in rows.tolist()])
    assert torch.equal(trie.lookup(torch.as_tensor(rows)), torch.arange(len(rows)))


@pytest.mark.parametrize("seed", range(4))
def test_variable_length_layout_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    eos = 0
    rows = {tuple(rng.integers(1, 4, size=rng.integers(0, 4)).tolist()) + (eos,) for _ in range(40)}
    rows = [list(r) for r in rows]
    trie = ItemTrie.from_sequences(rows, vocab_size=4, eos_token_id=eos)
    check_against_brute_force(trie, [tuple(r) for r in rows])
    assert trie.depth == max(len(r) for r in rows)
    assert torch.equal(trie.lookup(rows), torch.arange(len(rows)))
    leaves = trie.is_leaf(torch.arange(trie.num_nodes))
    assert bool((trie.node_token[leaves] == eos).all())


def test_single_item_and_tensor_input():
    trie = ItemTrie.from_sequences(torch.tensor([[5, 6]]), vocab_size=8)
    assert (trie.num_items, trie.num_nodes, trie.depth) == (1, 3, 2)
    assert trie.lookup(torch.tensor([[5, 6], [5, 7], [6, 6]])).tolist() == [0, -1, -1]


def test_walk_resumes_from_given_nodes():
    trie = ItemTrie.from_sequences([[1, 2, 3], [1, 4, 3], [2, 2, 2]], vocab_size=5)
    full = trie.walk(torch.tensor([[1, 2, 3], [1, 4, 3], [2, 2, 2], [1, 3, 3]]))
    half = trie.walk(torch.tensor([[1], [1, ], [2], [1]]))
    rest = trie.walk(torch.tensor([[2, 3], [4, 3], [2, 2], [3, 3]]), start=half)
    assert torch.equal(full, rest)
    assert full[3].item() == -1 and bool(trie.is_leaf(full[:3]).all())
    assert trie.walk(torch.tensor([[1]]), start=torch.tensor([-1])).tolist() == [-1]


def test_has_prefix_agrees_with_walk():
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 6, size=(80, 4))
    trie = ItemTrie.from_sequences(rows, vocab_size=6, on_duplicate="first")
    for _ in range(200):
        prefix = rng.integers(0, 6, size=int(rng.integers(0, 4))).tolist()
        walked = trie.walk(torch.tensor([prefix], dtype=torch.long).reshape(1, -1))[0] >= 0
        assert trie.has_prefix(prefix) == bool(walked)
    assert trie.has_prefix(rows[0][:3].tolist())


def test_lookup_rejects_prefixes_and_out_of_vocab():
    trie = ItemTrie.from_sequences([[1, 2, 9], [1, 9]], vocab_size=10, eos_token_id=9)
    assert trie.lookup([[1, 9], [1, 2], [1, 2, 9], [1, 12, 9]]).tolist() == [1, -1, 0, -1]


def test_duplicates_error_or_alias():
    rows = [[1, 2], [3, 4], [1, 2]]
    with pytest.raises(ValueError, match="rows 0 and 2 are the same identifier"):
        ItemTrie.from_sequences(rows, vocab_size=5)
    trie = ItemTrie.from_sequences(rows, vocab_size=5, on_duplicate="first")
    assert trie.num_items == 2 and trie.num_ids == 3
    assert trie.lookup([[1, 2]]).tolist() == [0]
    # excluding an alias excludes the identifier it shares
    assert torch.equal(trie.excluded_ranks([[2]], 1), trie.excluded_ranks([[0]], 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_identifiers_invert_lookup(seed):
    """Fixed-length, EOS-terminated of mixed lengths (one identifier a prefix of another's
    tokens), and aliased duplicates: every item's identifier is the row it was built from."""
    rng = np.random.default_rng(seed)
    fixed = rng.integers(0, 6, size=(300, 3))
    fixed = np.unique(fixed, axis=0)
    rng.shuffle(fixed)
    trie = ItemTrie.from_sequences(fixed, vocab_size=6)
    order = rng.permutation(len(fixed)).tolist()
    assert trie.identifiers(order) == fixed[order].tolist()
    rows = list({tuple(rng.integers(0, 8, size=rng.integers(0, 4)).tolist()) + (9,) for _ in range(80)})
    varied = ItemTrie.from_sequences([list(r) for r in rows], vocab_size=10, eos_token_id=9)
    assert varied.identifiers(range(len(rows))) == [list(r) for r in rows]
    assert varied.lookup(varied.identifiers(range(len(rows)))).tolist() == list(range(len(rows)))
    aliased = ItemTrie.from_sequences([[1, 2], [3, 4], [1, 2]], vocab_size=5, on_duplicate="first")
    assert aliased.identifiers([2, 1, 0]) == [[1, 2], [3, 4], [1, 2]] and trie.identifiers([]) == []
    with pytest.raises(ValueError, match="items: item ids must be in"):
        aliased.identifiers([3])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seqs=np.zeros((0, 4), dtype=np.int64), vocab_size=4), ValueError, "catalog is empty"),
        (dict(seqs=[], vocab_size=4), ValueError, "catalog is empty"),
        (dict(seqs=[[1, 2], [5, 1]], vocab_size=5), ValueError, "row 1 has token id 5 outside the vocabulary"),
        (dict(seqs=[[1, 2], [-1, 1]], vocab_size=5), ValueError, "row 1 has token id -1"),
        (dict(seqs=[[1, 2], [1]], vocab_size=5), ValueError, "variable-length identifiers need an eos_token_id"),
        (dict(seqs=[[1, 4], [1, 2]], vocab_size=5, eos_token_id=4), ValueError, "row 1 does not end with eos"),
        (dict(seqs=[[4, 1, 4]], vocab_size=5, eos_token_id=4), ValueError, "row 0 contains eos_token_id=4 before"),
        (dict(seqs=[[1]], vocab_size=5, eos_token_id=7), ValueError, "eos_token_id: 7 is outside"),
        (dict(seqs=[[1]], vocab_size=0), ValueError, "vocab_size"),
        (dict(seqs=[[1]], vocab_size=5, on_duplicate="last"), ValueError, "on_duplicate"),
        (dict(seqs=np.zeros((2, 2), dtype=np.float32), vocab_size=5), TypeError, "integer array"),
        (dict(seqs=np.zeros(3, dtype=np.int64), vocab_size=5), ValueError, "2-D array"),
        (dict(seqs="abc", vocab_size=5), TypeError, "seqs"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    seqs = kwargs.pop("seqs")
    with pytest.raises(error, match=match):
        ItemTrie.from_sequences(seqs, **kwargs)


def test_save_load_roundtrip(tmp_path):
    rows = [[3, 4, 1], [3, 1], [2, 1]]
    trie = ItemTrie.from_sequences(rows, vocab_size=6, eos_token_id=1)
    path = tmp_path / "catalog.trie"
    trie.save(path)
    loaded = ItemTrie.load(path)
    assert (loaded.vocab_size, loaded.eos_token_id, loaded.depth) == (6, 1, 3)
    for name in ("indptr", "node_token", "item_lo", "item_hi", "sorted_items", "rank_of_item", "level_offsets"):
        assert torch.equal(getattr(trie, name), getattr(loaded, name))
    assert loaded.lookup(rows).tolist() == [0, 1, 2]
    assert loaded.nbytes == trie.nbytes


def test_corrupt_files_raise(tmp_path):
    trie = ItemTrie.from_sequences(np.arange(40).reshape(10, 4) % 7, vocab_size=7, on_duplicate="first")
    good = tmp_path / "good.trie"
    trie.save(good)
    data = bytearray(good.read_bytes())

    flipped = tmp_path / "flipped.trie"
    damaged = bytearray(data)
    damaged[-5] ^= 0xFF  # inside the last array's bytes
    flipped.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt"):
        ItemTrie.load(flipped)

    truncated = tmp_path / "truncated.trie"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable ItemTrie file"):
        ItemTrie.load(truncated)

    garbage = tmp_path / "garbage.trie"
    garbage.write_bytes(b"not a trie at all")
    with pytest.raises(ValueError, match="path"):
        ItemTrie.load(garbage)

    with pytest.raises(FileNotFoundError, match="no ItemTrie file"):
        ItemTrie.load(tmp_path / "missing.trie")


def test_structurally_broken_file_with_valid_checksums_raises(tmp_path):
    """A file written by other code with consistent checksums but a broken CSR is refused."""
    import json
    import zlib

    from safetensors.torch import save_file

    trie = ItemTrie.from_sequences([[1, 2], [1, 3], [2, 2]], vocab_size=4)
    arrays = {k: v.clone() for k, v in trie._arrays.items()}
    arrays["node_token"][3], arrays["node_token"][4] = 3, 2  # children of node 1 out of order
    meta = {"format": "decoding.ItemTrie", "version": "1", "vocab_size": "4", "eos_token_id": "", "depth": "2",
            "crc32": json.dumps({k: zlib.crc32(v.numpy().tobytes()) for k, v in arrays.items()})}
    path = tmp_path / "broken.trie"
    save_file(arrays, str(path), metadata=meta)
    with pytest.raises(ValueError, match="children are not sorted"):
        ItemTrie.load(path)


def test_excluded_ranks_sorted_unique_and_validated():
    trie = ItemTrie.from_sequences([[1, 1], [0, 1], [1, 0], [0, 0]], vocab_size=2)
    ranks = trie.excluded_ranks([[0, 0, 3], []], 2)
    # sorted item order: [0,0]=3, [0,1]=1, [1,0]=2, [1,1]=0 -> ranks of items 0 and 3 are 3 and 0
    assert ranks.tolist() == [[0, 3, 4], [4, 4, 4]]
    assert trie.excluded_ranks(None, 2) is None
    assert trie.excluded_ranks(torch.full((2, 3), -1), 2) is None
    with pytest.raises(ValueError, match="exclude_items: item ids must be in"):
        trie.excluded_ranks([[4], []], 2)
    with pytest.raises(ValueError, match="exclude_items: expected 2 lists"):
        trie.excluded_ranks([[0]], 2)


def test_large_catalog_builds():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, size=(200_000, 4))
    trie = ItemTrie.from_sequences(rows, vocab_size=256, on_duplicate="first")
    sample = rng.integers(0, len(rows), 1000)
    found = trie.lookup(torch.as_tensor(rows[sample]))
    # every sampled row resolves to a row holding the same identifier
    assert np.array_equal(rows[found.numpy()], rows[sample])


def test_compact_trie_has_the_same_nodes_over_the_catalogs_tokens_only():
    from decoding import testing as bm

    seqs = bm.random_semantic_ids(3000, seed=5) + 500  # tokens from 508 on, in a 2,000-token vocabulary
    trie = ItemTrie.from_sequences(seqs, vocab_size=2000)
    compact, tokens = trie.compact()
    assert compact.vocab_size == tokens.numel() == len(np.unique(seqs)) < trie.vocab_size
    assert torch.equal(tokens, torch.as_tensor(np.unique(seqs)))
    ids = torch.searchsorted(tokens, torch.as_tensor(seqs))
    assert torch.equal(compact.lookup(ids), trie.lookup(torch.as_tensor(seqs)))
    assert torch.equal(compact.walk(ids[:, :2]), trie.walk(torch.as_tensor(seqs[:, :2])))
    assert trie.compact()[0] is compact  # computed once
    titles = ItemTrie.from_sequences([[5, 9, 2], [5, 2], [7, 2]], vocab_size=10, eos_token_id=2)
    c, t = titles.compact()
    assert t.tolist() == [2, 5, 7, 9] and c.eos_token_id == 0
