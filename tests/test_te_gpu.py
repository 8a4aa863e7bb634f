"""TransformerEngine layer spec and FP8 on a GPU (skipped where CUDA or transformer-engine is missing).

The local spec (SDPA core attention) is checked against HF on CPU elsewhere; here the TE spec, loaded
from the same tiny HF Qwen2 (and Qwen3: TE's norms as its q/k norms), must give the local spec's log-probs, packed THD sequences must equal
right-padded rows under TE's fused attention, and an FP8 (delayed scaling) policy must train on token
counts that are not multiples of 16 (the micro-batches are padded) with log-probs close to bf16; the
embedded engine on the TE spec must give its teacher-forced log-probs with left-padded prompts.
"""

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine.pytorch", reason="needs transformer-engine[pytorch] (pip install -e .[gpu])")
transformers = pytest.importorskip("transformers")

from test_convert import VOCAB, _make_hf, _mcfg  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_qwen2_te")
    _make_hf("qwen2", str(d))
    return str(d)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_qwen3_te")
    _make_hf("qwen3", str(d))
    return str(d)


def _policy(hf_dir, impl, dtype, fp8="", pack_tokens=0):
    from megaprorl.models import convert as C
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    info = init_distributed()
    m = _mcfg(hf_dir, "sdpa")
    m.transformer_impl, m.params_dtype, m.fp8, m.fp8_recipe = impl, dtype, fp8, "delayed"
    p = SimpleNamespace(tensor_parallel=1, pipeline_parallel=1, sequence_parallel=False)
    o = SimpleNamespace(lr=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    pol = Policy(m, p, o, VOCAB, info.device, "torch", pack_tokens=pack_tokens, pad_id=0)
    C.load_hf_into_model(pol.model, hf_dir)
    pol.optimizer.reload_model_params()  # fp32 main weights follow the loaded model, as in the trainer
    return pol


def _batch(seed=0):
    """Six right-padded rows of the packing tests (their totals are not multiples of 16)."""
    from megaprorl.models.tokenizer import CharTokenizer
    from test_packing import _batch as packing_batch

    return packing_batch(CharTokenizer(), n=6, seed=seed)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_te_spec_logprobs_equal_local_spec(request, family):
    from megaprorl.models.gpt import use_transformer_engine

    hf_dir = request.getfixturevalue("hf_dir" if family == "qwen2" else "qwen3_dir")
    local = _policy(hf_dir, "local", "fp32")
    te = _policy(hf_dir, "transformer_engine", "fp32")
    assert use_transformer_engine(te.mcfg) and not use_transformer_engine(local.mcfg)
    assert any("layer_norm_weight" in k for k in te.model.state_dict())  # the TE spec was built
    assert any("q_layernorm" in k for k in te.model.state_dict()) == (family == "qwen3")
    batch = _batch()
    m = batch.loss_mask > 0
    lp_local, ent_local = local.logprobs(batch, 3, with_entropy=True)
    lp_te, ent_te = te.logprobs(batch, 3, with_entropy=True)
    # fp32 weights; TE's GEMMs and fused attention may use TF32 internally
    torch.testing.assert_close(lp_te[m], lp_local[m], rtol=0, atol=2e-2)
    torch.testing.assert_close(ent_te[m], ent_local[m], rtol=0, atol=2e-2)


def test_te_packed_equals_padded_bf16(hf_dir):
    from megaprorl.algo.loss import LossSpec

    padded = _policy(hf_dir, "transformer_engine", "bf16")
    packed = _policy(hf_dir, "transformer_engine", "bf16", pack_tokens=32)
    batch = _batch(seed=1)
    m = batch.loss_mask > 0
    lp_pad = padded.logprobs(batch, 3)
    lp_pack = packed.logprobs(batch, 3)
    torch.testing.assert_close(lp_pack[m], lp_pad[m], rtol=0, atol=5e-2)
    for pol in (padded, packed):
        pol.optimizer.step_with_ready_grads = lambda: True  # compare losses and gradient norms at fixed weights
    spec = LossSpec(kl_coef=0.1)
    s_pad = padded.train_step(batch, spec, 3)
    s_pack = packed.train_step(batch, spec, 3)
    assert s_pack["loss"] == pytest.approx(s_pad["loss"], abs=2e-2)
    assert s_pack["grad_norm"] == pytest.approx(s_pad["grad_norm"], rel=5e-2)


@pytest.mark.parametrize("pack_tokens", [0, 32])
def test_fp8_policy_trains_close_to_bf16(hf_dir, pack_tokens):
    from megaprorl.algo.loss import LossSpec

    bf16 = _policy(hf_dir, "transformer_engine", "bf16", pack_tokens=pack_tokens)
    fp8 = _policy(hf_dir, "transformer_engine", "bf16", fp8="hybrid", pack_tokens=pack_tokens)
    assert fp8.model.config.fp8 == "hybrid"
    batch = _batch(seed=2)
    m = batch.loss_mask > 0
    assert int(batch.lengths.sum()) % 16 != 0 or any(int(x) % 16 for x in batch.lengths)
    lp16 = bf16.logprobs(batch, 3)
    lp8 = fp8.logprobs(batch, 3)
    diff = (lp8[m] - lp16[m]).abs()
    assert torch.isfinite(lp8[m]).all()
    assert float(diff.mean()) < 0.15, f"FP8 log-probs differ from bf16 by {float(diff.mean()):.3f} on average"
    before = [p.detach().clone() for p in fp8.model.parameters()]
    spec = LossSpec(kl_coef=0.01)
    for _ in range(2):  # the second step runs on delayed-scaling amax history from the first
        stats = fp8.train_step(batch, spec, 3)
        assert all(torch.isfinite(torch.tensor(float(stats[k]))) for k in ("loss", "grad_norm")), stats
    moved = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, fp8.model.parameters()))
    assert moved > 0


