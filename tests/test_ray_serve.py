"""``decoding-serve`` on Ray Serve as a user runs it: a local Ray cluster (``ray start --head``),
then the documented ``serve run CONFIG`` (docs/ray-serve.yaml, its paths pointed at a tiny model
and catalog) as a subprocess, two replicas, driven by a real HTTP client through Serve's proxy.
Answers are judged against ``decoding.beam_search`` in-process on the same weights; the replicas
are told apart by the ``x-decoding-replica`` header; a replica is killed under load with
``ray.kill`` and Serve replaces it. Everything started here is stopped at the end, by process id."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SID_VOCAB, need, saved_catalog

ray = need("ray")
httpx = need("httpx")
with warnings.catch_warnings():  # Ray Serve's own pydantic models use what pydantic 2 deprecated, at import
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    from ray import serve

from decoding.testing.exactness import ExactReference  # noqa: E402
from decoding.testing.serving import free_port  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
CONFIG = DOCS / "ray-serve.yaml"
APP, DEPLOYMENT = "decoding", "DecodingServe"
K = 8


def _bin(name: str) -> str:
    """A console script of this Python's environment (``ray``, ``serve``)."""
    path = pathlib.Path(sys.executable).with_name(name)
    return str(path) if path.exists() else shutil.which(name)


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat``'s fields after the command name (Linux): [state, ppid, ...]."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """The processes below ``pid`` (what the Ray head started), each with its start time, so that
    a process id reused later is never taken for one of them."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(int(stat[1]), []).append((int(entry.name), stat[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _stop(proc: subprocess.Popen, sig: int, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: pathlib.Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait(condition, what: str, timeout_s: float, logs=()):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(_tail(p) for p in logs))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return saved_catalog(tmp_path_factory, "ray_serve_catalogs", 3000, seed=13)


@pytest.fixture(scope="module")
def hf_model(served_hf_model):
    return served_hf_model


def _config(served_model_dir, catalog, port: int) -> str:
    """docs/ray-serve.yaml with its paths pointed at the test's model and catalog, its port free
    and its replicas small (two of them on this machine's 2 CPUs)."""
    import yaml

    text = CONFIG.read_text()
    assert text.count("/srv/my-recommender") == 1 and text.count("items=/srv/items.trie") == 1
    config = yaml.safe_load(text.replace("/srv/my-recommender", served_model_dir)
                            .replace("items=/srv/items.trie", f"items={catalog['path']}"))
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    assert app["name"] == APP and app["import_path"] == "decoding.integrations.ray_serve:app_builder"
    (deployment,) = app["deployments"]
    assert deployment["name"] == DEPLOYMENT and deployment["num_replicas"] == 2
    deployment["ray_actor_options"]["num_cpus"] = 0.25
    path = catalog["root"] / "ray-serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_argv_is_decoding_serves_command_line_and_what_serve_sets_is_refused():
    """No cluster: the builder's argument check. Options Serve's config sets are refused whenever
    given (even at decoding-serve's default), and a refusal never repeats argv (an API key)."""
    from decoding.integrations.ray_serve import app_builder, parse_argv

    args = parse_argv("--model /m --catalog items=/c --draft-layers 1")
    assert (args.model, args.catalog, args.draft_layers) == ("/m", [("items", "/c")], 1)
    for flag in ("--host=127.0.0.1", "--port", "--shutdown-timeout-s"):
        with pytest.raises(ValueError, match=flag.split("=")[0]):
            parse_argv(["--model", "/m", "--catalog", "a=/c", flag, *([] if "=" in flag else ["8000"])])
    with pytest.raises(ValueError) as refused:
        parse_argv(["--model", "/m", "--catalog", "a=/c", "--api-key", "SECRET-KEY", "--no-such-flag"])
    assert "SECRET-KEY" not in str(refused.value)
    with pytest.raises(ValueError, match="argv"):
        app_builder({"argv": ["--model", "/m"], "extra": 1})


def test_the_page_shows_the_config_the_test_runs():
    """docs/ray-serve.md shows docs/ray-serve.yaml as it is."""
    page = (DOCS / "ray-serve.md").read_text()
    assert f"```yaml\n{CONFIG.read_text()}```" in page


def _replica_states():
    app = serve.status().applications.get(APP)
    return dict(app.deployments[DEPLOYMENT].replica_states) if app and DEPLOYMENT in app.deployments else {}


