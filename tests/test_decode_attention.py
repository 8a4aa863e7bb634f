"""The Triton decode attention (each row of the KV cache attends to its own extent) against SDPA with the
equivalent mask, and the embedded engine with ``decode_attention='triton'`` against its SDPA path.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA the same cases run compiled."""

import os

import pytest
import torch

pytest.importorskip("triton")

from triton_kernels.decode_attention import decode_attention, reference  # noqa: E402
from triton_kernels.policy_loss import interpreting  # noqa: E402

from dist_utils import run_distributed  # noqa: E402
from tiny_models import tiny_policy, tiny_policy_cfgs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 (run this file on its own)", allow_module_level=True)


def _case(b, heads, groups, D, S, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, D, generator=g)
    k = torch.randn(S, b, groups, D, generator=g)
    v = torch.randn(S, b, groups, D, generator=g)
    start = torch.randint(0, S // 2, (b,), generator=g)
    end = torch.minimum(start + 1 + torch.randint(0, S, (b,), generator=g), torch.tensor(S))
    start[0], end[0] = S - 1, S  # one key only
    if b > 1:
        start[1], end[1] = 0, S  # the whole cache
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), start, end)]


@pytest.mark.parametrize("b,heads,groups,D,S", [(5, 6, 2, 64, 100), (3, 4, 4, 80, 37), (4, 16, 2, 32, 70),
                                                (2, 2, 1, 16, 5)],
                         ids=["gqa6-d64", "mha-d80", "gqa8-d32", "tiny"])
@pytest.mark.parametrize("splits", [1, 2, 5, 32])
def test_equals_masked_sdpa_fp32(b, heads, groups, D, S, splits):
    """fp32 within 1e-5 of SDPA over the whole cache with the extents as a mask: GQA (6 and 8 query heads per
    group) and MHA, head dims not a power of two, extents of one key and of the whole cache, one split (the
    output written directly) or several (rounded to whole blocks; the splits past a short row's extent are
    empty and weigh nothing)."""
    q, k, v, start, end = _case(b, heads, groups, D, S)
    out = decode_attention(q, k, v, start, end, scale=0.3, splits=splits, block_n=16)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, k, v, start, end, scale=0.3), atol=1e-5, rtol=1e-5)


def test_strided_query_and_default_scale():
    """q as a view of the engine's [1, b, heads, d] rotated query, and the default scale 1/sqrt(d)."""
    q, k, v, start, end = _case(3, 4, 2, 32, 50, seed=1)
    q4 = torch.randn(1, 3, 8, 32, device=DEVICE)[:, :, 2:6]  # heads strided out of a larger tensor
    out = decode_attention(q4[0], k, v, start, end, splits=3)
    torch.testing.assert_close(out, reference(q4[0], k, v, start, end), atol=1e-5, rtol=1e-5)


def test_bf16_within_rounding():
    q, k, v, start, end = _case(4, 6, 2, 64, 90, seed=2, dtype=torch.bfloat16)
    for splits in (1, 3):
        out = decode_attention(q, k, v, start, end, splits=splits, block_n=16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(q, k, v, start, end), atol=2e-2, rtol=2e-2)


def test_large_logits_are_stable():
    """Scores of +-1e3 (after scale): the online softmax rescales, no inf or nan."""
    q, k, v, start, end = _case(3, 4, 2, 16, 60, seed=3)
    q = q * 40.0
    out = decode_attention(q, k, v, start, end, splits=4, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, k, v, start, end), atol=1e-4, rtol=1e-4)


def test_refuses_what_does_not_fit(monkeypatch):
    q, k, v, start, end = _case(2, 4, 2, 16, 10)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q[:, :3], k, v, start, end)  # 3 heads over 2 groups
    with pytest.raises(ValueError, match="splits must be in"):
        decode_attention(q, k, v, start, end, splits=33)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, start, end)
    if DEVICE == "cpu":
        import triton_kernels.policy_loss as pl

        monkeypatch.setattr(pl, "interpreting", lambda: False)  # check_device's, shared with the loss kernels
        with pytest.raises(pl.TritonUnavailable, match="=triton runs on CUDA.*TRITON_INTERPRET=1.*use 'sdpa'"):
            decode_attention(q, k, v, start, end)


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def _prompts(tok):
    return [tok.encode(s) for s in ["1+2=", "13+45=", "7+88=", "99+1=", "5+5=", "2+2=", "123+456="]]


def _generate(pol, tok, attention, continuous=True, batch=4):
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=batch, compact_every=3, continuous=continuous,
                         decode_attention=attention)
    assert eng.decode_attention == attention
    params = SamplingParams(max_new_tokens=14, n=2, seed=5, temperature=1.5)
    return eng.generate(_prompts(tok), params), dict(eng.stats)


