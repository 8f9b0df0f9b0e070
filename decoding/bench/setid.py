"""``decoding-bench setid``: whole-catalog scoring for set identifiers (SETRec, RPG).

For each catalog size in ``--catalog-sizes``:

* SETRec scoring (3 embedding slots of 64, float16 tables, slot weights 0.9/0.1/0.1) and RPG
  scoring (16 digits x 256 codes, uint8 codes): :func:`decoding.ops.catalog_topk` against the
  materialise-then-``torch.topk`` baseline (the ``[B, N]`` score matrix, as both released codes
  do), on the same inputs: latency, items scored per second, and peak memory measured in a
  child process (:mod:`decoding.testing.memory`), plus whether the top-K scores agree;
* decoders end to end on the same catalog size and the same small Llama-style model:
  ``setid_generate`` (one forward, then the catalog) against trie-constrained ``beam_search``
  (prefill and one step per identifier token).
"""

from __future__ import annotations

import torch

from decoding import ItemTrie, beam_search
from decoding import testing as bm
from decoding.bench._common import log, print_methods, timed
from decoding.ops import catalog_topk
from decoding.setid import ORDINARY, SetIdCatalog, setid_generate
from decoding.testing.memory import peak_memory_bytes, run_job

SLOTS, DIM = 3, 64
WEIGHTS = (0.9, 0.1, 0.1)
DIGITS, CODES = 16, 256