@pytest.fixture(scope="module")
def cluster(served_model_dir, catalog):
    """A Ray head (``ray start --head --block``, 2 CPUs, its own temp dir and ports), then
    ``serve run CONFIG`` on it; yields an HTTP client of Serve's proxy once both replicas run.
    This process connects to the cluster as a driver (``ray.kill``, ``serve.status``). On exit:
    ``serve run`` gets Ctrl-C (it shuts Serve down), the driver disconnects, the head gets SIGTERM,
    and any process it started that is still alive is killed by its id."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live below it
    logs = catalog["root"]
    head_log, serve_log = logs / "ray-head.log", logs / "serve-run.log"
    gcs, http = free_port(), free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("TRITON_INTERPRET", None)  # a test session's setting
    head = serve_run = None
    started: list[tuple[int, str]] = []
    try:
        with open(head_log, "w") as log:
            head = subprocess.Popen(
                [_bin("ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
                 "--include-dashboard=false", f"--dashboard-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                 f"--temp-dir={temp}", "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, env=env)
        _wait(lambda: head.poll() is not None or "Ray runtime started" in _tail(head_log, 100_000),
              "the Ray head", 120, [head_log])
        assert head.poll() is None, _tail(head_log)
        address = f"127.0.0.1:{gcs}"
        with open(serve_log, "w") as log:  # the documented command, on this cluster
            serve_run = subprocess.Popen([_bin("serve"), "run", _config(served_model_dir, catalog, http),
                                          f"--address={address}"], stdout=log, stderr=subprocess.STDOUT, env=env)
        ray.init(address=address, namespace="serve", log_to_driver=False, logging_level="warning")

        def both_running():
            assert serve_run.poll() is None, _tail(serve_log)
            return _replica_states() == {"RUNNING": 2}

        _wait(both_running, "two running replicas", 180, [serve_log])
        with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=120,
                          limits=httpx.Limits(max_connections=64)) as client:
            _wait(lambda: client.get("/health").status_code == 200, "the proxy's route", 60, [serve_log])
            yield client
    finally:
        if head is not None:
            started = _descendants(head.pid)
        if serve_run is not None:
            _stop(serve_run, signal.SIGINT, 60)  # Ctrl-C: `serve run` shuts Serve down, then exits
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            _stop(head, signal.SIGTERM, 60)
        for pid, start in started:
            stat = _stat(pid)
            if stat is not None and stat[19] == start:  # still the process the head started
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def random_prompts(n, seed, low=4, high=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g)
    return [torch.randint(8, SID_VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def _judged(judge, b, answer, near_ties):
    kind = judge.check(b, answer["items"], answer["scores"])
    assert kind != "wrong", (b, answer, judge.items[b])
    if kind == "near-tie":
        near_ties.append(b)


def test_two_replicas_answer_as_in_process_beam_search(cluster, catalog, hf_model):
    """32 concurrent /v1/recommendations requests (every other one excluding items) through Serve's
    proxy: each answer is decoding.beam_search's on the same weights in-process (items in order,
    scores within 1e-4; a near-tie as docs/exactness.md defines it, at most two), both replicas
    answered, and the OpenAI route is the same server's."""
    client = cluster
    trie, prompts = catalog["trie"], random_prompts(32, seed=21)
    exclude = [[] if b % 2 else [b, 100 + b, 2999 - b] for b in range(len(prompts))]
    bodies = [{"catalog": "items", "prompt_token_ids": p, "k": K, "exclude_items": x} for p, x in zip(prompts, exclude)]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/recommendations", json=body), bodies))
    judge = ExactReference(hf_model, prompts, trie, K, catalog["seqs"], exclude_items=exclude)
    near_ties, replicas = [], set()
    for b, response in enumerate(responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert not set(answer["items"]) & set(exclude[b])
        assert trie.lookup(torch.tensor(answer["identifiers"])).tolist() == answer["items"]
        _judged(judge, b, answer, near_ties)
        replicas.add(response.headers["x-decoding-replica"])
    assert len(near_ties) <= 2, near_ties
    for _ in range(100):  # the proxy picks a replica per request: the other one answers soon
        if len(replicas) == 2:
            break
        replicas.add(client.post("/v1/recommendations", json=bodies[0]).headers["x-decoding-replica"])
    assert len(replicas) == 2, replicas
    body = {"model": client.get("/v1/models").json()["data"][0]["id"], "prompt": prompts[1], "n": K,
            "use_beam_search": True, "max_tokens": 4, "temperature": 0.0, "return_token_ids": True, "logprobs": 0,
            "length_penalty": 0.0, "vllm_xargs": {"decoding_catalog": "items"}}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    answer = {"items": trie.lookup(torch.tensor([c["token_ids"] for c in choices])).tolist(),
              "scores": [sum(c["logprobs"]["token_logprobs"]) for c in choices]}
    _judged(judge, 1, answer, near_ties)


def test_a_replica_killed_under_load_is_replaced_and_no_answer_is_wrong(cluster, catalog, hf_model, record_property):
    """Four clients send requests without pause; one replica's actor is killed with ``ray.kill``.
    Serve starts another (a new replica id answers; two replicas run again). Requests the kill
    cuts off may fail (counted), but every answer that comes is exact."""
    client = cluster
    trie, prompts = catalog["trie"], random_prompts(6, seed=22)
    judge = ExactReference(hf_model, prompts, trie, K, catalog["seqs"])
    answers, failures, stop = [], [], threading.Event()

    def send(worker):
        b = worker
        while not stop.is_set():
            b = (b + 1) % len(prompts)
            try:
                response = client.post("/v1/recommendations",
                                       json={"catalog": "items", "prompt_token_ids": prompts[b], "k": K})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code == 200:
                answers.append((time.monotonic(), response.headers["x-decoding-replica"], b, response.json()))
            else:
                failures.append(response.status_code)

    with ThreadPoolExecutor(4) as pool:
        senders = [pool.submit(send, w) for w in range(4)]
        try:
            _wait(lambda: len({replica for _, replica, _, _ in answers}) == 2, "both replicas answering", 60)
            before = {replica for _, replica, _, _ in answers}
            victim = answers[-1][1]
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{victim}", namespace="serve"),
                     no_restart=True)
            killed_at = time.monotonic()
            _wait(lambda: any(replica not in before for _, replica, _, _ in answers) and
                  _replica_states() == {"RUNNING": 2}, "a new replica answering", 120)
        finally:
            stop.set()
            for sender in senders:
                sender.result()
    replaced = {replica for at, replica, _, _ in answers if at > killed_at} - before
    assert len(replaced) == 1, replaced
    assert not [a for a in answers if a[1] == victim and a[0] > killed_at + 5], "the killed replica still answers"
    assert all(f in (500, 502, 503, 504) or isinstance(f, str) for f in failures), failures
    near_ties = []
    for _, _, b, answer in answers:
        _judged(judge, b, answer, near_ties)
    assert len(set(near_ties)) <= 1, near_ties  # a prompt whose top-K holds a near-tie
    record_property("answers", f"{len(answers)} answers; {len(failures)} failed around the kill: {failures[:10]}")
