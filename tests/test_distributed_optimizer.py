"""Megatron's optimizer in the policy, and its distributed (ZeRO-1) form over two gloo ranks: the same
updates as the replicated optimizer with half the Adam state per rank; its checkpoint resumes exactly,
reshards to one rank, and is refused by a run with the other optimizer; bf16 parameters train on fp32
main weights."""

import os

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import tiny_policy_cfgs


def _batch(rank, n_global_tokens=None):
    """This DP rank's half of a batch; the loss weights carry the global token count."""
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.policy import build_seq_batch

    tok = CharTokenizer()
    g = torch.Generator().manual_seed(11 + rank)
    prompts = [tok.encode(s) for s in (["1+2=", "13+45=", "7+8="] if rank == 0 else ["99+1=", "5+55="])]
    resp = [torch.randint(2, tok.vocab_size, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 9, (len(prompts),), generator=g)]
    b = build_seq_batch(prompts, resp, tok.pad_id)
    b.advantages = torch.randn(b.loss_mask.shape, generator=g) * b.loss_mask
    b.old_logp = torch.full(b.loss_mask.shape, -3.0)
    b.ref_logp = torch.full(b.loss_mask.shape, -3.1)
    b.weights = b.loss_mask / float(n_global_tokens)
    return b, tok


def _global_tokens():
    return sum(float(_batch(r, 1)[0].loss_mask.sum()) for r in (0, 1))


def _policy(distributed, dtype="fp32", lr=1e-2, **policy_kwargs):
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed()
    torch.manual_seed(3)
    m, p, o = tiny_policy_cfgs()
    m.params_dtype = dtype
    o.distributed_optimizer, o.lr, o.weight_decay = distributed, lr, 0.1
    from megaprorl.models.tokenizer import CharTokenizer

    return Policy(m, p, o, CharTokenizer().vocab_size, info.device, "torch", **policy_kwargs)


def _steps(pol, rank, n):
    from megaprorl.algo.loss import LossSpec

    batch, _ = _batch(rank, _global_tokens())
    return [pol.train_step(batch, LossSpec(kl_coef=0.1), micro_batch_size=2)["grad_norm"] for _ in range(n)]


def _train_job(rank, world, distributed):
    pol = _policy(distributed)
    norms = _steps(pol, rank, 2)
    n_state = sum(v.numel() for st in pol.adam_states() for k, v in st.items() if k.startswith("exp_avg"))
    return dict(norms=norms, weights=[(n, p.detach().clone()) for n, p in pol.model.named_parameters()],
                n_state=n_state,
                n_params=sum(p.numel() for p in pol.model.parameters()))


