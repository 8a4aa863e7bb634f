"""Sequence packing (Megatron THD packed sequences): packed == unpacked, for the model and the policy."""

import copy
from types import SimpleNamespace

import pytest
import torch

from dist_utils import run_distributed
from tiny_models import tiny_policy
from tiny_models import tiny_policy

transformers = pytest.importorskip("transformers")

from test_convert import VOCAB, _make_hf, _mcfg  # noqa: E402

LENGTHS = (7, 12, 1, 9, 3)


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _packed_logits_job(rank, world, hf_dir, seqs, tail):
    """Megatron (SDPA core attention) on one packed row vs HF per sequence; returns full-vocab logits."""
    from megatron.core import parallel_state as mps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megaprorl.models import convert as C
    from megaprorl.models.gpt import build_gpt
    from megaprorl.parallel import init_distributed
    from test_convert import _gather_tp

    init_distributed(world, 1)
    mcfg = _mcfg(hf_dir, "sdpa")
    hf_config = C.load_hf_config(hf_dir)
    model = build_gpt(mcfg, SimpleNamespace(tensor_parallel=world, pipeline_parallel=1, sequence_parallel=False),
                      C.hf_vocab_size(hf_config))
    C.load_hf_into_model(model, hf_dir, hf_config)
    lens = [len(s) for s in seqs] + ([tail] if tail else [])
    tokens = torch.cat(list(seqs) + ([torch.zeros(tail, dtype=torch.long)] if tail else []))[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                        max_seqlen_kv=max(lens))
    with torch.no_grad():
        packed = _gather_tp(model(tokens, pos, None, packed_seq_params=p))[0, :, :VOCAB]
        alone = [_gather_tp(model(s[None], torch.arange(len(s))[None], None))[0, :, :VOCAB] for s in seqs]
    mps.destroy_model_parallel()
    return dict(packed=packed, alone=alone)


@pytest.fixture(scope="module")
def hf_qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_qwen2")
    model = _make_hf("qwen2", str(d))
    return str(d), model


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_logits_equal_unpacked_and_hf(hf_qwen, tp):
    hf_dir, hf_model = hf_qwen
    seqs = _sequences()
    outs = run_distributed(_packed_logits_job, tp, (hf_dir, seqs, 5))
    for out in outs:
        off = 0
        for s, alone in zip(seqs, out["alone"]):
            n = len(s)
            with torch.no_grad():
                ref = hf_model(s[None]).logits[0].float()
            torch.testing.assert_close(out["packed"][off: off + n], alone, rtol=0, atol=2e-5)
            torch.testing.assert_close(out["packed"][off: off + n], ref, rtol=0, atol=1e-4)
            off += n


# ------------------------------------------------------------------------------------ policy level
def _pair(model=None):
    padded, tok = tiny_policy(model)
    packed, _ = tiny_policy(model, pack_tokens=24)
    packed.model.load_state_dict(padded.model.state_dict())
    return padded, packed, tok


@pytest.fixture(scope="module")
def policies():
    return _pair()


@pytest.fixture(scope="module")
def moe_policies():  # an MoE model: each token routed on its own, so packing changes nothing either
    from test_spine import MOE_MODEL

    return _pair(MOE_MODEL)