def setrec_inputs(N: int, B: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    table = torch.stack([torch.randn(N, DIM, generator=g).half() for _ in range(SLOTS)])
    return {"hidden": torch.randn(B, SLOTS, DIM, generator=g), "item_embeddings": table,
            "slot_weights": torch.tensor(WEIGHTS)}


def rpg_inputs(N: int, B: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"code_logprobs": torch.log_softmax(torch.randn(B, DIGITS, CODES, generator=g) * 2, -1),
            "item_codes": torch.randint(0, CODES, (N, DIGITS), generator=g, dtype=torch.uint8)}


def materialised_topk(k: int, inputs: dict):
    """The baseline: the full ``[B, N]`` float32 scores (slot by slot), then ``torch.topk``."""
    if "hidden" in inputs:
        h, table, w = inputs["hidden"], inputs["item_embeddings"], inputs["slot_weights"]
        scores = sum((h[:, s] * w[s]) @ table[s].float().T for s in range(table.shape[0]))
    else:
        lp, codes = inputs["code_logprobs"], inputs["item_codes"]
        scores = sum(lp[:, s, codes[:, s].long()] for s in range(codes.shape[1])) / codes.shape[1]
    return torch.topk(scores, k, dim=1)


def ours_topk(k: int, inputs: dict, backend: str = "auto"):
    return catalog_topk(k, backend=backend, **inputs)


def _setup(kind, N, B, seed):
    return setrec_inputs(N, B, seed) if kind == "setrec" else rpg_inputs(N, B, seed)


def _make_job(kind, N, B, seed, k, backend, method):
    """Runs in the measuring child: builds the inputs there, returns the call to measure."""
    inputs = _setup(kind, N, B, seed)
    if method == "ours":
        return lambda: ours_topk(k, inputs, backend)
    return lambda: materialised_topk(k, inputs)


def scoring_rows(args, N):
    B, k = args.batch, args.beams
    rows = []
    for kind in ("setrec", "rpg"):
        log(f"[setid] {kind} scoring, {N:,} items: building inputs")
        inputs = _setup(kind, N, B, args.seed)
        t_ours, runs_ours, got = timed(lambda: ours_topk(k, inputs, args.backend), torch.device("cpu"), args.repeats,
                                       f"{kind} catalog_topk")
        t_base, runs_base, ref = timed(lambda: materialised_topk(k, inputs), torch.device("cpu"), args.repeats,
                                       f"{kind} materialise + topk")
        agree = bool(torch.allclose(got.scores, ref.values, atol=1e-3))
        inputs = None  # free the tables before the children build their own
        log(f"[setid] {kind}: peak memory, each in a child process")
        mem_ours = peak_memory_bytes(run_job, kind, N, B, args.seed, k, args.backend, "ours", setup=_make_job)
        mem_base = peak_memory_bytes(run_job, kind, N, B, args.seed, k, args.backend, "baseline", setup=_make_job)
        for method, t, runs, mem in ((f"{kind}: catalog_topk", t_ours, runs_ours, mem_ours),
                                     (f"{kind}: materialise [B, N] + torch.topk", t_base, runs_base, mem_base)):
            rows.append({"method": method, "items": N, "latency_ms": t * 1e3, "runs_ms": [r * 1e3 for r in runs],
                         "items_per_s": B * N / t, "peak_memory_mb": mem / 2**20,
                         "speedup_vs_baseline": t_base / t, "same_top_k_scores": agree})
    return rows


def decoder_rows(args, N):
    """setid_generate vs trie beam search, same model size and catalog size."""
    B, K = args.batch, args.beams
    V = bm.sid_vocab_size(4, 256)
    model = bm.tiny_llama(V, hidden_size=DIM, layers=2, heads=2, seed=args.seed, intermediate_size=4 * DIM)
    ids, mask = bm.left_padded_prompts(B, V, args.prompt_len // 2, args.prompt_len, seed=args.seed)
    log(f"[setid] decoders, {N:,} items: building the trie and the set-identifier tables")
    trie = ItemTrie.from_sequences(bm.random_semantic_ids(N, 4, 256, seed=args.seed), vocab_size=V)
    catalog = SetIdCatalog(setrec_inputs(N, 1, args.seed)["item_embeddings"], torch.tensor(WEIGHTS))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    groups = torch.full(ids.shape, ORDINARY, dtype=torch.long)
    queries = torch.randn(SLOTS, DIM, generator=torch.Generator().manual_seed(args.seed))

    def setid():
        return setid_generate(model, embeds, groups, queries, catalog, K, attention_mask=mask, backend=args.backend)

    def beams():
        return beam_search(model, ids, mask, trie=trie, num_beams=K, backend=args.backend)

    t_beam, runs_beam, _ = timed(beams, torch.device("cpu"), args.repeats, "trie beam_search")
    t_set, runs_set, _ = timed(setid, torch.device("cpu"), args.repeats, "setid_generate")
    return [{"method": m, "items": N, "latency_ms": t * 1e3, "runs_ms": [r * 1e3 for r in runs],
             "requests_per_s": B / t, "speedup_vs_baseline": t_beam / t}
            for m, t, runs in (("trie beam_search (4-token IDs)", t_beam, runs_beam),
                               ("setid_generate (3 slots)", t_set, runs_set))]


def run(args, device) -> dict:
    if device.type != "cpu":
        log("[setid] note: peak memory is measured for CPU runs only")
    sizes = [int(x) for x in args.catalog_sizes.split(",")]
    scoring, decoders = [], []
    for N in sizes:
        scoring += scoring_rows(args, N)
        decoders += decoder_rows(args, N)
    return {"suite": "setid",
            "config": {"catalog_sizes": sizes, "batch": args.batch, "k": args.beams, "slots": SLOTS, "dim": DIM,
                       "digits": DIGITS, "codes": CODES, "prompt_len": args.prompt_len, "repeats": args.repeats,
                       "backend": args.backend, "seed": args.seed},
            "scoring": scoring, "decoders": decoders}


def show(res: dict) -> None:
    c = res["config"]
    print_methods(f"Whole-catalog scoring, batch {c['batch']}, k={c['k']} (SETRec: {c['slots']} slots x {c['dim']}, "
                  f"float16; RPG: {c['digits']} digits x {c['codes']} codes, uint8)", res["scoring"],
                  [("items", "items", "{:,}"), ("latency ms", "latency_ms", "{:.1f}"),
                   ("items/s", "items_per_s", "{:.2e}"), ("peak MB", "peak_memory_mb", "{:.1f}"),
                   ("speedup", "speedup_vs_baseline", "{:.2f}x"), ("agree", "same_top_k_scores", "{}")])
    print_methods(f"Decoders on the same catalog size and model (batch {c['batch']}, K={c['k']})", res["decoders"],
                  [("items", "items", "{:,}"), ("latency ms", "latency_ms", "{:.1f}"),
                   ("req/s", "requests_per_s", "{:.1f}"), ("vs beam search", "speedup_vs_baseline", "{:.2f}x")])
