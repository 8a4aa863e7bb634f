"""Every example config loads; ``base:`` chains merge child over parent, and their errors name files."""

import glob
import os

import pytest

from megaprorl.config import ConfigError, load_config

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.name


def test_scale_examples_inherit_the_recipe():
    v2 = load_config("examples/prorl_v2.yaml")
    c16 = load_config("examples/r1_1.5b_16k_4nodes.yaml")
    assert (c16.parallel.tensor_parallel, c16.parallel.sequence_parallel) == (2, False)
    assert c16.rollout.max_new_tokens == 16384 and c16.model.recompute_granularity == "full"
    assert c16.algo == v2.algo and c16.data == v2.data and c16.model.hf_path == v2.model.hf_path


def test_base_chain_merge_and_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nseed: 1\ndata:\n  sources:\n    - {name: x, type: builtin}\n"
                                     "    - {name: y, type: builtin}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\ndata:\n  sources:\n    - {name: z, type: builtin}\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["seed=3"])
    assert cfg.name == "b" and cfg.seed == 3
    assert [s.name for s in cfg.data.sources] == ["z"]  # lists are replaced, not appended
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*c.yaml"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "d.yaml"))
    (tmp_path / "f.yaml").write_text("base: a.yaml\nmodel:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(str(tmp_path / "f.yaml"))


def test_an_unknown_key_in_a_list_entry_is_named_with_its_list_and_index(tmp_path):
    """OmegaConf names a bad key inside a list entry without its place; the loader names both."""
    (tmp_path / "g.yaml").write_text("data:\n  sources:\n    - {name: x, type: builtin}\n"
                                     "    - {name: y, type: builtin, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"g.yaml: unknown config key 'data.sources\[1\].wieght'; did you mean "
                                          r"'data.sources\[1\].weight'\?"):
        load_config(str(tmp_path / "g.yaml"))
    with pytest.raises(ConfigError, match=r"override .*: unknown config key 'eval.sets\[0\].zzz' \(valid: name, "):
        load_config(None, ["eval.sets=[{name: a, zzz: 1}]"])


def test_slurm_dry_run_of_a_four_node_example(capsys):
    from megaprorl.cli import main

    rc = main(["launch", "slurm", "examples/r1_1.5b_8k_4nodes.yaml", "--nodes", "4", "--gpus-per-node", "8",
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc in (0, None)
    assert "--nodes=4" in out or "#SBATCH --nodes 4" in out or "nodes=4" in out
    assert "USR1@" in out and "--requeue" in out


# config.json of DeepSeek-R1-Distill-Qwen-1.5B as published (the architecture keys the trainer checks)
R1_DISTILL_1P5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
                   "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                   "num_key_value_heads": 2, "max_position_embeddings": 131072, "rope_theta": 10000,
                   "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "use_sliding_window": False,
                   "sliding_window": 4096, "vocab_size": 151936, "hidden_act": "silu", "torch_dtype": "bfloat16"}

# Llama-3.2-1B's published config.json (the architecture keys): tied embeddings, llama3 RoPE scaling x32
LLAMA_3P2_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
                "vocab_size": 128256, "hidden_act": "silu", "torch_dtype": "bfloat16"}

# Qwen3-0.6B's published config.json (the architecture keys): head_dim 128 with hidden 1024 / 16 heads,
# q/k norms (implied by model_type), no QKV bias, tied embeddings
QWEN3_0P6B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
              "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
              "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 28, "rope_theta": 1000000,
              "rope_scaling": None, "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "attention_bias": False,
              "use_sliding_window": False, "sliding_window": None, "vocab_size": 151936, "hidden_act": "silu",
              "torch_dtype": "bfloat16"}


def test_qwen3_config_reads_as_the_run_config_spells_it():
    """Qwen3-0.6B's config.json gives model.* keys (head_dim, qk_norm) that a run config takes as overrides
    and that pass the trainer's check against the same config.json."""
    from megaprorl.models.convert import check_model_config, model_config_from_hf

    fields = model_config_from_hf(QWEN3_0P6B)
    assert (fields["head_dim"], fields["qk_norm"], fields["add_qkv_bias"]) == (128, True, False)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "prorl_v2.yaml"),
                      [f"model.{k}={v}" for k, v in fields.items() if k != "params_dtype"])
    assert cfg.model.head_dim == 128 and cfg.model.qk_norm
    check_model_config(cfg.model, QWEN3_0P6B, "/models/Qwen3-0.6B")