def _batch(tok, n=9, seed=0):
    from megaprorl.algo.loss import aggregation_weights
    from megaprorl.policy import build_seq_batch

    g = torch.Generator().manual_seed(seed)
    prompts = [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1=", "5+5=", "0+0=", "12+3=", "4+40=", "6+7="]]
    prompts = prompts[:n]
    resp = [torch.randint(2, tok.vocab_size, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 12, (n,), generator=g)]
    batch = build_seq_batch(prompts, resp, tok.pad_id)
    batch.old_logp = torch.randn(batch.loss_mask.shape, generator=g) * 0.1 - 3.0
    batch.ref_logp = batch.old_logp + 0.05
    batch.advantages = torch.randn(batch.loss_mask.shape, generator=g) * batch.loss_mask
    batch.weights = aggregation_weights(batch.loss_mask, "token-mean", float(batch.loss_mask.sum()), len(batch))
    return batch


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_policy_logprobs_packed_equal_padded(policies, moe_policies, which):
    padded, packed, tok = policies if which == "dense" else moe_policies
    batch = _batch(tok)
    lp_pad, ent_pad = padded.logprobs(batch, 4, with_entropy=True)
    lp_pack, ent_pack = packed.logprobs(batch, 4, with_entropy=True)
    m = batch.loss_mask > 0
    torch.testing.assert_close(lp_pack[m], lp_pad[m], rtol=0, atol=2e-5)
    torch.testing.assert_close(ent_pack[m], ent_pad[m], rtol=0, atol=2e-5)
    # prompt positions too (everything but each row's padding)
    for i, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(lp_pack[i, : n - 1], lp_pad[i, : n - 1], rtol=0, atol=2e-5)
        assert torch.all(lp_pack[i, n - 1:] == 0)


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_policy_train_step_packed_equals_padded(policies, moe_policies, which):
    from megaprorl.algo.loss import LossSpec

    padded, packed, tok = policies if which == "dense" else moe_policies
    batch = _batch(tok, seed=1)
    spec = LossSpec(kl_coef=0.1, entropy_coef=0.01)
    state = copy.deepcopy(padded.model.state_dict())
    grads, stats = [], []
    for pol, mbs in ((padded, 3), (packed, 3)):
        pol.model.load_state_dict(state)
        pol.reset_optimizer()
        pol.optimizer.step_with_ready_grads = lambda: True  # compare gradients, not updates
        stats.append(pol.train_step(batch, spec, micro_batch_size=mbs))
        grads.append(torch.cat([p.grad.reshape(-1) for p in pol.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    for k in ("loss", "entropy", "kl_ref", "tokens", "clip_frac_low", "clip_frac_high"):
        assert stats[1][k] == pytest.approx(stats[0][k], rel=1e-5, abs=1e-7), k
    padded.model.load_state_dict(state)
    packed.model.load_state_dict(state)


def test_length_padding_for_fp8_leaves_results_unchanged(policies, monkeypatch):
    """FP8 needs token counts divisible by 16: micro-batches are padded (right-padded rows and packs)."""
    from megaprorl.policy.micro import padded_micro_batches

    padded, packed, tok = policies
    batch = _batch(tok)
    assert batch.tokens.shape[1] % 16 != 0
    assert all(mb.seq_len % 16 == 0 for mb in padded_micro_batches(batch, 4, tok.pad_id, pad_multiple=16))
    ref = padded.logprobs(batch, 4)
    for pol in (padded, packed):
        monkeypatch.setattr(pol.mcfg, "fp8", "e4m3")  # only the micro-batch layout reads it here
        assert all(mb.seq_len % 16 == 0 for mb in pol._micro_batches(batch, 4))
        out = pol.logprobs(batch, 4)
        m = batch.loss_mask > 0
        torch.testing.assert_close(out[m], ref[m], rtol=0, atol=2e-5)
        assert out.shape == ref.shape


def test_padded_vocab_columns_leave_the_softmax(policies):
    """The output layer has rows past the tokenizer's vocabulary (padding); log-probs normalise over
    the real vocabulary only, as the sampler draws from it only."""
    padded, _, tok = policies
    batch = _batch(tok)
    n_out = padded.model.output_layer.weight.shape[0]
    assert n_out > tok.vocab_size  # the fixture's vocabulary is padded
    lp = padded.logprobs(batch, 4)
    with torch.no_grad():
        L = batch.tokens.shape[1]
        z = padded.model(batch.tokens, torch.arange(L)[None].expand(len(batch), -1), None)[:, :-1].float()
    ref = torch.log_softmax(z[..., : tok.vocab_size], -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    m = batch.loss_mask > 0
    torch.testing.assert_close(lp[m], ref[m], rtol=0, atol=1e-5)
    wrong = torch.log_softmax(z, -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    assert (wrong[m] - ref[m]).abs().max() > 1e-4  # the padded columns did carry probability mass


@pytest.mark.gpu
def test_packed_equals_padded_bf16_on_gpu(monkeypatch):
    """bf16 on CUDA, both packed paths: one cuDNN SDPA call per sequence, and FlashAttention varlen
    (when this torch has it) for packs of many sequences."""
    from megaprorl.algo.loss import LossSpec
    from megaprorl.models import attention

    padded, tok = tiny_policy({"params_dtype": "bf16"})
    packed, _ = tiny_policy({"params_dtype": "bf16"}, pack_tokens=24)
    for pol in (padded, packed):
        pol.optimizer.step_with_ready_grads = lambda: True  # compare losses and gradients at fixed weights
    packed.model.load_state_dict(padded.model.state_dict())
    batch = _batch(tok)
    m = batch.loss_mask > 0
    lp_pad = padded.logprobs(batch, 4)
    paths = ["per_sequence"] + (["varlen"] if attention._varlen_attn() is not None else [])
    for path in paths:
        monkeypatch.setattr(attention, "VARLEN_MIN_SEQS", 10**6 if path == "per_sequence" else 0)
        before = dict(attention.PACKED_CALLS)
        lp_pack = packed.logprobs(batch, 4)
        assert attention.PACKED_CALLS[path] > before[path]
        torch.testing.assert_close(lp_pack[m], lp_pad[m], rtol=0, atol=5e-2)
        spec = LossSpec(kl_coef=0.1)
        batch.old_logp, batch.ref_logp = lp_pad, lp_pad + 0.01
        s_pad = padded.train_step(batch, spec, 3)
        s_pack = packed.train_step(batch, spec, 3)
        assert s_pack["loss"] == pytest.approx(s_pad["loss"], abs=2e-2), path
        assert s_pack["grad_norm"] == pytest.approx(s_pad["grad_norm"], rel=5e-2), path


# ------------------------------------------------------------------------------------------ packer
def test_pack_micro_batches_layout():
    from megaprorl.policy import build_seq_batch
    from megaprorl.policy.micro import pack_micro_batches

    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    resp = [[9, 10, 11], [12], [13, 14, 15, 16, 17], []]
    batch = build_seq_batch(prompts, resp, pad_id=0)
    batch.advantages = torch.arange(batch.loss_mask.numel(), dtype=torch.float).view_as(batch.loss_mask)
    packs = pack_micro_batches(batch, max_tokens=8, pad_id=0, pad_multiple=4)
    lens = [5, 2, 8, 2]
    assert sorted(r for p in packs for r in p.rows) == [0, 1, 2, 3]
    for p in packs:
        used = sum(lens[r] for r in p.rows)
        assert used <= 8 and p.seq_len % 4 == 0 and p.seq_len - used < 4
        assert p.cu_seqlens[-1] == p.seq_len and p.cu_seqlens.dtype == torch.int32
        for r, s, n in zip(p.rows, p.starts, p.lengths):
            seq = prompts[r] + resp[r]
            assert p.tokens[0, s: s + n].tolist() == seq
            assert p.targets("cpu")[s: s + n - 1].tolist() == seq[1:]
            assert p.positions[0, s: s + n].tolist() == list(range(n))
            mask = p.field("loss_mask", "cpu")[s: s + n]
            assert mask.tolist() == batch.loss_mask[r, : n - 1].tolist() + [0.0]
            assert p.field("advantages", "cpu")[s: s + n - 1].tolist() == batch.advantages[r, : n - 1].tolist()
        assert p.field("old_logp", "cpu") is None
    # deterministic
    again = pack_micro_batches(batch, max_tokens=8, pad_id=0, pad_multiple=4)
    assert [p.rows for p in again] == [p.rows for p in packs]
    # scatter puts per-token values back at [row, :n-1]
    out = torch.full(batch.loss_mask.shape, -1.0)
    for p in packs:
        p.scatter_into(out, torch.arange(p.seq_len, dtype=torch.float))
    for p in packs:
        for r, s, n in zip(p.rows, p.starts, p.lengths):
            assert out[r, : n - 1].tolist() == list(map(float, range(s, s + n - 1)))
    with pytest.raises(ValueError, match="max_tokens"):
        pack_micro_batches(batch, max_tokens=0, pad_id=0)


def test_pack_tokens_config_checks():
    from megaprorl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.pack_tokens"):
        load_config("examples/demo.yaml", ["train.pack_tokens=-1"])
    with pytest.raises(ConfigError, match="train.pack_tokens"):
        load_config("examples/demo.yaml", ["train.pack_tokens=64", "model.attention=megatron",
                                           "model.transformer_impl=local"])


def test_packed_per_sequence_attention_equals_each_sequence_alone():
    """SDPAttention's per-sequence path on a pack with an empty sequence and tail padding, GQA: values and
    gradients equal causal attention run on each sequence by itself; the padding gets zeros."""
    import torch.nn.functional as F

    from megaprorl.models.attention import packed_per_sequence

    g = torch.Generator().manual_seed(5)
    lengths, tail = [5, 0, 1, 9], 3
    t, h, kv, d = sum(lengths) + tail, 4, 2, 8
    q, k, v = (torch.randn(t, n, d, generator=g, requires_grad=True) for n in (h, kv, kv))
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    out = packed_per_sequence(q, k, v, bounds, scale=0.3)
    assert out.shape == (1, t, h, d)
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q2, k2, v2))
            ks, vs = (x.repeat_interleave(h // kv, dim=1) for x in (ks, vs))
            ref.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=b - a > 1, scale=0.3)[0].transpose(0, 1))
    ref = torch.cat(ref + [torch.zeros(tail, h, d)])
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), go[0])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(grads[0][-tail:] == 0)


def test_padded_micro_batch_views_the_logits_and_drops_the_placeholder_column():
    """Right-padded micro-batches hand the loss every position as a view of the logits (no [b, L-1, V]
    copy); the last position of each row has a placeholder target and zero mask/weight, and
    scatter_into drops it.  The rows go longest first, each micro-batch cut to its own longest row."""
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.policy.micro import padded_micro_batches, seq_lengths

    tok = CharTokenizer()
    batch = _batch(tok, n=5)
    B, L = batch.tokens.shape
    lengths = seq_lengths(batch)
    assert len(set(lengths.tolist())) > 2  # ragged, so the cut matters
    mbs = padded_micro_batches(batch, 3, tok.pad_id)
    assert torch.equal(torch.cat([mb.rows for mb in mbs]), torch.sort(-lengths, stable=True).indices)
    assert [mb.seq_len for mb in mbs] == [int(lengths[mb.rows].max()) for mb in mbs] and mbs[1].seq_len < L
    for mb in mbs:
        n, Lm = len(mb), mb.seq_len
        rows = mb.rows
        logits = torch.randn(n, Lm, 11)
        assert mb.flat_logits(logits).data_ptr() == logits.data_ptr() and mb.flat_logits(logits).shape == (n * Lm, 11)
        t = mb.targets("cpu").reshape(n, Lm)
        assert torch.equal(t[:, :-1], batch.tokens[rows, 1:Lm])
        for name in ("loss_mask", "weights", "advantages"):
            f = mb.field(name, "cpu").reshape(n, Lm)
            full = getattr(batch, name)[rows]
            assert torch.equal(f[:, :-1], full[:, :Lm - 1]) and torch.all(f[:, -1] == 0)
            assert torch.all(full[:, Lm - 1:] == 0)  # what the cut drops is padding
    out = torch.zeros(B, L - 1)
    for mb in mbs:
        mb.scatter_into(out, torch.arange(len(mb) * mb.seq_len, dtype=torch.float32) + 1)
    for mb in mbs:  # each row's own positions (< its length - 1); 0 past its end, as a pack leaves them
        want = (torch.arange(len(mb) * mb.seq_len, dtype=torch.float32) + 1).reshape(len(mb), mb.seq_len)[:, :-1]
        own = torch.arange(mb.seq_len - 1)[None] < (lengths[mb.rows] - 1)[:, None]
        assert torch.equal(out[mb.rows, :mb.seq_len - 1], want * own) and torch.all(out[mb.rows, mb.seq_len - 1:] == 0)

