"""Pipeline parallelism (PP=2 over gloo) through Megatron's schedule equals PP=1: log-probs, loss,
gradient norm and the updated weights, with right-padded and with packed micro-batches, each of its own length
(the stages exchange the activations' shapes)."""

import copy

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import tiny_policy, tiny_policy_cfgs

N_LAYERS = 2  # tiny_policy_cfgs: one decoder layer per stage at PP=2


def _batch(tok):
    from megaprorl.algo.loss import aggregation_weights
    from megaprorl.policy import build_seq_batch

    g = torch.Generator().manual_seed(3)
    prompts = [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1=", "5+5=", "12+30="]]
    resp = [torch.randint(2, tok.vocab_size, (k,), generator=g).tolist() for k in (3, 1, 6, 2, 4, 5)]
    b = build_seq_batch(prompts, resp, tok.pad_id)
    b.advantages = torch.randn(b.loss_mask.shape, generator=g) * b.loss_mask
    b.weights = aggregation_weights(b.loss_mask, "token-mean", float(b.loss_mask.sum()), len(b))
    return b


def _stage_state(full: dict, stage: int) -> dict:
    """The PP=1 state dict's tensors that stage ``stage`` of 2 holds, under that stage's local names (with
    tied embeddings the last stage holds a copy of the embedding as its output layer)."""
    per = N_LAYERS // 2
    out = {}
    if stage == 1 and "output_layer.weight" not in full:
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    for k, v in full.items():
        if k.startswith("decoder.layers."):
            i = int(k.split(".")[2])
            if i // per == stage:
                out[k.replace(f"decoder.layers.{i}.", f"decoder.layers.{i - stage * per}.", 1)] = v
        elif k.startswith("embedding."):
            if stage == 0:
                out[k] = v
        elif stage == 1:  # final norm and output layer
            out[k] = v
    return out


def _pp_job(rank, world, state, batch, pack, tie):
    from megaprorl.algo.loss import LossSpec
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed(1, world)
    m, p, o = tiny_policy_cfgs(tie_embeddings=tie)
    p.pipeline_parallel = world
    tok = CharTokenizer()
    pol = Policy(m, p, o, tok.vocab_size, info.device, "torch", pack_tokens=pack, pad_id=tok.pad_id)
    from megatron.core import parallel_state as mps

    stage = mps.get_pipeline_model_parallel_rank()
    own = {k: v for k, v in pol.model.state_dict().items() if not k.endswith("_extra_state")}
    mine = _stage_state(state, stage)
    assert set(own) == set(mine), (sorted(own), sorted(mine))
    pol.model.load_state_dict(mine, strict=False)
    lp, ent = pol.logprobs(batch, 2, with_entropy=True)
    variable = pol.model.config.variable_seq_lengths  # the micro-batches' shapes differ: exchanged per send
    batch.old_logp = lp
    batch.ref_logp = lp + 0.02
    stats = pol.train_step(batch, LossSpec(kl_coef=0.1, eps_low=0.2, eps_high=0.28), 2)
    params = {k: v.detach().clone() for k, v in pol.model.state_dict().items() if not k.endswith("_extra_state")}
    sft = pol.sft_step(batch, 2)  # the warm-start's supervised step goes through the same schedule
    sft_params = {k: v.detach().clone() for k, v in pol.model.state_dict().items() if not k.endswith("_extra_state")}
    return dict(stage=stage, lp=lp, ent=ent, stats=stats, params=params, sft=sft, sft_params=sft_params,
                variable=variable)


@pytest.mark.parametrize("pack,tie", [(0, False), (20, False), (0, True)], ids=["padded", "packed", "tied"])
def test_pipeline_parallel_equals_single_stage(pack, tie):
    """``tied``: tied embeddings (Qwen2.5-0.5B/1.5B), whose two copies on the first and last stage get the
    all-reduced gradient of both uses and so the single stage's update."""
    from megaprorl.algo.loss import LossSpec

    ref_pol, tok = tiny_policy(dict(tie_embeddings=tie), pack_tokens=pack)
    state = {k: v.clone() for k, v in ref_pol.state_dict().items()}
    batch = _batch(tok)
    lp, ent = ref_pol.logprobs(batch, 2, with_entropy=True)
    b1 = copy.copy(batch)
    b1.old_logp, b1.ref_logp = lp, lp + 0.02
    stats = ref_pol.train_step(b1, LossSpec(kl_coef=0.1, eps_low=0.2, eps_high=0.28), 2)
    after = {k: v.clone() for k, v in ref_pol.state_dict().items()}
    sft = ref_pol.sft_step(batch, 2)
    after_sft = ref_pol.state_dict()

    outs = run_distributed(_pp_job, 2, (state, batch, pack, tie))
    assert sorted(o["stage"] for o in outs) == [0, 1]
    assert all(o["variable"] for o in outs)  # ragged rows: micro-batches (padded or packed) of their own lengths
    for o in outs:  # every stage gets the last stage's results
        torch.testing.assert_close(o["lp"], lp, rtol=0, atol=2e-5)
        torch.testing.assert_close(o["ent"], ent, rtol=0, atol=2e-5)
        for k in ("loss", "entropy", "kl_ref", "tokens"):
            assert o["stats"][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
        assert o["stats"]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
        for k, v in o["params"].items():  # the update applied on each stage equals PP=1's
            torch.testing.assert_close(v, _stage_state(after, o["stage"])[k], rtol=1e-5, atol=1e-6)
        assert o["sft"] == pytest.approx(sft, rel=1e-5)
        for k, v in o["sft_params"].items():
            torch.testing.assert_close(v, _stage_state(after_sft, o["stage"])[k], rtol=1e-5, atol=1e-6)


PROMPTS = ["1+2=", "13+45=", "7+88=", "99+1=", "5+5="]
SAMPLING = [dict(max_new_tokens=6, n=2, temperature=1.0, top_p=0.9, seed=5), dict(max_new_tokens=5, greedy=True)]


def _generate(pol, tok, lean=True, continuous=True, prefill_tokens=0, together=True):
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    # 10 rows through 4: continuous, finished rows are refilled at every finish and leave the KV cache once
    # none wait; lock-step, batches of 4, 4 and 2 whose finished rows leave the cache (every stage alike)
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=4, compact_every=100, lean_decode=lean,
                         continuous=continuous, prefill_tokens=prefill_tokens)
    assert eng.lean_decode == lean and eng.continuous == (lean and continuous)
    prompts = [tok.encode(s) for s in PROMPTS]
    calls = [(prompts, SamplingParams(**sp)) for sp in SAMPLING]
    runs = [eng.generate(prompts, params) for _, params in calls]
    if together:  # the calls through one KV cache (an evaluation's greedy and sampled sets)
        runs += eng.generate_many(calls)
    return [[(r.response_ids, r.logprobs, r.finished) for r in run] for run in runs]


def _pp_engine_job(rank, world, state):
    from megatron.core import parallel_state as mps

    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed(1, world)
    m, p, o = tiny_policy_cfgs()
    p.pipeline_parallel = world
    tok = CharTokenizer()
    pol = Policy(m, p, o, tok.vocab_size, info.device, "torch", trainable=False, pad_id=tok.pad_id)
    pol.model.load_state_dict(_stage_state(state, mps.get_pipeline_model_parallel_rank()), strict=False)
    return [_generate(pol, tok), _generate(pol, tok, prefill_tokens=1)]  # prefills of one prompt each too


def test_embedded_engine_pipeline_parallel_equals_single_stage():
    """PP=2: each stage decodes its own layers with its own KV cache; every rank returns PP=1's rollouts, also
    with the prefills in forwards of one prompt each (every stage runs the same chunks); the greedy and sampled
    calls decoded together (generate_many) draw what each draws alone."""
    ref_pol, tok = tiny_policy()
    state = {k: v.clone() for k, v in ref_pol.state_dict().items()}
    want = _generate(ref_pol, tok)
    assert any(len(r[0]) > 1 for r in want[0])
    n = len(SAMPLING)  # generate_many's rollouts = each call's alone (the tokens; log-probs within 1e-6)
    assert [[r[0] for r in run] for run in want[n:]] == [[r[0] for r in run] for run in want[:n]]
    for g_run, w_run in zip(want[n:], want[:n]):
        assert [r[1] for r in g_run] == [pytest.approx(r[1], abs=1e-6) for r in w_run]
    for got in (g for pair in run_distributed(_pp_engine_job, 2, (state,)) for g in pair):
        for g_runs, w_runs in zip(got, want):
            assert [r[0] for r in g_runs] == [r[0] for r in w_runs]  # identical tokens (same seeded draws)
            assert [r[2] for r in g_runs] == [r[2] for r in w_runs]
            for (_, g_lp, _), (_, w_lp, _) in zip(g_runs, w_runs):
                assert g_lp == pytest.approx(w_lp, abs=1e-5)


def _tp_pp_engine_job(rank, world, hf_dirs, tp, pp):
    from types import SimpleNamespace

    from megatron.core import parallel_state as mps
    from test_convert import _mcfg

    from megaprorl.models import convert as C
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    from test_convert import EP_FAMILIES

    out = {}
    # at TP > 1 the MoE families also with their experts spread over the TP ranks (parallel.expert_parallel)
    runs = [(f, f, 1) for f in hf_dirs] + ([(f + "-ep2", f, 2) for f in EP_FAMILIES if f in hf_dirs] if tp > 1 else [])
    for name, family, ep in runs:
        hf_dir = hf_dirs[family]
        info = init_distributed(tp, pp, expert_parallel=ep)
        hf_config = C.load_hf_config(hf_dir)
        p = SimpleNamespace(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=False, expert_parallel=ep)
        tok = CharTokenizer()
        pol = Policy(_mcfg(hf_dir, "sdpa"), p, tiny_policy_cfgs()[2], C.hf_vocab_size(hf_config), info.device,
                     "torch", trainable=False, pad_id=tok.pad_id)
        C.load_hf_into_model(pol.model, hf_dir, hf_config)
        stream = C.HFWeightStream(pol.model, hf_config)  # what a refit by HF name receives; the second run
        streamed = [[[(n, t.clone()) for n, t in b] for b in stream.buckets(STREAM_BUCKET, dtype=dtype)]
                    for dtype in (None, torch.bfloat16)]  # reuses the first one's names and shapes
        # lean decode steps, continuous batching (MoE too); the calls decoded together for one dense family
        out[name] = (_generate(pol, tok, together=name == "qwen2"), streamed)
        del pol
        mps.destroy_model_parallel()
    return out


STREAM_BUCKET = 40_000  # bytes: a few tensors of the tiny models per bucket, and some tensors larger than one


@pytest.fixture(scope="module")
def tp_pp_runs(tmp_path_factory):
    """The job of the tests below, at one rank and at TP=2 x PP=2 (4 ranks)."""
    pytest.importorskip("transformers")
    from test_convert import FAMILIES, _make_hf

    root = tmp_path_factory.mktemp("tp_pp")
    hf_dirs = {family: str(root / family) for family in FAMILIES}
    hf = {family: _make_hf(family, d) for family, d in hf_dirs.items()}
    want = run_distributed(_tp_pp_engine_job, 1, (hf_dirs, 1, 1))[0]
    got_all = run_distributed(_tp_pp_engine_job, 4, (hf_dirs, 2, 2))
    return hf_dirs, hf, want, got_all


def _layouts(hf_dirs):
    """(result key, HF family) of the TP=2 x PP=2 runs: every family, and the MoE ones again at EP=2."""
    from test_convert import EP_FAMILIES

    return [(f, f) for f in hf_dirs] + [(f + "-ep2", f) for f in EP_FAMILIES]


def test_embedded_engine_at_tp2_pp2_equals_one_rank(tp_pp_runs):
    """Four ranks, TP=2 x PP=2, the weights of a tiny HF Llama (untied, Llama-3.x RoPE scaling), Qwen2
    (tied embeddings: the last stage samples with its copy of the embedding), Qwen3 (head_dim 32 for
    hidden 64 / 4 heads, per-head q/k norms) and the MoE families (also with two whole experts on each TP rank:
    parallel.expert_parallel=2) loaded and sharded by the converter: every rank returns the
    single-rank rollouts (greedy and seeded sampling; for Qwen2 also decoded together; vocab-parallel logits
    gathered on the last stage of each TP rank), and the single-rank log-probs (the prefill on Megatron's forward, the steps on the lean
    decode stage) are transformers' for the same tokens.  One job per layout for the models."""
    hf_dirs, hf, want, got_all = tp_pp_runs
    want = {family: w[0] for family, w in want.items()}
    _check_against_hf(want, hf)
    for key, family in _layouts(hf_dirs):
        assert any(len(r[0]) > 1 for r in want[family][0]), family
        for got in got_all:
            for g_runs, w_runs in zip(got[key][0], want[family]):
                assert [r[0] for r in g_runs] == [r[0] for r in w_runs], family
                assert [r[2] for r in g_runs] == [r[2] for r in w_runs], family
                for (_, g_lp, _), (_, w_lp, _) in zip(g_runs, w_runs):
                    assert g_lp == pytest.approx(w_lp, abs=1e-4), family


def test_weight_stream_gives_every_rank_the_hf_checkpoint(tp_pp_runs):
    """``convert.HFWeightStream`` (the refit of an engine that loads by HF name) of the models at TP=2 x PP=2 and
    at one rank: every rank receives the HF checkpoint the model was loaded from, bit for bit (fp32, and cast to
    bf16), each tensor once (a tied model's output layer is not sent again), in buckets within the limit."""
    from megaprorl.models import convert as C

    hf_dirs, _, want_one, got_all = tp_pp_runs
    for key, family in _layouts(hf_dirs):
        want = C.load_hf_state_dict(hf_dirs[family])
        for rank, res in enumerate([want_one] + got_all):
            for buckets, dtype in zip(res[family if res is want_one else key][1], (torch.float32, torch.bfloat16)):
                names = [n for b in buckets for n, _ in b]
                assert len(names) == len(set(names)) and set(names) == set(want), (family, rank, set(want) ^ set(names))
                for b in buckets:
                    for n, t in b:
                        assert t.dtype == dtype and torch.equal(t, want[n].to(dtype)), (family, rank, n)
                    nbytes = sum(t.numel() * t.element_size() for _, t in b)
                    assert nbytes <= STREAM_BUCKET or len(b) == 1, (family, rank, [n for n, _ in b], nbytes)
                assert len(buckets) > 3, family


def _check_against_hf(rollouts, hf_models):
    """Each rollout's log-probs (temperature 1: the sampled runs' and the greedy run's) = the HF model's
    log-softmax at the same tokens."""
    from megaprorl.models.tokenizer import CharTokenizer

    tok = CharTokenizer()
    for family, runs in rollouts.items():
        n = 0
        for run in runs:
            per_prompt = len(run) // len(PROMPTS)
            for i, (resp, lps, _) in enumerate(run):
                prompt = tok.encode(PROMPTS[i // per_prompt])
                with torch.no_grad():
                    logits = hf_models[family](input_ids=torch.tensor([prompt + resp])).logits[0]
                want = torch.log_softmax(logits.float(), -1)[len(prompt) - 1: -1].gather(
                    -1, torch.tensor(resp)[:, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(lps), want, atol=1e-4, rtol=0, msg=lambda m: f"{family}: {m}")
                n += len(resp)
        assert n >= 40, family


def test_pipeline_parallel_with_the_embedded_engine_is_a_valid_config():
    from megaprorl.config import load_config

    cfg = load_config("examples/demo.yaml", ["parallel.pipeline_parallel=2"])
    assert cfg.parallel.pipeline_parallel == 2 and cfg.rollout.engine == "megatron"


def _kv_fit_job(rank, world, tp):
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    info = init_distributed(tp, world // tp)
    m, p, o = tiny_policy_cfgs()
    p.tensor_parallel, p.pipeline_parallel = tp, world // tp
    tok = CharTokenizer()
    pol = Policy(m, p, o, tok.vocab_size, info.device, "torch", trainable=False, pad_id=tok.pad_id)
    prompts = [tok.encode(s) for s in PROMPTS]
    seq = max(len(x) for x in prompts) + 6
    per_row = MegatronEngine(pol, tok.eos_id, tok.pad_id).kv_bytes_per_row(seq)
    fits = 2 + rank  # rank 0 holds 2 rows, rank 1 holds 3
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=8, kv_cache_fraction=0.5,
                         free_memory=lambda: int((fits + 0.5) * per_row / 0.5))
    out = eng.generate(prompts, SamplingParams(max_new_tokens=6, n=2, seed=5, temperature=1.0))
    return eng.stats["rows"], per_row, [r.response_ids for r in out]


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "pp2"])
def test_kv_cache_fit_agrees_over_the_model_parallel_group(tp):
    """Ranks with different free memory (2 and 3 rows' worth) decode with the smaller count, TP=2 (each rank
    half the query groups) or PP=2 (each stage half the layers), and return the same rollouts."""
    (rows0, per0, out0), (rows1, per1, out1) = run_distributed(_kv_fit_job, 2, (tp,))
    assert rows0 == rows1 == 2
    assert per0 == per1  # half the groups of 2 layers, or all groups of 1 layer
    assert out0 == out1
