"""The TensorRT-LLM engine's side of the protocol, on the CPU, without TensorRT-LLM (no wheel installs here).

TensorRT-LLM's part is played by ``HFWorkers``: an HF ``transformers`` model that starts from random ("dummy")
weights, takes ``update_weights`` calls shaped as ``rlhf_utils.WorkerExtension`` takes them (a dict of GPU UUID
-> [(HF name, reduce_tensor handle)], each worker opening its own GPU's entry; ``None`` to finish) and answers
``generate`` with ``RequestOutput``-shaped objects.  What is shown: at TP=2 and at PP=2 the refit gives the engine the
policy's weights exactly, after the first refit and after the policy changed; the leader's rollouts reach
both ranks (the group of two: TP=2, or PP=2); the log-probs are the sampled tokens' (temperature-scaled) ones;
and the request mapping."""

import os
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import randomize_hf_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from megaprorl.models import convert as C  # noqa: E402
from megaprorl.rollout import SamplingParams  # noqa: E402
from megaprorl.rollout.trtllm_engine import TrtllmEngine, memory_tags, request_params, to_rollout  # noqa: E402

VOCAB, EOS = 100, 7
# the values of ExecutorMemoryType in the newer releases' llmapi.llm_args (the older ones lack the *_weights two)
MEMORY_TAGS = ["sampler", "drafter", "guided_decoder", "spec_resource_manager", "_no_capture_init_kv_cache",
               "_no_capture_init_extra_resources", "model_extra", "executor_extra", "kv_cache", "model", "draft_model",
               "model_weights", "draft_model_weights"]


def _config():
    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=EOS)


class HFWorkers:
    """Stands in for ``tensorrt_llm.LLM`` with the RLHF worker extension, on the GPUs (here: ids) it was given."""

    def __init__(self, gpus, uuids):
        torch.manual_seed(123)
        self.model = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="eager").float()
        self.uuids = [uuids[g] for g in gpus]
        self.calls = []
        self.shut = False
        self.released = set()  # the memory tags released by sleep; the weights' contents wait in self.backup
        self.backup = None
        self.submitted = 0
        self.events = []  # ("result", k) as a request's result is taken; the test adds ("finished", k)

    def shutdown(self):
        self.shut = True

    def _memory(self, method, tags):
        """``sleep`` / ``wakeup`` as TensorRT-LLM's workers take them (tag strings, checked against its
        ExecutorMemoryType); released weights hold garbage until woken, as unmapped memory would."""
        assert all(t in MEMORY_TAGS for t in tags), tags
        self.calls.append((method, list(tags)))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            if method == "sleep":
                assert not self.released & set(tags), f"{sorted(self.released & set(tags))} released twice"
                if "model" in tags:
                    self.backup = {k: p.clone() for k, p in params.items()}
                    for p in params.values():
                        p.fill_(float("nan"))
                self.released |= set(tags)
            else:
                assert set(tags) <= self.released, f"{sorted(set(tags) - self.released)} woken but not released"
                if "model" in tags:
                    for k, p in params.items():
                        p.copy_(self.backup[k])
                self.released -= set(tags)
        return [None] * len(self.uuids)

    def _collective_rpc(self, method, args=()):
        if method in ("sleep", "wakeup"):
            return self._memory(method, *args)
        assert method == "update_weights", method
        if "model" in self.released or "model_weights" in self.released:
            raise RuntimeError("an illegal memory access: update_weights into released weights")
        (handles,) = args
        self.calls.append(None if handles is None else sorted(handles))
        if handles is None:
            return [None] * len(self.uuids)
        params = dict(self.model.named_parameters())
        for uuid in self.uuids:  # every worker loads the full tensors of its own GPU's entry
            for name, (rebuild, rebuild_args) in handles[uuid]:
                with torch.no_grad():
                    params[name].copy_(rebuild(*rebuild_args))
        return [None] * len(self.uuids)

    def generate_async(self, inputs, sampling_params):
        """A request, decoded when its result is asked for (``RequestOutput.result()``), in the order asked."""
        if self.released:
            raise RuntimeError(f"an illegal memory access: generate with {sorted(self.released)} released")
        k = self.submitted
        self.submitted += 1

        def result():
            self.events.append(("result", k))
            return self._decode(inputs, sampling_params)

        return SimpleNamespace(result=result)

    @torch.no_grad()
    def _decode(self, inp, sp):
        g = torch.Generator().manual_seed(sp.seed)
        ids, lps, reason = list(inp["prompt_token_ids"]), [], "length"
        for _ in range(sp.max_tokens):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
            logp = torch.log_softmax(logits / sp.temperature, -1)
            tok = int(logp.argmax()) if sp.top_k == 1 else int(torch.multinomial(logp.exp(), 1, generator=g))
            top = int(logp.argmax())
            lps.append({top: SimpleNamespace(logprob=float(logp[top]), rank=1),
                        tok: SimpleNamespace(logprob=float(logp[tok]), rank=2)})
            ids.append(tok)
            if tok in sp.stop_token_ids:
                reason = "stop"
                break
        gen = ids[len(inp["prompt_token_ids"]):]
        return SimpleNamespace(prompt_token_ids=inp["prompt_token_ids"], outputs=[
            SimpleNamespace(token_ids=gen, logprobs=lps, finish_reason=reason)])


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def _job(rank, world, hf_dir):
    return {name: _one(rank, hf_dir, tp, pp) for name, (tp, pp) in LAYOUTS.items()}