def test_distributed_optimizer_updates_equal_replicated_with_half_the_state():
    rep = run_distributed(_train_job, 2, (False,))
    dist = run_distributed(_train_job, 2, (True,))
    for r in range(2):
        assert dist[r]["norms"] == pytest.approx(rep[r]["norms"], rel=1e-6)
        for (name, a), (_, b) in zip(dist[r]["weights"], rep[r]["weights"]):
            # The norm is summed over shards in another order (1 ulp apart here), so updates differ in
            # the last bits, except where Adam amplifies rounding noise: the key part of the QKV bias has
            # an exactly zero true gradient (a constant added to every key cancels in the softmax), and
            # Adam's m / sqrt(v) turns its ~1e-10 rounding residue into steps of up to lr (1e-2); this
            # machine: 5e-6 apart there after two steps, 1e-7 everywhere else.
            tol = dict(rtol=0, atol=2 * 2 * 1e-2) if name.endswith("linear_qkv.bias") else dict(rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    for (_, a), (_, b) in zip(dist[0]["weights"], dist[1]["weights"]):  # parameters all-gathered after the step
        assert torch.equal(a, b)
    n = rep[0]["n_params"]
    assert rep[0]["n_state"] == rep[1]["n_state"] == 2 * n  # exp_avg + exp_avg_sq of every parameter
    assert dist[0]["n_state"] + dist[1]["n_state"] == 2 * n  # sharded over the two DP ranks
    assert max(dist[0]["n_state"], dist[1]["n_state"]) < 1.2 * n


def _ckpt_job(rank, world, ckpt, mode, dtype):
    from megaprorl.dist_ckpt import load_policy, save_policy

    pol = _policy(True, dtype=dtype)
    if mode == "reshard":  # one rank: load the two ranks' shards, save them again
        load_policy(ckpt, pol)
        save_policy(ckpt + "_world1", pol)
        return None
    # two ranks: save after 2 updates and make a third; a fresh policy (a new model and optimizer) loads the
    # checkpoint and makes the third again
    _steps(pol, rank, 2)
    import logging

    warned = []  # what Megatron's save logs (it compared the ranks' unsharded entries and warned of param_state)
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("megatron.core.dist_checkpointing").addHandler(handler)
    save_policy(ckpt, pol)
    logging.getLogger("megatron.core.dist_checkpointing").removeHandler(handler)
    assert not [m for m in warned if "differs" in m], warned
    _steps(pol, rank, 1)
    resumed = _policy(True, dtype=dtype)
    load_policy(ckpt, resumed)
    assert resumed.updates == 2
    _steps(resumed, rank, 1)
    return [[p.detach().clone() for p in q.model.parameters()] for q in (pol, resumed)]


def _tensors(directory, tmp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, os.path.basename(directory) + ".pt")
    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_checkpoint_resumes_exactly_and_reshards(tmp_path, dtype):
    ckpt = str(tmp_path / "do")
    for cont, resumed in run_distributed(_ckpt_job, 2, (ckpt, "save-load", dtype)):
        for a, b in zip(cont, resumed):
            assert torch.equal(a, b)
    run_distributed(_ckpt_job, 1, (ckpt, "reshard", dtype))
    two, one = _tensors(ckpt, str(tmp_path)), _tensors(ckpt + "_world1", str(tmp_path))
    keys = [k for k in two if k.startswith("optimizer.state.")]
    assert any(".exp_avg_sq." in k for k in keys) and any(k.startswith("optimizer.state.param.") for k in keys)
    for k in keys:
        assert torch.equal(two[k], one[k]), k


def _mismatch_job(rank, world, ckpt):
    from megaprorl.dist_ckpt import load_policy, save_policy

    pol = _policy(False)
    _steps(pol, rank, 1)
    save_policy(ckpt, pol)
    other = _policy(True)
    with pytest.raises(ValueError, match="distributed_optimizer=True"):
        load_policy(ckpt, other)
    load_policy(ckpt, other, load_optimizer=False)  # the weights alone still load
    return [torch.equal(a, b) for a, b in zip(pol.model.parameters(), other.model.parameters())]


def test_checkpoint_of_the_other_optimizer_is_refused(tmp_path):
    out = run_distributed(_mismatch_job, 1, (str(tmp_path / "rep"),))
    assert all(out[0])


def _bf16_job(rank, world):
    pol = _policy(True, dtype="bf16", lr=1e-5)
    inner = pol.optimizer.chained_optimizers[0]
    before = [p.detach().clone() for p in pol.model.parameters()]
    _steps(pol, rank, 3)
    main = [p for g in inner.optimizer.param_groups for p in g["params"]]
    return dict(main_dtypes={p.dtype for p in main}, model_dtypes={p.dtype for p in pol.model.parameters()},
                moved=sum(int(not torch.equal(a, b)) for a, b in zip(before, pol.model.parameters())),
                updates=pol.updates)


def test_bf16_parameters_train_on_fp32_main_weights():
    for out in run_distributed(_bf16_job, 2):
        # every parameter is bf16 (build_gpt casts the local spec's fp32 torch norms); Adam updates fp32 copies
        assert out["main_dtypes"] == {torch.float32} and out["model_dtypes"] == {torch.bfloat16}
        assert out["updates"] == 3 and out["moved"] > 0


def test_trainer_with_distributed_optimizer_checkpoints_and_resumes(tmp_path):
    """train.optim.distributed_optimizer reaches the trainer's policy; its checkpoint restores weights and
    Adam state exactly, and a run configured with the replicated optimizer refuses it by name."""
    from test_reliability import _same, _snapshot, _trainer

    t = _trainer(tmp_path, "train.optim.distributed_optimizer=true")
    assert t.policy.distributed_optimizer
    t.rl_step()
    t.step += 1
    path = t.save_checkpoint()
    saved = _snapshot(t)
    u = _trainer(tmp_path, "train.optim.distributed_optimizer=true")
    u.load_checkpoint(path)
    assert u.step == 1 and u.policy.updates == t.policy.updates > 0
    assert _same(_snapshot(u), saved)
    w = _trainer(tmp_path, "train.optim.distributed_optimizer=false")
    with pytest.raises(ValueError, match="distributed_optimizer=False"):
        w.load_checkpoint(path)


def _reload_job(rank, world):
    """Weights written into the model outside the optimizer (an HF checkpoint load) reach its fp32 main
    weights through ``reload_model_params``: a zero-learning-rate step leaves the loaded weights."""
    pol, other = _policy(True, dtype="bf16"), _policy(False, dtype="bf16")
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.5)
    pol.model.load_state_dict(other.model.state_dict())
    pol.optimizer.reload_model_params()
    pol.set_lr(0.0, weight_decay=0.0)
    _steps(pol, rank, 1)
    return [torch.equal(a, b) for a, b in zip(pol.model.parameters(), other.model.parameters())]


