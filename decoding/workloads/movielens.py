"""A TIGER-style generative recommender on MovieLens-100K, trained from scratch on this machine.

Items get semantic IDs (:mod:`decoding.workloads.semantic_ids`: residual k-means over a truncated SVD of
the training interactions plus genres, a last code for uniqueness). A user's prompt is BOS then
the identifier tokens of their last ``max_items`` items; the model (a small Llama, from scratch)
learns next-token prediction over windows of ``window_items`` items of those token streams, so
decoding an identifier after the prompt recommends the next item. A one-layer draft learns the
same data, for speculative beam search. Everything is seeded; :func:`load_or_train` caches the
trained pair, so later runs load it.

The cache cannot go stale silently: an entry's key (:func:`cache_key`) covers everything that
determines what it holds (the recipe, the source of the code that builds the identifiers, defines
the models and trains them, torch's and transformers' versions, and the data); an entry is
written into a temporary folder and renamed into place with a manifest of its files' hashes,
and one whose files do not match their manifest (a partial write, a truncated file) is rebuilt
with a message, never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from decoding._transformers import left_pad
from decoding.trie import ItemTrie
from decoding.workloads.datasets import InteractionData
from decoding.workloads.semantic_ids import SemanticIDs, item_embeddings, semantic_ids

BOS = 1


@dataclass(frozen=True)
class Recipe:
    """The trained pair's hyperparameters (part of its cache key, :func:`cache_key`)."""

    levels: int = 3  # semantic-ID levels before the disambiguation code
    codes: int = 16
    embedding_dim: int = 32
    max_items: int = 20  # history items in a decoder's prompt
    window_items: int = 50  # history items per training window: the longest prompt the model learns
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    draft_layers: int = 1
    epochs: int = 10
    draft_epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    max_users: int | None = None  # a toy run: the first users only


# the recipes decoding-bench workload offers (--recipe): the default, and a deeper model of the
# same width
RECIPES = {"default": Recipe(), "large": Recipe(layers=4)}

# the source files whose code determines a trained pair: this module (windows, model
# constants, training loop) and the semantic IDs; the aligned draft adds the alignment code
PAIR_CODE = (__file__, os.path.join(os.path.dirname(__file__), "semantic_ids.py"))
ALIGN_CODE = ("speculative/train.py", "speculative/losses.py", "speculative/search.py")


def _sha256_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def data_fingerprint(data: InteractionData) -> str:
    """sha256 of what the recommender sees of the data: the item ids, genres and every user's
    history."""
    digest = hashlib.sha256()
    digest.update(np.asarray(data.item_ids).astype(str).tobytes())
    digest.update(json.dumps([list(map(int, h)) for h in data.histories]).encode())
    digest.update(json.dumps([list(g) for g in data.genres], default=str).encode())
    return digest.hexdigest()


def cache_key(recipe: Recipe, data: InteractionData, *, code=None, extra: dict | None = None) -> str:
    """The key of a cache entry: the recipe, the source of ``code`` (default :data:`PAIR_CODE`),
    torch's and transformers' versions, the data's fingerprint, and ``extra``."""
    import transformers

    material = {"recipe": asdict(recipe), "code": _sha256_files(PAIR_CODE if code is None else code),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "data": data_fingerprint(data), **(extra or {})}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (what cached results computed on it depend on)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


MANIFEST = "manifest.json"


def write_entry(folder: str, write, meta: dict) -> None:
    """Build a cache entry: ``write(tmp)`` fills a temporary folder beside ``folder``, a manifest
    of every file's sha256 and ``meta`` is added, and the folder is renamed into place (an
    entry that was there is replaced)."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, tmp)] = _sha256_files([path])
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"files": files, **meta}, f)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def read_entry(folder: str, log=print) -> dict | None:
    """The manifest of a complete, intact cache entry; None if there is none. An entry whose
    files do not match their manifest is reported and removed (it is rebuilt)."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return None
    problem = None
    try:
        with open(manifest) as f:
            meta = json.load(f)
        for rel, digest in meta["files"].items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                problem = f"{rel} is missing"
            elif _sha256_files([path]) != digest:
                problem = f"{rel} does not match its manifest"
            if problem:
                break
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"no readable manifest ({type(exc).__name__})"
    if problem is None:
        return meta
    log(f"[cache] {folder}: corrupt or partial entry ({problem}); rebuilding it")
    shutil.rmtree(folder, ignore_errors=True)
    return None