def _one(rank, hf_dir, tp, pp):
    from megatron.core import parallel_state as mps

    from megaprorl.models.gpt import build_gpt
    from megaprorl.parallel import init_distributed

    init_distributed(tp, pp)
    hf_config = C.load_hf_config(hf_dir)
    mcfg = SimpleNamespace(**dict(dict(init_std=0.02, params_dtype="fp32", make_vocab_divisible_by=128,
                                       transformer_impl="local", attention="sdpa", fp8="", fp8_recipe="delayed",
                                       recompute_granularity=""), **C.model_config_from_hf(hf_config)))
    model = build_gpt(mcfg, SimpleNamespace(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=False),
                      VOCAB)
    C.load_hf_into_model(model, hf_dir, hf_config)
    uuids = {"0": "GPU-aaaa", "1": "GPU-bbbb"}
    started = []

    def start(gpus):
        started.append(gpus)
        return HFWorkers(gpus, uuids), False

    eng = TrtllmEngine(SimpleNamespace(model=model), hf_config, [EOS, 9], pad_id=0, bucket_mb=0.02, dtype=torch.float32,
                       start_llm=start, make_sampling=SimpleNamespace, device_uuid=uuids[str(rank)], gpu=str(rank),
                       max_seq_len=64, sleep_tags=memory_tags(MEMORY_TAGS))
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(temperature=0.7, max_new_tokens=6, n=2, seed=11)
    with pytest.raises(RuntimeError, match="dummy weights until update_weights"):
        eng.generate(prompts, params)
    out = {"leader": eng.is_leader, "started": started}
    eng.update_weights(0)
    if eng.is_leader:
        out["after_first"] = {k: v.clone() for k, v in eng.llm.model.state_dict().items()}
    eng.sleep()  # the trainer's turn: weights and KV cache released
    with pytest.raises(RuntimeError, match="engine is asleep \\(sampler, .*kv_cache released\\); call wake"):
        eng.generate(prompts, params)
    with torch.no_grad():  # the policy moves (the same change of a replicated tensor on both ranks)
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    eng.update_weights(1)  # wakes the weights alone, then writes into them
    with pytest.raises(RuntimeError, match="engine is asleep \\(kv_cache released\\)"):
        eng.generate(prompts, params)
    eng.wake()
    with pytest.raises(ValueError, match="a prompt of 3 tokens \\+ 62 new tokens exceeds the TensorRT-LLM engine's"):
        eng.generate(prompts, SamplingParams(max_new_tokens=62))
    out["buckets"] = eng.refit_buckets
    out["streamed"] = {n: t.clone() for b in eng.stream.buckets(1 << 30) for n, t in b}
    finished = []

    def on_finish(k, r):
        finished.append(k)
        if eng.is_leader:
            eng.llm.events.append(("finished", k))

    rollouts = eng.generate(prompts, params, on_finish=on_finish)
    out["rollouts"] = rollouts
    out["finished"] = finished
    if eng.is_leader:
        out["after_second"] = {k: v.clone() for k, v in eng.llm.model.state_dict().items()}
    # several calls submitted together (an evaluation's greedy and sampled sets): each as generate gives it
    greedy = SamplingParams(max_new_tokens=4, greedy=True)
    reported = {}
    out["many"] = eng.generate_many([(prompts, params), ([[7, 8]], greedy)],
                                    on_finish=lambda c, k, r: reported.setdefault((c, k), r))
    out["many_alone"] = eng.generate([[7, 8]], greedy)
    out["many_reported"] = sorted(reported)
    eng.sleep()  # and awake again with no refit between (an evaluation after a checkpoint): the weights are back
    eng.wake()
    out["after_nap"] = eng.generate(prompts, params)
    if eng.is_leader:
        out["calls"] = eng.llm.calls
        out["events"] = eng.llm.events
        workers = eng.llm

        def dies(*a, **k):
            raise RuntimeError("executor died")

        eng.llm.generate_async = dies
    # a failure on the leader reaches every rank of the group (none is left waiting on the broadcast)
    with pytest.raises(RuntimeError, match="failed on the group's leader \\(rank 0\\): RuntimeError: executor died"):
        eng.generate(prompts, params)
    eng.close()
    out["shut"] = workers.shut if eng.is_leader else None
    assert eng.llm is None
    mps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config()).float()
    randomize_hf_params(hf)
    hf_dir = str(tmp_path_factory.mktemp("trtllm") / "hf")
    hf.save_pretrained(hf_dir)
    return hf_dir, run_distributed(_job, world_size=2, args=(hf_dir,), timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_refit_gives_the_engine_the_policys_weights(ran, layout):
    hf_dir, ranks = ran
    r0, r1 = (r[layout] for r in ranks)
    assert r0["leader"] and not r1["leader"] and r0["started"] == [["0", "1"]] and r1["started"] == []
    assert r0["shut"]  # close() shut the leader's LLM down
    want = C.load_hf_state_dict(hf_dir)
    assert set(r0["after_first"]) == set(want)
    for k in want:
        assert torch.equal(r0["after_first"][k], want[k]), k
    moved = r0["streamed"]  # the policy after its change, as HF tensors
    assert any(not torch.equal(moved[k], want[k]) for k in want)
    for k in want:
        assert torch.equal(r0["after_second"][k], moved[k]), k
    # each refit: several 20 KB buckets, each with both GPUs' handles, then one call that finishes it
    memory = [k for k, c in enumerate(r0["calls"]) if isinstance(c, tuple)]
    calls = [c for c in r0["calls"] if not isinstance(c, tuple)]
    assert calls.count(None) == 2 and calls[-1] is None and r0["buckets"] == r1["buckets"] > 1
    assert all(c == ["GPU-aaaa", "GPU-bbbb"] for c in calls if c is not None)
    assert len(calls) == 2 * (r0["buckets"] + 1)
    # sleep: everything released after the first refit; the second refit woke the weights first, and wake()
    # the KV cache before the rollouts; then a sleep and a wake with no refit between
    weights, kv = memory_tags(MEMORY_TAGS)
    n = r0["buckets"] + 1
    assert [r0["calls"][k] for k in memory] == [("sleep", weights + kv), ("wakeup", weights), ("wakeup", kv),
                                                ("sleep", weights + kv), ("wakeup", weights), ("wakeup", kv)]
    assert memory[:3] == [n, n + 1, 2 * n + 2]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_engine_woken_without_a_refit_samples_as_before(ran, layout):
    _, ranks = ran
    for r in ranks:
        r = r[layout]
        assert [(x.response_ids, x.logprobs) for x in r["after_nap"]] == \
            [(x.response_ids, x.logprobs) for x in r["rollouts"]]


def test_memory_tags_and_the_sleep_argument_across_releases():
    """The tags asked for are those the release has; the LLM gets ``sleep_config`` (KV cache released without a
    backup) where the release has it, else ``enable_sleep``; a release with neither is named as such."""
    from megaprorl.rollout.trtllm_engine import TrtllmUnavailable, sleep_llm_kwargs

    weights, kv = memory_tags(MEMORY_TAGS)
    assert kv == ["kv_cache"] and "model" in weights and "model_weights" in weights
    assert not {"kv_cache", "_no_capture_init_kv_cache"} & set(weights)
    older = [t for t in MEMORY_TAGS if not t.endswith("_weights")]
    assert memory_tags(older)[0] == [t for t in weights if not t.endswith("_weights")]
    with pytest.raises(TrtllmUnavailable, match="lack 'kv_cache' or 'model': set rollout.trtllm_sleep=false"):
        memory_tags(["model", "sampler"])

    class SleepConfig:
        model_fields = {"restore_modes": None}

        def __init__(self, **kw):
            self.kw = kw

    newer = SimpleNamespace(TorchLlmArgs=SimpleNamespace(model_fields={"sleep_config": 0, "enable_sleep": 0}),
                            SleepConfig=SleepConfig, ExecutorMemoryType=SimpleNamespace(KV_CACHE="kv-enum"))
    assert sleep_llm_kwargs(newer)["sleep_config"].kw == {"restore_modes": {"kv-enum": "NONE"}}
    old = SimpleNamespace(TorchLlmArgs=SimpleNamespace(model_fields={"enable_sleep": 0, "backend": 0}))
    assert sleep_llm_kwargs(old) == {"enable_sleep": True}
    with pytest.raises(TrtllmUnavailable, match="takes neither sleep_config nor enable_sleep"):
        sleep_llm_kwargs(SimpleNamespace(LlmArgs=SimpleNamespace(model_fields={"backend": 0})))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rollouts_reach_every_rank_with_the_sampled_tokens_logprobs(ran, layout):
    hf_dir, ranks = ran
    r0, r1 = (r[layout] for r in ranks)
    rs = r0["rollouts"]
    assert [(r.prompt_index, r.response_ids, r.logprobs) for r in rs] == \
        [(r.prompt_index, r.response_ids, r.logprobs) for r in r1["rollouts"]]
    assert [r.prompt_index for r in rs] == [0, 0, 1, 1] and r0["finished"] == [0, 1, 2, 3]
    model = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="eager").float()
    model.load_state_dict(r0["streamed"], strict=False)
    if "lm_head.weight" not in r0["streamed"]:
        model.tie_weights()
    for r in rs:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0] / 0.7, -1)
        n = len(r.prompt_ids)
        want = [float(logp[n - 1 + i, t]) for i, t in enumerate(r.response_ids)]
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(want), atol=1e-5, rtol=0)
        assert r.finished == (r.response_ids[-1] in (EOS, 9)) and len(r.response_ids) <= 6
    assert rs[0].response_ids != rs[1].response_ids  # each sample its own seed
    for r in (r0, r1):  # generate_many: each call's rollouts as generate gives them, reported with call and place
        assert [(x.prompt_index, x.response_ids, x.logprobs) for x in r["many"][0]] == \
            [(x.prompt_index, x.response_ids, x.logprobs) for x in rs]
        assert [(x.prompt_index, x.response_ids) for x in r["many"][1]] == \
            [(x.prompt_index, x.response_ids) for x in r["many_alone"]]
        assert r["many_reported"] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    # the leader (where the trainer's verifiers run) hands each rollout on as soon as its result is in
    first = r0["events"][:8]
    assert first == [e for k in range(4) for e in (("result", k), ("finished", k))], first


