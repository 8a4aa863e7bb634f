"""A trained policy (or its reference) out of a megaprorl checkpoint, as an HF directory.

    megaprorl convert checkpoint-to-hf --checkpoint RUN_DIR|CKPT_DIR --out HF_DIR
                      [--hf-config HF_DIR] [--which policy|reference] [--dtype fp32|bf16|fp16] [--tp N] [--pp M]

The checkpoint's resolved config (in its ``trainer.json``) rebuilds the model; its layout-independent
``model/`` directory loads at this process's layout (one process, or ``torchrun`` with ``--tp`` /
``--pp`` for models that do not fit one device); ``save_megatron_as_hf`` gathers the shards and rank 0
writes safetensors.  The HF ``config.json``, generation config and tokenizer files come from
``--hf-config`` or else the run's ``model.hf_path``; a run that did not start from an HF checkpoint
(the demo) gets a Qwen2 (QKV bias) or Llama ``config.json`` written from its ``model.*`` config, so
``transformers`` loads it (the built-in character tokenizer has no HF files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from . import checkpoint as ckpt


def export_checkpoint_to_hf(checkpoint: str, out_dir: str, hf_config_dir: str = "", which: str = "policy",
                            dtype: str = "", tp: int = 1, pp: int = 1, log=print) -> str:
    """Collective when run under torchrun.  Returns the checkpoint directory that was exported."""
    from .config import ConfigError, load_config
    from .dist_ckpt import REFERENCE_PREFIX, load_weights, saved_common
    from .models.convert import (_DTYPES, ConversionError, _model_type, check_model_config,
                                 hf_config_from_model_config, hf_vocab_size, load_hf_config, save_megatron_as_hf)
    from .parallel import init_distributed
    from .policy import Policy

    if which not in ("policy", "reference"):
        raise ConversionError(f"--which must be policy or reference, got {which!r}")
    if dtype and dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    try:
        path = ckpt.resolve_checkpoint(checkpoint, "--checkpoint")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    tjson = os.path.join(path, "trainer.json")
    with open(tjson) as f:
        tstate = json.load(f)
    text = tstate.get("config")
    if not text:
        raise ConversionError(f"{tjson} holds no run config (a checkpoint of an older megaprorl)")
    try:
        cfg = load_config(text=text, where=f"{tjson} (config)", installed=False)  # read here, not run
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    mcfg = _readable_here(cfg.model, log)
    src = hf_config_dir or mcfg.hf_path
    if src and not os.path.isfile(os.path.join(src, "config.json")):
        raise ConversionError(f"{os.path.join(src, 'config.json')} not found "
                              f"({'--hf-config' if hf_config_dir else 'the run model.hf_path'}); give --hf-config")
    info = init_distributed(tp, pp)
    model_dir = os.path.join(path, ckpt.MODEL_DIR)
    common = saved_common(model_dir)
    if src:
        hf_config = load_hf_config(src)
        check_model_config(mcfg, hf_config, src)
        vocab = hf_vocab_size(hf_config)
    else:
        from .models.tokenizer import build_tokenizer

        tok = build_tokenizer(mcfg.tokenizer, mcfg.use_chat_template)
        vocab = int(common.get("vocab_size", tok.vocab_size))
        hf_config = hf_config_from_model_config(mcfg, vocab, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if int(common.get("vocab_size", vocab)) != vocab:
        raise ConversionError(f"{model_dir}: the policy was trained with a vocabulary of {common['vocab_size']} "
                              f"rows, the HF config has vocab_size {vocab}")
    # the run's model, at this process's layout; no optimizer, no sequence parallelism needed to read it
    pcfg = type(cfg.parallel)(tensor_parallel=tp, pipeline_parallel=pp)
    policy = Policy(mcfg, pcfg, cfg.train.optim, vocab, info.device, "torch", trainable=False)
    load_weights(model_dir, policy.model, REFERENCE_PREFIX if which == "reference" else "")
    save_megatron_as_hf(policy.model, hf_config, out_dir, hf_dir=src or None,
                        dtype=_DTYPES[dtype] if dtype else None)
    if info.rank == 0:
        log(f"wrote the {which} of {path} (step {tstate.get('step')}) as an HF {_model_type(hf_config)} model to "
            f"{out_dir}")
    return path


def _readable_here(mcfg, log):
    """The run's model config, with the local spec in place of TransformerEngine where TE is not installed.

    A checkpoint's tensors carry the same names under either spec: Megatron's local spec saves its norms
    under TE's fused names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) and the
    ``_extra_state`` entries are never saved, so a TE or FP8 run's checkpoint loads into the local spec.
    FP8 is compute only (the saved weights are the bf16 / fp32 ones), so it is dropped with TE."""
    if mcfg.transformer_impl != "transformer_engine" and not mcfg.fp8:
        return mcfg
    try:
        import transformer_engine  # noqa: F401
        return mcfg
    except ImportError:
        log(f"TransformerEngine is not installed: reading the checkpoint of a model.transformer_impl="
            f"{mcfg.transformer_impl} model.fp8={mcfg.fp8!r} run through the local spec (same tensor names)")
        return dataclasses.replace(mcfg, transformer_impl="local", fp8="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a step_XXXXXXXX checkpoint, or a run / checkpoints directory (its newest)")
    p.add_argument("--out", required=True, help="the HF directory to write")
    p.add_argument("--hf-config", default="",
                   help="HF directory with config.json and tokenizer files (default: the run's model.hf_path)")
    p.add_argument("--which", choices=("policy", "reference"), default="policy")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to load at (under torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages to load at (under torchrun)")
