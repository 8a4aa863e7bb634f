"""The spine: config errors, the embedded engine against the policy, and full RL steps on CPU."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megaprorl.config import ConfigError, load_config
from tiny_models import tiny_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")


# ----------------------------------------------------------------------------------------- config
def test_config_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["algo.kl.cof=1e-3"])
    assert "algo.kl.cof" in str(e.value) and "algo.kl.coef" in str(e.value)


def test_config_misspelled_key_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(p) in str(e.value) and "train.stepz" in str(e.value) and "train.steps" in str(e.value)


def test_config_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.steps=many"])
    msg = str(e.value)
    assert "train.steps" in msg and msg.endswith("(expected an integer)")
    # the key's own declared type (omegaconf names the section the key is in)
    for override, expected in (("algo.loss.dual_clip=x", "a number or null"), ("eval.ks=[a]", "an integer"),
                               ("logging.tensorboard=maybe", "true or false"),
                               ("data.sources=3", "a list of mappings of DataSourceConfig's keys")):
        with pytest.raises(ConfigError, match=re.escape(f"(expected {expected})")):
            load_config(DEMO, [override])
    # inside a list's entry: the entry named with its index
    with pytest.raises(ConfigError, match=re.escape("bad value for 'data.sources[1].weight': Value 'heavy'")):
        load_config(DEMO, ["data.sources=[{name: a, path: x.jsonl}, {name: b, path: y.jsonl, weight: heavy}]"])
    with pytest.raises(ConfigError, match=re.escape("bad value for 'eval.sets[0].ks[0]'")):
        load_config(DEMO, ["eval.sets=[{name: a, path: x.jsonl, ks: [x]}]"])


def test_config_semantic_errors():
    with pytest.raises(ConfigError, match="algo.kl.estimator"):
        load_config(DEMO, ["algo.kl.estimator=k4"])
    with pytest.raises(ConfigError, match="train.mini_batch_prompts"):
        load_config(DEMO, ["train.mini_batch_prompts=48"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")
    with pytest.raises(ConfigError, match="'rollout.engine': 'trtllm' needs TensorRT-LLM, which is not installed: pip"):
        load_config(DEMO, ["rollout.engine=trtllm"])  # not installable on these machines
    with pytest.raises(ConfigError, match="'rollout.engine': must be 'megatron' or 'trtllm'"):
        load_config(DEMO, ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="rollout.trtllm_engine_dir"):  # no key that nothing reads
        load_config(DEMO, ["rollout.trtllm_engine_dir=/x"])
    with pytest.raises(ConfigError, match="model.rope_scaling.*'dynamic' is not supported"):
        load_config(DEMO, ["model.rope_scaling.rope_type=dynamic"])
    from megaprorl.models.rope import rope_scaling_spec

    with pytest.raises(ValueError, match="HF config: yarn with attention_factor=2.0"):  # not the derived 1.139
        rope_scaling_spec({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                           "attention_factor": 2.0}, "HF config")
    with pytest.raises(ConfigError, match="model.rope_scaling.*factor must be > 0"):
        load_config(DEMO, ["model.rope_scaling={rope_type: linear, factor: 0}"])
    with pytest.raises(ConfigError, match="model.rope_scaling.factr"):
        load_config(DEMO, ["model.rope_scaling.factr=2"])
    # the model's choices are checked with the config, not when the model is built (a typo in a 16K recipe
    # must not surface after the job has queued and loaded)
    for key, bad in (("params_dtype", "fp64"), ("transformer_impl", "te"), ("attention", "flash"),
                     ("recompute_granularity", "ful"), ("fp8", "e5m2"), ("fp8_recipe", "mxfp8")):
        with pytest.raises(ConfigError, match=f"'model.{key}': must be one of .*, got '{bad}'"):
            load_config(DEMO, [f"model.{key}={bad}"])
    with pytest.raises(ConfigError, match="'model.fp8': needs the TransformerEngine layer spec"):
        load_config(DEMO, ["model.fp8=hybrid", "model.transformer_impl=local"])
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match=r"'model.fp8': needs TransformerEngine, which is not installed: pip"):
            load_config(DEMO, ["model.fp8=hybrid"])

    assert rope_scaling_spec(load_config(DEMO).model.rope_scaling) == {}  # none by default
    cfg = load_config(DEMO, ["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=32"])  # Llama-3.2's
    assert rope_scaling_spec(cfg.model.rope_scaling) == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}
    cfg = load_config(DEMO, ["model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4",
                             "model.rope_scaling.original_max_position_embeddings=32768"])  # Qwen3's 131K
    assert rope_scaling_spec(cfg.model.rope_scaling) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.0, "mscale_all_dim": 0.0, "truncate": True}


def test_config_ranges_are_checked_before_use():
    """Every key of the ranges table refuses the value just outside its range, naming the key (before, a zero
    count divided by zero or looped forever inside the trainer, a negative one ran silently); the lowest value
    allowed passes the range check (the keys' other rules, such as heads dividing the hidden size, aside)."""
    import copy

    from megaprorl.config import _RANGES, _check_ranges, validate

    base = load_config(DEMO)

    def check(key, value, ranges_only=False):
        cfg = copy.deepcopy(base)
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
        if ranges_only:
            _check_ranges(cfg, lambda ok, k, msg: None if ok else pytest.fail(f"{k}: {msg}"))
        else:
            validate(cfg)

    for key, low, inclusive, _ in _RANGES:
        with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}': must be {'>=' if inclusive else '>'}"):
            check(key, low - 1 if inclusive else low)
        if inclusive:
            check(key, low, ranges_only=True)
    for key, bad in (("train.optim.adam_beta2", 1.0), ("algo.reference_reset.kl_ema", -0.1), ("eval.top_p", 0),
                     ("algo.loss.eps_low", 1.0), ("algo.loss.dual_clip", 1.0), ("data.builtin_max_digits", 0)):
        with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
            check(key, bad)
    with pytest.raises(ConfigError, match=re.escape("'eval.ks': pass@k needs k samples of each prompt: every k must "
                                                    "be <= eval.samples_per_prompt=2, got [1, 4]")):
        load_config(DEMO, ["eval.samples_per_prompt=2", "eval.ks=[1,4]"])  # (pass@4 was left out silently)
    with pytest.raises(ConfigError, match=re.escape("'eval.sets[0].ks': pass@k needs k samples")):
        load_config(DEMO, ["eval.sets=[{name: a, path: x.jsonl, samples_per_prompt: 4, ks: [8]}]"])
    load_config(DEMO, ["eval.sets=[{name: a, path: x.jsonl, samples_per_prompt: 8, ks: [8]}]"])
    with pytest.raises(ConfigError, match="'rollout.n_samples': must be >= 2, got 1: the advantages are taken"):
        load_config(DEMO, ["rollout.n_samples=1"])  # (every group was dropped as without signal, or trained as 0)
    with pytest.raises(ConfigError, match="config key 'train.micro_batch_size': must be >= 1, got 0"):
        load_config(DEMO, ["train.micro_batch_size=0"])  # through an override too
    for src, key in (("{name: a, path: x.jsonl, weight: -1}", "data.sources[0].weight"),
                     ("{name: a, type: reasoning_gym, task: t, size: 0}", "data.sources[0].size")):
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': must be >= ")):
            load_config(DEMO, [f"data.sources=[{src}]"])
    with pytest.raises(ConfigError, match="config key 'data.sources': the weights must not all be 0"):
        load_config(DEMO, ["data.sources=[{name: a, path: x.jsonl, weight: 0}, {name: b, path: y.jsonl, weight: 0}]"])