def test_request_params_and_outputs():
    sp = SamplingParams(temperature=1.2, top_p=0.9, max_new_tokens=5, seed=3, n=4)
    kw = request_params(sp, 0, 2, [7, 9], 0)
    # every rollout of a call its own seed: two copies of one prompt must not draw the same response
    assert [request_params(sp, i, s, [7], 0)["seed"] for i in range(2) for s in range(4)] == list(range(3, 11))
    per_prompt = SamplingParams(n=2, seeds=[100, 7])  # per-prompt streams: (seed of the prompt, sample)
    assert [request_params(per_prompt, i, s, [7], 0)["seed"] for i in range(2) for s in range(2)] == [100, 101, 7, 8]
    assert kw["seed"] == 5 and kw["temperature"] == 1.2 and kw["top_p"] == 0.9 and kw["top_k"] == 0
    assert kw["stop_token_ids"] == [7, 9] and kw["include_stop_str_in_output"] and kw["end_id"] == -1
    assert kw["max_tokens"] == 5 and kw["n"] == 1 and kw["logprobs"] == 1 and kw["pad_id"] == 0
    greedy = request_params(SamplingParams(greedy=True), 0, 0, [7], 0)
    assert greedy["top_k"] == 1
    # the simple format (one float per token) and the dict format (top-1 and the sampled token)
    done = to_rollout(0, [1], SimpleNamespace(token_ids=[4, 7], logprobs=[-0.5, -0.25], finish_reason="stop"), [7])
    assert done.finished and done.logprobs == [-0.5, -0.25] and done.extra["finish_reason"] == "stop"
    cut = to_rollout(0, [1], SimpleNamespace(token_ids=[4], logprobs=[{4: SimpleNamespace(logprob=-1.5)}],
                                             finish_reason="length"), [7])
    assert not cut.finished and cut.logprobs == [-1.5]
    with pytest.raises(RuntimeError, match="no log-prob for the sampled token 4"):
        to_rollout(0, [1], SimpleNamespace(token_ids=[4], logprobs=[{5: SimpleNamespace(logprob=-1.0)}]), [7])
    with pytest.raises(RuntimeError, match="left its stop token out of token_ids"):
        to_rollout(0, [1], SimpleNamespace(token_ids=[4], logprobs=[-1.0], finish_reason="stop", stop_reason=7), [7])
    with pytest.raises(RuntimeError, match="1 log-probs for 2 tokens"):
        to_rollout(0, [1], SimpleNamespace(token_ids=[4, 5], logprobs=[-1.0]), [7])