@dataclass
class TrainedPair:
    recipe: Recipe
    data: InteractionData
    sids: SemanticIDs
    trie: ItemTrie
    target: torch.nn.Module
    draft: torch.nn.Module
    train_seconds: float = 0.0
    loaded_from_cache: bool = False
    folder: str | None = None  # the cache folder (None: not cached)


def prompts_for(histories, sids: SemanticIDs, max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded int64 ``[users, 1 + max_items * L]`` prompts (BOS + the identifiers of each
    history's last ``max_items`` items) and their 0/1 mask."""
    tokens = sids.tokens
    return left_pad([[BOS] + tokens[np.asarray(h[-max_items:], dtype=np.int64)].reshape(-1).tolist()
                     for h in histories])


def _training_chunks(sequences, sids: SemanticIDs, max_items: int) -> list[list[int]]:
    """Each training history cut into windows of ``max_items + 1`` items (stride ``max_items``),
    as BOS + identifier tokens: every window teaches the next item after 0 to ``max_items``
    items, so prompts of up to ``max_items`` items are in the model's range."""
    tokens = sids.tokens
    chunks = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for start in range(0, max(len(seq) - 1, 1), max_items):
            window = seq[start: start + max_items + 1]
            if len(window) >= 2:
                chunks.append([BOS] + tokens[window].reshape(-1).tolist())
    return chunks


def _model(vocab_size: int, recipe: Recipe, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed + layers)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=4 * recipe.hidden,
                         num_hidden_layers=layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
                         max_position_embeddings=4096, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_lm(model, chunks: list[list[int]], *, epochs: int, batch_size: int, lr: float, seed: int, log=None):
    """Next-token training on right-padded chunks (padding ignored), AdamW with cosine decay;
    deterministic for ``seed``. Returns the mean loss of each epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = max(1, epochs * math.ceil(len(chunks) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(chunks), generator=gen).tolist()
        total, count = 0.0, 0
        for lo in range(0, len(order), batch_size):
            batch = [chunks[i] for i in order[lo: lo + batch_size]]
            width = max(len(c) for c in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(batch):
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        history.append(total / count)
        if log is not None:
            log(f"  epoch {epoch + 1}/{epochs}: loss {history[-1]:.3f}")
    model.eval()
    return history


def restrict(data: InteractionData, max_users: int | None) -> InteractionData:
    if max_users is None or max_users >= data.num_users:
        return data
    return InteractionData(data.name, data.item_ids, data.titles, data.years, data.genres, data.histories[:max_users])


def build_ids(data: InteractionData, recipe: Recipe) -> SemanticIDs:
    emb = item_embeddings(data.train_sequences, data.num_items, dim=recipe.embedding_dim, genres=data.genres,
                          seed=recipe.seed)
    return semantic_ids(emb, levels=recipe.levels, codes=recipe.codes, seed=recipe.seed)


def load_or_train(data: InteractionData, recipe: Recipe | None = None, cache_dir: str | None = None,
                  log=print, *, with_draft: bool = True) -> TrainedPair:
    """The trained target and draft for ``recipe``: loaded from ``cache_dir`` when an intact
    entry for its :func:`cache_key` is there, else trained (seeded) and saved there atomically.
    ``cache_dir`` None: train, cache nothing. ``with_draft`` False: the target only (``draft``
    is None)."""
    from transformers import LlamaForCausalLM

    recipe = Recipe() if recipe is None else recipe
    data = restrict(data, recipe.max_users)
    sids = build_ids(data, recipe)
    trie = ItemTrie.from_sequences(sids.tokens, vocab_size=sids.vocab_size)
    key = cache_key(recipe, data, extra={"with_draft": with_draft})
    folder = None if cache_dir is None else os.path.join(cache_dir, f"{data.name}-{key}")
    meta = None if folder is None else read_entry(folder, log)
    if meta is not None:
        saved = np.load(os.path.join(folder, "codes.npy"))
        if not np.array_equal(saved, sids.codes):
            raise RuntimeError(f"{folder}: cached semantic IDs differ from the recipe's (nondeterministic "
                               "k-means?); delete the folder to retrain")
        target = LlamaForCausalLM.from_pretrained(os.path.join(folder, "target")).eval()
        draft = LlamaForCausalLM.from_pretrained(os.path.join(folder, "draft")).eval() if with_draft else None
        return TrainedPair(recipe, data, sids, trie, target, draft, meta["train_seconds"], True, folder)
    chunks = _training_chunks(data.train_sequences, sids, recipe.window_items)
    t0 = time.perf_counter()
    target = _model(sids.vocab_size, recipe, recipe.layers)
    log(f"[ml-100k] training the target ({sum(p.numel() for p in target.parameters()):,} parameters, "
        f"{len(chunks):,} windows, seed {recipe.seed})")
    train_lm(target, chunks, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed,
             log=log)
    draft = None
    if with_draft:
        draft = _model(sids.vocab_size, recipe, recipe.draft_layers)
        log(f"[ml-100k] training the draft ({sum(p.numel() for p in draft.parameters()):,} parameters)")
        train_lm(draft, chunks, epochs=recipe.draft_epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                 seed=recipe.seed + 1, log=log)
    seconds = time.perf_counter() - t0
    if folder is not None:
        def write(tmp):
            target.save_pretrained(os.path.join(tmp, "target"))
            if draft is not None:
                draft.save_pretrained(os.path.join(tmp, "draft"))
            np.save(os.path.join(tmp, "codes.npy"), sids.codes)

        write_entry(folder, write, {"recipe": asdict(recipe), "train_seconds": seconds})
    return TrainedPair(recipe, data, sids, trie, target, draft, seconds, False, folder)


def seeds_of(recipe: Recipe, count: int) -> list[Recipe]:
    """``count`` recipes differing only in their seed (the first is ``recipe``)."""
    return [replace(recipe, seed=recipe.seed + i) for i in range(count)]


def aligned_draft(pair: TrainedPair, *, num_beams: int, epochs: int = 2, batch_size: int = 32, lr: float = 1e-3,
                  cache_dir: str | None = None, log=print):
    """A copy of the pair's draft aligned on the target's beams (:func:`decoding.speculative.align_draft`,
    strict loss) for every user's prompt before their validation item (no held-out item is
    seen; the teacher is the target itself), with strict acceptance measured on the validation
    prompts before and after. Cached beside the pair. Returns ``(draft, report dict)``."""
    import copy

    from transformers import LlamaForCausalLM

    from decoding.speculative import align_draft

    recipe, data = pair.recipe, pair.data
    package = os.path.dirname(os.path.dirname(__file__))
    code = [os.path.join(package, rel) for rel in ALIGN_CODE]
    key = cache_key(recipe, data, code=code, extra={
        "aligned": [num_beams, epochs, batch_size, lr], "target": weights_fingerprint(pair.target),
        "draft": weights_fingerprint(pair.draft)})
    folder = None if cache_dir is None else os.path.join(cache_dir, f"{data.name}-aligned-{key}")
    if folder is not None and read_entry(folder, log) is not None:
        return (LlamaForCausalLM.from_pretrained(os.path.join(folder, "draft")).eval(),
                json.load(open(os.path.join(folder, "report.json"))))
    ids, mask = prompts_for([h[:-3] for h in data.histories], pair.sids, recipe.max_items)
    valid = prompts_for(data.split("valid")[0], pair.sids, recipe.max_items)
    draft = copy.deepcopy(pair.draft)
    t0 = time.perf_counter()
    result = align_draft(draft, pair.target, pair.trie, ids, mask, num_beams=num_beams, epochs=epochs,
                         batch_size=batch_size, lr=lr, loss="strict", validation=valid, seed=recipe.seed, log=log)
    report = {"loss_before": result[0], "loss_after": result[1], "epoch_losses": result.losses,
              "validation_acceptance_before": result.acceptance_before,
              "validation_acceptance_after": result.acceptance_after, "seconds": time.perf_counter() - t0}
    if folder is not None:
        def write(tmp):
            draft.save_pretrained(os.path.join(tmp, "draft"))
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f)

        write_entry(folder, write, {"recipe": asdict(recipe)})
    return draft, report
