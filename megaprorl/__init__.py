"""megaprorl: prolonged reinforcement learning of language models with verifiable rewards (the ProRL recipe)
on Megatron-core."""

import warnings as _warnings

# Megatron-core warns at import, in every process, for each of its modules that falls back to torch where
# TransformerEngine or Apex would serve (optimizer, norms, multi-tensor ops): seven lines per rank before
# anything runs.  The trainer says once what the run uses (models.gpt.describe); a config that needs
# TransformerEngine (model.transformer_impl=transformer_engine, model.fp8) is an error naming the install.
_warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back",
                         category=UserWarning, module=r"megatron\.")
