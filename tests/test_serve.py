"""``decoding-serve`` as a user runs it: the real server as a subprocess on localhost
(``python -m decoding.serving.cli``, what the ``decoding-serve`` command runs), driven by a real
HTTP client. Answers are judged against ``decoding.beam_search`` in-process on the same weights;
the queue, cancellation and drain are read from the server's own ``/metrics``, not from timing."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SID_VOCAB, need

need("fastapi")
need("uvicorn")
need("prometheus_client")
httpx = need("httpx")

from decoding import ItemTrie, beam_search  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.testing.exactness import ExactReference  # noqa: E402

K = 8
API_KEY = "test-key"
HEAVY_BEAMS = 8192  # the cap of the second server: its requests hold the worker for a while


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_catalogs")
    seqs = bm.random_semantic_ids(12_000, seed=12)
    trie = ItemTrie.from_sequences(seqs, vocab_size=SID_VOCAB)
    trie.save(root / "items.trie")
    return {"root": root, "trie": trie, "seqs": seqs, "path": str(root / "items.trie")}


@pytest.fixture(scope="module")
def hf_model(served_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served_model_dir, dtype=torch.float32).eval()


def _server(model_dir, catalog, name, args):
    from decoding.testing.serving import decoding_server

    return decoding_server(model_dir, {"items": catalog["path"]}, catalog["root"] / f"{name}.log", args=args)


@pytest.fixture(scope="module")
def server(served_model_dir, catalog):
    """The main server: an API key, caps a test can reach, a batch budget that holds 64 requests."""
    args = ("--api-key", API_KEY, "--max-beams", "64", "--max-exclude", "100", "--max-prompt-tokens", "64",
            "--max-batch-rows", "1024", "--served-model-name", "rec", "--max-body-bytes", "100000")
    with _server(served_model_dir, catalog, "server", args) as (url, proc):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=url, timeout=120, headers=headers,
                          limits=httpx.Limits(max_connections=80)) as client:
            yield client, proc


@pytest.fixture(scope="module")
def busy_server(served_model_dir, catalog):
    """A server whose cap (8,192 beams, over 12,000 items) takes a while to search, with room for 4
    waiting requests and a batch budget smaller than one request at the cap (which runs alone).
    The module's last test stops it with SIGTERM."""
    args = ("--max-beams", str(HEAVY_BEAMS), "--max-queue", "4", "--max-batch-rows", "256", "--max-wait-ms", "5")
    with _server(served_model_dir, catalog, "busy", args) as (url, proc):
        with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            yield client, proc


