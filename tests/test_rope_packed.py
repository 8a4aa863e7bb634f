"""Packed-sequence RoPE (megaprorl.models.rope) equals Megatron's per-sequence implementation exactly."""

from types import SimpleNamespace

import pytest
import torch

from megaprorl.models import rope


def _megatron_thd():
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils._apply_rotary_pos_emb_thd


class _Group:  # what Megatron's thd RoPE asks of the context-parallel group
    def size(self):
        return 1

    def rank(self):
        return 0


CFG = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)


def _freqs(n, d=16, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    return torch.cat([f, f], -1)[:, None, None, :]  # [n, 1, 1, d], Megatron's layout


@pytest.mark.parametrize("lengths,table", [((5, 1, 9, 3, 7), 9),  # table of the longest sequence
                                           ((12,), 12),            # one sequence: Megatron's offset mapping
                                           ((4, 0, 6), 6)])         # an empty sequence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rope_equals_megatron(lengths, table, dtype):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = torch.randn(total, 3, 16, generator=g).to(dtype).requires_grad_()
    freqs = _freqs(table)
    rope._CACHE.update(key=None, value=None)
    ours = rope.apply_rotary_pos_emb(t, freqs, CFG, cu_seqlens=cu, cp_group=_Group())
    theirs = _megatron_thd()(t, cu, freqs, cp_group=_Group())
    assert torch.equal(ours, theirs)
    go = torch.randn(ours.shape, generator=g).to(dtype)
    g_ours, = torch.autograd.grad(ours, t, go)
    g_theirs, = torch.autograd.grad(theirs, t, go)
    assert torch.equal(g_ours, g_theirs)


def test_token_positions_and_cache():
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    assert rope.token_positions(cu, 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    freqs = _freqs(4)
    rope._CACHE.update(key=None, value=None)
    a = rope.packed_freqs(freqs, cu, 8)
    assert rope.packed_freqs(freqs, cu, 8) is a  # the layers of one forward pass share one gather
    assert torch.equal(a[:, 0, 0], freqs[[0, 1, 2, 0, 1, 2, 3, 0], 0, 0])
    assert rope.packed_freqs(freqs, cu.clone(), 8) is not a


def test_boundaries_that_do_not_cover_the_pack_are_an_error():
    t = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    rope._CACHE.update(key=None, value=None)
    with pytest.raises(ValueError, match="from 0 to 8, the pack has 10 tokens"):
        rope.apply_rotary_pos_emb(t, _freqs(8), CFG, cu_seqlens=cu, cp_group=_Group())


def test_install_routes_megatron_attention():
    import megatron.core.transformer.attention as attention

    rope.install()
    rope.install()
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    assert rope._ORIGINAL is not rope.apply_rotary_pos_emb


def test_kv_cache_stores_rotated_keys_with_megatrons_numbers(monkeypatch):
    """The engine's keys rotated once before the KV cache stores them, with cos/sin shared by the layers
    (megaprorl.models.rope), give Megatron's own path (the cached prefix rotated again, cos/sin computed
    again, in every layer at every step) token for token and log-prob for log-prob."""
    import megatron.core.transformer.attention as attention

    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine
    from tiny_models import tiny_policy

    pol, tok = tiny_policy()
    assert attention.Attention._adjust_key_value_for_inference is rope.adjust_key_value_rotating_once
    prompts = [tok.encode(s) for s in ["1+2=", "13+45=", "7+88="]]
    params = SamplingParams(max_new_tokens=12, n=3, seed=5, temperature=1.0)
    runs = [MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=9, lean_decode=lean).generate(prompts, params)
            for lean in (False, True)]  # Megatron's forward with rotated keys cached, and the lean steps
    monkeypatch.setattr(attention.Attention, "_adjust_key_value_for_inference", rope._ORIGINAL_ADJUST)
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", rope._ORIGINAL)  # and Megatron's own rotation
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=9)
    assert not eng.lean_decode  # declined: the prefill would cache unrotated keys
    theirs = eng.generate(prompts, params)
    assert sum(len(r.response_ids) for r in theirs) > 40
    for ours in runs:
        assert [r.response_ids for r in ours] == [r.response_ids for r in theirs]
        assert [r.logprobs for r in ours] == [r.logprobs for r in theirs]


@pytest.mark.parametrize("rot_dim", [16, 8])  # the whole head, or a partial rotation (t_pass kept)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bshd_rope_with_shared_cos_sin_equals_megatron(rot_dim, dtype):
    """Unpacked RoPE through megaprorl.models.rope (cos/sin cached per frequency table) equals Megatron's
    unfused function, values and gradients, and a new table (same shape) is not served stale cos/sin."""
    from megatron.core.models.common.embeddings import rope_utils

    g = torch.Generator().manual_seed(1)
    for base in (10000.0, 500.0):  # two tables of one shape, one after the other
        freqs = _freqs(7, d=rot_dim, base=base)
        t = torch.randn(7, 2, 3, 16, generator=g).to(dtype).requires_grad_()
        ours = rope.apply_rotary_pos_emb(t, freqs, CFG, mscale=1.0)
        again = rope.apply_rotary_pos_emb(t, freqs, CFG, mscale=1.0)  # served from the cache
        theirs = rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, mscale=1.0)
        assert torch.equal(ours, theirs) and torch.equal(again, theirs)
        go = torch.randn(ours.shape, generator=g).to(dtype)
        assert torch.equal(torch.autograd.grad(ours, t, go)[0], torch.autograd.grad(theirs, t, go)[0])