def test_config_checks(monkeypatch):
    """With TensorRT-LLM present (its import spec faked), engine=trtllm loads, and what it cannot do is named."""
    import importlib.machinery
    import importlib.util
    import os

    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "tensorrt_llm" else find_spec(name, *a))
    cfg = load_config(demo, ["rollout.engine=trtllm", "algo.old_logprobs=engine", "rollout.top_p=1.0"])
    assert cfg.rollout.engine == "trtllm" and cfg.rollout.trtllm_bucket_mb == 1024
    with pytest.raises(ConfigError, match="'algo.old_logprobs': 'engine' with rollout.engine=trtllm needs "
                                          "rollout.top_p=1"):
        load_config(demo, ["rollout.engine=trtllm", "algo.old_logprobs=engine", "rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="'rollout.cuda_graphs': graphs the embedded engine's decode step"):
        load_config(demo, ["rollout.engine=trtllm", "rollout.cuda_graphs=true", "rollout.decode_attention=triton"])
    with pytest.raises(ConfigError, match="'rollout.max_new_tokens': 4096 leaves no room for a prompt"):
        load_config(demo, ["rollout.engine=trtllm", "rollout.max_new_tokens=4096", "model.max_position_embeddings=4096"])
    with pytest.raises(ConfigError, match="'rollout.trtllm_kv_cache_fraction': must be in \\(0, 1\\)"):
        load_config(demo, ["rollout.engine=trtllm", "rollout.trtllm_kv_cache_fraction=0"])


def test_processed_logprobs_mode_across_releases(monkeypatch):
    """The enum of releases that have ``LogprobMode``, vLLM's string where ``logprobs_mode`` is a plain field,
    and a clear error where there is none."""
    import dataclasses
    import sys
    import types

    from megaprorl.rollout.trtllm_engine import TrtllmUnavailable, processed_logprobs_mode

    @dataclasses.dataclass
    class WithField:
        logprobs_mode: str = "raw_logprobs"

    @dataclasses.dataclass
    class Without:
        temperature: float = 1.0

    sp_module = types.ModuleType("tensorrt_llm.sampling_params")
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    monkeypatch.setitem(sys.modules, "tensorrt_llm.sampling_params", sp_module)
    assert processed_logprobs_mode(SimpleNamespace(SamplingParams=WithField)) == "processed_logprobs"
    with pytest.raises(TrtllmUnavailable, match="has no SamplingParams.logprobs_mode"):
        processed_logprobs_mode(SimpleNamespace(SamplingParams=Without, __version__="1.0"))
    sp_module.LogprobMode = SimpleNamespace(PROCESSED="enum-processed")
    assert processed_logprobs_mode(SimpleNamespace(SamplingParams=Without)) == "enum-processed"


def _leader(rank, world, groups):
    """One group's leader: ``_start_llm`` with TensorRT-LLM's Ray executor played by what it does with Ray (attach
    to the initialised Ray, no CUDA_VISIBLE_DEVICES set by Ray, the driver's environment copied to each worker)."""
    import sys
    import types

    import ray

    from megaprorl.rollout import trtllm_engine as TE

    class Probe:  # defined here, so that Ray ships it to its workers by value
        """What TensorRT-LLM's Ray GPU worker does to find its GPU (``ray_gpu_worker.RayWorkerWrapper``, as its
        source reads): the physical id Ray gave it, mapped to a local index through the CUDA_VISIBLE_DEVICES it
        inherited."""

        def place(self):
            gpu = int(ray.get_gpu_ids()[0])
            visible = [int(v) for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
            return gpu, visible.index(gpu)

    class LLM:
        def __init__(self, tensor_parallel_size, **kw):
            ray.init(address="auto", ignore_reinit_error=True, include_dashboard=False)
            os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
            env = {"env_vars": os.environ.copy()}
            probe = ray.remote(Probe)
            workers = [probe.options(num_gpus=1, runtime_env=env).remote() for _ in range(tensor_parallel_size)]
            self.placed = sorted(ray.get([w.place.remote() for w in workers]))
            self.kw = kw

        def shutdown(self):
            pass

    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = dict
    sys.modules["tensorrt_llm"] = types.ModuleType("tensorrt_llm")
    sys.modules["tensorrt_llm.llmapi"] = llmapi
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"  # the node's GPUs, as torchrun's ranks see them
    llm, own_ray = TE._start_llm(SimpleNamespace(LLM=LLM), "/hf", groups[rank], torch.bfloat16, 8, 64, 0.3)
    out = dict(placed=llm.placed, own_ray=own_ray, visible_after=os.environ["CUDA_VISIBLE_DEVICES"],
               dtype=llm.kw["dtype"], load_format=llm.kw["load_format"])
    ray.shutdown()
    return out


def test_each_groups_workers_land_on_its_gpus():
    """Two groups' leaders on one node at once, each with a private Ray instance (real Ray, GPUs as Ray resources):
    the workers of each land on that group's GPUs, at the local index TensorRT-LLM's worker derives, and the
    leader's CUDA_VISIBLE_DEVICES is back as it was."""
    pytest.importorskip("ray", reason="pip install ray (the trtllm and dev extras)")
    groups = [["0", "1"], ["2", "3"]]
    r = run_distributed(_leader, world_size=2, args=(groups,), timeout=300)
    assert r[0]["placed"] == [(0, 0), (1, 1)] and r[1]["placed"] == [(2, 0), (3, 1)]
    assert all(x["own_ray"] and x["visible_after"] == "0,1,2,3" for x in r)
    assert r[0]["dtype"] == "bfloat16" and r[0]["load_format"] == "dummy"