def test_overrides_apply():
    cfg = load_config(DEMO, ["algo.loss.eps_high=0.4", "rollout.n_samples=4"])
    assert cfg.algo.loss.eps_high == 0.4 and cfg.rollout.n_samples == 4
    # an empty value is the empty string for a string key (omegaconf would read null, which it refuses)
    cfg = load_config(DEMO, ["algo.rollout_correction.level=token", "algo.rollout_correction.level="])
    assert cfg.algo.rollout_correction.level == ""
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(DEMO, ["train.steps="])


# ----------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def _prompts(tok):
    return [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1=", "5+5="]]


def test_sampling_is_deterministic_under_a_seed(policy):
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    a = eng.generate(_prompts(tok), params)
    b = eng.generate(_prompts(tok), params)
    c = eng.generate(_prompts(tok), SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=12))
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.response_ids for r in a] != [r.response_ids for r in c]
    assert len(a) == 15 and [r.prompt_index for r in a[:6]] == [0, 0, 0, 1, 1, 1]


def test_per_prompt_seeds_make_a_prompts_samples_independent_of_the_call(policy):
    """With ``SamplingParams.seeds`` a prompt's samples are a function of its own seed: the same alone, among other
    prompts, or at another position; one seed per prompt, or a clear error."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=4)
    prompts, seeds = _prompts(tok), [5, 6, 7, 8, 9]

    def draw(idx):
        out = eng.generate([prompts[i] for i in idx], SamplingParams(temperature=1.5, max_new_tokens=6, n=3,
                                                                     seeds=[seeds[i] for i in idx]))
        return _by_prompt(out, idx)

    every = draw([0, 1, 2, 3, 4])
    assert draw([3]) == {3: every[3]} and draw([4, 1]) == {4: every[4], 1: every[1]}
    assert all(len(set(v)) > 1 for v in every.values())  # a prompt's samples differ
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        eng.generate(prompts, SamplingParams(seeds=[1, 2]))


def _by_prompt(rollouts, idx):
    out = {}
    for r in rollouts:
        out.setdefault(idx[r.prompt_index], []).append(tuple(r.response_ids))
    return out


def test_engine_logprobs_equal_teacher_forced(policy):
    """fp32, temperature 1: the engine's sampling log-probs (KV cache, left padding), laid out as the trainer's
    log-prob passes give them (``engine_logprobs``, what algo.old_logprobs=engine trains with), equal the policy's
    teacher-forced log-probs (one full forward, right padding) within 1e-4, and are 0 outside the responses."""
    from megaprorl.policy import build_seq_batch
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine
    from megaprorl.trainer import engine_logprobs

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=7)
    for temperature, n, budget, seed in ((1.0, 4, 8, 3), (0.7, 2, 5, 4)):  # temperature applied alike on both sides
        rolls = eng.generate(_prompts(tok), SamplingParams(temperature=temperature, max_new_tokens=budget, n=n,
                                                           seed=seed))
        batch = build_seq_batch([r.prompt_ids for r in rolls], [r.response_ids for r in rolls], tok.pad_id)
        lp = pol.logprobs(batch, micro_batch_size=5, temperature=temperature)
        got, m = engine_logprobs(rolls, batch), batch.loss_mask.bool()
        assert int(m.sum()) == sum(len(r.response_ids) for r in rolls) > 40
        assert not got[~m].any()
        torch.testing.assert_close(got[m], lp[m], atol=1e-4, rtol=0)


def test_greedy_stops_at_eos_and_top_p_restricts(policy):
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine, _top_p_filter

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id)
    for r in eng.generate(_prompts(tok), SamplingParams(max_new_tokens=6, greedy=True)):
        assert len(r.response_ids) <= 6
        assert r.finished == (tok.eos_id in r.response_ids)
        if r.finished:
            assert r.response_ids[-1] == tok.eos_id
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(_top_p_filter(p, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_microbatch_split_does_not_change_the_update(policy):
    """The token-mean over the global batch: one update is the same for 1 or 3 micro-batches."""
    import copy

    from megaprorl.algo.loss import LossSpec, aggregation_weights
    from megaprorl.policy import build_seq_batch

    pol, tok = policy
    g = torch.Generator().manual_seed(0)
    prompts = _prompts(tok) * 2
    resp = [torch.randint(2, tok.vocab_size, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (10,), generator=g)]
    batch = build_seq_batch(prompts, resp, tok.pad_id)
    batch.old_logp = pol.logprobs(batch, 4) + 0.1 * torch.randn(batch.loss_mask.shape, generator=g)
    batch.ref_logp = batch.old_logp + 0.05
    batch.advantages = torch.randn(batch.loss_mask.shape, generator=g) * batch.loss_mask
    batch.weights = aggregation_weights(batch.loss_mask, "token-mean", float(batch.loss_mask.sum()), len(batch))
    spec = LossSpec(kl_coef=0.1)
    grads = []
    state = copy.deepcopy(pol.model.state_dict())
    for mbs in (10, 3):
        pol.model.load_state_dict(state)
        pol.reset_optimizer()
        pol.optimizer.step_with_ready_grads = lambda: True  # keep the weights; compare gradients
        s = pol.train_step(batch, spec, micro_batch_size=mbs)
        grads.append(torch.cat([p.grad.reshape(-1) for p in pol.model.parameters() if p.grad is not None]))
        assert s["skipped_update"] == 0.0
    pol.model.load_state_dict(state)
    pol.reset_optimizer()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------- RL run
def _run_cli(args, tmp_path, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "megaprorl.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY = ["warmstart.steps=20", "train.steps=2", "train.prompts_per_step=8", "train.mini_batch_prompts=4",
        "rollout.n_samples=4", "eval.n_prompts=16", "logging.progress=false", "model.num_layers=1",
        "model.hidden_size=64", "model.ffn_hidden_size=128"]


def test_full_rl_steps_end_to_end(tmp_path):
    """Two RL steps from the CLI: warm-start, evaluation, rollouts, rewards, updates, run directory; then a
    second stage resuming the checkpoint under another config."""
    # (with TIS at the sequence level: the embedded engine's log-probs are the trainer's, so every weight is ~1)
    # (and a learning rate warming up over 2 steps then decaying: 1e-3 at step 1, 2e-3 at step 2)
    r = _run_cli(["train", DEMO, f"output_dir={tmp_path}", "name=run", *TINY, "algo.rollout_correction.level=sequence",
                  "train.optim.lr=2e-3", "train.optim.lr_warmup_steps=2", "train.optim.lr_decay_style=cosine",
                  "train.optim.lr_decay_steps=4"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^policy: [\d.]+M parameters, .*layer spec.*, TP=1 PP=1, (cpu|cuda)$", r.stdout, re.M), r.stdout
    assert "not installed. Falling back" not in r.stderr  # Megatron's import-time fallback warnings are quiet
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "reward" in x]
    assert [x["step"] for x in steps] == [1, 2]
    assert [x["lr"] for x in steps] == pytest.approx([1e-3, 2e-3])
    for key in ("reward", "entropy", "kl_ref", "clip_frac_low", "clip_frac_high", "approx_kl_old", "grad_norm",
                "response_length", "dynamic_sampling/discarded_frac", "time/rollout_s", "time/update_s"):
        assert key in steps[0], key
    assert steps[0]["rollout/logprob_mismatch"] < 1e-4
    assert steps[0]["rollout/mismatch_k3"] < 1e-8 and abs(steps[0]["rollout_correction/weight_mean"] - 1) < 1e-3
    assert steps[0]["rollout_correction/truncated_frac"] == 0.0
    assert steps[0]["time/rollout_tokens_per_s"] > 0 and steps[0]["rollout/decode_steps"] >= 1
    assert 0 < steps[0]["rollout/row_utilisation"] <= 1
    assert steps[0]["optimizer_steps"] == 2.0
    # what the trainer process and its reward workers hold on the host (a leak shows as a slope over a long run)
    assert 0 < steps[0]["memory/host_rss_gib"] < 8 and 0 < steps[0]["memory/reward_workers_rss_gib"] < 8
    assert steps[0]["host/open_fds"] > 3 and steps[0]["host/threads"] >= 1 and steps[0]["host/descendants"] >= 1
    assert (run / "config.yaml").exists() and (run / "curves.png").stat().st_size > 1000
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert "held-out greedy accuracy before RL" in r.stdout
    ck = run / "checkpoints" / "step_00000002"
    assert (ck / "COMPLETE").exists() and (ck / "rank_00000.pt").exists()
    # a later stage as a run of its own (ProRL v1's last steps at a longer context): another config resumes
    # this checkpoint in its own run directory and goes on from step 3 with its own response budget
    # (and it trains with the engine's log-probs as the old policy's: no recompute, so no mismatch to log;
    # with GSPO-token's sequence-level ratios, whose second mini-batch has ratios off 1)
    r = _run_cli(["train", DEMO, f"output_dir={tmp_path}", "name=stage2", *TINY, "train.steps=3",
                  "rollout.max_new_tokens=9", f"checkpoint.resume={ck}", "algo.old_logprobs=engine",
                  "algo.loss.ratio_level=sequence", "train.optim.lr=2e-3", "train.optim.lr_warmup_steps=2",
                  "train.optim.lr_decay_style=cosine", "train.optim.lr_decay_steps=4"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {ck} at step 2" in r.stdout
    later = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in later if "reward" in x] == [3]
    assert [x["lr"] for x in later if "reward" in x] == pytest.approx([1e-3])  # the schedule at step 3: half way down
    assert all("rollout/logprob_mismatch" not in x and "rollout_correction/ess" not in x and "approx_kl_old" in x
               for x in later if "reward" in x)
    assert max(x.get("response_length", 0) for x in later) > 5  # past the first stage's budget of 5
    assert (tmp_path / "stage2" / "checkpoints" / "step_00000003" / "COMPLETE").exists()


def test_cli_reports_config_errors(tmp_path, capsys):
    r = _run_cli(["train", DEMO, "algo.kl.cof=1"], tmp_path, timeout=120)
    assert r.returncode == 2 and "did you mean 'algo.kl.coef'" in r.stderr
    from megaprorl.cli import main

    # errors found once the files are read: a line, no traceback, exit 2
    none = str(tmp_path / "none")
    small = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "warmstart.steps=0",
             "logging.progress=false", f"output_dir={tmp_path}", "rewards.num_workers=0"]
    for argv, want in ((["plot", none], f"error: [Errno 2] No such file or directory: '{none}/metrics.jsonl'"),
                       (["eval", DEMO, f"checkpoint.resume={none}", *small],
                        f"error: config key 'checkpoint.resume': checkpoint {none} is not usable"),
                       (["train", DEMO, f"checkpoint.resume={none}", *small],
                        f"error: config key 'checkpoint.resume': checkpoint {none} is not usable"),
                       (["train", DEMO, "--resume", none, *small],  # overrides after an option too
                        f"error: config key 'checkpoint.resume': checkpoint {none} is not usable")):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.startswith(want), argv


def test_mixture_with_reasoning_gym_trains(tmp_path):
    """examples/mixture_cpu.yaml: addition + Reasoning Gym basic_arithmetic, both scored, no errors."""
    cfg = os.path.join(ROOT, "examples", "mixture_cpu.yaml")
    r = _run_cli(["train", cfg, f"output_dir={tmp_path}", "name=mix", "train.steps=2", "warmstart.steps=10",
                  "eval.n_prompts=16", "logging.progress=false", "model.num_layers=1", "rewards.num_workers=1"],
                 tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "reward" in x]
    assert len(steps) == 2
    assert sum(x["samples/logic"] for x in steps) > 0 and sum(x["samples/addition"] for x in steps) > 0
    assert all(x["reward_errors/logic"] == 0 and x["reward_errors/addition"] == 0 for x in steps)


def test_eval_command_reports_pass_at_k(tmp_path):
    """`megaprorl eval`: greedy accuracy plus pass@1 over k samples and unbiased pass@k, per domain."""
    out = tmp_path / "eval.json"
    r = _run_cli(["eval", DEMO, f"output_dir={tmp_path}", "warmstart.steps=20", "eval.n_prompts=16",
                  "eval.samples_per_prompt=4", "eval.ks=[1,2,4]", "eval.greedy=false", "model.num_layers=1",
                  "model.hidden_size=64", "model.ffn_hidden_size=128", "--output", str(out),
                  "--per-prompt", str(tmp_path / "rows.jsonl")], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("eval/accuracy", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/by_domain/addition/pass@4"):
        assert k in res, (k, sorted(res))
    assert 0.0 <= res["eval/pass@1"] <= res["eval/pass@2"] <= res["eval/pass@4"] <= 1.0
    assert res["eval/n_prompts"] == 16
    rows = [json.loads(x) for x in open(tmp_path / "rows.jsonl")]  # --per-prompt: the same numbers, per prompt
    assert len(rows) == 16 and all(len(x["rewards"]) == 4 for x in rows)
    assert sum(x["pass_rate"] for x in rows) / 16 == pytest.approx(res["eval/pass@1"])
    assert sum(x["greedy_reward"] >= 1 for x in rows) / 16 == pytest.approx(res["eval/accuracy"])


def _reduce_stats_worker(rank, world):
    from megaprorl.parallel import init_distributed
    from megaprorl.trainer import _reduce_stats

    init_distributed()
    stats = {"reward": float(rank), "reward/addition": 0.5 + rank, "trigger": "interval",
             "reward_errors": 1 + rank, "data/skipped_long_prompts": 2 * rank, "time/update_s": 1.0 + 2 * rank,
             "dynamic_sampling/filled_zero_signal": 3 * rank}
    if rank == 1:  # only rank 1 drew a logic prompt this step
        stats["reward/logic"] = 0.25
        stats["reward_errors/logic"] = 3
    return _reduce_stats(stats)


def test_reduce_stats_over_dp_ranks_with_different_keys():
    from dist_utils import run_distributed

    for out in run_distributed(_reduce_stats_worker, 2):
        assert out["reward"] == 0.5 and out["reward/addition"] == 1.0
        assert out["reward/logic"] == 0.25 and out["trigger"] == "interval"
        # counts of the step's batch are summed over the ranks
        assert out["reward_errors"] == 3 and out["data/skipped_long_prompts"] == 2 and out["reward_errors/logic"] == 3
        assert out["dynamic_sampling/filled_zero_signal"] == 3  # the step's batch's zero-signal groups, all ranks'
        # the update's mean time and its slowest rank's
        assert out["time/update_s"] == 2.0 and out["time/update_s_max"] == 3.0 and "reward_max" not in out


def test_engine_samples_without_fp8(policy, monkeypatch):
    """Under model.fp8 the engine decodes in the parameters' dtype: FP8 GEMMs need token counts divisible
    by 16 (a decode step has one token per row), and the trainer's FP8 forward recomputes the old-policy
    log-probs anyway.  Megatron's FP8 context is made to fail here, so entering it fails the test."""
    import megatron.core.transformer.transformer_block as block

    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    def no_fp8(*a, **k):
        raise AssertionError("the engine entered Megatron's FP8 context")

    monkeypatch.setattr(block, "get_fp8_context", no_fp8)
    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=5, n=2, seed=7)
    want = eng.generate(_prompts(tok), params)
    cfg = pol.model.config
    cfg.fp8 = "hybrid"
    try:
        got = eng.generate(_prompts(tok), params)
        assert cfg.fp8 == "hybrid"  # restored after generation
    finally:
        cfg.fp8 = None
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.logprobs for r in got] == [r.logprobs for r in want]


