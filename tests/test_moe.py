"""Mixture-of-experts policies (the Qwen3-MoE shape: ``model.num_experts``) through the trainer: at TP=2 (with the
sequence parallelism Megatron's MoE layer needs there) RL steps run and checkpoint, the checkpoint resumes at
TP=1 with the same log-probs and the same next step, and exported as an HF directory it loads in transformers'
Qwen3-MoE with the same log-probs.  The HF <-> Megatron mapping itself is in test_convert.py (families
qwen3_moe and qwen3_moe_raw)."""

import os

import pytest
import torch

from dist_utils import run_distributed
from test_reset import ROOT, TINY

pytest.importorskip("megatron.core")

MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=32", "model.qk_norm=true",
       "model.add_qkv_bias=false", "model.num_query_groups=2", "model.num_layers=2"]
PROMPTS, RESPONSES = [[3, 4, 5, 6], [7, 8]], [[9, 10, 1], [11, 1]]  # test_dist_ckpt's job's batch


@pytest.mark.parametrize("ep", [1, 2], ids=["", "ep2"])
def test_moe_policy_trains_at_tp2_resumes_at_tp1_and_exports_to_hf(tmp_path, ep):
    """At TP=2, with the experts split over both ranks (EP=1) or two whole experts on each (EP=2): two RL steps
    checkpoint; one rank resumes them with the same log-probs, and its next step (rollouts, loss, gradient norm)
    is the TP=2 run's; the checkpoint exports to transformers' Qwen3-MoE."""
    transformers = pytest.importorskip("transformers")
    from megaprorl.export import export_checkpoint_to_hf
    from megaprorl.policy import build_seq_batch

    from test_dist_ckpt import _trainer_job

    moe = MOE + ["parallel.sequence_parallel=true"]  # at TP=2, and ignored at TP=1
    saved = run_distributed(_trainer_job, 2, (str(tmp_path), "save", "tp", moe + [f"parallel.expert_parallel={ep}"]))
    loaded = run_distributed(_trainer_job, 1, (str(tmp_path), "load", "tp", moe))[0]
    assert all(s["step"] == 2 and s["adam_steps"] == {2.0} for s in saved) and loaded["step"] == 2
    for s in saved:
        torch.testing.assert_close(loaded["policy"], s["policy"], rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded["reference"], s["reference"], rtol=0, atol=1e-5)
        for k, v in s["next"].items():  # the resumed run's next step: same rollouts, same update
            assert loaded["next"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    hf_dir = str(tmp_path / "hf")
    export_checkpoint_to_hf(str(tmp_path / "demo"), hf_dir, log=lambda *a: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    batch = build_seq_batch(PROMPTS, RESPONSES, 0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch.tokens).logits[:, :-1].float(), -1)
    want = logp.gather(-1, batch.tokens[:, 1:, None])[..., 0]
    mask = batch.loss_mask.bool()  # the response tokens (the rows are right-padded)
    torch.testing.assert_close(want[mask], saved[0]["policy"][mask], rtol=0, atol=1e-4)


def _dp_job(rank, world, out_dir, extra=()):
    from megatron.core import parallel_state as mps

    from megaprorl.config import load_config
    from megaprorl.trainer import Trainer

    over = [f"output_dir={out_dir}", *TINY, *MOE, "train.optim.distributed_optimizer=true", *extra]
    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), over))
    try:
        t.warmstart()
        before = {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}
        stats = t.rl_step()
        after = {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}
        return dict(stats={k: stats[k] for k in ("loss", "grad_norm", "moe/load_max_over_mean", "moe/routed_tokens")},
                    moved=sorted(n for n in after if not torch.equal(after[n], before[n])), after=after,
                    vocab=t.tokenizer.vocab_size)
    finally:
        t.close()
        mps.destroy_model_parallel()


