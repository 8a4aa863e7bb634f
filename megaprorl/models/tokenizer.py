"""Tokenizers: a tiny built-in character tokenizer for the demo, and HF tokenizers from a local path.

Every tokenizer has ``eos_id`` (what the warm-start appends to an answer) and ``stop_ids`` (every token
that ends a response: the EOS first, then the model's other end tokens, e.g. Qwen2.5-Instruct's
``<|im_end|>`` and ``<|endoftext|>`` or Llama-3.1's three, from ``generation_config.json``).
``decode`` stops at the first of them.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence


def _unique(ids: Iterable[int]) -> List[int]:
    return list(dict.fromkeys(int(i) for i in ids))  # first occurrences, in order


def generation_eos_ids(model_dir: str) -> List[int]:
    """The ``eos_token_id`` (an id or a list of ids) of ``model_dir/generation_config.json``; [] when the
    file or the key is absent.  A malformed file is an error naming it."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read eos_token_id ({e})") from None
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
    return _unique(ids)


class _StopIds:
    """``stop_ids`` and the ``decode`` cut shared by both tokenizers."""

    eos_id: int
    stop_ids: List[int]

    def add_stop_ids(self, ids: Iterable[int]) -> None:
        """More tokens that end a response (after the EOS and those already known)."""
        self.stop_ids = _unique([*self.stop_ids, *ids])

    def keeps_text(self, text: str) -> bool:
        """Whether ``text`` comes back from decoding its ids (a special token is dropped by the decode; a
        character outside the built-in alphabet cannot be written at all)."""
        try:
            return text in self.decode(self.encode(text))
        except ValueError:
            return False

    def _cut(self, ids: Sequence[int]) -> List[int]:
        ids = [int(i) for i in ids]
        stops = set(self.stop_ids)
        for n, i in enumerate(ids):
            if i in stops:
                return ids[:n]
        return ids


class CharTokenizer(_StopIds):
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
        self.stop_ids = [self.EOS]

    def encode(self, text: str) -> List[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the built-in tokenizer's alphabet "
                             f"{self.alphabet!r}") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = []
        for i in self._cut(ids) if skip_special else ids:
            i = int(i)
            if 2 <= i < self.vocab_size:
                out.append(self.alphabet[i - 2])
        return "".join(out)

    def render_prompt(self, record: dict) -> str:
        return record["prompt"]

    def encode_prompt(self, record: dict) -> List[int]:
        return self.encode(self.render_prompt(record))


# the files that hold a vocabulary: a fast tokenizer's, SentencePiece's, BPE's and WordPiece's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


class HFTokenizer(_StopIds):
    """A Hugging Face tokenizer loaded from a local directory (no hub access), with its chat template and
    the end tokens of the directory's ``generation_config.json``."""

    def __init__(self, path: str, use_chat_template: bool = True, chat_template_kwargs: Optional[dict] = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (model.tokenizer)")
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            # transformers would build a tokenizer of the config's class with a vocabulary of one token
            raise FileNotFoundError(f"tokenizer directory {path!r} has no vocabulary: none of "
                                    f"{', '.join(TOKENIZER_FILES)} (model.tokenizer)")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise RuntimeError("HF tokenizers need `pip install -e .[hf]` (transformers, tokenizers)") from e
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        self.vocab_size = len(self.tok)
        gen_eos = generation_eos_ids(path)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else (gen_eos or [None])[0]
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r} has no eos_token and {path}/generation_config.json no "
                             "eos_token_id: nothing would end a response")
        self.stop_ids = _unique([self.eos_id, *gen_eos])
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.use_chat_template = use_chat_template and getattr(self.tok, "chat_template", None) is not None
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        for k in self.chat_template_kwargs:
            if k in ("tokenize", "add_generation_prompt", "conversation", "messages"):
                raise ValueError(f"model.chat_template_kwargs.{k}: megaprorl sets {k!r} itself")
        # what the tokenizer itself puts before a text (Llama's BOS; Qwen's nothing), for prompts that no chat
        # template renders (a template writes its own BOS into the text)
        bos = self.tok.bos_token_id
        self._bos = [bos] if bos is not None and self.tok.encode("", add_special_tokens=True)[:1] == [bos] else []

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_prompt(self, record: dict) -> List[int]:
        """The prompt's ids: the chat template's rendering as it is, or the plain text after the tokenizer's
        own BOS, as ``tokenizer(text)`` starts it (no template: a base Llama still sees its BOS)."""
        ids = self.encode(self.render_prompt(record))
        return ids if self.use_chat_template else self._bos + ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = self._cut(ids) if skip_special else [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render_prompt(self, record: dict) -> str:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        if self.use_chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                **self.chat_template_kwargs)
        return "\n".join(m["content"] for m in messages)


def build_tokenizer(name_or_path: str, use_chat_template: bool = True, alphabet: Optional[str] = None,
                    chat_template_kwargs: Optional[dict] = None):
    """``builtin`` (digits, operators, lowercase: the demo), ``builtin-ascii`` (printable ASCII, for
    mixtures with text prompts such as Reasoning Gym's), or a local HF tokenizer directory (its chat
    template rendered with ``chat_template_kwargs`` as extra variables)."""
    if name_or_path in ("", "builtin", "char"):
        return CharTokenizer(alphabet) if alphabet else CharTokenizer()
    if name_or_path == "builtin-ascii":
        import string

        return CharTokenizer(string.printable)
    return HFTokenizer(name_or_path, use_chat_template, chat_template_kwargs)