def metric(client, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 if absent)."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", re.M)
    found = pattern.search(client.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def random_prompts(n, seed, low=4, high=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g)
    return [torch.randint(8, SID_VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def completion(prompt, n=K, **fields):
    return {"model": "rec", "prompt": prompt, "n": n, "use_beam_search": True, "max_tokens": 4, "temperature": 0.0,
            "return_token_ids": True, "logprobs": 0, "vllm_xargs": {"decoding_catalog": "items"}, **fields}


def heavy(prompt_len=200, seed=0):
    """A /v1/recommendations body at the busy server's cap."""
    return {"catalog": "items", "prompt_token_ids": random_prompts(1, seed, prompt_len, prompt_len + 1)[0],
            "k": HEAVY_BEAMS}


def test_64_concurrent_beam_requests_equal_in_process_beam_search(server, catalog, hf_model, record_property):
    """64 OpenAI beam requests at once (prompts of 4 to 15 tokens, every other one excluding
    items), batched by the server: each answer is decoding.beam_search's on the same weights
    in-process, by the exactness contract (items in order, scores within 1e-4; a near-tie as
    docs/exactness.md defines it, at most one request in twenty), and the server did batch them."""
    client, _ = server
    trie, prompts = catalog["trie"], random_prompts(64, seed=5)
    # every other request excludes the three items it would rank first, in the same batches as the others
    plain = ExactReference(hf_model, prompts[::2], trie, K, catalog["seqs"])
    exclude = [[] for _ in prompts]
    for b, (items, _) in enumerate(plain.items):
        exclude[2 * b] = items[:3]
    bodies = [completion(p, vllm_xargs={"decoding_catalog": "items", "decoding_exclude": x})
              for p, x in zip(prompts, exclude)]
    batches_before = metric(client, "decoding_serve_batch_requests_count")
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/completions", json=body), bodies))
    judge = ExactReference(hf_model, prompts, trie, K, catalog["seqs"], exclude_items=exclude)
    near_ties = []
    for b, response in enumerate(responses):
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert [c["index"] for c in choices] == list(range(K))
        items = trie.lookup(torch.tensor([c["token_ids"] for c in choices])).tolist()
        assert min(items) >= 0
        sums = [sum(c["logprobs"]["token_logprobs"]) for c in choices]
        ranked = [s / 4.0 for s in sums]  # length_penalty: vLLM's default 1.0
        assert all(a >= b - 1e-6 for a, b in zip(ranked, ranked[1:])), ranked  # best first
        assert not set(items) & set(exclude[b])
        kind = judge.check(b, items, sums)
        assert kind != "wrong", (b, list(zip(items, sums)), judge.items[b])
        if kind == "near-tie":
            near_ties.append(b)
    record_property("near_ties", f"{len(near_ties)} of {len(prompts)}: {near_ties}")
    if near_ties:
        warnings.warn(f"decoding-serve: {len(near_ties)} near-tie(s) of 64 requests: {near_ties}", stacklevel=1)
    assert len(near_ties) <= 3
    batches = metric(client, "decoding_serve_batch_requests_count") - batches_before
    assert 1 <= batches < 64, f"64 concurrent requests ran in {batches} batches"


def test_recommendations_agree_with_completions_and_honour_exclusions(server, catalog, hf_model):
    client, _ = server
    trie = catalog["trie"]
    for prompt in random_prompts(3, seed=6):
        body = {"catalog": "items", "prompt_token_ids": prompt, "k": K}
        first = client.post("/v1/recommendations", json=body)
        assert first.status_code == 200, first.text
        got = first.json()
        ref = beam_search(hf_model, torch.tensor([prompt]), trie=trie, num_beams=K)
        assert got["items"] == ref.items[0].tolist()
        assert got["scores"] == pytest.approx(ref.scores[0].tolist(), abs=1e-4)
        assert got["identifiers"] == ref.sequences[0].tolist()
        # the completions route, length_penalty 0: the same items and scores
        choices = client.post("/v1/completions", json=completion(prompt, length_penalty=0.0)).json()["choices"]
        assert trie.lookup(torch.tensor([c["token_ids"] for c in choices])).tolist() == got["items"]
        # excluded items never come back; the answer is beam_search's with the same exclusions
        exclude = got["items"][:3] + [11_999]
        again = client.post("/v1/recommendations", json={**body, "exclude_items": exclude}).json()
        ref = beam_search(hf_model, torch.tensor([prompt]), trie=trie, num_beams=K, exclude_items=[exclude])
        assert not set(again["items"]) & set(exclude)
        assert again["items"] == ref.items[0].tolist()
        xargs = {"decoding_catalog": "items", "decoding_exclude": exclude}
        choices = client.post("/v1/completions", json=completion(prompt, vllm_xargs=xargs)).json()["choices"]
        assert trie.lookup(torch.tensor([c["token_ids"] for c in choices])).tolist() == again["items"]


def test_text_prompts_models_and_api_key(server, served_model_dir):
    client, _ = server
    from transformers import AutoTokenizer

    text = "t10 t300 t700"
    ids = AutoTokenizer.from_pretrained(served_model_dir).encode(text)
    by_text = client.post("/v1/recommendations", json={"catalog": "items", "prompt": text, "k": 4}).json()
    by_ids = client.post("/v1/recommendations", json={"catalog": "items", "prompt_token_ids": ids, "k": 4}).json()
    assert by_text == by_ids
    choices = client.post("/v1/completions", json=completion(text, n=4)).json()["choices"]
    assert [c["token_ids"] for c in choices] == by_ids["identifiers"]
    assert choices[0]["text"] == " ".join(f"t{t}" for t in by_ids["identifiers"][0])
    assert client.get("/v1/models").json()["data"][0]["id"] == "rec"
    no_key = httpx.post(client.base_url.join("/v1/recommendations"), json={"catalog": "items", "prompt": text, "k": 4})
    assert no_key.status_code == 401
    assert httpx.get(client.base_url.join("/health")).status_code == 200


@pytest.mark.parametrize("route, body, param, words", [
    ("/v1/completions", completion([10, 11], n=65), "n", "max_beams (64)"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10], "k": 65}, "k", "max_beams (64)"),
    ("/v1/completions", completion([10], vllm_xargs={"decoding_catalog": "items",
                                                     "decoding_exclude": list(range(101))}),
     "vllm_xargs", "max_exclude (100)"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10], "exclude_items": list(range(101))},
     "exclude_items", "max_exclude (100)"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10] * 65}, "prompt_token_ids",
     "max_prompt_tokens (64)"),
    ("/v1/completions", completion([10] * 65), "prompt", "max_prompt_tokens (64)"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10], "exclude_items": [12_000]},
     "exclude_items", "below 12000"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [SID_VOCAB]}, "prompt_token_ids",
     "model's vocabulary"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10], "k": 0}, "k", "positive int"),
    ("/v1/recommendations", {"catalog": "items", "prompt_token_ids": [10], "kk": 3}, "kk", "not a field"),
    ("/v1/completions", completion([10], max_tokens=3), "max_tokens", "shorter than the catalog's identifiers"),
    ("/v1/completions", completion([10], use_beam_search=False), "use_beam_search", "use_beam_search: true"),
    ("/v1/completions", completion([10], logprobs=2), "logprobs", "alternatives"),
    ("/v1/completions", completion([10], temperature=0.7), "temperature", "send 0"),
    ("/v1/completions", completion([10], stop=["x"]), "stop", "not supported"),
    ("/v1/completions", completion([10], vllm_xargs={"decoding_catalogue": "items"}), "vllm_xargs",
     "decoding_catalogue"),
    ("/v1/completions", completion([[10], [11]]), "prompt", "one prompt"),
    ("/v1/completions", completion(" "), "prompt", "no tokens"),
    ("/v1/recommendations", {"catalog": "items", "prompt": "t10 " * 600}, "prompt", "characters"),
])
def test_bad_input_and_caps_get_400_naming_the_argument(server, route, body, param, words):
    client, proc = server
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
    assert proc.poll() is None


