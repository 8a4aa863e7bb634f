"""Megatron's optimizer on one GPU (NCCL), bf16 parameters: the distributed and the replicated optimizer
take the same steps on fp32 main weights (TE's FusedAdam when TransformerEngine is installed, torch's
Adam otherwise), and a distributed-optimizer checkpoint resumes to the same next update."""

import pytest
import torch

from tiny_models import tiny_policy_cfgs

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _policy(distributed, **policy_kwargs):
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed()
    torch.manual_seed(5)
    m, p, o = tiny_policy_cfgs(params_dtype="bf16")
    o.distributed_optimizer, o.lr, o.weight_decay = distributed, 1e-4, 0.1
    return Policy(m, p, o, CharTokenizer().vocab_size, info.device, "torch", **policy_kwargs)


def _batch():
    from test_packing import _batch as packing_batch
    from megaprorl.models.tokenizer import CharTokenizer

    return packing_batch(CharTokenizer(), seed=4)


def _train(pol, n):
    from megaprorl.algo.loss import LossSpec

    return [pol.train_step(_batch(), LossSpec(kl_coef=0.1), 3)["grad_norm"] for _ in range(n)]


def test_distributed_equals_replicated_bf16_on_gpu():
    rep, dist = _policy(False), _policy(True)
    before = [p.detach().clone() for p in rep.model.parameters()]
    assert _train(dist, 3) == pytest.approx(_train(rep, 3), rel=1e-5)
    for a, b in zip(dist.model.parameters(), rep.model.parameters()):
        torch.testing.assert_close(a, b)  # bf16 tolerances: one fp32 rounding may flip a bf16 one
    assert any(not torch.equal(a, b) for a, b in zip(before, rep.model.parameters()))
    main = [p for o in rep.optimizer.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]
    assert {p.dtype for p in main} == {torch.float32}


def test_distributed_optimizer_checkpoint_resumes_on_gpu(tmp_path):
    from megaprorl.dist_ckpt import load_policy, save_policy

    a = _policy(True)
    _train(a, 2)
    save_policy(str(tmp_path / "ckpt"), a)
    _train(a, 1)
    b = _policy(True)
    load_policy(str(tmp_path / "ckpt"), b)
    _train(b, 1)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_offload_frees_the_optimizer_state_and_trains_the_same_on_gpu():
    """train.offload_optimizer on a GPU: the fp32 main weights, Adam moments and gradient buffer (16 bytes a
    parameter) leave the device between updates and come back bit for bit (pinned host buffers)."""
    plain = _policy(False)
    off = _policy(False, offload=True)
    n_params = sum(p.numel() for p in off.model.parameters())
    norms = []
    for _ in range(3):
        with off.on_device():
            norms += _train(off, 1)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        off.restore()
        assert torch.cuda.memory_allocated() - held >= 16 * n_params  # main weights, two moments, gradients
        off.offload(copy=False)
    assert norms == _train(plain, 3)
    assert all(torch.equal(a, b) for a, b in zip(off.model.parameters(), plain.model.parameters()))
    assert all(h.is_pinned() for h in off._offload._host)
