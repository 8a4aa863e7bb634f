"""Tokenizers: a tiny built-in character tokenizer for the demo, and HF tokenizers from a local path."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet; id 0 = pad, 1 = end of sequence."""

    PAD, EOS = 0, 1

    def __init__(self, alphabet: str = "0123456789+-*=(), ?abcdefghijklmnopqrstuvwxyz"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer alphabet has repeated characters")
        self.alphabet = alphabet
        self._id = {c: i + 2 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 2
        self.pad_id = self.PAD
        self.eos_id = self.EOS

    def encode(self, text: str) -> List[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the built-in tokenizer's alphabet "
                             f"{self.alphabet!r}") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS and skip_special:
                break
            if 2 <= i < self.vocab_size:
                out.append(self.alphabet[i - 2])
        return "".join(out)

    def render_prompt(self, record: dict) -> str:
        return record["prompt"]


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (no hub access), with its chat template."""

    def __init__(self, path: str, use_chat_template: bool = True):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (model.tokenizer)")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise RuntimeError("HF tokenizers need `pip install -e .[hf]` (transformers, tokenizers)") from e
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.use_chat_template = use_chat_template and getattr(self.tok, "chat_template", None) is not None

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = list(int(i) for i in ids)
        if skip_special and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render_prompt(self, record: dict) -> str:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        if self.use_chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages)


def build_tokenizer(name_or_path: str, use_chat_template: bool = True, alphabet: Optional[str] = None):
    """``builtin`` (digits, operators, lowercase: the demo), ``builtin-ascii`` (printable ASCII, for
    mixtures with text prompts such as Reasoning Gym's), or a local HF tokenizer directory."""
    if name_or_path in ("", "builtin", "char"):
        return CharTokenizer(alphabet) if alphabet else CharTokenizer()
    if name_or_path == "builtin-ascii":
        import string

        return CharTokenizer(string.printable)
    return HFTokenizer(name_or_path, use_chat_template)