def test_a_request_never_names_a_file_and_errors_reveal_nothing(server, catalog):
    client, _ = server
    names = ["/etc/passwd", catalog["path"], str(catalog["root"]), "../items", "items.trie", "", "ITEMS", "x" * 300]
    messages = set()
    for name in names:
        for route, body in (("/v1/completions", completion([10], vllm_xargs={"decoding_catalog": name})),
                            ("/v1/recommendations", {"catalog": name, "prompt_token_ids": [10]})):
            response = client.post(route, json=body)
            assert response.status_code == 400, (name, response.text)
            message = response.json()["error"]["message"]
            assert str(catalog["root"]) not in message and "passwd" not in message
            messages.add(message.split(":", 1)[1])
    assert len(messages) == 1, messages  # one answer, whatever the name and whatever exists on disk
    wrong_model = client.post("/v1/completions", json={**completion([10]), "model": catalog["path"]})
    assert wrong_model.status_code == 404 and catalog["path"] not in wrong_model.text
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    huge = client.post("/v1/recommendations", content=b"[" + b"1," * 60_000 + b"1]")
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "body"


def test_a_full_queue_gets_429_with_retry_after(busy_server):
    client, _ = busy_server
    light = {"catalog": "items", "prompt_token_ids": [10, 11, 12], "k": 2}
    with ThreadPoolExecutor(12) as pool:
        heavies = [pool.submit(client.post, "/v1/recommendations", json=heavy(seed=s)) for s in range(3)]
        wait_for(lambda: metric(client, "decoding_serve_running_requests") == 1
                 and metric(client, "decoding_serve_queue_depth") >= 1, "a heavy request running, others waiting")
        # small requests, one at a time, each once the server took it: they wait behind the heavy
        # ones (first come, first served), so the queue fills and one is refused
        waiting, refused = [], None
        for _ in range(8):
            accepted = metric(client, "decoding_serve_accepted_requests_total")
            sent = pool.submit(client.post, "/v1/recommendations", json=light)
            wait_for(lambda: sent.done() or metric(client, "decoding_serve_accepted_requests_total") > accepted,
                     "the small request accepted or refused")
            if sent.done() and sent.result().status_code == 429:
                refused = sent.result()
                break
            waiting.append(sent)
        assert refused is not None, "the queue never filled"
        assert 1 <= len(waiting) <= 4
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "RateLimitError"
        for done in heavies + waiting:  # everything accepted is answered
            assert done.result().status_code == 200
    assert metric(client, "decoding_serve_requests_total", 'route="/v1/recommendations",status="429"') == 1