def test_moe_policy_with_the_distributed_optimizer_at_dp2(tmp_path):
    """Two data-parallel replicas, Megatron's distributed optimizer (the experts' parameters in their own buffers,
    reduced over the expert data-parallel group): one RL step updates the router and every expert, finitely, and
    leaves the replicas equal; the step's metrics hold the experts' load."""
    r0, r1 = run_distributed(_dp_job, 2, (str(tmp_path),))
    for r in (r0, r1):
        assert all(torch.isfinite(torch.tensor(float(v))) for v in r["stats"].values())
        assert r["stats"]["moe/routed_tokens"] > 0 and r["stats"]["moe/load_max_over_mean"] >= 1.0  # logged
        assert any(n.endswith("mlp.router.weight") for n in r["moved"]), (r["stats"], r["moved"])
        assert {n.split("local_experts.")[1].split(".")[0] for n in r["moved"] if "local_experts" in n} == \
            {"0", "1", "2", "3"}
    for n, v in r0["after"].items():
        assert torch.equal(v, r1["after"][n]), n


def test_expert_parallel_with_data_parallel_and_the_distributed_optimizer(tmp_path):
    """Four ranks: two data-parallel replicas of TP=2 with the experts spread over the two TP ranks (EP=2) and
    Megatron's distributed optimizer (the experts' Adam state sharded over the expert data-parallel group): the
    RL step is the one of two TP=1 replicas (loss, gradient norm, expert load), each rank trains its two experts,
    and the replicas stay equal."""
    from megaprorl.models import convert as C
    from test_dist_ckpt import _trainer_job

    run_distributed(_trainer_job, 1, (str(tmp_path), "save", "tp", MOE))  # warm-started weights that both load
    start = [f"model.load={tmp_path / 'demo'}", "warmstart.steps=0"]
    one = run_distributed(_dp_job, 2, (str(tmp_path / "dp2"), start))
    ep = run_distributed(_dp_job, 4, (str(tmp_path / "ep"), start + ["parallel.tensor_parallel=2",
                                                                    "parallel.sequence_parallel=true",
                                                                    "parallel.expert_parallel=2"]))
    for r in ep + one:  # the expert load is the step's, over both replicas' tokens
        for k, v in one[0]["stats"].items():
            assert r["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    for r in ep:
        assert {n.split("local_experts.")[1].split(".")[0] for n in r["moved"] if "local_experts" in n} == {"0", "1"}
    for a, b in ((ep[0], ep[2]), (ep[1], ep[3])):  # the two replicas of each TP rank (DP is the outer dimension)
        for n, v in a["after"].items():
            assert torch.equal(v, b["after"][n]), n
    hf_config = _tiny_hf_config(one[0]["vocab"])
    hf = C.megatron_to_hf([ep[0]["after"], ep[1]["after"]], hf_config, ep_size=2)
    want = C.megatron_to_hf([one[0]["after"]], hf_config)
    assert set(hf) == set(want)
    for k in want:  # the updated weights, experts gathered from both EP ranks, are the TP=1 replicas' (to 1e-5:
        # Adam's first step moves a weight by about the learning rate, 3e-4, whatever its gradient's rounding)
        torch.testing.assert_close(hf[k], want[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")


def _tiny_hf_config(vocab):
    """The HF config of the trainer's tiny MoE model (MOE on examples/demo.yaml), for the weight mapping."""
    from megaprorl.config import load_config
    from megaprorl.models import convert as C

    return C.hf_config_from_model_config(load_config(os.path.join(ROOT, "examples", "demo.yaml"), TINY + MOE).model,
                                         vocab)


def test_frozen_router_stays_while_the_experts_train(tmp_path):
    """``algo.moe_freeze_router``: an RL step leaves every router's weight as it was and trains the experts; the
    config refuses it for a dense model."""
    from megaprorl.config import ConfigError, load_config

    r0, r1 = run_distributed(_dp_job, 2, (str(tmp_path), ["algo.moe_freeze_router=true"]))
    for r in (r0, r1):
        assert not any(n.endswith("mlp.router.weight") for n in r["moved"])
        assert any("local_experts" in n for n in r["moved"])
    with pytest.raises(ConfigError, match="'algo.moe_freeze_router': needs an MoE model"):
        load_config(os.path.join(ROOT, "examples", "demo.yaml"), ["algo.moe_freeze_router=true"])


def test_moe_config_checks():
    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(ROOT, "examples", "demo.yaml")
    cfg = load_config(demo, MOE)
    assert cfg.model.num_experts == 4 and cfg.model.moe_norm_topk_prob
    qwen2 = ["model.qk_norm=false", "model.add_qkv_bias=true", "model.moe_shared_expert_ffn_hidden_size=48"]
    assert load_config(demo, MOE + qwen2).model.moe_shared_expert_ffn_hidden_size == 48  # the Qwen2-MoE shape
    for extra, msg in [(["model.moe_topk=5"], "'model.moe_topk': must be in 1..model.num_experts"),
                       (["parallel.tensor_parallel=2"], "'parallel.sequence_parallel': must be true for an MoE"),
                       (["model.qk_norm=false"], "'model.num_experts': an MoE model is the Qwen3-MoE shape"),
                       (["model.moe_shared_expert_ffn_hidden_size=48"], "or the Qwen2-MoE shape"),
                       (["rollout.cuda_graphs=true", "rollout.decode_attention=triton"],
                        "'rollout.cuda_graphs': an MoE model's decode step .* depend on the routing"),
                       (["model.moe_ffn_hidden_size=33", "parallel.tensor_parallel=2",
                         "parallel.sequence_parallel=true"], "'model.moe_ffn_hidden_size': must be divisible"),
                       (["parallel.expert_parallel=3", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
                        r"'parallel.expert_parallel': \(3\) must divide parallel.tensor_parallel \(2\)"),
                       (["parallel.expert_parallel=4", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true",
                         "model.num_query_groups=4", "model.num_experts=6"],
                        r"'parallel.expert_parallel': \(4\) must divide model.num_experts \(6\)"),
                       (["parallel.expert_parallel=0"], "'parallel.expert_parallel': must be >= 1")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(demo, MOE + extra)
    sp2 = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    assert load_config(demo, MOE + sp2 + ["parallel.expert_parallel=2"]).parallel.expert_parallel == 2
    # at TP=4, EP=2: each expert split over 2 ranks, so its FFN width must divide by 2, not by 4
    tp4 = ["parallel.tensor_parallel=4", "parallel.sequence_parallel=true", "model.num_query_groups=4"]
    assert load_config(demo, MOE + tp4 + ["parallel.expert_parallel=2", "model.moe_ffn_hidden_size=34"])
    with pytest.raises(ConfigError, match="'model.moe_ffn_hidden_size': must be divisible by .* \\(4: each"):
        load_config(demo, MOE + tp4 + ["model.moe_ffn_hidden_size=34"])
    with pytest.raises(ConfigError, match="'parallel.expert_parallel': is 2, but the model has no experts"):
        load_config(demo, ["parallel.expert_parallel=2"])


@pytest.mark.parametrize("replay", [False, True], ids=["", "routing-replay"])
def test_moe_checkpoint_saved_at_one_rank_resumes_at_pp2(tmp_path, replay):
    """The MoE checkpoint of one rank loads at PP=2 (each stage its layers' routers and experts), with the same
    log-probs and the same next step (the engine decoding across the two stages); with routing replay, each stage
    records and replays its own layers' routing, and the step is still one rank's."""
    from test_dist_ckpt import _trainer_job

    moe = MOE + (["algo.moe_routing_replay=true"] if replay else [])
    saved = run_distributed(_trainer_job, 1, (str(tmp_path), "save", "pp", moe))[0]
    for out in run_distributed(_trainer_job, 2, (str(tmp_path), "load", "pp", moe)):
        assert out["step"] == 2 and out["adam_steps"] == {2.0}
        torch.testing.assert_close(out["policy"], saved["policy"], rtol=0, atol=1e-5)
        for k, v in saved["next"].items():
            assert out["next"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def _hf_policy(hf_dir, tp, pp=1, pack=0, routing_replay=False, ep=1):
    """A frozen MoE policy with an HF directory's weights at TP x PP (TP > 1: sequence parallel), its tokenizer and
    test_packing's batch."""
    from types import SimpleNamespace

    from megaprorl.models import convert as C
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy
    from test_convert import _mcfg
    from test_packing import _batch
    from tiny_models import tiny_policy_cfgs

    info = init_distributed(tp, pp, expert_parallel=ep)
    p = SimpleNamespace(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=tp > 1, expert_parallel=ep)
    tok = CharTokenizer()
    hf_config = C.load_hf_config(hf_dir)
    pol = Policy(_mcfg(hf_dir, "sdpa"), p, tiny_policy_cfgs()[2], C.hf_vocab_size(hf_config), info.device, "torch",
                 trainable=False, pad_id=tok.pad_id, pack_tokens=pack, routing_replay=routing_replay)
    C.load_hf_into_model(pol.model, hf_dir, hf_config)
    return pol, _batch(tok)


@pytest.fixture(scope="module")
def moe_hf_dir(tmp_path_factory):
    """A random tiny Qwen3-MoE (4 experts, top-2) over the character tokenizer's vocabulary, as an HF directory."""
    transformers = pytest.importorskip("transformers")
    from megaprorl.models.tokenizer import CharTokenizer
    from test_convert import _hf_config

    torch.manual_seed(0)
    cfg = _hf_config("qwen3_moe")
    cfg.vocab_size = CharTokenizer().vocab_size
    hf_dir = str(tmp_path_factory.mktemp("moe") / "hf")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(hf_dir)
    return hf_dir


def _load_job(rank, world, hf_dir, tp, pp, pack):
    """The expert-load statistics of one log-prob pass over the HF model's weights, at this layout."""
    from megatron.core import parallel_state as mps

    pol, batch = _hf_policy(hf_dir, tp, pp, pack)
    pol.logprobs(batch, 3, expert_load=True)  # 9 rows: micro-batches of one shape (PP needs it)
    out = dict(pol.last_expert_load, real=int(batch.lengths.sum()))
    pol.logprobs(batch, 3)  # not asked: the hooks are gone, the last statistics stay
    assert not any(layer.mlp.router._forward_hooks for layer in pol.model.decoder.layers)
    mps.destroy_model_parallel()
    return out


def test_expert_load_counts_the_real_tokens_whatever_the_layout(moe_hf_dir):
    """``Policy.logprobs(expert_load=True)`` counts the tokens each router sends to each expert, padding left out:
    every real token k times per layer, and the same counts padded or packed, at TP=1, at TP=2 under sequence
    parallelism (each rank's chunk of the sequence, summed) and at PP=2 (each stage its layers, averaged over all)."""
    hf_dir = moe_hf_dir
    layouts = ((1, 1, 0), (1, 1, 24), (2, 1, 0), (1, 2, 0))  # (TP, PP, pack tokens)
    runs = {lay: run_distributed(_load_job, lay[0] * lay[1], (hf_dir, *lay)) for lay in layouts}
    want = runs[(1, 1, 0)][0]
    assert want["moe/routed_tokens"] == 2 * want["real"]  # top-2
    assert 1.0 <= want["moe/load_max_over_mean"] <= 4.0 and 0.0 <= want["moe/dead_experts_frac"] < 1.0
    for outs in runs.values():
        for out in outs:
            for k in ("moe/routed_tokens", "moe/load_max_over_mean", "moe/dead_experts_frac"):
                assert out[k] == pytest.approx(want[k], rel=1e-9), k


# ------------------------------------------------------------------------------------ routing replay (R3)
@pytest.fixture(scope="module")
def replay_policy():
    from test_spine import MOE_MODEL
    from tiny_models import tiny_policy

    return tiny_policy(MOE_MODEL, routing_replay=True)


def _teacher_forced_routing(pol, r):
    """The experts a full forward over the rollout's tokens (but the last) sends each one to: [n, layers, k]."""
    ids = torch.tensor([r.prompt_ids + r.response_ids[:-1]])
    pol.routing_replay.record()
    try:
        with torch.no_grad():
            pol.model.eval()
            pol.model(ids, torch.arange(ids.shape[1])[None], None)
        return pol.routing_replay.recorded()
    finally:
        pol.routing_replay.clear()


@pytest.mark.parametrize("lean", [True, False])
def test_engine_records_each_tokens_experts(replay_policy, lean):
    """Through continuous batching (admissions into freed rows, rows leaving the cache) or lock-step batches,
    the engine's record of each rollout's routing is what a forward over its tokens routes: every token's k
    experts in every MoE layer, prompt and response alike; evaluations (record_routing off) record nothing."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = replay_policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=3, compact_every=2, lean_decode=lean,
                         continuous=lean)
    prompts = [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1="]]
    params = SamplingParams(max_new_tokens=10, n=2, seed=4, temperature=1.0)
    assert all("routing" not in r.extra for r in eng.generate(prompts, params))
    eng.record_routing = True
    out = eng.generate(prompts, params)
    assert eng.stats["admissions"] > 1 and len({len(r.response_ids) for r in out}) > 1
    for r in out:
        got = r.extra["routing"]
        assert got.dtype == torch.int16 and got.shape == (len(r.prompt_ids) + len(r.response_ids) - 1, 2, 2)
        want = _teacher_forced_routing(pol, r)
        assert torch.equal(got.long().sort(-1).values, want.sort(-1).values)


def _replayed_logprobs(pol, batch, routing):
    from megaprorl.policy import SeqBatch

    b = SeqBatch(**{**batch.__dict__, "routing": routing})
    return pol.logprobs(b, 3)


def test_replayed_routing_decides_the_experts(replay_policy):
    """The policy's forward with a batch's routing sends each token to those experts: its own routing replayed
    gives its log-probs (to an ulp); another routing (each expert id shifted) gives others, the same packed and
    padded; and the routers compute their own top-k again afterwards."""
    from megaprorl.policy import routing_batch
    from test_packing import _batch
    from test_spine import MOE_MODEL
    from tiny_models import tiny_policy

    pol, tok = replay_policy
    batch = _batch(tok)
    plain = pol.logprobs(batch, 3)
    own = []
    for i, n in enumerate(batch.lengths.tolist()):
        r = SimpleRollout(batch.tokens[i, :n].tolist())
        own.append(_teacher_forced_routing(pol, r).to(torch.int16))
    routing = routing_batch(own, batch.tokens)
    real = torch.arange(batch.tokens.shape[1] - 1)[None] < (batch.lengths - 1)[:, None]  # (padding: filler experts)
    # the same experts for every real token; the padding's go to the filler experts instead of their own top-k,
    # which changes how many rows each expert's GEMM has, and BLAS may round a row differently in a GEMM of
    # another height (measured: 2 of 84 log-probs 1 ulp apart with torch 2.13's CPU kernels)
    torch.testing.assert_close(_replayed_logprobs(pol, batch, routing)[real], plain[real], rtol=0, atol=1e-6)
    shifted = ((routing.long() + 1) % MOE_MODEL["num_experts"]).to(torch.int16)
    other = _replayed_logprobs(pol, batch, shifted)
    m = batch.loss_mask > 0
    assert (other[m] - plain[m]).abs().max() > 1e-3
    packed, _ = tiny_policy(MOE_MODEL, routing_replay=True, pack_tokens=24)
    packed.model.load_state_dict(pol.model.state_dict())
    torch.testing.assert_close(_replayed_logprobs(packed, batch, shifted)[m], other[m], rtol=0, atol=2e-5)
    assert torch.equal(pol.logprobs(batch, 3), plain)  # no routing given: the routers' own top-k


class SimpleRollout:
    def __init__(self, ids):
        self.prompt_ids, self.response_ids = ids[:1], ids[1:]


def _replay_job(rank, world, hf_dir, tp, ep=1):
    """The log-probs of one HF MoE model's weights with a given (random) routing replayed, at TP=1 or at TP=2
    under sequence parallelism (each rank replays its chunk of the sequence; with ``ep`` 2, to experts that the
    other rank may hold)."""
    from megatron.core import parallel_state as mps

    from megaprorl.policy import SeqBatch

    pol, batch = _hf_policy(hf_dir, tp, routing_replay=True, ep=ep)
    g = torch.Generator().manual_seed(3)
    B, L = batch.tokens.shape
    routing = torch.rand(B, L, 2, 4, generator=g).argsort(-1)[..., :2].to(torch.int16)  # 2 distinct of 4 experts
    out = dict(replayed=pol.logprobs(SeqBatch(**{**batch.__dict__, "routing": routing}), 3), own=pol.logprobs(batch, 3))
    mps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("ep", [1, 2], ids=["", "ep2"])
def test_replay_under_sequence_parallelism_equals_one_rank(moe_hf_dir, ep):
    hf_dir = moe_hf_dir
    one = run_distributed(_replay_job, 1, (hf_dir, 1))[0]
    assert (one["replayed"] - one["own"]).abs().max() > 1e-3  # the random routing is not the model's own
    for out in run_distributed(_replay_job, 2, (hf_dir, 2, ep)):
        torch.testing.assert_close(out["replayed"], one["replayed"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["own"], one["own"], rtol=0, atol=1e-5)


def test_trainer_replays_the_rollouts_routing(tmp_path):
    """``algo.moe_routing_replay``: the trainer's old log-probs and updates replay the engine's recorded routing (an
    RL step at one rank: the old-policy pass then equals the engine's log-probs as without replay, in fp32), and the
    config refuses it where it cannot work."""
    from megaprorl.config import ConfigError, load_config
    from megaprorl.trainer import Trainer

    demo = os.path.join(ROOT, "examples", "demo.yaml")
    t = Trainer(load_config(demo, [f"output_dir={tmp_path}", *TINY, *MOE, "algo.moe_routing_replay=true"]))
    try:
        seen = []
        real = t.policy.logprobs

        def logprobs(batch, *a, **k):
            seen.append(batch.routing)
            return real(batch, *a, **k)

        t.policy.logprobs = logprobs
        t.warmstart()
        stats = t.rl_step()
        assert seen and seen[0] is not None and seen[0].shape[-2:] == (2, 2)
        assert stats["rollout/logprob_mismatch"] < 1e-4 and stats["moe/routed_tokens"] > 0
        assert t.policy.routing_replay is not None and t.reference.routing_replay is None
        assert t.engine.record_routing is False  # off again after the draws
    finally:
        t.close()
    for extra, msg in [(["algo.moe_routing_replay=true", "model.num_experts=0"], "needs an MoE model"),
                       (["algo.moe_routing_replay=true", "parallel.pipeline_parallel=2",
                         "model.recompute_granularity=full"], "would replay a later micro-batch's routing")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(demo, MOE + extra)


# ---------------------------------------------------------------- experts across data-parallel replicas (TP = 1)
def _global_experts(params, ep_rank, ep, n_experts=4):
    """A rank's parameters named as one replica holding every expert names them (local expert i of EP rank r is
    expert r * n / ep + i)."""
    out = {}
    for n, v in params.items():
        if ".local_experts." in n:
            head, tail = n.split(".local_experts.")
            i, rest = tail.split(".", 1)
            n = f"{head}.local_experts.{ep_rank * (n_experts // ep) + int(i)}.{rest}"
        out[n] = v
    return out


def _wide_job(rank, world, out_dir, start):
    """On each of two ranks (TP=1): rollouts of its own prompts (rank 0 two prompts of up to 6 new tokens, rank 1 one
    of up to 3; then rank 0 a second call while rank 1 has none), teacher-forced log-probs and one optimizer step over its own sequences
    in micro-batches of one (rank 0 three, rank 1 one), and one RL step."""
    from megatron.core import parallel_state as mps

    from megaprorl.algo.loss import LossSpec, aggregation_weights
    from megaprorl.config import load_config
    from megaprorl.policy import build_seq_batch
    from megaprorl.rollout import SamplingParams
    from megaprorl.trainer import Trainer

    over = [f"output_dir={out_dir}", *TINY, *MOE, "train.optim.distributed_optimizer=true", *start]
    t = Trainer(load_config(os.path.join(ROOT, "examples", "demo.yaml"), over))
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=6 if rank == 0 else 3, n=2, seed=7 + rank)
        prompts = [[3, 4, 5], [6, 7]] if rank == 0 else [[8, 9, 10, 11]]
        calls = [t.engine.generate(prompts, params)]
        idle = [t.engine.stats["idle_forwards"]]
        calls.append(t.engine.generate([[5, 6]] if rank == 0 else [], params))
        idle.append(t.engine.stats["idle_forwards"])
        rollouts = [[(r.response_ids, r.logprobs) for r in c] for c in calls]
        seqs = ([[3, 4, 5, 6], [7, 8], [5, 6, 7, 8, 9]], [[9, 10, 1], [11, 1], [12, 1]]) if rank == 0 else \
            ([[6, 5, 4]], [[2, 3, 1]])
        batch = build_seq_batch(*seqs, 0)
        logp = t.policy.logprobs(batch, 1)
        batch.old_logp = logp
        batch.advantages = torch.linspace(-1, 1, batch.loss_mask.numel()).view_as(batch.loss_mask) * batch.loss_mask
        batch.weights = aggregation_weights(batch.loss_mask, "token-mean", 17.0, 4.0)  # the two ranks' tokens: 17
        s = t.policy.train_step(batch, LossSpec(), 1)
        idle_micro = t.policy.idle_micro_batches
        after = {n: p.detach().clone() for n, p in t.policy.model.named_parameters()}
        step = t.rl_step()
        t.step += 1
        t.save_checkpoint()
        saved = t.policy.logprobs(build_seq_batch(PROMPTS, RESPONSES, 0), 2)
        return dict(rollouts=rollouts, idle=idle, idle_micro=idle_micro, logp=logp, saved=saved, grad_norm=s["grad_norm"], loss=s["loss"],
                    after=_global_experts(after, mps.get_expert_model_parallel_rank(),
                                          mps.get_expert_model_parallel_world_size()),
                    rl={k: step[k] for k in ("loss", "grad_norm", "moe/load_max_over_mean", "moe/routed_tokens")})
    finally:
        t.close()
        mps.destroy_model_parallel()


@pytest.mark.parametrize("world,extra", [(2, ()), (4, ()), (2, ("train.pack_tokens=12", "train.fused_lm_head=true"))],
                         ids=["dp2", "dp4", "dp2-packed-fused-head"])
def test_experts_across_data_parallel_replicas_equal_whole_replicas(tmp_path, world, extra):
    """parallel.expert_parallel=2 at TP=1 on two ranks (and on four: two expert groups, whose expert gradients are
    summed over the expert data-parallel group): each holds two experts and the ranks exchange tokens in
    every MoE layer (Megatron's all-to-all dispatcher), with different prompts, response lengths and micro-batch
    counts on each (the rank with fewer runs idle ones).  Rollouts (tokens, log-probs), log-prob passes, an optimizer step (Megatron's distributed
    optimizer) and an RL step equal those of two replicas that hold every expert; the rank with less work ran
    idle forwards, and took part in the other's second generate() with none of its own.  The run's checkpoint
    resumes on one rank."""
    from test_dist_ckpt import _trainer_job

    run_distributed(_trainer_job, 1, (str(tmp_path), "save", "tp", MOE))  # warm-started weights that both load
    start = [f"model.load={tmp_path / 'demo'}", "warmstart.steps=0", *extra]
    whole = run_distributed(_wide_job, world, (str(tmp_path / "whole"), start))
    wide = run_distributed(_wide_job, world, (str(tmp_path / "wide"), start + ["parallel.expert_parallel=2"]))
    for w, o in zip(wide, whole):
        for cw, co in zip(w["rollouts"], o["rollouts"]):
            assert [r[0] for r in cw] == [r[0] for r in co]
            for (_, lw), (_, lo) in zip(cw, co):
                torch.testing.assert_close(torch.tensor(lw), torch.tensor(lo), rtol=0, atol=1e-5)
        torch.testing.assert_close(w["logp"], o["logp"], rtol=0, atol=1e-5)
        assert w["grad_norm"] == pytest.approx(o["grad_norm"], rel=1e-5) and w["loss"] == pytest.approx(o["loss"],
                                                                                                       abs=1e-6)
        for k, v in o["rl"].items():
            assert w["rl"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        for n, v in w["after"].items():  # this rank's experts and the dense weights: the whole replica's
            torch.testing.assert_close(v, o["after"][n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # expert groups: ranks (0, 1) and at four ranks (2, 3), whose work is alike
    assert wide[1]["idle"][1] > 0 and whole[1]["idle"] == [0, 0]  # rank 1's forwards in rank 0's second call
    assert wide[1]["idle"][0] > 0 and wide[0]["idle"][0] == 0  # rank 1's shorter decode waited for rank 0's
    assert all(w["idle"] == [0, 0] for w in wide[2:])
    # rank 1's one sequence against rank 0's three: two idle micro-batches in the log-prob pass, two in the step
    # (packed in 12 tokens: rank 0's 7 + 4 and 5 tokens in two packs, rank 1's 6 in one; one idle pack in each)
    idle = 1 if extra else 2
    assert [w["idle_micro"] for w in wide] == [0, 2 * idle, 0, 0][:world] and {o["idle_micro"] for o in whole} == {0}
    assert {n for w in wide for n in w["after"] if "local_experts" in n} == set(n for n in whole[0]["after"]
                                                                                if "local_experts" in n)
    # the checkpoint (Megatron's distributed one) resumes on one rank holding every expert, with the same log-probs
    loaded = run_distributed(_trainer_job, 1, (str(tmp_path / "wide"), "load", "tp",
                                               MOE + ["train.optim.distributed_optimizer=true"]))[0]
    assert loaded["step"] == 1
    from megaprorl.policy import build_seq_batch

    mask = build_seq_batch(PROMPTS, RESPONSES, 0).loss_mask.bool()  # (a packed pass leaves the padding 0)
    torch.testing.assert_close(loaded["policy"][mask], wide[0]["saved"][mask], rtol=0, atol=1e-5)


def test_experts_across_replicas_config_checks():
    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(ROOT, "examples", "demo.yaml")
    assert load_config(demo, MOE + ["parallel.expert_parallel=4"]).parallel.expert_parallel == 4
    with pytest.raises(ConfigError, match=r"across data-parallel replicas \(parallel.tensor_parallel = 1\) needs "
                                          "parallel.pipeline_parallel = 1"):
        load_config(demo, MOE + ["parallel.expert_parallel=2", "parallel.pipeline_parallel=2"])
    with pytest.raises(ConfigError, match="'algo.moe_routing_replay': is not supported with"):
        load_config(demo, MOE + ["parallel.expert_parallel=2", "algo.moe_routing_replay=true"])
    with pytest.raises(ConfigError, match=r"\(4\) must divide parallel.tensor_parallel \(2\)"):
        load_config(demo, MOE + ["parallel.expert_parallel=4", "parallel.tensor_parallel=2",
                                 "parallel.sequence_parallel=true"])


def _draw_rounds_job(rank, world):
    """``Trainer._keep_drawing`` on two ranks of one expert group: rank 0 wants three rounds, rank 1 one."""
    import types

    import megaprorl.trainer as T

    T.wide_expert_group = lambda: torch.distributed.group.WORLD
    calls = []
    sampler = types.SimpleNamespace(rounds=3 if rank == 0 else 1)
    sampler.can_draw = lambda: sampler.rounds > 0
    engine = types.SimpleNamespace(wake=lambda: None,
                                   generate=lambda prompts, params: calls.append(("idle", list(prompts))))
    me = types.SimpleNamespace(engine=engine, device=torch.device("cpu"))
    while T.Trainer._keep_drawing(me, sampler):
        calls.append("draw")
        sampler.rounds -= 1
    return calls


def test_a_rank_done_drawing_takes_part_in_the_others_draws():
    """With the experts across replicas a rank whose batch is complete runs a generate() with no prompts for each
    further round another rank of its expert group draws (dynamic sampling), and all stop together."""
    r0, r1 = run_distributed(_draw_rounds_job, 2)
    assert r0 == ["draw", "draw", "draw"]
    assert r1 == ["draw", ("idle", []), ("idle", [])]
