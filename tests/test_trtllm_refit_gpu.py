"""The TensorRT-LLM engine's refit over real CUDA IPC, without TensorRT-LLM: the engine's handles go to another
process on the same GPU, which opens them as TensorRT-LLM's ``rlhf_utils.WorkerExtension.update_weights`` does
(its own entry by GPU UUID; argument 6 of the rebuild set to its device) and copies them into its own model.
Its copy must equal the policy's weights, streamed as HF tensors, bit for bit, in bf16."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _worker(conn, uuid):
    """The stand-in for a TensorRT-LLM worker: answers each update_weights call with the tensors it copied."""
    torch.cuda.set_device(0)
    got = {}
    while True:
        handles = conn.recv()
        if handles is None:
            conn.send({k: v.cpu() for k, v in got.items()})
            return
        for name, (rebuild, args) in handles[uuid]:
            args = list(args)
            args[6] = 0  # as WorkerExtension does: the tensor on this worker's device
            got[name] = rebuild(*args).clone()
        torch.cuda.synchronize()
        conn.send("copied")


class _Workers:
    def __init__(self, conn):
        self.conn = conn

    def _collective_rpc(self, method, args=()):
        assert method == "update_weights"
        (handles,) = args
        if handles is not None:
            self.conn.send(handles)
            assert self.conn.recv() == "copied"
        return [None]

    def shutdown(self):
        pass


def test_refit_over_cuda_ipc_gives_another_process_the_weights():
    import torch.multiprocessing as mp
    from types import SimpleNamespace

    from tiny_models import tiny_policy, tiny_policy_cfgs

    from megaprorl.models.convert import HFWeightStream, hf_config_from_model_config
    from megaprorl.rollout.trtllm_engine import TrtllmEngine

    policy, tok = tiny_policy({"params_dtype": "bf16"})
    mcfg = tiny_policy_cfgs(params_dtype="bf16")[0]  # the policy's model config
    hf_config = hf_config_from_model_config(mcfg, policy.vocab_size)
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(there, uuid))
    proc.start()
    try:
        eng = TrtllmEngine(SimpleNamespace(model=policy.model), hf_config, tok.stop_ids, tok.pad_id, 0.05,
                           torch.bfloat16, lambda gpus: (_Workers(here), False), SimpleNamespace, uuid, "0")
        eng.update_weights(0)
        assert eng.refit_buckets > 1
        here.send(None)
        got = here.recv()
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    want = {n: t.cpu() for b in HFWeightStream(policy.model, hf_config).buckets(1 << 30, torch.bfloat16) for n, t in b}
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n