# Qwen3-1.7B's published config.json (the architecture keys)
QWEN3_1P7B = dict(QWEN3_0P6B, hidden_size=2048, intermediate_size=6144)


def test_qwen3_example_describes_the_checkpoint():
    """examples/qwen3_1.7b_8k_1node.yaml passes the trainer's check against Qwen3-1.7B's config.json, and
    without its q/k norms it would be refused by name."""
    from megaprorl.models.convert import ConversionError, check_model_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "qwen3_1.7b_8k_1node.yaml"))
    check_model_config(cfg.model, QWEN3_1P7B, "/models/Qwen3-1.7B")
    cfg.model.qk_norm = False
    with pytest.raises(ConversionError, match=r"model.qk_norm=False \(config.json: True\)"):
        check_model_config(cfg.model, QWEN3_1P7B, "/models/Qwen3-1.7B")


def test_head_dim_frees_the_width_from_the_heads():
    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.yaml")
    with pytest.raises(ConfigError, match="model.num_attention_heads.*or set model.head_dim"):
        load_config(demo, ["model.hidden_size=66", "model.num_attention_heads=4"])
    cfg = load_config(demo, ["model.hidden_size=66", "model.num_attention_heads=4", "model.head_dim=16"])
    assert cfg.model.head_dim == 16
    with pytest.raises(ConfigError, match="model.head_dim"):
        load_config(demo, ["model.head_dim=-1"])


def test_llama_3p2_config_reads_as_the_run_config_spells_it():
    """Llama-3.2-1B's config.json gives model.* keys (llama3 RoPE scaling included) that a run config takes as
    overrides and that pass the trainer's check against the same config.json."""
    from megaprorl.models.convert import check_model_config, model_config_from_hf

    fields = model_config_from_hf(LLAMA_3P2_1B)
    assert fields["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert fields["tie_embeddings"] and not fields["add_qkv_bias"] and fields["rotary_base"] == 500000.0
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "prorl_v2.yaml"),
                      [f"model.{k}={v}" for k, v in fields.items() if k != "params_dtype"])
    check_model_config(cfg.model, LLAMA_3P2_1B, "/models/Llama-3.2-1B")


@pytest.mark.parametrize("path", [p for p in EXAMPLES if "r1_1.5b" in p or "prorl_v" in p], ids=os.path.basename)
def test_r1_examples_describe_the_checkpoint(path):
    """The 1.5B examples pass the trainer's check of model.* against the checkpoint's config.json, and a
    wrong RoPE base (Qwen2.5's 1e6 instead of the distill's 1e4) would be refused."""
    from megaprorl.models.convert import ConversionError, check_model_config

    cfg = load_config(path)
    check_model_config(cfg.model, R1_DISTILL_1P5B, "/models/DeepSeek-R1-Distill-Qwen-1.5B")
    cfg.model.rotary_base = 1e6
    with pytest.raises(ConversionError, match=r"model.rotary_base=1000000.0 \(config.json: 10000.0\)"):
        check_model_config(cfg.model, R1_DISTILL_1P5B, "/models/x")


def test_readme_config_reference_lists_every_key_with_its_default_and_meaning():
    """README's config reference has one row per config key (no row for a key that does not exist), each
    with the dataclass default and a meaning."""
    import dataclasses
    import re

    from megaprorl.config import Config

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from walk(v, prefix + f.name + ".")
            else:
                yield prefix + f.name, v

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = text[text.index("## Config reference"): text.index("## What is verified where")]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \| `([^`]*)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    want = dict(walk(Config()))
    assert sorted(set(want) - set(rows)) == [], "keys missing from README's config reference"
    assert sorted(set(rows) - set(want)) == [], "README's config reference lists keys that do not exist"
    assert [k for k in want if rows[k][0] != repr(want[k])] == [], "defaults differ"
    assert [k for k in want if not rows[k][1]] == [], "rows without a meaning"
