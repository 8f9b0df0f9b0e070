"""How often the exact served path's top-N answers decide a beam row on a trained recommender.

The served exact beam search (``decoding.integrations.vllm.rows``) asks a wide trie node's top-N
log-probs over the vocabulary (N = twice the beams kept) and falls back to the children by id
when those cannot decide the row. Random weights make the fallback common; this measures it on the
trained MovieLens-100K target of ``decoding-bench workload ml-100k`` (loaded from its cache, or
trained: about 9 minutes here), with the engine's answers computed by the same model in
transformers, for every test user:

- with the engine's real cap (128 ids per request): how many rows are wide at all;
- with every node treated as wide (``max_ids=1``) and the small-vocabulary shortcut (the whole
  row) off, as on an LLM's vocabulary: how often a top-N answer decides its row.

Each search is also checked against ``decoding.beam_search`` (same items). Run:
``python benchmarks/ml100k_rows_plan.py [--beams 20] [--cache-dir ~/.cache/decoding]``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from decoding import beam_search
from decoding.integrations.vllm import rows
from decoding.integrations.vllm.rows import BeamRows
from decoding.workloads.datasets import movielens_100k
from decoding.workloads.movielens import Recipe, load_or_train, prompts_for


class Scored:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = np.asarray(token_ids, dtype=np.int64), np.asarray(logprobs, np.float32)


@torch.no_grad()
def answer(model, requests) -> list[Scored]:
    """What vLLM returns for each request: the log-probs of its ids, or its top-N (the argmax first)."""
    if not requests:
        return []
    width = max(len(r.prompt) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt):], mask[i, width - len(r.prompt):] = torch.tensor(r.prompt), 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    out = []
    for r, row in zip(requests, torch.log_softmax(logits.float(), -1)):
        wanted = r.token_ids if r.token_ids is not None else torch.topk(row, r.top_n).indices.tolist()
        chosen = [int(row.argmax()), *wanted]
        out.append(Scored(chosen, row[chosen].numpy()))
    return out


def search(model, trie, prompts, num_beams, max_ids):
    book = BeamRows(trie, prompts, trie.vocab_size, keep=num_beams, max_logprobs=-1, max_ids=max_ids)

    def score():
        requests = book.requests()
        answers = answer(model, requests)
        more = book.followups(requests, answers)
        return book.logits(requests + more, answers + answer(model, more))

    return book.search(score, num_beams=num_beams, backend="cpu"), book.stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-dir", default="~/.cache/decoding")
    parser.add_argument("--out", default=None, help="write the counts here (JSON)")
    args = parser.parse_args(argv)
    pair = load_or_train(movielens_100k(), Recipe(), cache_dir=os.path.expanduser(args.cache_dir))
    model, trie = pair.target.eval(), pair.trie
    inputs, _ = pair.data.split("test")
    ids, mask = prompts_for(inputs, pair.sids, pair.recipe.max_items)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    counts = {}
    for label, max_ids in (("engine cap (128 ids)", 128), ("every node asks its top-N first", 1)):
        rows.SMALL_VOCAB = 0 if max_ids == 1 else 4096  # MovieLens' vocabulary is small: no whole rows here
        totals = {"wide_rows": 0, "top_n_rows": 0, "fallback_rows": 0, "requests": 0, "same_items": 0}
        for start in range(0, len(prompts), args.batch):
            chunk = prompts[start: start + args.batch]
            got, stats = search(model, trie, chunk, args.beams, max_ids)
            ref = beam_search(model, ids[start: start + args.batch], mask[start: start + args.batch], trie=trie,
                              num_beams=args.beams)
            totals["same_items"] += int((got.items == ref.items).all(dim=1).sum())
            for key in ("wide_rows", "top_n_rows", "fallback_rows", "requests"):
                totals[key] += getattr(stats, key)
        counts[label] = totals
        print(f"{label}: {totals['wide_rows']} wide rows; {totals['top_n_rows']} asked the top-{2 * args.beams} first, "
              f"{totals['fallback_rows']} fell back to ids; {totals['requests']} engine requests; "
              f"{totals['same_items']}/{len(prompts)} users with decoding.beam_search's items")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"beams": args.beams, "users": len(prompts), "counts": counts}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
