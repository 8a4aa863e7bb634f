"""Time the embedded engine with and without acting on finished rows (continuous batching refills them,
lock-step batches drop them), and with its decode steps through the lean stage or Megatron's forward
(CPU or GPU).

A random policy over the built-in character tokenizer (about 1 % EOS per step, so response lengths
spread over the budget as RL responses do), ``--rows`` rows decoded to at most ``--max-new-tokens``.
All runs draw the same tokens (checked); the table gives the decode steps, the decode rows summed over
steps, the admissions (prefills) and compactions, the wall time, and "own keys": the share of the key
positions a masked SDPA decode step reads (every row over the furthest row's span) that rows attend to
(their own extents, what rollout.decode_attention=triton reads).  ``--no-eos`` decodes every row to the budget (a long-context decode
speed test of the engine as a whole).

    PYTHONPATH=.:tests python3 scripts/engine_compaction.py [--rows 64] [--max-new-tokens 256]
    # host-bound decode (what a GPU's decode of a small-batch model is): tiny layers, one thread
    PYTHONPATH=.:tests python3 scripts/engine_compaction.py --rows 4 --layers 8 --hidden 64 --heads 4 \
        --max-new-tokens 200 --no-eos --compact-every 0 --lean-decode 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--compact-every", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--lean-decode", type=int, nargs="+", default=[1], choices=[0, 1],
                    help="decode steps through the engine's lean stage (1) or Megatron's forward (0)")
    ap.add_argument("--continuous", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="continuous batching (1: finished rows refilled) or lock-step batches (0)")
    ap.add_argument("--batch-size", type=int, default=0, help="rows in the decode batch (0: --rows, all at once)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-eos", action="store_true", help="every row decodes to --max-new-tokens (long-context decode)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from tiny_models import tiny_policy

    from megaprorl.rollout import SamplingParams
    from megaprorl.rollout.megatron_engine import MegatronEngine

    pol, tok = tiny_policy({"num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": 4 * args.hidden,
                            "num_attention_heads": args.heads, "num_query_groups": 2,
                            "max_position_embeddings": 16 + args.max_new_tokens}, trainable=False)
    prompts = [tok.encode(f"{i}+{2 * i}=") for i in range(args.rows)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, n=1, seed=7, temperature=1.0)
    rows, want = [], None
    runs = [(e, bool(x), bool(c)) for e in args.compact_every for x in args.lean_decode for c in args.continuous]
    runs = [r for r in runs if not r[2] or (r[0] > 0 and r[1])]  # continuous needs the lean step and refills
    for every, lean, cont in runs:
        eng = MegatronEngine(pol, -1 if args.no_eos else tok.eos_id, tok.pad_id, batch_size=args.batch_size or args.rows,
                             compact_every=every, lean_decode=lean, continuous=cont)
        eng.generate(prompts[:2], SamplingParams(max_new_tokens=4, n=1, seed=0))  # warm-up
        t0 = time.perf_counter()
        out = eng.generate(prompts, params)
        secs = time.perf_counter() - t0
        ids = [r.response_ids for r in out]
        if want is None:
            want = ids
        assert ids == want, "the runs drew different tokens"
        lens = [len(x) for x in ids]
        rows.append(dict(compact_every=every, lean_decode=lean, continuous=cont, seconds=secs,
                         ms_per_step=1000 * secs / max(1, eng.stats["decode_steps"]),
                         **eng.stats, finished=sum(r.finished for r in out), mean_len=sum(lens) / len(lens),
                         max_len=max(lens)))
    print(f"{'compact_every':>13} {'lean':>5} {'cont':>5} {'seconds':>8} {'steps':>6} {'ms/step':>8} {'decode rows':>11} "
          f"{'dense rows':>10} {'admits':>6} {'compactions':>11} {'finished':>8} {'mean len':>8} {'own keys':>8}")
    for r in rows:
        print(f"{r['compact_every']:>13} {int(r['lean_decode']):>5} {int(r['continuous']):>5} {r['seconds']:>8.2f} "
              f"{r['decode_steps']:>6} {r['ms_per_step']:>8.2f} {r['decode_row_steps']:>11} {r['dense_row_steps']:>10} "
              f"{r['admissions']:>6} {r['compactions']:>11} {r['finished']:>8} {r['mean_len']:>8.1f} "
              f"{r['keys_own'] / max(r['keys_span'], 1):>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           args=vars(args), runs=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