@pytest.mark.parametrize("lean,attention", [(False, "sdpa"), (True, "sdpa"), (True, "triton")],
                         ids=["megatron-forward", "lean-continuous", "lean-continuous-triton"])
def test_te_spec_engine_logprobs_equal_teacher_forced(hf_dir, lean, attention):
    """The embedded engine on the TE spec: prompts of different lengths are left-padded, and TE's attention
    must apply the engine's masks in the prefill (mask type arbitrary, see megaprorl.models.rope) or the
    short prompts attend to the padding.  Decode steps through Megatron's forward (lock-step), or through
    the lean step (TE's linear layers called as modules, SDPA or the Triton kernel on the cache), which
    makes continuous batching available on the TE spec.  Either way the sampling log-probs equal the
    policy's teacher-forced ones, as on the local spec."""
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.policy import build_seq_batch
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine, lean_decode_unsupported

    tok = CharTokenizer()
    te = _policy(hf_dir, "transformer_engine", "fp32")
    assert lean_decode_unsupported(te.model) is None
    eng = MegatronEngine(te, tok.eos_id, tok.pad_id, batch_size=4, lean_decode=lean, decode_attention=attention)
    assert eng.lean_decode == lean and eng.continuous == lean and eng.decode_attention == attention
    prompts = [tok.encode(s) for s in ["1+2=", "13+45+678=", "7="]]  # 4, 10 and 2 tokens: left padding
    rolls = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=3))
    batch = build_seq_batch([r.prompt_ids for r in rolls], [r.response_ids for r in rolls], tok.pad_id)
    lp = te.logprobs(batch, 3).float().cpu()
    for i, r in enumerate(rolls):
        s = len(r.prompt_ids) - 1
        # fp32 weights; TE's GEMMs and attention may use TF32 internally
        torch.testing.assert_close(torch.tensor(r.logprobs), lp[i, s: s + len(r.response_ids)], rtol=0, atol=2e-2)