def test_weights_loaded_into_the_model_reach_the_main_weights():
    for out in run_distributed(_reload_job, 2):
        assert all(out)


# ------------------------------------------------------------------ learning-rate schedule (train.optim.lr_*)
def test_lr_schedule_warmup_then_cosine_by_hand():
    """lr 1e-3, 4 warmup steps from 0, cosine to 1e-4 at step 10: steps 1-4 train at 2.5e-4 .. 1e-3, step 7 (half
    way through the decay) at 1e-4 + 0.5 * 9e-4, step 10 and after at 1e-4.  Every parameter group gets the rate;
    the weight decay keeps each group's multiplier (0 on biases and norms).  An optimizer rebuilt by a reset
    continues the schedule, and the update uses the rate: Adam's first step moves each weight by about lr."""
    from megaprorl.algo.loss import LossSpec
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed()
    torch.manual_seed(3)
    m, p, o = tiny_policy_cfgs()
    o.lr, o.weight_decay, o.lr_warmup_steps, o.lr_warmup_init = 1e-3, 0.1, 4, 0.0
    o.lr_decay_style, o.lr_decay_steps, o.min_lr = "cosine", 10, 1e-4
    from megaprorl.models.tokenizer import CharTokenizer

    pol = Policy(m, p, o, CharTokenizer().vocab_size, info.device, "torch")
    want = {1: 2.5e-4, 2: 5e-4, 3: 7.5e-4, 4: 1e-3, 7: 5.5e-4, 10: 1e-4, 12: 1e-4}
    for step, lr in want.items():
        assert pol.schedule_lr(step, total_steps=99) == pytest.approx(lr, rel=1e-12), step
        groups = pol.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([lr] * len(groups), rel=1e-12)
        assert sorted({g["weight_decay"] for g in groups}) == [0.0, pytest.approx(0.1)]
    pol.reset_optimizer()
    assert pol.schedule_lr(7, total_steps=99) == pytest.approx(5.5e-4)
    assert [g["lr"] for g in pol.optimizer.param_groups] == pytest.approx([5.5e-4] * len(pol.optimizer.param_groups))

    pol.schedule_lr(1, total_steps=99)  # 2.5e-4
    for g in pol.optimizer.param_groups:
        g["weight_decay"] = 0.0  # the step's move is Adam's alone
    before = [q.detach().clone() for q in pol.model.parameters()]
    batch, _ = _batch(0, _global_tokens())
    pol.train_step(batch, LossSpec(), micro_batch_size=4)
    moved = torch.cat([(q.detach() - b).abs().reshape(-1) for q, b in zip(pol.model.parameters(), before)])
    assert float(moved.max()) == pytest.approx(2.5e-4, rel=1e-3)  # Adam's first step: lr * g / (|g| + eps)


def test_lr_schedule_decays_over_train_steps_by_default_and_linear():
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy
    from megaprorl.models.tokenizer import CharTokenizer

    info = init_distributed()
    m, p, o = tiny_policy_cfgs()
    o.lr, o.lr_warmup_steps, o.lr_decay_style, o.lr_decay_steps, o.min_lr = 1e-3, 0, "linear", 0, 0.0
    pol = Policy(m, p, o, CharTokenizer().vocab_size, info.device, "torch")
    assert [pol.schedule_lr(k, total_steps=4) for k in (0, 1, 2, 4, 5)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 0, 0])
    o.lr_decay_style = "constant"
    pol.reset_optimizer()
    assert [pol.schedule_lr(k, total_steps=4) for k in (1, 4, 9)] == pytest.approx([1e-3] * 3)


def test_lr_schedule_config_errors():
    from megaprorl.config import ConfigError, load_config

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    cfg = load_config(demo, ["train.optim.lr_decay_style=cosine", "train.optim.lr_warmup_steps=5"])
    assert cfg.train.optim.lr_decay_style == "cosine"
    bad = {
        "train.optim.lr_decay_style=step": "'train.optim.lr_decay_style': must be one of constant, linear, cosine",
        "train.optim.min_lr=1.0": "'train.optim.min_lr': must be in",
        "train.optim.lr_warmup_init=1.0": "'train.optim.lr_warmup_init': must be in",
        "train.optim.lr_warmup_steps=-1": "'train.optim.lr_warmup_steps': must be >= 0",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            load_config(demo, [override])
    with pytest.raises(ConfigError, match="'train.optim.lr_decay_steps': the decay must end after the warmup"):
        load_config(demo, ["train.optim.lr_decay_style=linear", "train.optim.lr_warmup_steps=10",
                           "train.optim.lr_decay_steps=10"])
