"""The trainer from a local HF directory, end to end: a tiny random Qwen2 with a BPE tokenizer trained here,
a chat template and two end tokens in generation_config.json (as Qwen2.5-Instruct has) and Llama-3.x RoPE
scaling, trained for two RL steps from the CLI, exported back with ``megaprorl convert checkpoint-to-hf``
and read by transformers.

- the engine's sampling log-probs on chat-rendered prompts equal the HF model's (fp32, 1e-4);
- the tokenizer's EOS and generation_config.json's other end token both stop a response;
- a config whose architecture differs from config.json is refused, naming the key and the value;
- the exported reference is the original HF checkpoint bit for bit, the exported policy has moved (the
  same files when exported at TP=2 over two ranks), and transformers' log-probs of the exported policy
  equal the trained Megatron policy's (loaded back with ``model.load``);
- the demo's policy (no HF start) exports as a Qwen2 (or, with model.qk_norm and model.head_dim, a Qwen3) that transformers runs with the same log-probs, and
  so does its checkpoint with the config of a TE + FP8 run, without TE;
- prompts start with a Llama-style tokenizer's BOS once, with or without a chat template.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import randomize_hf_params

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("megatron.core")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo.yaml")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HF_VOCAB = 320  # embedding rows beyond the tokenizer's length, as Qwen2.5 has (151936 > 151665)
# Llama-3.x RoPE scaling (HF applies any rope_type to any model) with a short original context, so the
# engine's and the trainer's positions meet its bands: the scaled frequencies, end to end
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
ARCH = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            rotary_base=10000.0, rope_scaling=ROPE_SCALING, norm_epsilon=1e-6, add_qkv_bias=True,
            tie_embeddings=False)


def _make_hf_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)]
    texts += ["user assistant system the answer is", "please add the numbers and answer"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHAT
    fast.save_pretrained(path)
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = transformers.Qwen2Config(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, rope_scaling=dict(ROPE_SCALING), rms_norm_eps=1e-6,
                                   tie_word_embeddings=False,
                                   eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    randomize_hf_params(model, 0.08)
    model.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # two end tokens, EOS first
        json.dump({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "bos_token_id": None}, f)
    return ids


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    return path, _make_hf_dir(path)


def _overrides(path, out, **extra):
    ov = {"model.tokenizer": path, "model.hf_path": path, "model.max_position_embeddings": 128,
          "output_dir": out, "name": "hf", "warmstart.steps": 0, "train.steps": 2, "train.prompts_per_step": 4,
          "train.mini_batch_prompts": 2, "train.micro_batch_size": 8, "train.logprob_micro_batch_size": 8,
          "train.kernel_backend": "torch", "train.optim.lr": 1e-3, "rollout.n_samples": 4,
          "rollout.max_new_tokens": 6, "rollout.temperature": 1.0, "eval.n_prompts": 4, "logging.progress": False,
          "logging.tensorboard": False, "logging.plot": False, "algo.dynamic_sampling.enabled": False}
    ov.update({f"model.{k}": v for k, v in ARCH.items()})
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def _hf_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    s = len(prompt) - 1
    return lp[s: s + len(response)].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def _trainer(overrides):
    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    return Trainer(load_config(DEMO, overrides))


def _run_cli(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megaprorl.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r


def _cli(args):
    """``megaprorl ARGS`` in this process (its exit status)."""
    from megaprorl.cli import main

    return main(args)


def test_engine_on_a_local_hf_checkpoint_equals_transformers(hf_dir, tmp_path):
    from megaprorl.rollout import SamplingParams

    path, ids = hf_dir
    t = _trainer(_overrides(path, str(tmp_path)))
    try:
        tok = t.tokenizer
        assert tok.eos_id == ids["<|im_end|>"]
        assert tok.stop_ids == [ids["<|im_end|>"], ids["<|endoftext|>"]]
        assert t.engine.stop_ids == sorted(tok.stop_ids)
        assert t.policy.vocab_size == HF_VOCAB  # the checkpoint's rows, not the tokenizer's length
        records = [{"prompt": p} for p in ("12+34=", "7+8=", "99+1=")]
        prompts = [t.encode_prompt(r) for r in records]
        for p in prompts:  # rendered through the chat template
            assert p[0] == ids["<|im_start|>"] and tok.tok.decode(p).endswith("<|im_start|>assistant\n")
        rolls = t.engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=5))
        hf = _hf_model(path)
        n = 0
        for r in rolls:
            want = _hf_logprobs(hf, r.prompt_ids, r.response_ids)
            torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)
            n += len(r.response_ids)
        assert n >= 40
    finally:
        t.close()


def test_every_end_token_stops_a_response(hf_dir, tmp_path):
    """The random model draws both end tokens now and then: a response ends at the first of either, and a
    tokenizer's decode cuts there too."""
    from megaprorl.rollout import SamplingParams

    path, ids = hf_dir
    t = _trainer(_overrides(path, str(tmp_path)))
    try:
        stops = {ids["<|im_end|>"], ids["<|endoftext|>"]}
        prompts = [t.encode_prompt({"prompt": f"{a}+{a}="}) for a in range(8)]
        rolls = t.engine.generate(prompts, SamplingParams(temperature=3.0, max_new_tokens=40, n=8, seed=1))
        ended_by = set()
        for r in rolls:
            inner = [i for i in r.response_ids[:-1] if i in stops]
            assert not inner, r.response_ids
            assert r.finished == (r.response_ids[-1] in stops)
            if r.finished:
                ended_by.add(r.response_ids[-1])
        assert ended_by == stops  # both tokens ended some response (64 rows at temperature 3)
        text = "12+34 is"
        cut = t.tokenizer.encode(text) + [ids["<|endoftext|>"]] + t.tokenizer.encode("zz")
        assert t.tokenizer.decode(cut) == text
    finally:
        t.close()