def test_a_client_that_leaves_before_its_batch_is_never_decoded(busy_server):
    client, _ = busy_server
    decoded, rows = (metric(client, "decoding_serve_decoded_requests_total"),
                     metric(client, "decoding_serve_batch_rows_sum"))
    cancelled = metric(client, "decoding_serve_cancelled_requests_total", 'stage="queued"')
    with ThreadPoolExecutor(4) as pool:
        heavies = [pool.submit(client.post, "/v1/recommendations", json=heavy(seed=s)) for s in range(3)]
        wait_for(lambda: metric(client, "decoding_serve_queue_depth") >= 1, "a heavy request waiting")
        accepted = metric(client, "decoding_serve_accepted_requests_total")
        body = json.dumps({"catalog": "items", "prompt_token_ids": [10, 11, 12], "k": 3}).encode()
        leaver = socket.create_connection((client.base_url.host, client.base_url.port))
        leaver.sendall(b"POST /v1/recommendations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:  # the server queued it behind the heavy requests ...
            wait_for(lambda: metric(client, "decoding_serve_accepted_requests_total") == accepted + 1,
                     "the leaver accepted")
        finally:
            leaver.close()  # ... and its client hangs up
        for done in heavies:
            assert done.result().status_code == 200
    wait_for(lambda: metric(client, "decoding_serve_cancelled_requests_total", 'stage="queued"') == cancelled + 1,
             "the withdrawn request dropped from the queue")
    # what ran: the three heavy requests, none of the leaver's 3 rows
    assert metric(client, "decoding_serve_decoded_requests_total") == decoded + 3
    assert metric(client, "decoding_serve_batch_rows_sum") == rows + 3 * HEAVY_BEAMS


def test_a_bystander_is_served_within_2s_beside_a_request_at_the_cap(busy_server, catalog):
    client, _ = busy_server
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(client.post, "/v1/recommendations", json=heavy(prompt_len=32, seed=7))
        wait_for(lambda: metric(client, "decoding_serve_running_requests") == 1, "the request at the cap running")
        t0 = time.perf_counter()
        small = client.post("/v1/recommendations", json={"catalog": "items", "prompt_token_ids": [10, 11], "k": 1})
        waited = time.perf_counter() - t0
        assert small.status_code == 200 and len(small.json()["items"]) == 1
        answer = big.result().json()
    assert waited < 2.0, f"the bystander waited {waited:.2f} s"
    assert len(answer["items"]) == HEAVY_BEAMS and min(answer["items"]) >= 0
    assert len(set(answer["items"])) == HEAVY_BEAMS
    assert catalog["trie"].lookup(torch.tensor(answer["identifiers"][:100])).tolist() == answer["items"][:100]


def test_sigterm_under_load_answers_every_accepted_request(busy_server):
    """The module's last test: it stops the busy server."""
    client, proc = busy_server
    accepted = metric(client, "decoding_serve_accepted_requests_total")
    bodies = [heavy(seed=9)] + [{"catalog": "items", "prompt_token_ids": p, "k": 5} for p in random_prompts(3, 10)]
    with ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(client.post, "/v1/recommendations", json=body) for body in bodies]
        wait_for(lambda: metric(client, "decoding_serve_accepted_requests_total") == accepted + 4,
                 "four requests accepted")
        proc.send_signal(signal.SIGTERM)
        answers = [done.result() for done in sent]
    assert [a.status_code for a in answers] == [200] * 4
    assert [len(a.json()["items"]) for a in answers] == [HEAVY_BEAMS, 5, 5, 5]
    # uvicorn re-raises the signal once it has drained, so the process ends as SIGTERM says
    assert proc.wait(60) in (0, -signal.SIGTERM)


class FailingDecoder:
    """A decoder that fails prompts starting with token 0, and answers others with nothing."""

    vocab_size = 100

    def admit(self, request, parameters):
        pass

    def batch_key(self, request):
        return request.k

    def rows(self, request):
        return request.k

    def decode(self, requests):
        from decoding.serving.decoders import Result

        if any(r.prompt_ids[0] == 0 for r in requests):
            raise RuntimeError("the decoder failed")
        return [Result([], [], [], []) for _ in requests]


def test_failures_answer_in_openais_shape_and_are_counted():
    """In process (FastAPI's test client, the app's lifespan included): a request the decoder
    fails gets an OpenAI-shaped 500 and is counted, its batch-mates their answers; a batcher that
    stopped turns /health and new requests into 503s."""
    from fastapi.testclient import TestClient

    from decoding.serving.app import create_app

    app = create_app(FailingDecoder(), model_name="m", max_wait_s=0.2)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        bodies = [{"catalog": "c", "prompt_token_ids": [t], "k": 2} for t in (0, 5)]
        failed, fine = pool.map(lambda body: client.post("/v1/recommendations", json=body), bodies)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "InternalServerError"
        assert "the decoder failed" not in failed.text  # the cause goes to the server log only
        assert fine.status_code == 200 and fine.json() == {"items": [], "scores": [], "identifiers": []}
        assert metric(client, "decoding_serve_requests_total", 'route="/v1/recommendations",status="500"') == 1
        assert client.get("/health").status_code == 200
        batcher = app.state.batcher
        client.portal.call(lambda: batcher._worker.cancel())  # the worker stops
        wait_for(lambda: client.get("/health").status_code == 503, "/health to answer 503")
        stopped = client.post("/v1/recommendations", json=bodies[1])
        assert stopped.status_code == 503 and stopped.json()["error"]["type"] == "ServiceUnavailableError"


def test_the_api_key_stays_out_of_help_and_the_process_list(monkeypatch):
    from decoding.serving.cli import parser

    monkeypatch.setenv("DECODING_SERVE_API_KEY", "s3cret-key")
    assert "s3cret-key" not in parser().format_help()