@pytest.mark.parametrize("greedy", [False, True])
def test_finished_rows_leave_the_decode_batch(policy, greedy):
    """Lock-step batches: dropping finished rows from the KV cache changes no token, no log-prob and no
    finish flag, while later steps decode fewer rows; compact_every=100 drops them at every finish, 4 once
    they are a quarter of the cache."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    params = SamplingParams(max_new_tokens=40, n=6, seed=21, temperature=1.5, greedy=greedy)
    prompts = _prompts(tok) + [tok.encode(s) for s in ["2+2=", "40+2="]]  # 42 rows: batches of 30 and 12
    dense = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=30, compact_every=0)
    want = dense.generate(prompts, params)
    assert dense.stats["compactions"] == 0
    assert dense.stats["decode_row_steps"] == dense.stats["dense_row_steps"] > 0
    lengths = sorted({len(r.response_ids) for r in want if r.finished})
    assert len(lengths) >= 2, lengths  # rows finish at different steps
    for every in (100, 4):
        eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=30, compact_every=every, continuous=False)
        got = eng.generate(prompts, params)
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        assert [r.finished for r in got] == [r.finished for r in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert eng.stats["compactions"] >= 1, eng.stats
        assert eng.stats["decode_row_steps"] < eng.stats["dense_row_steps"] == dense.stats["dense_row_steps"]


@pytest.mark.parametrize("greedy", [False, True])
def test_continuous_batching_refills_finished_rows(policy, greedy):
    """Continuous batching (waiting rollouts prefilled into the rows that finished, each row decoding at its
    own position) draws the tokens lock-step batching draws, at any batch size: every token is drawn from
    a uniform of (seed, rollout, token index).  It takes fewer decode steps than lock-step batches, and
    the n samples of a prompt share one prefill row."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    params = SamplingParams(max_new_tokens=40, n=6, seed=21, temperature=1.5, greedy=greedy)
    prompts = _prompts(tok) + [tok.encode(s) for s in ["2+2=", "40+2=", "123+456="]]  # 48 rollouts, 3 lengths
    lock = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=12, compact_every=0)
    assert not lock.continuous
    want = lock.generate(prompts, params)
    lengths = sorted({len(r.response_ids) for r in want})
    assert len(lengths) >= 3 and any(r.finished for r in want), lengths  # rows finish at different steps
    assert lock.stats["decode_row_steps"] == lock.stats["dense_row_steps"]
    assert lock.stats["prefill_rows"] == 8 and lock.stats["admissions"] == 4  # 2 prompts per batch of 12
    for batch, every in ((12, 4), (12, 100), (5, 8), (48, 2)):
        eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=batch, compact_every=every)
        assert eng.continuous
        got = eng.generate(prompts, params)
        assert [r.response_ids for r in got] == [r.response_ids for r in want], (batch, every)
        assert [r.finished for r in got] == [r.finished for r in want]
        assert [r.prompt_index for r in got] == [r.prompt_index for r in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        st = eng.stats
        assert st["tokens"] == sum(len(r.response_ids) for r in want) and st["rollouts"] == 48
        assert st["tokens"] - st["rollouts"] <= st["decode_row_steps"]  # every decoded row gave at most one token
        lens = [len(r.response_ids) for r in want]
        lock_steps = sum(max(lens[s: s + batch]) - 1 for s in range(0, 48, batch))  # lock-step batches of `batch`
        if batch < 48:
            assert st["admissions"] > -(-48 // batch), st  # rows were refilled while others decoded
            assert st["decode_steps"] < lock_steps, (st, lock_steps)
        assert st["decode_row_steps"] < st["dense_row_steps"], st
        assert st["prefill_rows"] < 48


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "lock-step"])
def test_calls_decoded_together_draw_the_tokens_of_each_call(policy, continuous):
    """generate_many (an evaluation's greedy and sampled sets in one KV cache): three calls with their own
    budgets, sample counts, temperatures and seeds, among them a greedy one and one that repeats a prompt of
    another, give each call's rollouts as generate gives them (tokens, ends, log-probs within 1e-6), reported
    as they finish
    with their call and place, in fewer decode steps than the calls one after another."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    p = _prompts(tok) + [tok.encode(s) for s in ["2+2=", "40+2=", "123+456="]]
    calls = [(p[:4], SamplingParams(max_new_tokens=12, greedy=True)),
             (p[2:7], SamplingParams(max_new_tokens=30, n=3, temperature=1.5, top_p=0.9, seeds=[50, 51, 52, 53, 54])),
             (p[6:], SamplingParams(max_new_tokens=20, n=2, temperature=0.8, seed=9))]
    every = 3 if continuous else 0
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=7, compact_every=every)
    want, steps = [], 0
    for prompts, params in calls:
        want.append(eng.generate(prompts, params))
        steps += eng.stats["decode_steps"]
    reported = {}
    got = eng.generate_many(calls, on_finish=lambda c, k, r: reported.setdefault((c, k), r))
    assert [len(g) for g in got] == [4, 15, 4] and len(reported) == 23
    for c, (g_call, w_call) in enumerate(zip(got, want)):
        for k, (g, w) in enumerate(zip(g_call, w_call)):
            assert reported[(c, k)] is g
            assert (g.prompt_index, g.prompt_ids, g.response_ids, g.finished) == \
                (w.prompt_index, w.prompt_ids, w.response_ids, w.finished)
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-6)
    assert max(len(r.response_ids) for r in got[1]) > 20  # past the other calls' budgets
    assert eng.stats["rollouts"] == 23
    if continuous:  # one tail; lock-step batching decodes the calls one after another (a batch lasts as long as
        assert eng.stats["decode_steps"] < steps, (eng.stats, steps)  # its longest rollout, so budgets are not mixed)
    else:
        assert eng.stats["decode_steps"] == steps
    assert eng.stats["prefill_rows"] < 23  # a prompt's samples admitted together share its prefill
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        eng.generate_many([(p[:4], SamplingParams(seeds=[1, 2]))])


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "lock-step"])
def test_claimed_prompts_draw_the_tokens_of_the_whole_call(policy, continuous):
    """generate(claim=...) (rollout.share_prompts_over_dp): two engines ("ranks") share one call's prompts through
    one counter, each decoding only what it claims when rows are free.  Every prompt is decoded once, by one of
    them; with per-prompt seeds each rollout has the tokens and log-probs it has in the whole call on one engine.
    The first rank takes its claims first, the second after it; both claim more as rows free up."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    prompts = _prompts(tok) + [tok.encode(s) for s in ["2+2=", "40+2=", "123+456=", "8+9=", "77+7="]]
    params = SamplingParams(max_new_tokens=30, n=3, temperature=1.5, seeds=[100 + i for i in range(len(prompts))])
    every = 3 if continuous else 0
    want = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=6, compact_every=every).generate(prompts, params)
    counter, asked = [0], []

    def claim(k):
        got = list(range(counter[0], min(counter[0] + k, len(prompts))))
        counter[0] += k
        asked.append(k)
        return got

    got = []
    for _ in range(2):  # one after the other: the first claims until its rows stay full, then runs dry
        eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=6, compact_every=every)
        got.append(eng.generate(prompts, params, claim=claim))
        assert eng.stats["rollouts"] == len(got[-1])
    first, second = ([r.prompt_index for r in g] for g in got)
    assert sorted(first + second) == [r.prompt_index for r in want]  # each prompt once, by one of them
    assert first and not second  # the first engine took every prompt; the second found none left
    by_prompt = {(r.prompt_index, k % 3): r for k, r in enumerate(got[0])}
    for k, w in enumerate(want):
        g = by_prompt[(w.prompt_index, k % 3)]
        assert g.response_ids == w.response_ids and g.finished == w.finished
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    assert asked[0] == 2 and len(asked) > 2  # 6 rows of 3 samples, then more as rows freed up


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "lock-step"])
def test_prefill_in_chunks_draws_the_same_tokens(policy, continuous):
    """rollout.prefill_tokens: an admission's distinct prompts prefilled in several forwards (each padded to
    the admission's longest prompt) give one forward's tokens and log-probs, in more prefill forwards."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    params = SamplingParams(max_new_tokens=12, n=2, seed=8, temperature=1.3)
    runs = []
    for budget in (0, 15, 1):  # one forward; 2 prompts of <= 7 tokens per forward; one prompt per forward
        eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=6, compact_every=3, continuous=continuous,
                             prefill_tokens=budget)
        runs.append((eng.generate(_prompts(tok), params), dict(eng.stats)))
    (want, st0), (got2, st2), (got1, st1) = runs
    for got in (got2, got1):
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        for g, w in zip(got, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    assert st0["prefills"] == st0["admissions"] < st2["prefills"] < st1["prefills"] == st1["prefill_rows"]
    assert st1["admissions"] == st0["admissions"] and st1["prefill_tokens"] == st0["prefill_tokens"]
    with pytest.raises(ValueError, match="prefill_tokens"):
        MegatronEngine(pol, tok.eos_id, tok.pad_id, prefill_tokens=-1)


@pytest.mark.parametrize("continuous", [True, False])
def test_kv_cache_fraction_fits_the_rows_to_free_memory(policy, monkeypatch, continuous):
    """kv_cache_fraction: as many rows as fit in that fraction of the free memory (kv_bytes_per_row is
    the bytes the cache then holds), the same tokens as with all rows; no row fitting is a clear error."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    params = SamplingParams(max_new_tokens=12, n=3, seed=8, temperature=1.0)
    every = 8 if continuous else 0
    want = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=15, compact_every=every).generate(_prompts(tok), params)
    probe = MegatronEngine(pol, tok.eos_id, tok.pad_id)
    seq = max(len(p) for p in _prompts(tok)) + 12
    per_row = probe.kv_bytes_per_row(seq)
    assert per_row == 2 * 2 * 2 * 16 * seq * 4  # 2 layers x (K, V) x 2 query groups x head dim 16, fp32
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=15, compact_every=every, kv_cache_fraction=0.5,
                         free_memory=lambda: int(3.7 * per_row / 0.5))
    held = []
    step = MegatronEngine._step
    monkeypatch.setattr(MegatronEngine, "_step", lambda self, cache, last: (
        held.append(sum(m.numel() * m.element_size() for kv in cache.ctx.key_value_memory_dict.values() for m in kv)),
        step(self, cache, last))[1])
    got = eng.generate(_prompts(tok), params)
    assert eng.stats["rows"] == 3
    assert eng.stats["kv_cache_bytes"] == max(held)  # the largest cache made (lock-step: per batch)
    if continuous:
        assert held[0] == 3 * per_row
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    small = MegatronEngine(pol, tok.eos_id, tok.pad_id, kv_cache_fraction=0.5, free_memory=lambda: per_row)
    with pytest.raises(RuntimeError, match="rollout.kv_cache_fraction=0.5 .* holds no row"):
        small.generate(_prompts(tok), params)