@pytest.mark.parametrize("key,value", [("rotary_base", 1000000.0), ("num_query_groups", 4), ("tie_embeddings", True)])
def test_architecture_that_differs_from_config_json_is_refused(hf_dir, tmp_path, key, value):
    from megaprorl.config import ConfigError

    path, _ = hf_dir
    with pytest.raises(ConfigError) as e:
        _trainer(_overrides(path, str(tmp_path), **{f"model.{key}": value}))
    msg = str(e.value)
    assert f"model.{key}={value!r}" in msg and "config.json" in msg and path in msg


def test_missing_model_files_are_config_errors(hf_dir, tmp_path):
    """A model or tokenizer directory that is not there, or a tokenizer directory without a vocabulary (where
    transformers would build the config's tokenizer class with one token), names its config key."""
    import shutil

    from megaprorl.config import ConfigError

    path, _ = hf_dir
    bare = tmp_path / "bare"  # a model directory without its tokenizer files
    bare.mkdir()
    shutil.copy(os.path.join(path, "config.json"), bare / "config.json")
    for extra, want in (({"model.hf_path": str(tmp_path / "none")},
                         f"config key 'model.hf_path': {tmp_path / 'none'}/config.json not found"),
                        ({"model.tokenizer": str(tmp_path / "none")},
                         f"config key 'model.tokenizer': tokenizer directory '{tmp_path / 'none'}' does not exist"),
                        ({"model.tokenizer": str(bare)},
                         f"config key 'model.tokenizer': tokenizer directory '{bare}' has no vocabulary: none of "
                         "tokenizer.json, ")):
        with pytest.raises(ConfigError, match=re.escape(want)):
            _trainer(_overrides(path, str(tmp_path), **extra))


def _export_job(rank, world, checkpoint, out):
    from megaprorl.export import export_checkpoint_to_hf

    export_checkpoint_to_hf(checkpoint, out, tp=world)


