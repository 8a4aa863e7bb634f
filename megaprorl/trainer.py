"""The ProRL loop.  It wires the modules together and owns no math (see DESIGN.md).

prompts -> rollouts -> rewards -> length penalty -> dynamic sampling -> advantages ->
old / reference log-probs -> mini-batch optimizer steps -> weight sync -> reference reset -> checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import evaluation
from .algo.advantages import group_baseline_advantages, token_advantages
from .algo.dynamic_sampling import DynamicSampler, running_signal_rate
from .algo.entropy_control import EntropyController
from .algo.length_penalty import LengthPenaltySchedule, apply_length_penalty, filter_overlong, overlong_penalty
from .algo.loss import LossSpec, aggregation_weights, kl_estimate
from .algo.reset import ReferenceResetController
from .algo.rollout_correction import mismatch_stats, rollout_correction_weights
from .config import Config, ConfigError, to_yaml
from .data import builtin
from .data.retire import SolvedPromptFilter
from .evaluation import PromptResult, overall_metrics, set_metrics
from .host import host_stats
from .models.flops import peak_tflops, shape_of, train_flops
from .models.gpt import describe as describe_policy
from .models.tokenizer import HFTokenizer, build_tokenizer
from .parallel import (dp_group, dp_rank, dp_weighted_mean, dp_world, init_distributed, max_over, mp_broadcast_object,
                       mp_leader, tp_rank, wide_expert_group)
from .parallel import balance
from .policy import Policy, SeqBatch, build_seq_batch, routing_batch
from .policy.micro import seq_lengths
from .rewards import RewardPool
from .rollout import SamplingParams, build_engine
from .runlog import RunLogger, plot_run
from .status import HealthWatch

EXIT_REQUEUE = 3  # the trainer checkpointed after SIGTERM/SIGUSR1 and asks to be requeued


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class _Seq:
    """One response of the step's batch with what the update and the rollout log need of its group; it may
    train on another data-parallel rank than the one that drew it (``parallel.balance_batch``)."""

    rollout: Any
    reward: float
    shaped: float
    adv: float  # its group-baseline advantage (float64 precision), before whitening
    rank: int  # where it was drawn: that rank, its group's index there, its sample index in the group
    group: int
    sample: int
    meta: Dict[str, Any]  # the record's id, domain and source


def _grouped(items, key) -> List[list]:
    """``items`` grouped by ``key(item)``, the groups in the order of their first item, each in item order."""
    groups: Dict[Any, list] = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    return list(groups.values())


def _derive_seed(*parts) -> int:
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer stops at the end of the step every rank agrees on."""

    def __init__(self):
        self.requested = False
        self.signal = None

    def install(self):
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(s, self._handler)
            except ValueError:  # not the main thread (tests)
                pass

    def _handler(self, signum, frame):
        self.requested = True
        self.signal = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                     cfg.parallel.timeout_s, seed=cfg.seed,
                                     expert_parallel=cfg.parallel.expert_parallel)
        self.device = self.info.device
        for key, v in (("train.prompts_per_step", cfg.train.prompts_per_step),
                       ("train.mini_batch_prompts", cfg.train.mini_batch_prompts)):
            if v % dp_world():  # each rank draws its share of the step's groups, and of every mini-batch
                raise ConfigError(f"config key '{key}': {v} prompts do not split evenly over the {dp_world()} "
                                  "data-parallel ranks (world size / (tensor_parallel x pipeline_parallel)); make it a "
                                  "multiple of their number")
        # init_distributed seeds torch; seed Python's and NumPy's global generators too (per rank), else
        # they start from OS entropy and a checkpoint carries one process's random state into the next
        random.seed(_derive_seed(cfg.seed, "python", self.info.rank))
        np.random.seed(_derive_seed(cfg.seed, "numpy", self.info.rank) % 2**32)
        self.is_main = self.info.rank == 0
        self.run_dir = os.path.join(cfg.output_dir, cfg.name)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        builtin.register()
        try:
            self.tokenizer = build_tokenizer(cfg.model.tokenizer, cfg.model.use_chat_template,
                                             chat_template_kwargs=cfg.model.chat_template_kwargs)
        except OSError as e:  # a missing directory, one without a vocabulary, unreadable files
            raise ConfigError(f"config key 'model.tokenizer': {str(e).removesuffix(' (model.tokenizer)')}") from None
        self._check_think_end()
        rr = cfg.algo.reference_reset
        if cfg.algo.kl.coef == 0 and (rr.interval or rr.kl_spike_factor or rr.stall_evals):
            self._warn("algo.reference_reset: no reference policy to reset (algo.kl.coef is 0), so no resets"
                       + (", and no optimizer resets with them (reset_optimizer)" if rr.reset_optimizer else ""))
        vocab, hf_cfg, load_src = self._model_source()
        head = dict(fused_lm_head=cfg.train.fused_lm_head, lm_head_token_chunk=cfg.train.lm_head_token_chunk)
        self.policy = Policy(cfg.model, cfg.parallel, cfg.train.optim, vocab, self.device, cfg.train.kernel_backend,
                             pack_tokens=cfg.train.pack_tokens, pad_id=self.tokenizer.pad_id,
                             loss_grad_mode=cfg.train.loss_grad_mode, routing_replay=cfg.algo.moe_routing_replay,
                             freeze_router=cfg.algo.moe_freeze_router, offload=cfg.train.offload_optimizer, **head)
        self._say(describe_policy(cfg.model, cfg.parallel, self.policy.model))
        self.flops_shape = shape_of(cfg.model, vocab)  # for perf/tflops_* and perf/mfu_*
        self.peak_tflops = peak_tflops(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "",
                                       cfg.logging.peak_tflops)
        if load_src is not None:
            from .dist_ckpt import load_policy

            # the policy's weights only (optimizer fresh; main weights follow), at this run's layout
            load_policy(os.path.join(load_src, ckpt.MODEL_DIR), self.policy, load_optimizer=False)
            self._say(f"policy initialised from {load_src}")
        elif hf_cfg is not None:
            from .models.convert import load_hf_into_model

            load_hf_into_model(self.policy.model, cfg.model.hf_path, hf_cfg)  # the config read once, above
            self.policy.optimizer.reload_model_params()  # fp32 main weights follow the loaded model
        self.use_ref = cfg.algo.kl.coef > 0
        self.reference = None
        if self.use_ref:
            self.reference = Policy(cfg.model, cfg.parallel, cfg.train.optim, vocab, self.device,
                                    cfg.train.kernel_backend, trainable=False, pack_tokens=cfg.train.pack_tokens,
                                    pad_id=self.tokenizer.pad_id, offload=cfg.train.offload_reference, **head)
            self.reference.load_weights_from(self.policy)
        self._offload()  # (before the engine: TensorRT-LLM sizes its KV cache by the memory free when it starts)
        self.engine = build_engine(cfg, self.policy, self.tokenizer)
        self._say(self._memory_line())
        if cfg.rollout.continuous_batching and getattr(self.engine, "continuous", True) is False:
            from .rollout.megatron_engine import lean_decode_unsupported

            why = ("rollout.compact_every=0" if cfg.rollout.compact_every == 0 else "rollout.lean_decode=false"
                   if not cfg.rollout.lean_decode else lean_decode_unsupported(self.policy.model))
            self._say(f"rollout: continuous batching needs the engine's lean decode step and compact_every > 0 "
                      f"({why}): decoding in lock-step batches")
        if cfg.rollout.decode_attention == "triton" and getattr(self.engine, "decode_attention", "triton") != "triton":
            self._say("rollout: decode_attention=triton and cuda_graphs apply to the engine's lean decode steps, "
                      "which this model does not take: decode steps run Megatron's forward")
        # the verifiers run once per model-parallel group, on its first rank, whose results the group shares:
        # its ranks train on the same rollouts and must agree on their rewards (a time limit hit on one rank and
        # not another would otherwise give them different advantages, or different groups kept)
        self.scores_here = not dist.is_initialized() or dist.get_rank() == mp_leader()
        self.source = self._build_source()  # (before the reward pool: a bad data file fails with nothing to close)
        self.eval_sets = evaluation.build_eval_sets(cfg, self._build_eval_records)
        self.eval_prompts = self._encode_eval_prompts()
        self.eval_rows: List[PromptResult] = []
        self.eval_time_s = 0.0  # the last evaluation's
        self.rewards = RewardPool(cfg.rewards) if self.scores_here else None
        self.length_schedule = LengthPenaltySchedule(cfg.algo.length_penalty)
        self.resets = ReferenceResetController(cfg.algo.reference_reset)
        self.entropy_control = EntropyController(cfg.algo.entropy_control)
        self.retired = SolvedPromptFilter(cfg.data.retire_solved_after, cfg.data.retire_solved_reward)
        self.spec = LossSpec(eps_low=cfg.algo.loss.eps_low, eps_high=cfg.algo.loss.eps_high,
                             dual_clip=cfg.algo.loss.dual_clip, ratio_log_clamp=cfg.algo.loss.ratio_log_clamp,
                             kl_coef=cfg.algo.kl.coef if cfg.algo.kl.placement == "loss" else 0.0,
                             kl_estimator=cfg.algo.kl.estimator, kl_log_ratio_clamp=cfg.algo.kl.log_ratio_clamp,
                             kl_output_clamp=cfg.algo.kl.output_clamp, entropy_coef=cfg.algo.loss.entropy_coef,
                             ratio_level=cfg.algo.loss.ratio_level)
        self.step = 0
        self.saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote or loaded
        self.nonfinite_in_a_row = 0
        self.save_errors = 0  # checkpoints of this run that could not be written (the run went on)
        self.health = HealthWatch()
        self.signal_rate: Optional[float] = None  # algo.dynamic_sampling.first_draw_oversample's running mean
        self.eval_history: List[Dict] = []
        self.best: List[Tuple[float, int]] = []  # (checkpoint.best_metric, step) of the best evaluations, best first
        self.preempt = _Preemption()
        self.logger: Optional[RunLogger] = None

    def _model_source(self):
        """(vocabulary rows, HF config or None, megaprorl checkpoint or None) of the policy to build:
        ``model.hf_path``'s config.json checked against ``model.*``, the end tokens collected on the
        tokenizer, ``model.load`` resolved to a checkpoint."""
        cfg = self.cfg
        vocab = self.tokenizer.vocab_size
        hf_cfg = None
        if cfg.model.hf_path:
            from .models.convert import ConversionError, check_model_config, hf_vocab_size, load_hf_config
            from .models.tokenizer import generation_eos_ids

            try:
                hf_cfg = load_hf_config(cfg.model.hf_path)
                check_model_config(cfg.model, hf_cfg, cfg.model.hf_path)
            except ConversionError as e:
                raise ConfigError(f"config key 'model.hf_path': {e}") from None
            vocab = hf_vocab_size(hf_cfg)  # the checkpoint's embedding rows (>= the tokenizer's size)
            self.tokenizer.add_stop_ids(generation_eos_ids(cfg.model.hf_path))
        load_src = None
        if cfg.model.load:
            from .dist_ckpt import saved_common

            try:
                load_src = ckpt.resolve_checkpoint(cfg.model.load, "config key 'model.load'")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            saved = saved_common(os.path.join(load_src, ckpt.MODEL_DIR)).get("vocab_size")
            if saved is not None and int(saved) != vocab:
                if hf_cfg is not None:
                    raise ConfigError(f"config key 'model.load': {load_src} was trained with {saved} vocabulary "
                                      f"rows, {cfg.model.hf_path}/config.json has vocab_size {vocab}")
                vocab = int(saved)  # the rows of the checkpoint's embedding (an HF-started run's, say)
        self.tokenizer.add_stop_ids(cfg.rollout.stop_token_ids)
        bad = [i for i in self.tokenizer.stop_ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"config key 'rollout.stop_token_ids': stop token ids {bad} are outside the "
                              f"vocabulary of {vocab} (the tokenizer's EOS and generation_config.json included)")
        return vocab, hf_cfg, load_src

    # ------------------------------------------------------------------------------ data
    def _build_source(self):
        """The training prompts of this data-parallel rank: its share of each source's sequence (every rank
        builds the same sources and keeps its own positions: ``data.sources.ShardedSource``), so the ranks'
        prompts are disjoint; a mixture's choice of source is drawn per rank."""
        cfg = self.cfg
        from .data.sources import build_source, shard_source

        shard = (dp_rank(), dp_world())
        if not cfg.data.sources:
            return shard_source(builtin.AdditionSource(seed=_derive_seed(cfg.data.seed, "train", 0),
                                                       min_digits=cfg.data.builtin_min_digits,
                                                       max_digits=cfg.data.builtin_max_digits), shard)
        return build_source(cfg.data.sources, seed=_derive_seed(cfg.data.seed, "train", dp_rank()), shard=shard)

    def _build_eval_records(self) -> List[Dict]:
        cfg = self.cfg
        if cfg.eval.source:
            from .data.sources import build_source

            matches = [s for s in cfg.data.sources if s.name == cfg.eval.source]
            if not matches:
                raise ConfigError(f"config key 'eval.source': no data source named {cfg.eval.source!r} "
                                  f"(have {[s.name for s in cfg.data.sources]})")
            src = build_source([matches[0]], seed=_derive_seed(cfg.data.seed, "eval"))
            # a source with fewer rows than eval.n_prompts is evaluated once through, not with repeats
            n = min(cfg.eval.n_prompts, len(src)) if hasattr(src, "__len__") else cfg.eval.n_prompts
            return src.sample(n)
        return builtin.eval_split(cfg.eval.n_prompts, cfg.data.seed, cfg.data.builtin_min_digits,
                                  cfg.data.builtin_max_digits, train_seed=0)

    def encode_prompt(self, record: Dict) -> List[int]:
        return self.tokenizer.encode_prompt(record)

    def _encode_eval_prompts(self) -> List[List[List[int]]]:
        """Every evaluation set's prompts, encoded once; a prompt whose response budget would run past
        ``model.max_position_embeddings`` is an error now, not at the first evaluation hours into the run."""
        room = self.cfg.model.max_position_embeddings
        out = []
        for i, es in enumerate(self.eval_sets):
            prompts = [self.encode_prompt(r) for r in es.records]
            over = [(len(p), r.get("id")) for p, r in zip(prompts, es.records) if len(p) + es.max_new_tokens > room]
            if over:
                key = f"eval.sets[{i}] ({es.name})" if es.name else "eval.source / the built-in set"
                longest = max(n for n, _ in over)
                raise ConfigError(
                    f"config key '{key}': {len(over)} prompts of up to {longest} tokens + a response budget of "
                    f"{es.max_new_tokens} exceed model.max_position_embeddings={room} (e.g. row {over[0][1]}, "
                    f"{over[0][0]} tokens): raise model.max_position_embeddings, lower the set's max_new_tokens, "
                    "or leave those rows out")
            out.append(prompts)
        return out

    # ------------------------------------------------------------------------------ warm start
    def warmstart(self) -> Dict:
        """Short supervised fine-tuning on the built-in task's answers, with the new policy's (fresh)
        optimizer at the warm-start learning rate; a fresh RL optimizer after."""
        w = self.cfg.warmstart
        if w.steps <= 0:
            return {}
        from .data.builtin import sft_examples

        examples = sft_examples(w.examples, _derive_seed(self.cfg.seed, "sft", dp_rank()),
                                self.cfg.data.builtin_min_digits, self.cfg.data.builtin_max_digits)
        gen = torch.Generator().manual_seed(_derive_seed(self.cfg.seed, "sft-order"))
        losses = []
        t0 = time.time()
        with self.policy.on_device():
            for i in range(w.steps):
                idx = torch.randint(0, len(examples), (w.batch_size,), generator=gen).tolist()
                prompts = [self.encode_prompt(examples[j]) for j in idx]
                answers = [self.tokenizer.encode(examples[j]["answer"]) + [self.tokenizer.eos_id] for j in idx]
                batch = build_seq_batch(prompts, answers, self.tokenizer.pad_id)
                lr = w.lr * min(1.0, (i + 1) / max(1, w.steps // 10)) * 0.5 * (1 + math.cos(math.pi * i / w.steps))
                self.policy.set_lr(lr, weight_decay=0.0)
                losses.append(self.policy.sft_step(batch, self.cfg.train.micro_batch_size))
            self.policy.reset_optimizer()
        if self.reference is not None:
            with self.reference.on_device():
                self.reference.load_weights_from(self.policy)
        self.engine.update_weights(self.step)  # an engine with its own copy of the weights samples the SFT'd policy
        return {"warmstart/final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
                "warmstart/time_s": time.time() - t0}

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, greedy: Optional[bool] = None) -> Dict:
        """Every evaluation set's greedy accuracy and, at evaluation sampling settings, pass@k
        (megaprorl/evaluation.py); the prompts' rows are left in ``self.eval_rows``.

        The sets share ``generate`` calls: one greedy call for the sets of one token budget, one sampled call for
        those of one budget and one sample count, the calls of one budget decoded together (``generate_many``),
        each rollout scored as soon as it finishes.  Each prompt samples from its own seed, a function of the
        run's seed, the set, the step and the prompt's row in the set: its samples do not depend on which other
        sets or prompts share the call, nor on the data-parallel layout."""
        cfg = self.cfg
        t0 = time.time()
        sets = self.eval_sets
        mine = [es.records[dp_rank():: dp_world()] for es in sets]  # rank r evaluates rows r, r + world, ...
        prompts = [p[dp_rank():: dp_world()] for p in self.eval_prompts]
        rows: List[List[Optional[PromptResult]]] = [[None] * len(recs) for recs in mine]
        # one greedy call for the sets of one token budget, one sampled call for those of one budget and one
        # sample count
        calls, done = [], []
        for group in _grouped(range(len(sets)), lambda i: sets[i].max_new_tokens):
            flat = [(i, k) for i in group for k in range(len(mine[i]))]
            calls.append(([mine[i][k] for i, k in flat], [prompts[i][k] for i, k in flat],
                          SamplingParams(max_new_tokens=sets[group[0]].max_new_tokens, n=1, greedy=True)))
            done.append((True, flat))
        sampled = [] if (greedy or cfg.eval.greedy) else [i for i, es in enumerate(sets) if es.samples_per_prompt > 1]
        for group in _grouped(sampled, lambda i: (sets[i].max_new_tokens, sets[i].samples_per_prompt)):
            flat = [(i, k) for i in group for k in range(len(mine[i]))]
            es = sets[group[0]]
            seeds = [_derive_seed(cfg.seed, "eval", sets[i].name, self.step, dp_rank() + k * dp_world())
                     for i, k in flat]
            calls.append(([mine[i][k] for i, k in flat], [prompts[i][k] for i, k in flat],
                          SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, seeds=seeds,
                                         max_new_tokens=es.max_new_tokens, n=es.samples_per_prompt)))
            done.append((False, flat))
        # the calls of one budget decoded together (a KV cache's rows are sized for the longest budget in it, so
        # budgets are not mixed: a short budget's calls keep the rows that fit them)
        out, scores = [None] * len(calls), [None] * len(calls)
        for budget in dict.fromkeys(params.max_new_tokens for _, _, params in calls):
            idx = [j for j, (_, _, params) in enumerate(calls) if params.max_new_tokens == budget]
            got, got_scores, _, _ = self._generate_scored_calls([calls[j] for j in idx])
            for j, g, sc in zip(idx, got, got_scores):
                out[j], scores[j] = g, sc
        for (is_greedy, flat), rollouts, scored in zip(done, out, scores):
            if is_greedy:
                for (i, k), ro, sc in zip(flat, rollouts, scored):
                    rows[i][k] = PromptResult(sets[i].name, mine[i][k].get("id"), mine[i][k].get("domain", "?"),
                                              float(sc.reward), len(ro.response_ids), bool(ro.finished),
                                              greedy_response=(self.tokenizer.decode(ro.response_ids)
                                                               if cfg.eval.write_responses else None),
                                              greedy_error=sc.error)
                continue
            for ro, sc in zip(rollouts, scored):
                i, k = flat[ro.prompt_index]
                rows[i][k].rewards.append(float(sc.reward))
                rows[i][k].tokens.append(len(ro.response_ids))
                rows[i][k].finished.append(bool(ro.finished))
                if sc.error is not None:
                    rows[i][k].errors.append(sc.error)
        # every rank's rows, back in each set's order
        pairs = _gather_objects([((i, dp_rank() + k * dp_world()), row)
                                 for i in range(len(sets)) for k, row in enumerate(rows[i])])
        pairs.sort(key=lambda p: p[0])
        out: Dict = {}
        every: List[PromptResult] = []
        for i, es in enumerate(sets):
            set_rows = [row for (j, _), row in pairs if j == i]
            out.update(set_metrics(es, set_rows))
            every.extend(set_rows)
        out.update(overall_metrics(sets, every, out))
        self.eval_time_s = time.time() - t0  # generation and scoring of every set, logged as time/eval_s
        failed = [(row, e) for row in every for e in ([row.greedy_error] if row.greedy_error else []) + row.errors]
        if failed:  # scored 0: a broken verifier or sandbox must not pass for a policy that cannot solve the set
            per_set = {es.name or "eval": sum(row.n_errors for row in every if row.set == es.name) for es in sets}
            row, err = failed[0]
            self._warn(f"[eval] {len(failed)} responses' verifiers failed and scored 0 ("
                       + ", ".join(f"{k}: {v}" for k, v in per_set.items() if v) + f"); e.g. {row.id}: {err}")
        self.eval_rows = every
        return out

    def _set_accuracies(self, ev: Dict) -> str:
        named = [es for es in self.eval_sets if es.name]
        return ("" if not named else " (" + ", ".join(f"{es.name} {ev[es.prefix + 'accuracy']:.3f}" for es in named)
                + ")")

    def _after_eval(self, ev: Dict) -> None:
        """Write an evaluation's per-prompt rows (``eval.write_results``) and check the reset trigger's metric."""
        if self.is_main and self.cfg.eval.write_results:
            self._write_aside(evaluation.write_rows, os.path.join(self.run_dir, "eval", f"step_{self.step:08d}.jsonl"),
                              self.eval_rows)
        rr, c = self.cfg.algo.reference_reset, self.cfg.checkpoint
        for on, key, name in ((rr.stall_evals, "algo.reference_reset.stall_metric", rr.stall_metric),
                              (c.keep_best, "checkpoint.best_metric", c.best_metric)):
            if on and name not in ev:
                raise ConfigError(f"config key '{key}': {name!r} is not an evaluation metric; this run's are "
                                  f"{sorted(ev)}")

    def _observe_stall(self, step: int, ev: Dict) -> None:
        """Feed an evaluation to the reset controller's stall trigger (``algo.reference_reset.stall_evals``)."""
        if self.cfg.algo.reference_reset.stall_evals > 0:
            self.resets.observe_validation(step, ev[self.cfg.algo.reference_reset.stall_metric])

    def _rank_evaluation(self, ev: Dict) -> bool:
        """Place this step's evaluation among the ``checkpoint.keep_best`` best by ``checkpoint.best_metric``
        (ties: the earlier step first); True when it is one of them, so its checkpoint must be kept."""
        c = self.cfg.checkpoint
        value = float(ev.get(c.best_metric, float("nan")))
        if c.keep_best <= 0 or not math.isfinite(value):
            return False
        ranked = sorted([b for b in self.best if b[1] != self.step] + [(value, self.step)], key=lambda b: (-b[0], b[1]))
        self.best = ranked[:c.keep_best]
        return any(st == self.step for _, st in self.best)

    def _best_listing(self) -> List[Dict]:
        return [{"step": st, "value": v, "path": ckpt.step_dir(self.ckpt_dir, st)} for v, st in self.best]

    def _generate_scored(self, records: List[Dict], prompts: List[List[int]], params: SamplingParams, claim=None):
        """Generate ``params.n`` rollouts of each prompt and score each (against ``records[r.prompt_index]``) as
        soon as it finishes, while the others decode; the scores are computed on the model-parallel group's first
        rank and shared with the group.  Returns (rollouts, scores, generation seconds, seconds waited for the
        verifiers after the last rollout finished).  ``claim``: the engine decodes only the prompts it claims
        (``_shared_round``)."""
        out, scored, t_gen, t_wait = self._generate_scored_calls([(records, prompts, params)], claim)
        return out[0], scored[0], t_gen, t_wait

    def _generate_scored_calls(self, calls: List[Tuple[List[Dict], List[List[int]], SamplingParams]], claim=None):
        """``_generate_scored`` of several calls [(records, prompts, params)] decoded together (the engine's
        ``generate_many``): (rollouts per call, scores per call, generation seconds, seconds waited)."""
        t = time.time()
        self.engine.wake()
        futures: Dict[Tuple[int, int], Any] = {}

        def score_when_finished(c: int, k: int, r) -> None:
            if self.scores_here:
                futures[(c, k)] = self.rewards.submit([calls[c][0][r.prompt_index]],
                                                      [self.tokenizer.decode(r.response_ids)])

        if len(calls) == 1:
            _, prompts, params = calls[0]
            kw = {} if claim is None else {"claim": claim}
            out = [self.engine.generate(prompts, params, on_finish=lambda k, r: score_when_finished(0, k, r), **kw)]
        else:
            out = self.engine.generate_many([(prompts, params) for _, prompts, params in calls],
                                            on_finish=score_when_finished)
        t_gen = time.time() - t
        t = time.time()
        for c, rollouts in enumerate(out):
            for k, r in enumerate(rollouts):
                if (c, k) not in futures:  # an engine that does not report rollouts as they finish
                    score_when_finished(c, k, r)
        scored = mp_broadcast_object([[futures[(c, k)].result()[0] for k in range(len(rollouts))]
                                      for c, rollouts in enumerate(out)] if self.scores_here else None)
        return out, scored, t_gen, time.time() - t

    # ------------------------------------------------------------------------------ one RL step
    def _draw_groups(self) -> Tuple[List[Dict], Dict]:
        """Generate and score groups until B_local groups with signal (or the draw bound) are reached."""
        cfg = self.cfg
        n = cfg.rollout.n_samples
        b_local = cfg.train.prompts_per_step // dp_world()
        ds = cfg.algo.dynamic_sampling
        sampler: DynamicSampler[Dict] = DynamicSampler(b_local, ds, first_rate=self.signal_rate)
        shared = dp_world() > 1 and cfg.rollout.share_prompts_over_dp  # the ranks' prompts decoded as one pool
        pooled = dp_world() > 1 and ((ds.enabled and ds.share_over_dp) or shared)
        timings = {"rollout": 0.0, "reward": 0.0}
        engine_stats: Dict[str, float] = {}  # the embedded engine's counters, summed over the draws
        raw_rewards: List[float] = []
        lengths: List[int] = []
        truncated_count = 0
        by_domain: Dict[str, list] = {}  # domain -> [reward sum, count, errors, response tokens]
        penalty_on = cfg.algo.length_penalty.enabled and self.length_schedule.is_on(self.step)
        skipped = {"long": 0, "retired": 0}
        outcomes = []  # (prompt key, solved by every sample) of each group drawn, for data.retire_solved_after
        claimed = 0  # rollout.share_prompts_over_dp: the prompts this rank's engine decoded
        while True:
            size = self._pooled_draw(sampler) if pooled else sampler.next_draw() if self._keep_drawing(sampler) else 0
            if not size:
                break
            records, prompts, skipped_now = self._sample_prompts(size)
            for k in skipped:
                skipped[k] += skipped_now[k]
            params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    max_new_tokens=cfg.rollout.max_new_tokens, n=n,
                                    seed=_derive_seed(cfg.seed, "rollout", self.step, sampler.draws, dp_rank()))
            claim = None
            if shared:
                records, prompts, params.seeds, claim = self._shared_round(records, prompts, sampler.draws)
            self.engine.record_routing = cfg.algo.moe_routing_replay  # training draws only, not evaluations
            try:
                rollouts, scored, t_gen, t_wait = self._generate_scored(records, prompts, params, claim)
            finally:
                self.engine.record_routing = False
            if shared:  # this rank's groups: the prompts it claimed, in claim order
                mine = list(dict.fromkeys(r.prompt_index for r in rollouts))
                local = {g: j for j, g in enumerate(mine)}
                records = [records[g] for g in mine]
                for r in rollouts:
                    r.prompt_index = local[r.prompt_index]
                claimed += len(mine)
            timings["rollout"] += t_gen
            timings["reward"] += t_wait
            for k, v in (getattr(self.engine, "stats", None) or {}).items():
                engine_stats[k] = engine_stats.get(k, 0) + v
            rew = torch.tensor([s.reward for s in scored], dtype=torch.float32)
            lens = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
            trunc = torch.tensor([not r.finished for r in rollouts])
            shaped = (apply_length_penalty(rew, lens, trunc, cfg.algo.length_penalty, max_length=cfg.rollout.max_new_tokens)
                      if penalty_on else rew.clone())
            op = cfg.algo.overlong_penalty
            if op.buffer:  # DAPO's soft overlong punishment, on the length-shaped reward
                shaped = shaped + overlong_penalty(lens, cfg.rollout.max_new_tokens, op.buffer, op.factor)
            raw_rewards += rew.tolist()
            for r, s_ in zip(rollouts, scored):
                dom = records[r.prompt_index].get("domain", "?")
                acc = by_domain.setdefault(dom, [0.0, 0, 0, 0])
                acc[0] += s_.reward
                acc[1] += 1
                acc[2] += 1 if s_.error else 0
                acc[3] += len(r.response_ids)
            lengths += lens.int().tolist()
            truncated_count += int(trunc.sum())
            groups = [{"record": records[g], "rollouts": rollouts[g * n:(g + 1) * n], "reward": rew[g * n:(g + 1) * n],
                       "shaped": shaped[g * n:(g + 1) * n], "errors": sum(1 for s in scored[g * n:(g + 1) * n] if s.error)}
                      for g in range(len(records))]
            sampler.add(groups, shaped.view(len(records), n))  # signal is judged on the shaped rewards
            if self.retired.enabled:
                outcomes += [self.retired.outcome(g["record"], g["reward"].tolist()) for g in groups]
        if pooled:  # the ranks' groups with signal make the step's B together (the exchange evens the shares)
            kept, pool_stats = self._take_pooled(sampler)
        else:
            kept, pool_stats = sampler.take(), {}  # B_local groups, topped up with zero-signal ones at the bound
        n_tok = max(len(lengths), 1)
        stats = {
            "reward": sum(raw_rewards) / max(len(raw_rewards), 1),
            "accuracy": sum(1.0 for r in raw_rewards if r >= 1.0) / max(len(raw_rewards), 1),
            "response_length": sum(lengths) / n_tok,
            "truncated_frac": truncated_count / n_tok,
            **sampler.stats(),
            **pool_stats,
            "length_penalty/on": float(penalty_on),
            "data/skipped_long_prompts": skipped["long"],
            "time/rollout_s": timings["rollout"],
            "time/reward_s": timings["reward"],  # the wait for the verifiers once generation ended (they start earlier)
        }
        if shared:
            stats["rollout/prompts_claimed"] = claimed
        discarded, generated = sampler.discarded, sampler.generated
        if dp_world() > 1:  # the share of all ranks' groups (each rank's share, averaged, would weigh the ranks
            # alike though they drew different numbers: per-rank draws, shared prompts)
            discarded, generated = [sum(x) for x in zip(*_gather_objects([(sampler.discarded, sampler.generated)]))]
            stats["dynamic_sampling/discarded_frac"] = discarded / max(generated, 1)
        if ds.enabled and ds.first_draw_oversample:
            # the running signal rate over all ranks' groups, which the next step's first draw scales by
            self.signal_rate = running_signal_rate(self.signal_rate, generated - discarded, generated)
            stats["dynamic_sampling/signal_rate"] = self.signal_rate
        if engine_stats.get("tokens"):  # generated tokens per second of rollout time (either engine)
            stats["time/rollout_tokens_per_s"] = engine_stats["tokens"] / max(timings["rollout"], 1e-9)
        if engine_stats.get("decode_row_steps"):
            # the embedded engine: the share of decoded rows that were running (the rest: finished rows kept in the
            # cache until enough are free to refill or drop); decode steps (forwards)
            stats["rollout/row_utilisation"] = ((engine_stats["tokens"] - engine_stats["rollouts"])
                                                / engine_stats["decode_row_steps"])
            stats["rollout/decode_steps"] = engine_stats["decode_steps"]
        if engine_stats.get("keys_span"):
            # the share of the key positions a masked SDPA decode step reads that rows attend to (each row's own
            # extent, what rollout.decode_attention=triton reads instead of the furthest row's span)
            stats["rollout/own_key_share"] = engine_stats["keys_own"] / engine_stats["keys_span"]
        if self.retired.enabled:  # every rank applies every rank's outcomes, in rank order: one pool
            stats["data/retired_this_step"] = self.retired.observe(_gather_objects(outcomes))
            stats["data/retired_prompts"] = len(self.retired.retired)
            stats["data/skipped_retired"] = skipped["retired"]
        for dom, (tot, cnt, err, toks) in sorted(by_domain.items()):
            stats[f"reward/{dom}"] = tot / max(cnt, 1)
            stats[f"samples/{dom}"] = cnt
            stats[f"reward_errors/{dom}"] = err
            stats[f"response_length/{dom}"] = toks / max(cnt, 1)
        return kept, stats

    def _shared_round(self, records: List[Dict], prompts: List[List[int]], draw: int):
        """``rollout.share_prompts_over_dp``: every rank's prompts of this round in one list (rank by rank), each
        with the seed of the rank that drew it and its place there (its samples do not depend on which rank
        decodes it), and the claim function that hands them out: a counter per round in the job's TCP store,
        read by each model-parallel group's first rank, which shares what it got with its group.  Returns
        (records, prompts, seeds, claim)."""
        parts = _gather_objects([(records, prompts)])
        seeds = [_derive_seed(self.cfg.seed, "rollout", self.step, draw, r, i)
                 for r, (recs, _) in enumerate(parts) for i in range(len(recs))]
        records = [rec for recs, _ in parts for rec in recs]
        prompts = [p for _, ps in parts for p in ps]
        store = dist.distributed_c10d._get_default_store()
        key = f"megaprorl/claims/{self.step}/{draw}"
        leader = dist.get_rank() == mp_leader()

        def claim(k: int) -> List[int]:
            got = None
            if leader:
                end = store.add(key, k)  # atomic: the counter after this rank's k
                got = list(range(min(end - k, len(prompts)), min(end, len(prompts))))
            return mp_broadcast_object(got)

        return records, prompts, seeds, claim

    def _pooled_draw(self, sampler: DynamicSampler) -> int:
        """``algo.dynamic_sampling.share_over_dp``: this rank's share of the next draw of the ranks' pool (0: the
        pool has the step's groups with signal, or the draw bound is reached).  Every rank draws the same number
        in the same rounds (so the ranks whose experts meet in every forward keep step too)."""
        kept, generated = [sum(x) for x in zip(*_gather_objects([(sampler.kept, sampler.generated)]))]
        want = self.cfg.train.prompts_per_step
        if kept >= want or sampler.draws >= sampler.max_draws:
            return 0
        return -(-sampler.draw_for(want, kept, kept, generated) // dp_world())

    def _take_pooled(self, sampler: DynamicSampler) -> Tuple[List[Dict], Dict[str, float]]:
        """This rank's part of the pool's ``train.prompts_per_step`` groups: groups with signal taken as evenly
        over the ranks as they hold them, topped up (at the draw bound) with zero-signal ones the same way; the
        shares may differ by rank (``_balance`` evens them out)."""
        want = self.cfg.train.prompts_per_step
        held = _gather_objects([(sampler.available, sampler.spare)])
        with_signal = sum(a for a, _ in held)
        if with_signal >= want:
            mine = balance.even_take([a for a, _ in held], want)[dp_rank()]
        else:  # every group with signal, and the rest in zero-signal ones
            mine = held[dp_rank()][0] + balance.even_take([s for _, s in held], want - with_signal)[dp_rank()]
        return sampler.take(mine), {"dynamic_sampling/surplus_groups": max(with_signal - want, 0)}

    def _keep_drawing(self, sampler: DynamicSampler) -> bool:
        """Whether this rank draws another round.  With the experts spread over data-parallel replicas
        (``parallel.wide_expert_group``) a rank whose batch is complete takes part in the others' further draws
        (a generate() with no prompts runs the forwards theirs need) until none of them draws."""
        group = wide_expert_group()
        if group is None:
            return sampler.can_draw()
        while True:
            mine = sampler.can_draw()
            if max_over(int(mine), group, self.device) == 0:
                return False
            if mine:
                return True
            self.engine.wake()
            self.engine.generate([], SamplingParams(max_new_tokens=1))

    def _sample_prompts(self, k: int) -> Tuple[List[Dict], List[List[int]], Dict[str, int]]:
        """``k`` training records from the sources and their encoded prompts, leaving out (and counting) those
        retired as solved (``data.retire_solved_after``) and those longer than ``data.max_prompt_tokens``, with
        others drawn in their place."""
        # the prompt and its response budget must fit the positions the model is built for
        room = self.cfg.model.max_position_embeddings - self.cfg.rollout.max_new_tokens
        limit = min(self.cfg.data.max_prompt_tokens or room, room)
        records: List[Dict] = []
        prompts: List[List[int]] = []
        skipped = {"long": 0, "retired": 0}
        while len(records) < k:
            for r in self.source.sample(k - len(records)):
                if self.retired.is_retired(r):
                    skipped["retired"] += 1
                    continue
                p = self.encode_prompt(r)
                if limit and len(p) > limit:
                    skipped["long"] += 1
                    continue
                records.append(r)
                prompts.append(p)
            if skipped["retired"] > 100 * k + 1000:
                raise ConfigError(f"config key 'data.retire_solved_after': {skipped['retired']} of the prompts drawn "
                                  f"for {k} groups were retired as solved ({len(self.retired.retired)} retired in "
                                  f"all): the pool is used up; add prompts, or raise it (0: never retire)")
            if skipped["long"] > 100 * k + 1000:
                key = ("data.max_prompt_tokens" if limit == self.cfg.data.max_prompt_tokens
                       else "model.max_position_embeddings")
                raise ConfigError(f"config key '{key}': {skipped['long']} of the prompts drawn for {k} groups were "
                                  f"longer than {limit} tokens (model.max_position_embeddings - rollout.max_new_tokens "
                                  f"= {room}); raise it (data.max_prompt_tokens: or 0, no limit of its own)")
        return records, prompts, skipped

    def rl_step(self) -> Dict:
        cfg = self.cfg
        t_step = time.time()
        self._peak_memory(None)
        groups, stats = self._draw_groups()
        self._peak_memory("rollout", stats)
        n = cfg.rollout.n_samples
        # (a rank may hold no group here: the pooled draws' shares differ until _balance evens them out)
        shaped = torch.cat([g["shaped"] for g in groups]) if groups else torch.zeros(0)
        if groups:
            stats["shaped_reward"] = float(shaped.mean())
        stats["reward_errors"] = sum(g["errors"] for g in groups)
        # each response's advantage against its group, here where the whole group was drawn (then it may move)
        seq_adv = group_baseline_advantages(shaped.double(), torch.arange(len(groups)).repeat_interleave(n),
                                            cfg.algo.advantage)
        seqs = [_Seq(r, float(g["reward"][j]), float(g["shaped"][j]), float(seq_adv[gi * n + j]), dp_rank(), gi, j,
                     {k: g["record"].get(k) for k in ("id", "domain", "source")})
                for gi, g in enumerate(groups) for j, r in enumerate(g["rollouts"])]
        unit, balanced = n, False  # the mini-batches are cut in whole groups, or in responses once balanced
        if dp_world() > 1:  # how evenly the ranks' responses load them; shared out afresh (parallel.balance_batch)
            seqs, balanced, bal_stats = self._balance(seqs)
            stats.update(bal_stats)
            unit = 1 if balanced else n
        rollouts = [q.rollout for q in seqs]
        batch = build_seq_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                                self.tokenizer.pad_id)
        n_response_tokens = float(batch.loss_mask.sum())
        if cfg.algo.overlong_filter:  # truncated responses take no part in the loss (their rewards did in the baseline)
            truncated = torch.tensor([not r.finished for r in rollouts])
            batch.loss_mask = filter_overlong(batch.loss_mask, truncated)
            stats["overlong_filtered_frac"] = float(truncated.float().mean())
        if cfg.algo.moe_routing_replay:  # the policy's forwards send each token to the experts it was sampled with
            batch.routing = routing_batch([r.extra["routing"] for r in rollouts], batch.tokens)
        self.engine.sleep()

        t = time.time()
        mbs = cfg.train.logprob_micro_batch_size
        temp = cfg.rollout.temperature
        engine_logp = engine_logprobs(rollouts, batch)
        if cfg.algo.old_logprobs == "engine":  # what the tokens were drawn with: the same weights
            batch.old_logp = engine_logp
        else:
            moe = bool(cfg.model.num_experts)  # and how evenly its routers spread the batch over the experts
            batch.old_logp = self.policy.logprobs(batch, mbs, temperature=temp, expert_load=moe)
            if moe:
                stats.update(self.policy.last_expert_load)
            stats.update(mismatch_stats(batch.old_logp, engine_logp, batch.loss_mask))
        if self.reference is not None:
            with self.reference.on_device(changes=False):
                batch.ref_logp = self.reference.logprobs(batch, mbs, temperature=temp)
        stats["time/logprob_s"] = time.time() - t
        self._peak_memory("logprob", stats)

        mask = batch.loss_mask
        kl_in_reward = None
        if self.reference is not None and cfg.algo.kl.placement == "reward":
            kl_tok = kl_estimate(batch.old_logp, batch.ref_logp, cfg.algo.kl.estimator, cfg.algo.kl.log_ratio_clamp,
                                 cfg.algo.kl.output_clamp) * mask
            kl_in_reward = cfg.algo.kl.coef * kl_tok
        dev = self.device  # collectives run on the backend's device (NCCL: GPU tensors)
        batch.advantages = token_advantages(
            torch.tensor([q.adv for q in seqs], dtype=torch.float64, device=dev), mask.to(dev),
            cfg.algo.whiten_advantages, group=dp_group() if dp_world() > 1 else None,
            token_penalty=None if kl_in_reward is None else kl_in_reward.to(dev)).cpu()
        rc = cfg.algo.rollout_correction
        if rc.level:  # the engine sampled from pi_engine, not pi_old: importance-weight the policy gradient
            w, rc_stats = rollout_correction_weights(batch.old_logp, engine_logp, mask, rc.level, rc.mode, rc.cap,
                                                     rc.cap_low, rc.log_ratio_clamp)
            batch.advantages = batch.advantages * w
            stats.update(rc_stats)

        if cfg.logging.rollouts:
            self._write_rollouts(seqs, batch)

        t = time.time()
        stats["lr"] = self.policy.schedule_lr(self.step + 1, cfg.train.steps)  # train.optim's schedule
        if self.entropy_control.enabled:  # the bonus set from the last step's entropy (algo/entropy_control.py)
            self.spec = dataclasses.replace(self.spec, entropy_coef=self.entropy_control.coef())
            stats["entropy_coef"] = self.spec.entropy_coef
        with self.policy.on_device():  # (train.offload_optimizer: the optimizer's state is on the host until now)
            upd = self._optimizer_steps(batch, unit, keep_order=balanced)
        stats["time/update_s"] = time.time() - t
        self._peak_memory("update", stats)
        stats.update(upd)
        if self.entropy_control.enabled:  # the whole batch's entropy, so every rank sets the same coefficient
            self.entropy_control.observe(dp_weighted_mean(upd["entropy"], upd.get("tokens", 1.0), self.device))

        stats.update(self._perf_stats([len(r.prompt_ids) + len(r.response_ids) for r in rollouts],
                                      stats["time/logprob_s"], stats["time/update_s"]))

        t = time.time()
        self.engine.update_weights(self.step + 1)
        stats["time/weight_sync_s"] = time.time() - t
        stats.update(self._offload_stats())
        stats["time/step_s"] = time.time() - t_step
        stats["step_time_s"] = stats["time/step_s"]
        stats["tokens_per_s"] = n_response_tokens * dp_world() / max(stats["time/step_s"], 1e-9)
        return stats

    def _perf_stats(self, seq_lens: List[int], t_logprob: float, t_update: float) -> Dict[str, float]:
        """The model TFLOP/s per device of the step's update and of its log-prob passes and update together, and
        their MFU when the device's peak is known (``logging.peak_tflops``, or a known GPU's dense bf16 peak): this
        rank's sequences' model FLOPs (``megaprorl/models/flops.py``; a forward is a third of a forward and
        backward) over its model-parallel group's devices.  Averaged over the data-parallel ranks when logged, which
        gives all ranks' FLOPs over all devices, the ranks keeping step through the gradients' all-reduce."""
        fb = train_flops(self.flops_shape, seq_lens)
        n_fwd = (self.cfg.algo.old_logprobs == "recompute") + (self.reference is not None)
        devices = self.cfg.parallel.tensor_parallel * self.cfg.parallel.pipeline_parallel
        out = {"perf/tflops_update": fb / devices / max(t_update, 1e-9) / 1e12,
               "perf/tflops_trainer": fb * (1 + n_fwd / 3) / devices / max(t_logprob + t_update, 1e-9) / 1e12}
        if self.peak_tflops:
            out.update({"perf/mfu_update": out["perf/tflops_update"] / self.peak_tflops,
                        "perf/mfu_trainer": out["perf/tflops_trainer"] / self.peak_tflops})
        return out

    def _write_rollouts(self, seqs: List["_Seq"], batch: SeqBatch) -> None:
        """``logging.rollouts`` groups of this step (each rank's share of the groups as drawn), one JSON line per
        sample, to RUN/rollouts/step_XXXXXXXX.jsonl (the step being taken, counted from 1)."""
        want = self.cfg.logging.rollouts
        n_groups = len(seqs) // self.cfg.rollout.n_samples
        take = n_groups if want < 0 else min(n_groups, -(-want // dp_world()))
        rows = []
        if self.scores_here:  # one rank of each model-parallel group: they hold the same samples
            for row, q in enumerate(seqs):  # wherever a response trains, it is written as drawn
                if q.group >= take:
                    continue
                r = q.rollout
                m = batch.loss_mask[row]
                rows.append({"step": self.step + 1, "rank": q.rank, "group": q.group, "sample": q.sample, **q.meta,
                             "prompt": self.tokenizer.decode(r.prompt_ids),
                             "response": self.tokenizer.decode(r.response_ids),
                             "reward": q.reward, "shaped_reward": q.shaped,
                             "advantage": float((batch.advantages[row] * m).sum() / m.sum().clamp_min(1)),
                             "response_tokens": len(r.response_ids), "finished": bool(r.finished)})
        rows = sorted(_gather_objects(rows), key=lambda x: (x["rank"], x["group"], x["sample"]))
        if self.is_main:
            self._write_aside(evaluation.write_jsonl,
                              os.path.join(self.run_dir, "rollouts", f"step_{self.step + 1:08d}.jsonl"), rows)

    def _group_order(self, n_units: int, rank: int, epoch: int = 0) -> torch.Tensor:
        """The order in which a rank's groups (or responses) are cut into mini-batches in a pass over its batch."""
        return torch.randperm(n_units, generator=torch.Generator().manual_seed(
            _derive_seed(self.cfg.seed, "order", self.step, rank, *([epoch] if epoch else []))))

    def _balance(self, seqs: List["_Seq"]) -> Tuple[List["_Seq"], bool, Dict[str, float]]:
        """At DP > 1: the ranks' loads (model FLOPs of their responses) in each mini-batch of the step as drawn,
        and with ``parallel.balance_batch`` the responses shared out afresh so that each rank gets the same number
        and about the same FLOPs in every mini-batch, each mini-batch still the whole groups of the step's
        random order (``parallel/balance.py``); the responses that change rank travel to it.  Returns (this
        rank's responses, in mini-batch order when balanced; whether balanced; stats: ``dp/load_imbalance`` (the
        mini-batches' slowest rank's load summed, over their mean load summed: the update's time over an even
        split's), ``dp/load_imbalance_drawn`` (the same as drawn) and ``dp/responses_moved``)."""
        cfg = self.cfg
        world, me, n = dp_world(), dp_rank(), cfg.rollout.n_samples
        n_mini = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
        mine = [train_flops(self.flops_shape, [len(q.rollout.prompt_ids) + len(q.rollout.response_ids)]) for q in seqs]
        costs = _gather_objects([mine])
        drawn = []  # each rank's load per mini-batch were it to train what it drew, cut as it would cut it
        for r in range(world):
            g_r = len(costs[r]) // n
            in_order = [costs[r][g * n + j] for g in self._group_order(g_r, r).tolist() for j in range(n)]
            drawn.append(balance.mini_batch_loads(in_order, g_r, n_mini, n))
        stats = {"dp/load_imbalance_drawn": balance.step_imbalance(drawn)}
        if not cfg.parallel.balance_batch:
            stats["dp/load_imbalance"] = stats["dp/load_imbalance_drawn"]
            return seqs, False, stats
        layout = balance.plan(costs, n_mini, _derive_seed(cfg.seed, "balance", self.step), group_size=n)
        b_local = cfg.train.prompts_per_step // world
        stats["dp/load_imbalance"] = balance.step_imbalance(
            [balance.mini_batch_loads([costs[src][i] for src, i in layout[r]], b_local, n_mini, n)
             for r in range(world)])
        stats["dp/responses_moved"] = sum(src != r for r in range(world) for src, _ in layout[r])
        send: List[list] = [[] for _ in range(world)]
        for r in range(world):
            if r != me:
                send[r] = [(i, seqs[i]) for src, i in layout[r] if src == me]
        got = {(src, i): q for src, part in enumerate(balance.exchange_objects(send, dp_group())) for i, q in part}
        return [seqs[i] if src == me else got[(src, i)] for src, i in layout[me]], True, stats

    def _balanced_order(self, batch: SeqBatch, n_mini: int, epoch: int) -> torch.Tensor:
        """A later PPO pass over a balanced batch (``train.ppo_epochs`` > 1): this rank's responses in a fresh
        random order, cut into ``n_mini`` equal counts of about equal model FLOPs (``balance.split_even``), the
        cuts in random order.  Each rank's share of every mini-batch is then about its whole load over
        ``n_mini``, as even over the ranks as ``_balance`` made the whole loads; a plain reshuffle would keep
        only the sums even."""
        n = len(batch)
        perm = self._group_order(n, dp_rank(), epoch)
        lens = seq_lengths(batch)
        costs = [train_flops(self.flops_shape, [int(lens[i])]) for i in perm.tolist()]
        lists = balance.split_even(costs, n_mini, n // n_mini)
        cuts = torch.randperm(n_mini, generator=torch.Generator().manual_seed(
            _derive_seed(self.cfg.seed, "cuts", self.step, dp_rank(), epoch)))
        return torch.cat([perm[torch.tensor(lists[c], dtype=torch.long)] for c in cuts.tolist()])

    def _optimizer_steps(self, batch: SeqBatch, unit: int, keep_order: bool = False) -> Dict:
        """The step's optimizer steps: ``train.ppo_epochs`` passes over the batch, each cut into the mini-batches
        in its own random order of its units of ``unit`` consecutive rows (a group's responses, or one response
        once ``_balance`` spread them); ``keep_order``: the first pass in the batch's order, which ``_balance``
        made, and the later ones cut by ``_balanced_order``."""
        cfg = self.cfg
        n_units = len(batch) // unit
        n_mini = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
        bounds = balance.mini_batch_bounds(n_units, n_mini)
        epochs = cfg.train.ppo_epochs
        total = n_mini * epochs
        agg: Dict[str, float] = {}
        for e, m in ((e, m) for e in range(epochs) for m in range(n_mini)):
            if m == 0:  # each pass over the batch in its own mini-batch order
                if keep_order and e == 0:
                    order = torch.arange(n_units)
                elif keep_order:
                    order = self._balanced_order(batch, n_mini, e)
                else:
                    order = self._group_order(n_units, dp_rank(), e)
            gsel = order[bounds[m]:bounds[m + 1]]
            idx = (gsel[:, None] * unit + torch.arange(unit)[None]).reshape(-1)
            mb = batch.slice(idx)
            # the valid tokens and the sequences that have any (a row the overlong filter emptied counts in neither)
            counts = torch.tensor([float(mb.loss_mask.sum()), float((mb.loss_mask.sum(-1) > 0).sum())],
                                  dtype=torch.float64, device=self.device)
            if dist.is_initialized() and dp_world() > 1:
                dist.all_reduce(counts, group=dp_group())
            mb.weights = aggregation_weights(mb.loss_mask, cfg.algo.loss.aggregation, float(counts[0]), float(counts[1]),
                                             norm_length=cfg.rollout.max_new_tokens)
            s = self.policy.train_step(mb, self.spec, cfg.train.micro_batch_size, temperature=cfg.rollout.temperature)
            for k, v in s.items():
                agg[k] = agg.get(k, 0.0) + v / total
            if s["skipped_update"]:
                self.nonfinite_in_a_row += 1
                self._warn(f"[non-finite] RL step {self.step + 1}, optimizer step {e * n_mini + m + 1}/{total}: loss "
                           f"{s.get('loss', float('nan')):.4g}, grad norm {s['grad_norm']:.4g}; update skipped "
                           f"({self.nonfinite_in_a_row} in a row, the run stops at "
                           f"{cfg.train.optim.max_nonfinite_in_a_row})")
                if self.nonfinite_in_a_row >= cfg.train.optim.max_nonfinite_in_a_row:
                    raise NonFiniteError(
                        f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                        f"(RL step {self.step + 1}); stopping. Lower train.optim.lr or check the data.")
            else:
                self.nonfinite_in_a_row = 0
        agg["optimizer_steps"] = float(total)
        agg["skipped_updates"] = agg.pop("skipped_update") * total
        return agg

    # ------------------------------------------------------------------------------ resets
    def maybe_reset_reference(self, stats: Dict) -> Optional[str]:
        if self.reference is None:
            return None
        if "kl_ref" in stats:  # every rank must decide alike: the KL of the whole batch, not of the rank's share
            self.resets.observe_kl(self.step, dp_weighted_mean(stats["kl_ref"], stats.get("tokens", 1.0), self.device))
        trigger = self.resets.should_reset(self.step)
        if trigger:
            with self.reference.on_device():
                self.reference.load_weights_from(self.policy)
            if self.cfg.algo.reference_reset.reset_optimizer:
                self.policy.reset_optimizer()
            self.resets.record_reset(self.step, trigger)
        return trigger

    # ------------------------------------------------------------------------------ host offload
    def _policies(self) -> List[Policy]:
        return [self.policy] + ([self.reference] if self.reference is not None else [])

    def _offload(self) -> None:
        """train.offload_optimizer / offload_reference: the idle state to host memory (megaprorl/policy/offload.py);
        it comes back only where it is used (the update, the reference's log-prob pass, resets, checkpoints)."""
        for p in self._policies():
            p.offload()

    @contextlib.contextmanager
    def _on_device(self, changes: bool = True):
        """Everything offloaded on the device for the duration (Policy.on_device)."""
        with contextlib.ExitStack() as stack:
            for p in self._policies():
                stack.enter_context(p.on_device(changes))
            yield

    def _peak_memory(self, phase: Optional[str], stats: Optional[Dict] = None) -> None:
        """On a GPU: ``memory/<phase>_peak_gib``, the most device memory held by tensors since the last call
        (torch.cuda.max_memory_allocated; the KV cache, activations, logits, offloaded state when back)."""
        if self.device.type != "cuda":
            return
        if phase is not None:
            stats[f"memory/{phase}_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(self.device)

    def _memory_line(self) -> str:
        """What rank 0 holds, from its tensors (Policy.memory_bytes), and the embedded engine's KV cache per row."""
        cfg = self.cfg
        gib = lambda b: (f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.2f} MiB"  # noqa: E731
                         if b >= 2 ** 20 else f"{b / 2 ** 10:.1f} KiB")
        m = self.policy.memory_bytes()
        off = " (in host memory outside the update)" if cfg.train.offload_optimizer else ""
        parts = [f"weights {gib(m['weights'])}", f"gradients {gib(m['gradients'])}",
                 f"optimizer {gib(m['optimizer'])} once Adam has stepped{off}"]
        if self.reference is not None:
            parts.append(f"reference {gib(self.reference.memory_bytes()['weights'])}"
                         + (" (in host memory outside its pass)" if cfg.train.offload_reference else ""))
        kv_row = getattr(self.engine, "kv_bytes_per_row", None)
        if kv_row is not None:
            n, r = cfg.rollout.max_new_tokens + cfg.data.max_prompt_tokens, cfg.rollout.batch_size
            row = kv_row(n)
            what = "the response budget + data.max_prompt_tokens" if cfg.data.max_prompt_tokens else \
                "the response budget; prompts add theirs"
            parts.append(f"KV cache {gib(row)} a row of {n} positions ({what}), {gib(row * r)} for "
                         f"rollout.batch_size={r}")
        return "memory on this rank: " + ", ".join(parts)

    def _offload_stats(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, p in zip(("optimizer", "reference"), self._policies()):
            st = p.offload_stats()
            if st:
                out["time/offload_s"] = out.get("time/offload_s", 0.0) + st["seconds"]
                out[f"offload/{name}_gib"] = st["gib"]
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        from .dist_ckpt import save_policy

        # policy, optimizer state and reference go to the layout-independent dist checkpoint; the rank
        # files hold what is per rank (random streams) and the data sampler's position
        rank_state = {"rng": ckpt.rng_state(), "source": self.source.state_dict()}
        trainer_state = {"step": self.step, "resets": self.resets.state_dict(),
                         "length_penalty": self.length_schedule.state_dict(), "eval_history": self.eval_history,
                         "nonfinite_in_a_row": self.nonfinite_in_a_row, "retired_prompts": self.retired.state_dict(),
                         "signal_rate": self.signal_rate, "save_errors": self.save_errors,
                         "health": self.health.state_dict(),
                         "best_checkpoints": self.best, "entropy_control": self.entropy_control.state_dict(),
                         "config": to_yaml(self.cfg)}
        with self._on_device():  # (copied back after: saving may build optimizer state Megatron had left lazy)
            path = ckpt.save(self.ckpt_dir, self.step, rank_state, trainer_state, self.cfg.checkpoint.keep_last,
                             write_model=lambda d: save_policy(d, self.policy, self.reference,
                                                               extra_common={"vocab_size": self.policy.vocab_size}),
                             keep=[st for _, st in self.best])
        self.saved_step = self.step
        if self.is_main and self.cfg.checkpoint.keep_best:
            evaluation.write_json(os.path.join(self.ckpt_dir, "best.json"),
                                  {"metric": self.cfg.checkpoint.best_metric, "best": self._best_listing()})
        return path

    def _save_or_go_on(self) -> bool:
        """A checkpoint during the run: one that cannot be written (on any rank: ``ckpt.CheckpointWriteError``)
        is reported and counted (``checkpoint/save_errors``) and the run goes on, to try again at the next
        checkpoint, rather than end and be requeued from an older one into the same failure.  Whether it was
        written."""
        try:
            self.save_checkpoint()
            return True
        except ckpt.CheckpointWriteError as e:
            self.save_errors += 1
            self.best = [(v, st) for v, st in self.best if st != self.step]  # not among the kept ones
            newest = ckpt.find_latest(self.ckpt_dir, self.info.world_size) if self.is_main else None
            self._warn(f"[checkpoint] step {self.step} was not saved ({e}); the run goes on and saves again at the "
                       f"next checkpoint. Newest complete checkpoint: {newest or 'none'}")
            return False

    def load_checkpoint(self, path: str) -> None:
        rank_state, tstate = ckpt.load(path)
        if ckpt.has_model_dir(path):
            from .dist_ckpt import load_policy

            with self._on_device():
                load_policy(os.path.join(path, ckpt.MODEL_DIR), self.policy, self.reference)
        else:
            raise ValueError(f"{path}: no {ckpt.MODEL_DIR}/ directory (a checkpoint of megaprorl before distributed "
                             "checkpoints, whose torch AdamW state this version cannot load)")
        self.source.load_state_dict(rank_state["source"])
        if rank_state.get("rank_changed"):
            self._say(f"[checkpoint] {path} was saved with another world size: model, optimizer and reference "
                      "were resharded to this layout; per-rank random streams start fresh from the seed")
        else:
            ckpt.set_rng_state(rank_state["rng"])
        self.step = int(tstate["step"])
        self.resets.load_state_dict(tstate["resets"])
        self.length_schedule.load_state_dict(tstate["length_penalty"])
        self.eval_history = tstate.get("eval_history", [])
        self.nonfinite_in_a_row = int(tstate.get("nonfinite_in_a_row", 0))
        self.save_errors = int(tstate.get("save_errors", 0))
        self.health.load_state_dict(tstate.get("health", {}))
        self.signal_rate = tstate.get("signal_rate")
        self.best = [(float(v), int(st)) for v, st in tstate.get("best_checkpoints", [])]
        self.entropy_control.load_state_dict(tstate.get("entropy_control", {}))
        self.retired.load_state_dict(tstate.get("retired_prompts", {}))
        self.engine.update_weights(self.step)
        self.saved_step = self.step

    def _resume_path(self) -> Optional[str]:
        """The checkpoint to resume from (``checkpoint.resume``), the same on every rank (``ckpt.agree``)."""
        if not self.cfg.checkpoint.resume:  # the same config on every rank: nothing to agree on
            return None
        try:
            return ckpt.agree(self._choose_resume, self.info.world_size)
        except ValueError as e:  # (every rank raises it) the checkpoint named, or none usable: the user's to mend
            raise ConfigError(str(e)) from None

    def _choose_resume(self) -> Optional[str]:
        r = self.cfg.checkpoint.resume
        if not r:
            return None
        if r == "auto":
            path = ckpt.find_latest(self.ckpt_dir, self.info.world_size)
            if path is None and ckpt.list_checkpoints(self.ckpt_dir, verbose=False):
                # starting over would delete metrics.jsonl, and pruning would keep the broken checkpoints
                raise ValueError(f"checkpoint.resume=auto: {self.ckpt_dir} has checkpoints but none is usable "
                                 f"(reasons above); move them away to start over, or resume from one explicitly")
            return path
        why = ckpt.validate(r, self.info.world_size)
        if why:
            raise ValueError(f"config key 'checkpoint.resume': checkpoint {r} is not usable: {why}")
        return r

    # ------------------------------------------------------------------------------ the run
    def run(self) -> Dict:
        cfg = self.cfg
        self.preempt.install()
        resume = self._resume_path()
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        summary: Dict = {"run_dir": self.run_dir}
        if resume:
            self.load_checkpoint(resume)
            summary["resumed_from"] = resume
            self._say(f"resumed from {resume} at step {self.step}")
        else:
            ws = self.warmstart()
            summary.update(ws)
            if ws:
                self._say(f"warm-start: {cfg.warmstart.steps} SFT steps, loss {ws['warmstart/final_loss']:.3f}, "
                          f"{ws['warmstart/time_s']:.0f}s")
            if cfg.eval.at_start:
                before = self.evaluate()
                self._after_eval(before)
                self._observe_stall(0, before)  # the starting point: later evaluations must beat it
                self.eval_history.append({"step": 0, **before})
                self._say(f"before RL: held-out greedy accuracy {before['eval/accuracy']:.3f} "
                          f"on {before['eval/n_prompts']} prompts" + self._set_accuracies(before))
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.logging.tensorboard,
                                progress=cfg.logging.progress, total_steps=cfg.train.steps, initial_step=self.step,
                                resume=bool(resume), wandb_project=cfg.logging.wandb_project, run_name=cfg.name,
                                config=asdict(cfg))
        start = self.eval_history[0] if self.eval_history and self.eval_history[0]["step"] == 0 else {}
        if not resume and start:
            self.logger.log(0, {**start, "time/eval_s": self.eval_time_s})
        exit_code = 0
        t_run = time.time()
        try:
            while self.step < cfg.train.steps:
                stats = self.rl_step()
                self.step += 1
                trigger = self.maybe_reset_reference(stats)
                if trigger:
                    stats["reference_reset"] = 1.0
                    stats["reference_reset_trigger"] = trigger
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.steps:
                    ev = self.evaluate()
                    self._after_eval(ev)
                    stats.update(ev)
                    stats["time/eval_s"] = self.eval_time_s
                    self.eval_history.append({"step": self.step, **ev})
                    self._observe_stall(self.step, ev)
                    if self._rank_evaluation(ev):
                        stats["checkpoint/best"] = 1.0
                stats.update(host_stats(self.rewards.worker_pids() if self.rewards is not None else ()))
                if self.save_errors:
                    stats["checkpoint/save_errors"] = self.save_errors
                reduced = _reduce_stats(stats)
                self.logger.log(self.step, reduced)
                for msg in self.health.observe(reduced):  # an entropy collapse, groups without signal, truncation
                    self._warn(f"[health] step {self.step}: {msg}")
                if ((cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)
                        or stats.get("checkpoint/best")):
                    self._save_or_go_on()
                if self.preempt.agreed(self.device):
                    saved = self.saved_step == self.step or self._save_or_go_on()  # (just saved by the interval)
                    what = f"checkpointed step {self.step}" if saved else \
                        f"step {self.step} could not be checkpointed (the resume takes the newest complete one)"
                    self._say(f"{self.preempt.signal or 'signal'} received: {what}, exiting with {EXIT_REQUEUE} "
                              "for requeue")
                    exit_code = EXIT_REQUEUE
                    break
        finally:
            self.logger.close()
        summary["exit_code"] = exit_code
        if exit_code:
            return summary
        after = self.evaluate()
        self._after_eval(after)
        self.eval_history.append({"step": self.step, **after})
        self._rank_evaluation(after)
        self.logger.log_final(self.step, {**after, "time/eval_s": self.eval_time_s})
        self.save_checkpoint()
        summary.update({"rl_time_s": time.time() - t_run, "steps": self.step,
                        "accuracy_before": start.get("eval/accuracy"),
                        "accuracy_after": after["eval/accuracy"], "eval_prompts": after["eval/n_prompts"],
                        "eval_sets": {es.name: {"before": start.get(f"{es.prefix}accuracy"),
                                                "after": after[f"{es.prefix}accuracy"]}
                                      for es in self.eval_sets if es.name},
                        "resets": self.resets.history})
        if cfg.checkpoint.keep_best:
            summary["best_checkpoints"] = self._best_listing()
        if self.is_main and cfg.logging.plot:
            try:
                summary["plot"] = plot_run(self.run_dir)
            except Exception as e:  # noqa: BLE001 - a figure is not worth the summary below
                self._warn(f"logging.plot: the curves were not drawn ({type(e).__name__}: {e})")
        if self.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=str)
        return summary

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        self.engine.close()

    def _check_think_end(self) -> None:
        """rewards.think_end must survive the decode that turns responses into the text the verifiers see."""
        r = self.cfg.rewards
        if r.think_mode == "off" or not r.think_end or self.tokenizer.keeps_text(r.think_end):
            return
        why = (f"rewards.think_end {r.think_end!r} does not come back from the tokenizer's decode (a special "
               "token, or outside the built-in alphabet)")
        if r.think_mode == "require":
            raise ConfigError(f"config key 'rewards.think_mode': 'require', but {why}: every reward would be 0")
        if isinstance(self.tokenizer, HFTokenizer):
            self._warn(f"{why}: responses are scored whole (rewards.think_mode=auto)")

    def _write_aside(self, write, path: str, rows) -> None:
        """A diagnostic file beside the metrics (per-prompt evaluation results, sampled rollouts): a write that
        fails is reported and counted (log/write_errors) and the run goes on without it."""
        try:
            write(path, rows)
        except OSError as e:
            msg = f"cannot write {path} ({e}); the run goes on without it"
            if self.logger is not None and self.logger.enabled:
                self.logger.failed(None, msg)
            else:
                self._warn(msg)

    def _say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def _warn(self, msg: str) -> None:
        """An event worth a line in the log (above the progress bar when there is one)."""
        if not self.is_main:
            return
        logger = getattr(self, "logger", None)  # (none yet while the trainer is being built)
        if logger is not None and logger.enabled:
            logger.write(msg)
        else:
            print(msg, flush=True)


def engine_logprobs(rollouts, batch: SeqBatch) -> torch.Tensor:
    """The rollout engine's log-probs of the response tokens laid out as the trainer's log-prob passes give them
    ([B, L - 1], entry t: token t + 1; 0 outside the responses)."""
    out = torch.zeros_like(batch.loss_mask)
    for i, r in enumerate(rollouts):
        if r.response_ids:
            start = len(r.prompt_ids) - 1
            out[i, start: start + len(r.response_ids)] = torch.tensor(r.logprobs, dtype=out.dtype)
    return out


# counts over the whole step's batch: summed over the data-parallel ranks, not averaged
# and reward_errors/<domain>
_SUMMED_STATS = ("reward_errors", "data/skipped_long_prompts", "data/skipped_retired",
                 "dynamic_sampling/filled_zero_signal")


# timings whose slowest rank is logged beside their mean (as <key>_max): the step waits for that rank, so the
# gap between the two is the time lost to uneven work (parallel.balance_batch evens out the log-prob passes and
# the update; the rollouts stay as drawn unless rollout.share_prompts_over_dp, whose claims per rank show how
# it shared them out); the GPU memory peaks, whose fullest rank is the one that fails; and what each process holds
# on its host (megaprorl/host.py), where a leak on one rank shows first
_MAXED_STATS = ("time/rollout_s", "time/logprob_s", "time/update_s", "rollout/prompts_claimed",
                "memory/rollout_peak_gib", "memory/logprob_peak_gib", "memory/update_peak_gib",
                "memory/host_rss_gib", "memory/reward_workers_rss_gib", "host/open_fds", "host/threads",
                "host/descendants")


def _summed(key: str) -> bool:
    return key in _SUMMED_STATS or key.startswith("reward_errors/")


def _reduce_stats(stats: Dict) -> Dict:
    """Average numeric stats over data-parallel ranks (rank 0 logs them).

    Ranks may report different keys (a rank can draw no prompt of some domain, so it has no
    ``reward/<domain>``): each key is averaged over the ranks that report it.  The counts of the step's
    batch (``_SUMMED_STATS``) are summed instead; the timings and memory peaks of ``_MAXED_STATS`` also give
    their largest rank's, as ``<key>_max``.
    """
    if not dist.is_initialized() or dp_world() == 1:
        return stats
    mine = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not k.startswith("eval/")}
    per_rank = _gather_objects([mine])
    out = dict(stats)
    for k in sorted(set().union(*per_rank)):
        vals = [d[k] for d in per_rank if k in d]
        out[k] = sum(vals) if _summed(k) else sum(vals) / len(vals)
        if k in _MAXED_STATS:
            out[k + "_max"] = max(vals)
    return out


def _gather_objects(rows):
    if not dist.is_initialized() or dp_world() == 1:
        return rows
    out = [None] * dp_world()
    dist.all_gather_object(out, rows, group=dp_group())
    return [r for part in out for r in part]


def train(cfg: Config) -> Dict:
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.is_main and summary.get("exit_code", 0) == 0:
        print_summary(summary)
    return summary


def print_summary(s: Dict) -> None:
    lines = ["", "=" * 64, "megaprorl run summary", "=" * 64,
             f"run directory           {s['run_dir']}",
             f"RL steps                {s.get('steps')}  ({s.get('rl_time_s', 0):.0f} s)"]
    if s.get("accuracy_before") is not None:
        lines.append(f"held-out greedy accuracy before RL (after warm-start): {s['accuracy_before']:.3f} "
                     f"on {s.get('eval_prompts')} prompts")
    lines.append(f"held-out greedy accuracy after RL:                     {s['accuracy_after']:.3f}")
    for name, acc in (s.get("eval_sets") or {}).items():
        before = "" if acc.get("before") is None else f"{acc['before']:.3f} -> "
        lines.append(f"  {name:22s}greedy accuracy {before}{acc['after']:.3f}")
    if s.get("resets"):
        lines.append(f"reference resets        {s['resets']}")
    if s.get("plot"):
        lines.append(f"curves                  {s['plot']}")
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)