def test_engine_reports_rollouts_as_they_finish(policy):
    """on_finish gets every rollout once, the very object generate returns, while the others still decode
    (the trainer starts their scoring then)."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=6)
    calls = []
    out = eng.generate(_prompts(tok), SamplingParams(max_new_tokens=30, n=4, seed=21, temperature=1.5),
                       on_finish=lambda k, r: calls.append((k, r, eng.stats["tokens"])))
    assert sorted(k for k, _, _ in calls) == list(range(len(out))) == list(range(20))
    assert all(r is out[k] for k, r, _ in calls)
    assert calls[0][2] < calls[-1][2] == eng.stats["tokens"]  # the first came before generation ended
    assert [k for k, _, _ in calls] != sorted(k for k, _, _ in calls)  # in finishing order


def test_sampler_draws_from_the_filtered_distribution():
    """Inverting the CDF at the counter-based uniforms draws each token with its probability (top-p
    filtered), never a token of probability 0, and the uniforms of different rollouts and steps differ."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine, _top_p_filter, draw_uniform

    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, -30.0, 0.0, 3.0]])
    n = 40000
    u = torch.tensor([draw_uniform(5, k, 3) for k in range(n)], dtype=torch.float64)
    assert len(set(u.tolist())) == n and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert draw_uniform(5, 0, 3) != draw_uniform(5, 0, 4) != draw_uniform(6, 0, 4)
    for top_p in (1.0, 0.8):
        params = SamplingParams(temperature=1.3, top_p=top_p)
        nxt, lp = MegatronEngine._sample(z.expand(n, -1), params, u)
        want = _top_p_filter(torch.softmax(z / 1.3, -1), top_p)[0].double()
        freq = torch.bincount(nxt, minlength=z.shape[1]).double() / n
        sigma = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (freq, want)
        assert (freq[want == 0] == 0).all()
        torch.testing.assert_close(lp, torch.log_softmax(z / 1.3, -1)[0, nxt])
    assert float(u.mean()) == pytest.approx(0.5, abs=5 * (1 / 12 / n) ** 0.5)


