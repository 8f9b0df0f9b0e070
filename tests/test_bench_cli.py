"""decoding-bench runs end to end on a small configuration, agrees with its baseline, and
writes its table, results.json and chart. The benchmark suites run once (timing disabled)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding.bench.__main__ import SUITES, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_cli_small_run_writes_results(tmp_path, capsys):
    rc = main(["all", "--items", "3000", "--batch", "3", "--beams", "5", "--prompt-len", "16",
               "--hidden", "32", "--layers", "1", "--heads", "2", "--repeats", "1", "--step-repeats", "2",
               "--build-sizes", "20000", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "decoding.beam_search" in out and "transformers + Python trie" in out
    data = json.loads((tmp_path / "results.json").read_text())
    e2e = next(r for r in data["results"] if r["suite"] == "e2e")
    assert e2e["agreement"]["same_item_sets"] == 1.0
    assert e2e["agreement"]["max_score_diff"] < 1e-4
    assert all(m["invalid_item_rate"] == 0.0 for m in e2e["methods"])
    assert {r["suite"] for r in data["results"]} == {"e2e", "step", "build"}
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_without_the_bench_extra_the_run_completes_without_a_chart(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like to import
    rc = main(["build", "--build-sizes", "2000", "--out", str(tmp_path)])
    assert rc == 0 and (tmp_path / "results.json").exists() and not (tmp_path / "results.png").exists()
    assert "pip install 'genrec-decoding[bench]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--beams", "0"], "--beams must be positive"),
    (["--items", "10", "--beams", "20"], "--beams must not exceed --items"),
    (["nope"], "invalid choice"),
    (["speculative", "--drafts", "5"], "--drafts must be at least --beams"),
    (["speculative", "--draft-layers", "9"], "--draft-layers in 1..--layers"),
    (["setid", "--catalog-sizes", "10,x"], "--catalog-sizes must be comma-separated integers"),
    (["kv", "--prompt-len", "100"], "kv needs --prompt-len above 288"),
    (["kv", "--drafts", "5"], "unrecognized arguments: --drafts"),  # a flag of another suite
    (["e2e", "--clients", "4"], "unrecognized arguments: --clients"),
    (["vllm-http", "--text-vocab", "-1"], "--text-vocab must be non-negative"),
    (["setid", "--catalog-sizes", "10"], "--catalog-sizes must each be at least --beams"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_no_arguments_is_the_default_e2e_run():
    args = parse_args([])
    assert args.suite == "e2e" and args.items == 100_000 and args.beams == 20 and args.batch == 16
    assert parse_args(["--beams", "5,10"]).beam_widths == [5, 10]  # flags alone: e2e's


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "decoding.bench", "--help"], capture_output=True, text=True, check=True)
    for suite in SUITES:
        assert f"    {suite}" in res.stdout, suite
    assert "--items" not in res.stdout  # the suites' flags are in their own help


@pytest.mark.parametrize("suite, has, lacks", [
    ("e2e", ["--items", "--dtype", "--backend"], ["--clients", "--drafts", "--catalog-sizes", "--cache-dir"]),
    ("vllm-http", ["--clients", "--text-vocab", "--items"], ["--drafts", "--dtype", "--cache-dir", "--step-repeats"]),
    ("workload", ["--cache-dir", "--max-users", "--fresh-baselines"], ["--items", "--clients", "--hidden"]),
    ("speculative", ["--drafts", "--draft-steps", "--align-steps"], ["--clients", "--catalog-sizes"]),
    ("build", ["--build-sizes"], ["--beams", "--hidden", "--clients"]),
])
def test_each_subcommand_help_shows_only_its_flags(suite, has, lacks, capsys):
    with pytest.raises(SystemExit):
        parse_args([suite, "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in has), text
    assert not [flag for flag in lacks if flag in text], text


def test_benchmark_suites_smoke_run():
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(ROOT / "benchmarks")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cli_speculative_small_run(tmp_path, capsys):
    """decoding-bench speculative: target-only vs strict (exact items) and relaxed
    (valid items, sampled) speculation, with stats."""
    rc = main(["speculative", "--items", "3000", "--batch", "3", "--beams", "4", "--prompt-len", "12",
               "--hidden", "32", "--layers", "2", "--heads", "2", "--repeats", "1", "--align-steps", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert res["suite"] == "speculative" and res["config"]["drafts"] == 8
    by_name = {m["method"]: m for m in res["methods"]}
    assert len(by_name) == 7
    for name, m in by_name.items():
        assert m["invalid_item_rate"] == 0.0, name
        if "relaxed" not in name:
            assert m["same_items_as_target"] == 1.0 and m["recall_of_target_top_k"] == 1.0, name
        assert 0.0 <= m["recall_of_target_top_k"] <= 1.0
    spec = by_name["speculative strict, draft aligned by strict loss"]
    assert spec["rounds"] >= 1 and 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["target_forwards"] >= 2
    assert res["alignment_loss"]["after"] <= res["alignment_loss"]["before"] + 1e-6
    relaxed = by_name["speculative relaxed, draft aligned by relaxed loss"]
    assert relaxed["rounds"] >= 1 and relaxed["target_forwards"] >= 2
    assert res["relaxed_alignment_loss"]["after"] <= res["relaxed_alignment_loss"]["before"] + 1e-6
    assert "Speculative beam search (strict and relaxed)" in capsys.readouterr().out


def test_cli_setid_small_run(tmp_path, capsys):
    """decoding-bench setid: catalog_topk vs materialise + topk (same top-K scores,
    peak memory measured) and setid_generate vs trie beam search, on a small catalog."""
    rc = main(["setid", "--catalog-sizes", "3000", "--batch", "2", "--beams", "5", "--prompt-len", "8",
               "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert res["suite"] == "setid" and res["config"]["catalog_sizes"] == [3000]
    assert len(res["scoring"]) == 4 and len(res["decoders"]) == 2
    for row in res["scoring"]:
        assert row["same_top_k_scores"] and row["peak_memory_mb"] >= 0 and row["items_per_s"] > 0
    assert "Whole-catalog scoring" in capsys.readouterr().out


def test_cli_kv_small_run(tmp_path, capsys):
    """decoding-bench kv: transformers vs prompt KV per beam vs shared vs each pruning policy."""
    rc = main(["kv", "--prompt-len", "320", "--batch", "2", "--beams", "4", "--items", "2000", "--hidden", "32",
               "--layers", "3", "--heads", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert res["suite"] == "kv" and len(res["methods"]) == 6
    by_name = {m["method"]: m for m in res["methods"]}
    shared = by_name["decoding.beam_search, shared prompt KV"]
    assert shared["top_k_agreement"] == 1.0
    assert by_name["decoding.beam_search, prompt KV per beam"]["top_k_agreement"] == 1.0
    pruned = [m for m in res["methods"] if m["method"].startswith("shared + ")]
    assert all(m["prompt_kv_mb"] < shared["prompt_kv_mb"] for m in pruned)
    assert all(m["peak_memory_mb"] >= 0 for m in res["methods"])
    assert "KV cache at long prompts" in capsys.readouterr().out


def test_the_http_bench_tells_a_near_tie_from_a_wrong_answer():
    from decoding.testing.exactness import classify

    ref_items, ref_scores = [1, 2, 3], [-1.0, -2.0, -3.0]
    assert classify({1: -1.0, 2: -2.0, 3: -3.0}, ref_items, ref_scores) == "exact"
    # the K-th item swapped for one scoring the same up to float rounding
    assert classify({1: -1.0, 2: -2.0, 4: -3.00001}, ref_items, ref_scores) == "near-tie"
    # an item (4) from a subtree the reference dropped at step 1, whose prefix sat on the cut, in
    # place of one (2) below the beam the reference kept at the cut: one engine kept each
    prefixes = {4: [((40,), -0.600001)], 2: [((20,), -0.6)]}.__getitem__
    kept = [{(10,), (20,)}]
    assert classify({1: -1.0, 4: -1.5, 3: -3.0}, ref_items, ref_scores, cuts=[-0.6], prefixes=prefixes,
                    kept=kept) == "near-tie"
    # ... far from any cut: wrong
    assert classify({1: -1.0, 4: -1.5, 3: -3.0}, ref_items, ref_scores, cuts=[-0.2], prefixes=prefixes,
                    kept=kept) == "wrong"
    # ... or a sibling below the very beam the reference kept at the cut: both engines kept that
    # beam, so rounding at the cut explains nothing
    siblings = {4: [((20,), -0.6)], 2: [((20,), -0.6)]}.__getitem__
    assert classify({1: -1.0, 4: -1.5, 3: -3.0}, ref_items, ref_scores, cuts=[-0.6], prefixes=siblings,
                    kept=kept) == "wrong"


def test_the_served_contract_judges_order_and_scores_and_only_its_near_ties():
    """classify_ordered (what the served-exactness tests apply): order and scores count; a
    near-tie only as docs/exactness.md defines it."""
    from decoding.testing.exactness import classify_ordered

    items, scores = [1, 2, 3, -1], [-1.0, -2.0, -3.0, float("-inf")]  # -1: the catalog ran out
    assert classify_ordered([1, 2, 3], [-1.0, -2.00005, -3.0], items, scores) == "exact"
    assert classify_ordered([1, 3, 2], [-1.0, -3.0, -2.0], items, scores) == "wrong"  # order, not a tie
    assert classify_ordered([1, 2, 3], [-1.0, -2.001, -3.0], items, scores) == "wrong"  # a score off by 1e-3
    assert classify_ordered([1, 2], [-1.0, -2.0], items, scores) == "wrong"  # an item short
    assert classify_ordered([1, 1, 2], [-1.0, -1.0, -2.0], items, scores) == "wrong"  # an item twice
    # two items tied within 1e-5 (relative) in the other order
    tied_items, tied_scores = [1, 2, 3], [-1.0, -2.0, -2.00001]
    assert classify_ordered([1, 3, 2], [-1.0, -2.00001, -2.0], tied_items, tied_scores) == "near-tie"
    # the K-th swapped for an item scoring the same up to float rounding; within 1e-4 is not enough
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.00001], items, scores) == "near-tie"
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.00009], items, scores) == "wrong"
    # ... and the stand-in's reported score must be its true score
    true_scores = {4: -3.00001}.__getitem__
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.00001], items, scores, item_score=true_scores) == "near-tie"
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.00001], items, scores,
                            item_score={4: -7.0}.__getitem__) == "wrong"
    # an item from a subtree the reference dropped at the step-1 cut, for one below the kept beam
    prefixes = {4: [((40,), -0.600001)], 3: [((30,), -0.6)]}.__getitem__
    kept = [{(10,), (20,), (30,)}]
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.5], items, scores, cuts=[-0.6], prefixes=prefixes,
                            kept=kept) == "near-tie"
    assert classify_ordered([1, 2, 4], [-1.0, -2.0, -3.5], items, scores, cuts=[-0.2], prefixes=prefixes,
                            kept=kept) == "wrong"


def test_alternated_times_the_methods_in_turn_and_pairs_each_round():
    """bench._common.alternated: a warm-up round, then each timed round runs every method once in
    the plan's order; a method's paired ratio is the median over rounds of the first method's time
    over its own in the same round."""
    import time

    from decoding.bench._common import alternated

    calls = []
    delays = {"base": [0.0, 0.02, 0.04, 0.02], "fast": [0.0, 0.01, 0.01, 0.02]}

    def method(label):
        def fn():
            calls.append(label)
            time.sleep(delays[label][sum(c == label for c in calls) - 1])
            return label
        return fn

    timings = alternated([("base", method("base")), ("fast", method("fast"))], torch.device("cpu"), repeats=3)
    assert calls == ["base", "fast"] * 4
    median, runs, last = timings["fast"]
    assert len(runs) == 3 and last == "fast" and median == sorted(runs)[1]
    base_runs = timings["base"][1]
    assert timings["paired"]["fast"] == sorted(b / f for b, f in zip(base_runs, runs))[1]
    assert timings["paired"]["base"] == 1.0
    assert timings["paired"]["fast"] > 1.0  # 20 ms against 10 ms in the timed rounds