def test_train_export_and_reload(hf_dir, tmp_path):
    from megaprorl.models.convert import load_hf_state_dict
    from megaprorl.policy import build_seq_batch

    path, ids = hf_dir
    # a random model earns reward 0 everywhere, so the advantages are 0: weight decay moves the policy
    r = _run_cli(["train", DEMO, *_overrides(path, str(tmp_path), **{"train.optim.weight_decay": 0.5})], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "hf"
    exp, ref = str(tmp_path / "exported"), str(tmp_path / "exported_ref")
    for out, which in ((exp, "policy"), (ref, "reference")):
        assert _cli(["convert", "checkpoint-to-hf", "--checkpoint", str(run), "--out", out, "--which", which]) == 0
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert os.path.exists(os.path.join(out, name)), name
    exp_tp2 = str(tmp_path / "exported_tp2")  # loaded at TP=2 over two gloo ranks, gathered, written by rank 0
    run_distributed(_export_job, 2, (str(run), exp_tp2))
    orig, pol, rsd, pol2 = (load_hf_state_dict(d) for d in (path, exp, ref, exp_tp2))
    assert set(pol2) == set(pol) and all(torch.equal(pol2[k], pol[k]) for k in pol)
    assert set(orig) == set(pol) == set(rsd)
    for k in orig:  # the reference was never reset in two steps: the HF checkpoint, bit for bit
        assert torch.equal(orig[k], rsd[k]), k
    assert any(not torch.equal(orig[k], pol[k]) for k in orig)  # the policy trained

    # the trained Megatron policy, loaded back with model.load, equals transformers on the exported files
    t = _trainer(_overrides(path, str(tmp_path / "again"), **{"model.load": str(run)}))
    try:
        hf, hf0 = _hf_model(exp), _hf_model(path)
        prompts = [t.encode_prompt({"prompt": p}) for p in ("3+4=", "51+49=")]
        responses = [t.tokenizer.encode("7") + [ids["<|im_end|>"]], t.tokenizer.encode("100 is it")]
        lp = t.policy.logprobs(build_seq_batch(prompts, responses, t.tokenizer.pad_id), 4)
        moved = 0.0
        for i, (p, resp) in enumerate(zip(prompts, responses)):
            s = len(p) - 1
            torch.testing.assert_close(lp[i, s: s + len(resp)], _hf_logprobs(hf, p, resp), atol=1e-4, rtol=0)
            moved = max(moved, float((lp[i, s: s + len(resp)] - _hf_logprobs(hf0, p, resp)).abs().max()))
        assert moved > 1e-3  # far outside the tolerance: the trained weights, not the HF start, were loaded
    finally:
        t.close()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_demo_policy_exports_as_hf(tmp_path, family):
    """A run that did not start from HF (character tokenizer) exports a config.json of its own: Qwen2 (QKV
    bias), or Qwen3 with model.qk_norm and a model.head_dim that is not hidden / heads."""
    from megaprorl.models.tokenizer import CharTokenizer

    arch = {"qwen2": [], "qwen3": ["model.qk_norm=true", "model.head_dim=32", "model.add_qkv_bias=false"]}[family]
    tiny = arch + ["warmstart.steps=5", "train.steps=1", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
            "rollout.n_samples=2", "eval.n_prompts=4", "logging.progress=false", "logging.plot=false",
            "logging.tensorboard=false", "model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
            f"output_dir={tmp_path}", "name=demo"]
    r = _run_cli(["train", DEMO, *tiny], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = str(tmp_path / "demo_hf")
    assert _cli(["convert", "checkpoint-to-hf", "--checkpoint", str(tmp_path / "demo" / "checkpoints"),
                 "--out", out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    tok = CharTokenizer()
    assert cfg["model_type"] == family and cfg["vocab_size"] == tok.vocab_size and cfg["eos_token_id"] == tok.eos_id
    assert cfg["head_dim"] == (32 if family == "qwen3" else 16)
    hf = _hf_model(out)
    t = _trainer(tiny + [f"model.load={tmp_path / 'demo'}", f"output_dir={tmp_path / 'x'}"])
    try:
        from megaprorl.policy import build_seq_batch

        prompts, responses = [tok.encode("12+30=")], [tok.encode("42") + [tok.eos_id]]
        lp = t.policy.logprobs(build_seq_batch(prompts, responses, tok.pad_id), 4)
        s = len(prompts[0]) - 1
        torch.testing.assert_close(lp[0, s: s + 3], _hf_logprobs(hf, prompts[0], responses[0]), atol=1e-4, rtol=0)
    finally:
        t.close()
    if family != "qwen2":
        return

    # the same checkpoint, as a TransformerEngine FP8 run with TensorRT-LLM rollouts would have written it (its
    # tensors carry the same names under either spec; only trainer.json's config differs): without TE or
    # TensorRT-LLM installed (a config that needs them is refused for training) it exports through the local
    # spec to the same files
    from megaprorl.checkpoint import resolve_checkpoint
    from megaprorl.config import load_config, to_yaml
    from megaprorl.models.convert import load_hf_state_dict

    tj = os.path.join(resolve_checkpoint(str(tmp_path / "demo"), "--checkpoint"), "trainer.json")
    state = json.load(open(tj))
    cfg_te = load_config(text=state["config"])
    cfg_te.model.transformer_impl, cfg_te.model.fp8 = "transformer_engine", "hybrid"
    cfg_te.rollout.engine = "trtllm"
    state["config"] = to_yaml(cfg_te)
    json.dump(state, open(tj, "w"))
    out_te = str(tmp_path / "demo_hf_te")
    assert _cli(["convert", "checkpoint-to-hf", "--checkpoint", str(tmp_path / "demo"), "--out", out_te]) == 0
    a, b = load_hf_state_dict(out), load_hf_state_dict(out_te)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_errors_name_what_is_wrong(tmp_path, capsys):
    assert _cli(["convert", "checkpoint-to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "--checkpoint" in err
    assert _cli(["train", DEMO, f"model.load={tmp_path}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.load" in err and "no complete checkpoint" in err


def test_generation_config_end_tokens_are_read_and_checked(tmp_path):
    from megaprorl.models.tokenizer import generation_eos_ids

    assert generation_eos_ids(str(tmp_path)) == []
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert generation_eos_ids(str(tmp_path)) == [7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [9, 7, 9]}')
    assert generation_eos_ids(str(tmp_path)) == [9, 7]
    for bad in ('{"eos_token_id": "x"}', '{"eos_token_id": [1, -2]}', "{not json"):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(ValueError, match="generation_config.json"):
            generation_eos_ids(str(tmp_path))


def test_prompts_start_with_the_tokenizers_bos_once(hf_dir, tmp_path):
    """A Llama-style tokenizer puts its BOS before a text: a prompt no chat template renders gets it (as
    ``tokenizer(text)`` does), one rendered by a template that writes it gets it once; a Qwen-style
    tokenizer (no BOS) adds nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from megaprorl.models.tokenizer import build_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["12+34=46 the answer"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>")
    fast.save_pretrained(str(tmp_path / "plain"))
    plain = build_tokenizer(str(tmp_path / "plain"))
    assert not plain.use_chat_template
    ids = plain.encode_prompt({"prompt": "12+34="})
    assert ids == [bos] + plain.encode("12+34=") == fast("12+34=")["input_ids"]
    fast.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    fast.save_pretrained(str(tmp_path / "chat"))
    ids = build_tokenizer(str(tmp_path / "chat")).encode_prompt({"prompt": "12+34="})
    assert ids[0] == bos and ids.count(bos) == 1
    qwen = build_tokenizer(hf_dir[0], use_chat_template=False)
    assert qwen.encode_prompt({"prompt": "12+34="}) == qwen.encode("12+34=")


def test_chat_template_kwargs_reach_the_template(hf_dir, tmp_path):
    """model.chat_template_kwargs are the template's extra variables (Qwen3's enable_thinking), from a
    dotted override; the variables megaprorl sets itself are refused by name."""
    from megaprorl.config import load_config
    from megaprorl.models.tokenizer import build_tokenizer

    path = str(tmp_path / "thinking")
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir[0], local_files_only=True)
    fast.chat_template = CHAT + ("{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
                                 "<think>\n\n</think>\n\n{% endif %}")
    fast.save_pretrained(path)
    cfg = load_config(DEMO, [f"model.tokenizer={path}", "model.chat_template_kwargs.enable_thinking=false"])
    assert cfg.model.chat_template_kwargs == {"enable_thinking": False}
    record = {"prompt": "12+34="}
    off = build_tokenizer(path, chat_template_kwargs=cfg.model.chat_template_kwargs).render_prompt(record)
    on = build_tokenizer(path).render_prompt(record)
    assert off == on + "<think>\n\n</think>\n\n" and on.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="model.chat_template_kwargs.add_generation_prompt"):
        build_tokenizer(path, chat_template_kwargs={"add_generation_prompt": False})


def test_think_end_must_survive_decoding(hf_dir, tmp_path, capsys):
    """A </think> that the tokenizer has as a special token vanishes from the decoded responses the verifiers
    read: rewards.think_mode=require is then refused (every reward would be 0); as an added, non-special
    token (as R1-Distill's and Qwen3's tokenizers have it) it comes back."""
    from megaprorl.config import ConfigError
    from megaprorl.models.tokenizer import CharTokenizer, build_tokenizer

    for special in (True, False):
        fast = transformers.AutoTokenizer.from_pretrained(hf_dir[0], local_files_only=True)
        fast.add_tokens([tokenizers.AddedToken("<think>", special=special), tokenizers.AddedToken("</think>", special=special)],
                       special_tokens=special)
        fast.save_pretrained(str(tmp_path / str(special)))
        tok = build_tokenizer(str(tmp_path / str(special)))
        assert len(tok.encode("</think>")) == 1 and tok.keeps_text("</think>") is not special
    assert not CharTokenizer().keeps_text("</think>")
    path = hf_dir[0]
    with pytest.raises(ConfigError, match="rewards.think_mode.*every reward would be 0"):
        _trainer(_overrides(path, str(tmp_path / "run"), **{"model.tokenizer": str(tmp_path / "True"),
                                                             "rewards.think_mode": "require"}))
    # the default think_mode=auto says so and goes on (it raised AttributeError: the warning came before the
    # trainer had its logger attribute)
    t = _trainer(_overrides(path, str(tmp_path / "run"), **{"model.tokenizer": str(tmp_path / "True")}))
    t.close()
    assert "responses are scored whole (rewards.think_mode=auto)" in capsys.readouterr().out