MOE_MODEL = dict(num_experts=4, moe_topk=2, moe_ffn_hidden_size=32, moe_norm_topk_prob=True, qk_norm=True,
                 head_dim=16, add_qkv_bias=False)


@pytest.fixture(scope="module")
def moe_policy():
    return tiny_policy(MOE_MODEL)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_lean_decode_equals_megatrons_forward(policy, moe_policy, greedy, which):
    """Decode steps through the engine's lean stage give Megatron's forward's tokens, finish flags and
    log-probs bit for bit (rows leaving the cache on both sides), for a dense model and an MoE one (whose
    MoE layers the lean step calls as modules)."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine, lean_decode_unsupported

    pol, tok = policy if which == "dense" else moe_policy
    assert lean_decode_unsupported(pol.model) is None
    params = SamplingParams(max_new_tokens=24, n=4, seed=9, temperature=1.0, greedy=greedy)
    runs = []
    for lean in (False, True):
        eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=12, lean_decode=lean, continuous=False)
        assert eng.lean_decode == lean
        runs.append(eng.generate(_prompts(tok), params))
    assert sum(len(r.response_ids) for r in runs[0]) > 100
    assert [r.response_ids for r in runs[1]] == [r.response_ids for r in runs[0]]
    assert [r.finished for r in runs[1]] == [r.finished for r in runs[0]]
    assert [r.logprobs for r in runs[1]] == [r.logprobs for r in runs[0]]


@pytest.mark.parametrize("model", [{}, {"qk_norm": True, "head_dim": 32, "add_qkv_bias": False}], ids=["qwen2", "qwen3"])
def test_lean_decode_with_linear_layers_called_as_modules(model, monkeypatch):
    """The lean step's path for linear layers that are not Megatron's own (TransformerEngine's, norms fused
    in): each is called as a module and its returned bias added.  Forced on the local spec, it gives
    Megatron's forward's tokens, finish flags and log-probs bit for bit (with Qwen3's q/k norms too), and
    every decode step does call the modules."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout import megatron_engine
    from tiny_models import tiny_policy

    pol, tok = tiny_policy(model, trainable=False)
    params = SamplingParams(max_new_tokens=16, n=3, seed=4, temperature=1.0)
    want = megatron_engine.MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=8, lean_decode=False,
                                          continuous=False).generate(_prompts(tok), params)
    calls = []
    for cls in (ColumnParallelLinear, RowParallelLinear):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=forward, **k: calls.append(1) or _f(self, *a, **k))
    monkeypatch.setattr(megatron_engine, "_raw_linear_types", lambda: ())
    eng = megatron_engine.MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=8, continuous=False)
    assert eng.lean_decode
    got = eng.generate(_prompts(tok), params)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.finished for r in got] == [r.finished for r in want]
    assert [r.logprobs for r in got] == [r.logprobs for r in want]
    # 4 linear layers per layer, 2 layers, every decode step (and the prefills through Megatron's forward)
    assert len(calls) >= 8 * eng.stats["decode_steps"] > 0


