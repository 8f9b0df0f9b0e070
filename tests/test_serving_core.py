"""The engine-neutral serving core without a server: the batcher's grouping, budget, fairness,
cancellation, queue limit and drain (on a recording decoder), and the request schema both
servers share."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from decoding.serving.batcher import Batcher, BatchStats, QueueFull, ShuttingDown
from decoding.serving.requests import Caps, DecodeRequest, RequestError, completion_request, recommendation_request


class RecordingDecoder:
    """Answers each request with its own prompt; records every batch. ``gate`` holds a batch
    until the test releases it."""

    def __init__(self):
        self.batches, self.gate, self.started = [], threading.Event(), threading.Event()
        self.gate.set()

    def batch_key(self, request):
        return (request.catalog, request.k)

    def rows(self, request):
        return request.k

    def decode(self, requests):
        self.started.set()
        self.gate.wait(10)
        self.batches.append([r.prompt_ids[0] for r in requests])
        return [r.prompt_ids for r in requests]


class Counts(BatchStats):
    def __init__(self):
        self.events = []

    def cancelled(self, stage):
        self.events.append(("cancelled", stage))


def req(i, k=2, catalog="a"):
    return DecodeRequest((i,), k, catalog)


def run(coro):
    return asyncio.run(coro)


def test_batches_are_fifo_under_the_row_budget_and_keys_never_mix():
    async def main():
        decoder = RecordingDecoder()
        decoder.gate.clear()
        batcher = Batcher(decoder, max_batch_rows=6, max_wait_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(req(0)))
        assert await asyncio.to_thread(decoder.started.wait, 10)  # the worker holds request 0
        rest = [asyncio.ensure_future(batcher.submit(r)) for r in
                (req(1), req(2, catalog="b"), req(3), req(4, k=10), req(5), req(6), req(7))]
        await asyncio.sleep(0.01)
        decoder.gate.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.close()
        return decoder.batches, answers

    batches, answers = run(main())
    assert answers == [(i,) for i in range(8)]
    # 1, 3, 5 share a key and fit 6 rows; 2 (another catalog) heads the next batch; 4 (10 rows,
    # above the budget) runs alone; the oldest waiting request always starts the batch
    assert batches == [[0], [1, 3, 5], [2], [4], [6, 7]]


def test_the_bounded_wait_gathers_requests_that_arrive_together():
    async def main():
        decoder = RecordingDecoder()
        batcher = Batcher(decoder, max_batch_rows=64, max_wait_s=0.2)
        batcher.start()
        await asyncio.gather(*(batcher.submit(req(i)) for i in range(5)))
        await batcher.close()
        return decoder.batches

    assert run(main()) == [[0, 1, 2, 3, 4]]


def test_only_requests_that_can_share_a_batch_extend_its_wait():
    """A stream of requests for another catalog keeps arriving: the waiting request's batch still
    closes one gap after its own last compatible arrival, not at max_wait_s."""

    async def main():
        decoder = RecordingDecoder()
        batcher = Batcher(decoder, max_batch_rows=64, max_wait_s=5.0, arrival_gap_s=0.05)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(batcher.submit(req(0)))
        others = []
        while not first.done() and loop.time() - started < 3.0:
            others.append(asyncio.ensure_future(batcher.submit(req(len(others) + 1, catalog="b"))))
            await asyncio.sleep(0.01)
        waited = loop.time() - started
        await asyncio.gather(first, *others)
        await batcher.close()
        return waited, decoder.batches

    waited, batches = run(main())
    assert waited < 2.0, f"the request waited {waited:.2f} s for requests it cannot share a batch with"
    assert batches[0] == [0]


def test_a_withdrawn_request_is_never_decoded_and_a_full_queue_refuses():
    async def main():
        decoder, counts = RecordingDecoder(), Counts()
        decoder.gate.clear()
        batcher = Batcher(decoder, max_batch_rows=2, max_queue=2, max_wait_s=0.0, stats=counts)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(req(0)))
        assert await asyncio.to_thread(decoder.started.wait, 10)
        leaver = asyncio.ensure_future(batcher.submit(req(1)))
        stays = asyncio.ensure_future(batcher.submit(req(2)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(req(3))
        assert refused.value.retry_after_s >= 1
        leaver.cancel()  # the client left: its place in the queue frees at once
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batcher.submit(req(4)))
        running.cancel()  # leaves mid-batch: the result is dropped
        await asyncio.sleep(0.01)
        decoder.gate.set()
        answers = await asyncio.gather(stays, late)
        await batcher.close()
        return decoder.batches, answers, counts.events

    batches, answers, events = run(main())
    assert batches == [[0], [2], [4]]  # 1 never decoded
    assert answers == [(2,), (4,)]
    assert sorted(events) == [("cancelled", "queued"), ("cancelled", "running")]


def test_close_answers_every_accepted_request_and_then_refuses():
    async def main():
        decoder = RecordingDecoder()
        batcher = Batcher(decoder, max_batch_rows=2, max_wait_s=0.0)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(req(i))) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(p.done() for p in pending)
        with pytest.raises(ShuttingDown):
            await batcher.submit(req(9))
        return [p.result() for p in pending]

    assert run(main()) == [(i,) for i in range(6)]


def test_one_failing_request_fails_alone_and_the_batcher_keeps_serving():
    class Flaky(RecordingDecoder):
        def decode(self, requests):
            if any(r.prompt_ids == (0,) for r in requests):
                raise RuntimeError("bad request 0")
            return super().decode(requests)

    async def main():
        decoder = Flaky()
        batcher = Batcher(decoder, max_batch_rows=64, max_wait_s=0.2)
        batcher.start()
        together = [asyncio.ensure_future(batcher.submit(req(i))) for i in range(3)]  # one batch
        outcomes = await asyncio.gather(*together, return_exceptions=True)
        later = await batcher.submit(req(5))
        await batcher.close()
        return outcomes, later, decoder.batches

    outcomes, later, batches = run(main())
    assert isinstance(outcomes[0], RuntimeError) and outcomes[1:] == [(1,), (2,)]
    assert later == (5,) and batches == [[1], [2], [5]]  # the failed batch, again one request at a time


def test_the_token_budget_counts_padded_prompts():
    async def main():
        decoder = RecordingDecoder()
        batcher = Batcher(decoder, max_batch_rows=64, max_batch_tokens=12, max_wait_s=0.2)
        batcher.start()
        lengths = [2, 3, 4, 5, 20]
        await asyncio.gather(*(batcher.submit(DecodeRequest(tuple([i] * n), 2, "a")) for i, n in enumerate(lengths)))
        await batcher.close()
        return decoder.batches

    # 3 x 4 tokens fit 12; a fourth (5 tokens) would pad all four to 20; 20 tokens run alone
    assert run(main()) == [[0, 1, 2], [3], [4]]


def test_a_worker_that_dies_fails_the_waiting_requests_instead_of_leaving_them():
    class Key:
        def __eq__(self, other):
            raise RuntimeError("a bug in the batcher's worker")

        __hash__ = object.__hash__

    class Broken(RecordingDecoder):
        def batch_key(self, request):
            return Key()

    async def main():
        batcher = Batcher(Broken(), max_batch_rows=64, max_wait_s=0.05)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(req(i))) for i in range(2)]
        outcomes = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        with pytest.raises(ShuttingDown):
            await batcher.submit(req(3))
        await batcher.close()
        return outcomes

    assert all(isinstance(o, ShuttingDown) for o in run(main()))


@pytest.mark.parametrize("kwargs", [{"max_batch_rows": 0}, {"max_queue": True}, {"max_wait_s": -1}])
def test_batcher_arguments_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Batcher(RecordingDecoder(), **kwargs)


def test_both_routes_read_one_request():
    caps = Caps(max_beams=16, max_exclude=4)
    rec = recommendation_request({"catalog": "c", "prompt_token_ids": [5, 6], "k": 3, "exclude_items": [1]}, caps)
    comp, reply = completion_request({"model": "m", "prompt": [5, 6], "n": 3, "use_beam_search": True,
                                      "max_tokens": 4, "length_penalty": 0.0,
                                      "vllm_xargs": {"decoding_catalog": "c", "decoding_exclude": [1]}}, caps)
    assert rec == DecodeRequest((5, 6), 3, "c", (1,))
    assert comp == DecodeRequest((5, 6), 3, "c", (1,), max_tokens=4)
    assert reply["logprobs"] is None and reply["return_token_ids"] is False
    text = recommendation_request({"catalog": "c", "prompt": "hi there"}, caps, tokenize=lambda s: [7, 8])
    assert text.prompt_ids == (7, 8) and text.k == 10
    with pytest.raises(RequestError, match="no tokenizer") as error:
        recommendation_request({"catalog": "c", "prompt": "hi"}, caps)
    assert error.value.parameter == "prompt"
    with pytest.raises(RequestError, match="--max-exclude") as error:
        recommendation_request({"catalog": "c", "prompt_token_ids": [1], "exclude_items": [1] * 5}, caps)
    assert error.value.parameter == "exclude_items"


@pytest.mark.parametrize("body, field, words", [
    ({"catalog": "c", "prompt": " "}, "prompt", "no tokens"),
    ({"catalog": "c", "prompt": "x" * 33}, "prompt", "characters"),
    ({"catalog": "c", "prompt": "oov"}, "prompt", "does not have"),
    ({"catalog": "c", "prompt_token_ids": [1], "length_penalty": float("nan")}, "length_penalty", "finite"),
    ({"catalog": "c", "prompt_token_ids": [1], "length_penalty": 1e308}, "length_penalty", "finite"),
    ({"catalog": "c", "prompt_token_ids": [1], "/etc/passwd": 1}, "a field", "not a field"),
])
def test_bad_requests_name_the_field_and_echo_no_path(body, field, words):
    caps = Caps(max_prompt_tokens=1)
    tokenize = {" ": [], "oov": [99]}.get
    with pytest.raises(RequestError, match=words) as error:
        recommendation_request(body, caps, tokenize=lambda text: tokenize(text, [5]), vocab_size=50)
    assert error.value.parameter == field and "passwd" not in str(error.value)


def test_caps_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        Caps(max_queue=0)


def test_a_served_directory_round_trips_and_never_names_a_path_outside_it(tmp_path):
    import json

    from decoding import ItemTrie
    from decoding import testing as bm
    from decoding.serving.decoders import HistoryPrompt
    from decoding.serving.directory import MANIFEST, read_server_directory, write_server_directory

    trie = ItemTrie.from_sequences([[3, 4], [3, 5], [6, 4]], vocab_size=8)
    model = bm.tiny_llama(8, hidden_size=16, heads=2, layers=1)
    write_server_directory(tmp_path / "d", model=model, catalogs={"movies": trie}, titles={"movies": ["a", "b", "c"]},
                           history_prompts={"movies": HistoryPrompt((1,), 2)}, draft=model, served_model_name="m")
    served = read_server_directory(tmp_path / "d")
    entry = served.catalogs["movies"]
    assert served.model == str(tmp_path / "d" / "model") and served.draft == str(tmp_path / "d" / "draft")
    assert ItemTrie.load(entry.trie).identifiers([0, 1, 2]) == [[3, 4], [3, 5], [6, 4]]
    assert entry.history_prompt == HistoryPrompt((1,), 2) and served.served_model_name == "m"
    # the prompt a history stands for: the prefix, then the last max_items items' identifiers
    assert entry.history_prompt.prompt(trie, [0, 2, 1]) == (1, 6, 4, 3, 5)
    manifest = tmp_path / "d" / MANIFEST
    meta = json.loads(manifest.read_text())
    for bad, words in (({"model": "/etc"}, "relative"), ({"model": "../x"}, "leaves the directory"),
                       ({"catalogs": {"m": {"trie": "a/../../t"}}}, "leaves the directory"),
                       ({"catalogs": {}}, "at least one catalog"), ({"version": 2}, "version 1"),
                       ({"catalogs": {"m": {"trie": "t", "history_prompt": {"max_items": 0}}}}, "max_items")):
        manifest.write_text(json.dumps({**meta, **bad}))
        with pytest.raises(ValueError, match=words):
            read_server_directory(tmp_path / "d")
    with pytest.raises(ValueError, match="titles"):
        write_server_directory(tmp_path / "e", model=model, catalogs={"movies": trie}, titles={"movies": ["a"]})


def test_decoder_options_are_filled_and_checked_before_any_decoder_sees_them():
    from decoding.serving.requests import decoder_options

    caps = Caps(max_beams=16)
    # num_drafts unset: the decoder's default (it knows the catalog); a seed only for relaxed mode
    assert decoder_options("speculative", None, 4, caps) == (("draft_steps", 2), ("mode", "strict"))
    assert decoder_options("speculative", {"mode": "relaxed", "num_drafts": 6}, 4, caps) == (
        ("draft_steps", 2), ("mode", "relaxed"), ("num_drafts", 6), ("seed", 0))
    assert decoder_options("beam", {"kv_policy": "shared"}, 4, caps) == ()  # the default is left out
    assert decoder_options("setid", {}, 4, caps) == ()
    for decoder, options, words in (("setid", {"mode": "strict"}, "takes none"),
                                    ("speculative", {"seed": -1}, "options.seed"),
                                    ("speculative", {"seed": True}, "options.seed"),
                                    ("speculative", {"num_drafts": 2.5}, "at least k")):
        with pytest.raises(RequestError, match=words) as error:
            decoder_options(decoder, options, 4, caps)
        assert error.value.parameter == "options"


def test_cli_kv_policies_are_parsed_into_the_package_policies():
    from decoding.kv import EarnCut, SnapKV, StreamingLLM
    from decoding.serving.cli import parser

    args = parser().parse_args(["--model", "m", "--catalog", "a=b", "--kv-policy",
                                'r={"kind": "streamingllm", "sink": 1, "recent": 8}', "--kv-policy",
                                's={"kind": "snapkv", "window": 4, "capacity": 16}', "--kv-policy",
                                'e={"kind": "earn", "layer": 1, "registers": [0, -1]}', "--setid", "x=dir", "--setid",
                                "dir2"])
    assert dict(args.kv_policy) == {"r": StreamingLLM(1, 8), "s": SnapKV(4, 16), "e": EarnCut(1, (0, -1))}
    assert args.setid == [("x", "dir"), (None, "dir2")]
    for bad in ('r={"kind": "lru"}', 'r={"kind": "snapkv", "window": 9, "capacity": 4}',
                'r={"kind": "streamingllm", "size": 3}', "r=[1]", "1r={}"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--model", "m", "--catalog", "a=b", "--kv-policy", bad])
    with pytest.raises(SystemExit):
        parser().parse_args(["--model", "m", "--draft", "d", "--draft-layers", "1"])


def test_the_default_draft_beams_fit_the_catalog_and_the_cap_and_relaxed_requests_run_alone():
    from decoding import ItemTrie
    from decoding import testing as bm
    from decoding.serving.decoders import BeamDecoder, SpeculativeDecoder
    from decoding.serving.requests import decoder_options
    from decoding.speculative.draft import truncated_draft

    model = bm.tiny_llama(16, hidden_size=16, heads=2, layers=2)
    trie = ItemTrie.from_sequences([[a, b] for a in range(3, 6) for b in range(3, 6)][:8], vocab_size=16)
    names = {"catalog": "catalog", "k": "k", "exclude": "exclude_items"}
    for cap, k, drafts in ((64, 6, 8), (64, 3, 6), (4, 3, 4)):  # 2k, within the 8 items and max_beams
        decoder = SpeculativeDecoder(BeamDecoder(model, {"c": trie}), truncated_draft(model, 1), max_drafts=cap)
        request = DecodeRequest((3, 4), k, "c", decoder="speculative",
                                options=decoder_options("speculative", {}, k, Caps(max_beams=cap)))
        assert decoder.admit(request, names).option("num_drafts") == drafts
    relaxed = DecodeRequest((3, 4), 2, "c", decoder="speculative",
                            options=decoder_options("speculative", {"mode": "relaxed"}, 2, Caps()))
    first, second = decoder.admit(relaxed, names), decoder.admit(relaxed, names)
    assert decoder.batch_key(first) != decoder.batch_key(second)  # a sample never shares its batch
    strict = DecodeRequest((3, 4), 2, "c", decoder="speculative", options=decoder_options("speculative", {}, 2, Caps()))
    assert decoder.batch_key(decoder.admit(strict, names)) == decoder.batch_key(decoder.admit(strict, names))
    with pytest.raises(RequestError, match="more than the catalog's 8 items"):
        decoder.admit(replace(strict, options=(("draft_steps", 2), ("mode", "strict"), ("num_drafts", 9))), names)