def _generate_graphed(pol, tok, continuous, batch=4):
    """The engine with its decode steps through ``_StepGraph``.  Without CUDA the engine refuses
    ``cuda_graphs=True``, so it is switched on after construction: the step graphs then run their captured
    function eagerly on their static buffers (the fixed split plan, the device-side extents, a graph per cache)."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=batch, compact_every=3, continuous=continuous,
                         decode_attention="triton", cuda_graphs=DEVICE == "cuda")
    eng.cuda_graphs = True
    params = SamplingParams(max_new_tokens=14, n=2, seed=5, temperature=1.5)
    return eng.generate(_prompts(tok), params), dict(eng.stats)


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "lock-step"])
def test_engine_with_triton_attention_and_step_graphs_draw_sdpas_tokens(policy, continuous):
    """The engine's lean decode steps through the Triton kernel draw the SDPA path's tokens, with log-probs
    within 1e-5 (fp32), in continuous batching (rows at different positions, refilled rows short) and in
    lock-step batches (left-padded prompts: extents that start past position 0).  rollout.cuda_graphs: the same
    steps through one step graph per KV cache (static buffers, the split plan of the cache's length) draw the
    same tokens, with a new graph after every compaction and for every lock-step batch; on a GPU the graphs are
    captured and replayed."""
    pol, tok = policy
    want, st_want = _generate(pol, tok, "sdpa", continuous)
    got, st_got = _generate(pol, tok, "triton", continuous)
    graphed, st_graphed = _generate_graphed(pol, tok, continuous)
    for run in (got, graphed):
        assert [r.response_ids for r in run] == [r.response_ids for r in want]
        assert [r.finished for r in run] == [r.finished for r in want]
        for g, w in zip(run, want):
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    assert st_got == st_want and st_want["graphs"] == 0
    assert 0 < st_got["keys_own"] < st_got["keys_span"]  # what the kernel reads, what a masked SDPA reads
    assert len({len(r.response_ids) for r in want}) >= 3
    batches = 1 if continuous else -(-len(want) // st_graphed["rows"])  # lock-step: a cache per batch
    assert st_graphed["graphs"] == batches + st_graphed["compactions"] and st_graphed["compactions"] >= 1
    assert {k: v for k, v in st_graphed.items() if k != "graphs"} == {k: v for k, v in st_want.items() if k != "graphs"}


def test_engine_step_graphs_refuse_what_they_cannot_capture(policy):
    from megaprorl.config import ConfigError, load_config
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    with pytest.raises(ConfigError, match="'rollout.cuda_graphs': needs rollout.decode_attention=triton"):
        MegatronEngine(pol, tok.eos_id, tok.pad_id, decode_attention="sdpa", cuda_graphs=True)
    if DEVICE == "cpu":
        with pytest.raises(ConfigError, match="'rollout.cuda_graphs': CUDA graphs need a CUDA device"):
            MegatronEngine(pol, tok.eos_id, tok.pad_id, decode_attention="triton", cuda_graphs=True)
    assert not MegatronEngine(pol, tok.eos_id, tok.pad_id, lean_decode=False, cuda_graphs=True).cuda_graphs
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    with pytest.raises(ConfigError, match="rollout.cuda_graphs.*decode_attention=triton"):
        load_config(demo, ["rollout.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="rollout.cuda_graphs.*pipeline_parallel=1"):
        load_config(demo, ["rollout.cuda_graphs=true", "rollout.decode_attention=triton",
                           "parallel.pipeline_parallel=2"])
    assert load_config(demo, ["rollout.cuda_graphs=true", "rollout.decode_attention=triton"]).rollout.cuda_graphs


def test_engine_key_counts(policy):
    """keys_span / keys_own: per decode step, rows x (the furthest row's position + 1) and the sum of the rows'
    extents, summed over steps."""
    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, batch_size=2, compact_every=0)
    prompts = [tok.encode("1+2="), tok.encode("13+45=")]  # lengths 4 and 6: left padding 2 on the first
    eng.generate(prompts, SamplingParams(max_new_tokens=3, n=1, greedy=True, seed=0))
    steps = eng.stats["decode_steps"]
    assert steps >= 1
    # lock-step, both rows at the same position p = 6 + i in step i; extents 4 + 1 + i and 6 + 1 + i
    assert eng.stats["keys_span"] == sum(2 * (6 + i + 1) for i in range(steps))
    assert eng.stats["keys_own"] == sum((4 + i + 1) + (6 + i + 1) for i in range(steps))


def test_engine_config_refuses_unknown_attention(policy):
    from megaprorl.config import ConfigError, load_config
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    with pytest.raises(ValueError, match="rollout.decode_attention"):
        MegatronEngine(pol, tok.eos_id, tok.pad_id, decode_attention="flash")
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    with pytest.raises(ConfigError, match="rollout.decode_attention"):
        load_config(demo, ["rollout.decode_attention=flash"])
    assert load_config(demo, ["rollout.decode_attention=triton"]).rollout.decode_attention == "triton"


def test_triton_where_it_cannot_run_is_a_config_error(policy, monkeypatch):
    """rollout.decode_attention=triton with the model on a CPU and no interpreter: a ConfigError naming the
    key (the CLI prints it as `error: ...`), not a traceback from the kernel module."""
    from types import SimpleNamespace

    import triton_kernels.policy_loss as pl
    from megaprorl.config import ConfigError, load_config
    from megaprorl.rollout import build_engine

    pol, tok = policy
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.yaml")
    cfg = load_config(demo, ["rollout.decode_attention=triton"])
    tokenizer = SimpleNamespace(eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=[])
    if DEVICE == "cpu":
        monkeypatch.setattr(pl, "interpreting", lambda: False)
        with pytest.raises(ConfigError, match="'rollout.decode_attention': rollout.decode_attention=triton runs on CUDA"):
            build_engine(cfg, pol, tokenizer)
        monkeypatch.undo()
    assert build_engine(cfg, pol, tokenizer).decode_attention == "triton"


def test_engine_without_lean_decode_keeps_megatrons_attention(policy):
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = policy
    eng = MegatronEngine(pol, tok.eos_id, tok.pad_id, lean_decode=False, decode_attention="triton")
    assert eng.decode_attention == "sdpa"


def _mp_job(rank, world):
    from megaprorl.models.tokenizer import CharTokenizer
    from megaprorl.parallel import init_distributed
    from megaprorl.policy import Policy

    out = {}
    for pp in (1, 2):  # TP=2, then PP=2, in the same two processes
        info = init_distributed(world // pp, pp)
        torch.manual_seed(0)
        m, p, o = tiny_policy_cfgs()
        p.tensor_parallel, p.pipeline_parallel = world // pp, pp
        tok = CharTokenizer()
        pol = Policy(m, p, o, tok.vocab_size, info.device, "torch", trainable=False, pad_id=tok.pad_id)
        for attention in ("sdpa", "triton"):
            rollouts, _ = _generate(pol, tok, attention)
            out[pp, attention] = [(r.response_ids, r.logprobs) for r in rollouts]
    return out


def test_engine_with_triton_attention_under_model_parallelism():
    """TP=2 (each rank its query groups: one group of two heads) and PP=2 (each stage its layers' caches):
    the Triton path draws the SDPA path's tokens on every rank."""
    for r in run_distributed(_mp_job, 2):
        for pp in (1, 2):
            got, want = r[pp, "triton"], r[pp, "sdpa"]
            assert [t for t, _ in got] == [t for t, _ in want], pp
            for (_, g), (_, w) in zip(got, want):
                assert g == pytest.approx(w, abs=1e-5)


@pytest.mark.gpu
def test_gpu_long_extents_bf16():
    """Compiled on the GPU at Qwen2-1.5B's head shape (12 heads, 2 groups, d 128), 64 rows with extents up to
    17K positions (the 16K recipe's cache), bf16, the device's own split plan."""
    g = torch.Generator().manual_seed(0)
    b, heads, groups, D, S = 64, 12, 2, 128, 17408
    q = torch.randn(b, heads, D, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(S, b, groups, D, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(S, b, groups, D, generator=g).to("cuda", torch.bfloat16)
    start = torch.randint(0, 512, (b,), generator=g)
    end = torch.clamp(start + torch.randint(1, S, (b,), generator=g), max=S)
    start, end = start.cuda(), end.cuda()
    out = decode_attention(q, k, v, start, end)
    torch.testing.assert_close(out.float(), reference(q, k, v, start, end), atol=2e-2, rtol=2e-2)


def test_bench_quick_writes_its_report(tmp_path):
    """`megaprorl bench decode-attention --quick` (the CPU smoke case under the interpreter; on a GPU, compiled)."""
    from megaprorl.bench.decode_attention import main

    out = tmp_path / "da.json"
    assert main(["--quick", "--out", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["own_positions"] <= rows[0]["span_positions"]
    assert rows[0]["sdpa_ms"] > 0 and rows[0]["triton_ms"] > 0 and rows[0]["max_abs_diff"] < 2e-2