def test_engine_contexts_have_their_masks_applied_as_given(policy, monkeypatch):
    """TransformerEngine's attention applies a mask only under the padding / arbitrary mask types, and
    Megatron asks for causal in a prefill and no_mask in a decode step: through the engine's contexts every
    attention call gets its mask with the type arbitrary (the local spec's attentions apply any mask)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megaprorl.models.attention import SDPAttention
    from megaprorl.policy import build_seq_batch
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    seen, forward = [], SDPAttention.forward

    def spy(self, query, key, value, attention_mask, attn_mask_type=None, **kw):
        seen.append((query.shape[0], attn_mask_type, attention_mask is not None))
        return forward(self, query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kw)

    monkeypatch.setattr(SDPAttention, "forward", spy)
    MegatronEngine(pol, tok.eos_id, tok.pad_id, lean_decode=False).generate(
        _prompts(tok), SamplingParams(max_new_tokens=3, n=2, seed=1))
    assert {s > 1 for s, _, _ in seen} == {True, False}  # prefills and decode steps
    assert all(t == AttnMaskType.arbitrary and masked for _, t, masked in seen), seen
    seen.clear()
    pol.logprobs(build_seq_batch([[3, 4, 5]], [[6, 7]], tok.pad_id), 1)  # no inference context: Megatron's types
    assert seen and all(t != AttnMaskType.arbitrary for _, t, _ in seen)


def test_lean_decode_declines_what_it_does_not_cover():
    from megaprorl.rollout.megatron_engine import MegatronEngine, lean_decode_unsupported
    from tiny_models import tiny_policy

    pol, tok = tiny_policy({"attention": "megatron"}, trainable=False)  # Megatron's DotProductAttention
    assert "SDPAttention" in lean_decode_unsupported(pol.model)  # the user asked for Megatron's attention
    assert MegatronEngine(pol, tok.eos_id, tok.pad_id).lean_decode is False


def test_lean_decode_needs_keys_cached_rotated(policy, monkeypatch):
    import megatron.core.transformer.attention as attention

    from megaprorl.models import rope
    from megaprorl.rollout.megatron_engine import lean_decode_unsupported

    monkeypatch.setattr(attention.Attention, "_adjust_key_value_for_inference", rope._ORIGINAL_ADJUST)
    assert "unrotated" in lean_decode_unsupported(policy[0].model)
