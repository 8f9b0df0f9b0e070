"""The real-workload pipeline: the MovieLens-100K reader, semantic IDs, the metrics (against
hand-computed cases), and the whole train-then-evaluate bench at toy size."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from decoding.workloads.datasets import INSTALL_HINT, movielens_100k
from decoding.workloads.metrics import bootstrap_interval, ndcg_at_k, paired_difference, recall_at_k, recall_per_user
from decoding.workloads.semantic_ids import kmeans, semantic_ids

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


def needs_data(test):
    """MovieLens-100K ships in RecBole's wheel (never imported): skipped without it, a failure
    where the stack must have it (``DECODING_REQUIRE`` names recbole)."""
    skip = pytest.mark.skipif(not HAS_RECBOLE, reason=f"MovieLens-100K comes with RecBole: {INSTALL_HINT}")
    return pytest.mark.needs("recbole")(skip(test))


def test_recall_and_ndcg_against_hand_computed_cases():
    ranked = np.array([[5, 3, 9, 1], [2, 8, 7, 6], [4, -1, -1, -1]])
    targets = np.array([9, 6, 0])
    # user 0: target at rank 2; user 1: rank 3; user 2: absent
    assert recall_at_k(ranked, targets, 2) == 0.0
    assert recall_at_k(ranked, targets, 3) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, targets, 4) == pytest.approx(2 / 3)
    assert ndcg_at_k(ranked, targets, 3) == pytest.approx((1 / np.log2(4)) / 3)
    assert ndcg_at_k(ranked, targets, 4) == pytest.approx((1 / np.log2(4) + 1 / np.log2(5)) / 3)
    assert ndcg_at_k(np.array([[7]]), np.array([7]), 1) == 1.0
    with pytest.raises(ValueError, match="ranked, targets"):
        recall_at_k(ranked, targets[:2], 3)
    # -1 pads the ranked lists: a target of -1 would match the padding
    with pytest.raises(ValueError, match="targets: item ids must be non-negative"):
        recall_at_k(ranked, np.array([9, 6, -1]), 4)
    for k in (0, 5, 2.0):
        with pytest.raises(ValueError, match="k: expected an int in 1..4"):
            ndcg_at_k(ranked, targets, k)


def test_bootstrap_intervals_cover_the_mean_and_pair_the_users():
    rng = np.random.default_rng(0)
    hits = (rng.random(943) < 0.15).astype(float)
    lo, hi = bootstrap_interval(hits)
    assert lo < hits.mean() < hi
    # about +/- 1.96 * sqrt(p (1 - p) / n) for a proportion
    half = 1.96 * np.sqrt(0.15 * 0.85 / 943)
    assert abs((hi - lo) / 2 - half) < 0.3 * half
    assert bootstrap_interval(hits) == (lo, hi)  # seeded
    same = paired_difference(hits, hits)
    assert same == {"difference": 0.0, "interval": [0.0, 0.0], "measurable": False}
    # one user in 20 gains a hit: paired, that is measurable, though the two intervals overlap
    better = np.maximum(hits, (np.arange(943) % 20 == 0).astype(float))
    diff = paired_difference(better, hits)
    assert diff["measurable"] and diff["interval"][0] > 0
    assert bootstrap_interval(better)[0] < hi
    with pytest.raises(ValueError, match="per_user_a, per_user_b"):
        paired_difference(hits, hits[:10])
    assert recall_per_user(np.array([[1, 2], [3, 4]]), np.array([2, 5]), 2).tolist() == [1.0, 0.0]


def write_atomic(folder, inter_rows, item_rows):
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                          + "".join("\t".join(map(str, r)) + "\n" for r in inter_rows))
    (folder / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                         + "".join("\t".join(map(str, r)) + "\n" for r in item_rows))


def test_reader_orders_by_time_and_splits_leave_one_out(tmp_path):
    inter = [("u1", "a", 5, 30), ("u1", "b", 3, 10), ("u2", "c", 4, 5), ("u1", "c", 1, 20), ("u2", "a", 2, 1),
             ("u2", "b", 2, 9), ("u1", "d", 2, 40), ("u3", "a", 1, 1)]  # u3: too short, dropped
    write_atomic(tmp_path, inter, [("a", "Alpha", 1999, "Comedy Drama"), ("b", "Beta", "", "Action"),
                                   ("c", "Gamma", 2001, "Drama")])
    data = movielens_100k(tmp_path)
    assert data.num_users == 2 and data.item_ids == ["a", "b", "c", "d"]
    # u1 by time: b(10) c(20) a(30) d(40); u2: a(1) b(9) c(5) -> a c b
    assert [h.tolist() for h in data.histories] == [[1, 2, 0, 3], [0, 2, 1]]
    assert [s.tolist() for s in data.train_sequences] == [[1, 2], [0]]
    inputs, targets = data.split("valid")
    assert targets.tolist() == [0, 2] and [i.tolist() for i in inputs] == [[1, 2], [0]]
    inputs, targets = data.split("test")
    assert targets.tolist() == [3, 1] and [i.tolist() for i in inputs] == [[1, 2, 0], [0, 2]]
    assert data.titles[:2] == ["Alpha", "Beta"] and data.years.tolist() == [1999, -1, 2001, -1]
    assert data.genres[0] == ["Comedy", "Drama"] and data.genres[3] == []
    with pytest.raises(ValueError, match="which"):
        data.split("train")


def test_a_missing_data_set_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="recbole==1.2.1"):
        movielens_100k(tmp_path)


@needs_data
def test_movielens_100k_from_the_recbole_wheel():
    data = movielens_100k()
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)
    assert min(len(h) for h in data.histories) == 20
    assert sum(len(t) for t in data.train_sequences) == 100_000 - 2 * 943
    assert "Toy Story" in data.titles and all(g for g in data.genres)


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    x = np.concatenate([c + rng.normal(0, 0.3, (30, 2)) for c in centers]).astype(np.float32)
    assign, cents = kmeans(x, 3, seed=1)
    assert len({tuple(assign[i * 30:(i + 1) * 30]) for i in range(3)}) == 3  # one cluster per blob
    assert all(len(set(assign[i * 30:(i + 1) * 30])) == 1 for i in range(3))
    again, _ = kmeans(x, 3, seed=1)
    assert np.array_equal(assign, again)
    with pytest.raises(ValueError, match="k:"):
        kmeans(x, 0)


def test_semantic_ids_are_unique_deterministic_and_tokenised_per_level():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    sids = semantic_ids(emb, levels=2, codes=4, seed=5)
    assert sids.codes.shape == (300, 3) and sids.level_sizes[:2] == (4, 4)
    assert len({tuple(r) for r in sids.codes}) == 300  # the last code disambiguates
    assert sids.level_sizes[2] == sids.codes[:, 2].max() + 1
    tokens = sids.tokens
    offsets = sids.offsets
    for level in range(3):  # disjoint token ranges per level, after the special tokens
        lo, hi = offsets[level], offsets[level] + sids.level_sizes[level]
        assert tokens[:, level].min() >= lo and tokens[:, level].max() < hi
    assert sids.vocab_size == tokens.max() + 1 and tokens.min() >= 8
    assert np.array_equal(semantic_ids(emb, levels=2, codes=4, seed=5).codes, sids.codes)
    assert not np.array_equal(semantic_ids(emb, levels=2, codes=4, seed=6).codes, sids.codes)


@needs_data
def test_the_whole_workload_at_toy_size_trains_caches_and_evaluates(tmp_path, capsys):
    """A few users, one epoch: every decoder runs on the trained pair; beam_search equals
    transformers' constrained beam search and strict speculation equals beam_search for every
    user; the second run loads the cached pair instead of training."""
    from decoding.bench.__main__ import main

    argv = ["workload", "ml-100k", "--max-users", "24", "--train-epochs", "1", "--batch", "12", "--beams", "20",
            "--seeds", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())["results"][0]
    by = {m["method"]: m for m in first["methods"]}
    users = first["config"]["users"]
    assert users == 24 and not first["config"]["cached"]
    assert by["transformers beam search + Python trie"]["same_items_as_beam_search"] == users
    strict_rows = [m for m in first["methods"] if m["method"].startswith("speculative strict")]
    assert len(strict_rows) == 7
    for strict in strict_rows:
        assert strict["same_up_to_near_ties"] == users and strict["agreement_with_exact_topk"] == 1.0
        assert 0.0 <= strict["acceptance_rate"] <= 1.0 and strict["target_forwards_per_batch"] >= 1
    continuous = by["speculative strict, gamma=3, continuous batching (12 in flight)"]
    assert continuous["prefills_per_batch"] >= 1 and continuous["target_forwards_per_request"] >= 2
    pruned = [m for m in first["methods"] if m["method"].startswith("KV 25% of the long prompt")]
    assert len(pruned) == 3 and all(m["prompt_positions_kept"] * 4 <= m["prompt_positions"] for m in pruned)
    assert all(0.0 < m["mean_fraction_of_own_prompt_kept"] <= 1.0 for m in pruned)
    assert not by["transformers beam search + Python trie"].get("cached_from_an_earlier_run")
    alignment = first["alignment"]
    assert alignment["loss_after"] < alignment["loss_before"]
    assert 0.0 <= alignment["validation_acceptance_after"] <= 1.0
    assert by["transformers beam search, unconstrained"]["invalid_item_rate"] > 0.5
    for m in first["methods"]:
        assert 0.0 <= m["recall@10"] <= m["recall@20"] <= 1.0
        for metric in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            lo, hi = m[f"{metric}_ci95"]
            assert lo <= m[metric] <= hi
        if m["method"] != "decoding.beam_search":  # every option beside plain beam search, paired
            diff = m["vs_beam_search"]["recall@20"]
            assert diff["interval"][0] <= diff["difference"] <= diff["interval"][1]
    d3 = next(m for m in first["methods"] if m["method"].startswith("D3"))
    assert set(d3["validation_recall20_by_weight"]) == {"0.0", "0.1", "0.3", "0.5"}
    seeds = first["seeds"]
    assert seeds["seeds"] == [0, 1]
    row = seeds["rows"]["decoding.beam_search"]["recall@20"]
    assert len(row["values"]) == 2 and row["values"][0] == by["decoding.beam_search"]["recall@20"]
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())["results"][0]
    assert second["config"]["cached"]
    again = {m["method"]: m for m in second["methods"]}
    assert again["transformers beam search + Python trie"]["cached_from_an_earlier_run"]
    assert again["transformers beam search + Python trie"]["same_items_as_beam_search"] == users
    assert [m["recall@20"] for m in second["methods"][:3]] == [m["recall@20"] for m in first["methods"][:3]]
    assert "MovieLens-100K" in capsys.readouterr().out


@needs_data
def test_the_cache_retrains_after_a_code_change_and_rebuilds_a_truncated_entry(tmp_path, monkeypatch):
    """The cache key covers the code that trains and defines the models (here a scratch copy of
    it, whose model constant changes) and an entry whose file was truncated is rebuilt, never
    used."""
    from pathlib import Path

    from decoding.workloads import movielens as ml

    scratch = tmp_path / "movielens_copy.py"
    scratch.write_text(Path(ml.__file__).read_text())
    monkeypatch.setattr(ml, "PAIR_CODE", (str(scratch), ml.PAIR_CODE[1]))
    data, cache, logs = movielens_100k(), str(tmp_path / "cache"), []
    recipe = ml.Recipe(max_users=24, epochs=1, draft_epochs=1)

    def run():
        return ml.load_or_train(data, recipe, cache_dir=cache, log=logs.append, with_draft=False)

    first = run()
    assert not first.loaded_from_cache and run().loaded_from_cache
    text = scratch.read_text()
    assert "max_position_embeddings=4096" in text
    scratch.write_text(text.replace("max_position_embeddings=4096", "max_position_embeddings=4095"))
    changed = run()
    assert not changed.loaded_from_cache and changed.folder != first.folder
    weights = next(Path(changed.folder).rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rebuilt = run()
    assert not rebuilt.loaded_from_cache and any("corrupt or partial" in line for line in logs)
    assert run().loaded_from_cache
    for a, b in zip(rebuilt.target.parameters(), changed.target.parameters()):  # seeded: the same weights
        assert torch.equal(a, b)


def test_cached_baselines_are_keyed_by_the_weights_and_a_truncated_file_is_rebuilt(tmp_path):
    from decoding.bench.workload import _transformers_baselines

    calls = []

    def run_batch(sl, constrained=True):
        calls.append(constrained)
        n = sl.stop - sl.start
        return torch.zeros((n, 2), dtype=torch.long), torch.zeros((n, 2))

    ids = torch.arange(12).view(4, 3)

    def baselines(weights, fresh=False):
        return _transformers_baselines(str(tmp_path), ids, 2, 2, run_batch, 4, fresh=fresh, weights=weights)

    assert not baselines("aaaa")["cached"] and len(calls) == 4
    assert baselines("aaaa")["cached"] and len(calls) == 4
    assert not baselines("bbbb")["cached"] and len(calls) == 8  # other weights: computed again
    path = next(tmp_path.glob("*waaaa*/*.npz"))
    path.write_bytes(path.read_bytes()[:40])
    assert not baselines("aaaa")["cached"] and len(calls) == 12
    assert baselines("aaaa")["cached"]
    assert not list(tmp_path.glob("*.partial-*"))


def test_without_the_data_the_workload_says_what_to_install_and_exits_2(monkeypatch, capsys):
    from decoding.bench.__main__ import main
    from decoding.workloads import datasets

    monkeypatch.setattr(datasets, "_recbole_folder", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["workload", "ml-100k", "--max-users", "4", "--cache-dir", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("decoding-bench workload:")]
    assert len(said) == 1 and INSTALL_HINT in said[0]
