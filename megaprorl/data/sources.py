"""Prompt sources: JSONL / Parquet files, Reasoning Gym generators, weighted domain mixtures.

Every source implements the :class:`PromptSource` protocol: ``sample(n)`` returns ``n`` records
(dicts with ``"id"``, ``"domain"``, ``"prompt"`` (text) or ``"messages"`` (chat turns) and the
verifier fields of its domain, see docs/data.md), and ``state_dict()`` / ``load_state_dict()``
capture where the sampler is, so a run resumed from a checkpoint draws exactly the prompts it
would have drawn. Order: each epoch is a fresh permutation of the rows drawn from
``Random(f"{seed}:{epoch}")``; an epoch ends when every row has been drawn once.

Data parallelism: every rank builds the same sources (same seeds) and draws through
:class:`ShardedSource`, which keeps the records at the rank's positions of each source's sequence, so
the ranks' prompts are disjoint however many each draws.

A malformed row raises :class:`DataError` naming the file and line (row for Parquet).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable


class DataError(ValueError):
    """A user-caused data problem (bad file, malformed row, bad config)."""


@runtime_checkable
class PromptSource(Protocol):
    def sample(self, n: int) -> List[Dict[str, Any]]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------ validation
DOMAIN_FIELDS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    # each inner tuple: at least one of these fields must be present
    "math": (("answer",),),
    "stem": (("answer",),),
    "code": (("tests", "input_output", "test_list"),),
    "logic": (("task", "entry"), ("entry", "answer")),
    "ifeval": (("instruction_id_list",),),
}


def validate_record(rec: Any, where: str, default_domain: str = "") -> Dict[str, Any]:
    """Check one prompt record; returns it (with defaults filled) or raises DataError(where: ...)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(rec).__name__}")
    if not rec.get("domain"):
        if not default_domain:
            raise DataError(f"{where}: row has no 'domain' (and the source sets no default domain)")
        rec["domain"] = default_domain
    dom = rec["domain"]
    if not isinstance(dom, str):
        raise DataError(f"{where}: 'domain' must be a string")
    prompt, messages = rec.get("prompt"), rec.get("messages")
    if prompt is None and messages is None:
        raise DataError(f"{where}: row needs 'prompt' (text) or 'messages' (list of {{role, content}})")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        if hasattr(messages, "tolist"):
            messages = rec["messages"] = messages.tolist()
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if dom == "logic":
        if "entry" not in rec and "answer" not in rec:
            raise DataError(f"{where}: logic row needs 'entry' (Reasoning Gym entry) or 'answer'")
        if not rec.get("task") and not ((rec.get("entry") or {}).get("metadata") or {}).get("source_dataset"):
            raise DataError(f"{where}: logic row needs 'task' (Reasoning Gym dataset name)")
    else:
        for group in DOMAIN_FIELDS.get(dom, ()):
            if not any(rec.get(f) is not None for f in group):
                raise DataError(f"{where}: {dom} row needs field {' or '.join(repr(f) for f in group)}")
    if dom == "ifeval":
        ids = rec["instruction_id_list"]
        if hasattr(ids, "tolist"):
            ids = rec["instruction_id_list"] = ids.tolist()
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{where}: 'instruction_id_list' must be a list of strings")
        kw = rec.get("kwargs")
        if isinstance(kw, str):
            try:
                kw = rec["kwargs"] = json.loads(kw)
            except ValueError as e:
                raise DataError(f"{where}: 'kwargs' is not valid JSON: {e}") from None
        if kw is not None and (not isinstance(kw, list) or len(kw) != len(ids)):
            raise DataError(f"{where}: 'kwargs' must be a list with one object per instruction")
    if dom == "code":
        from megaprorl.rewards.code import build_tests  # validation of the test layout

        try:
            build_tests(rec)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: bad code tests: {e}") from None
    return rec


# ------------------------------------------------------------------------------ epoch sampler
class _EpochSampler:
    """Draws indices 0..size-1, a seeded permutation per epoch; resumable."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise DataError("a prompt source has no rows")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm: Optional[List[int]] = None

    def _permutation(self) -> List[int]:
        if self._perm is None:
            idx = list(range(self.size))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(idx)
            self._perm = idx
        return self._perm

    def take(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            perm = self._permutation()
            k = min(n - len(out), self.size - self.pos)
            out.extend(perm[self.pos:self.pos + k])
            self.pos += k
            if self.pos >= self.size:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("size", self.size)) != self.size:
            raise DataError(f"sampler state is for {state.get('size')} rows but the source has {self.size}")
        self.epoch, self.pos, self.seed = int(state["epoch"]), int(state["pos"]), state.get("seed", self.seed)
        self._perm = None


class _ListSource:
    """A source over an in-memory list of validated records."""

    def __init__(self, records: List[Dict[str, Any]], seed: int = 0, shuffle: bool = True):
        self.records = records
        self._sampler = _EpochSampler(len(records), seed, shuffle)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, n: int) -> List[Dict[str, Any]]:
        return [dict(self.records[i]) for i in self._sampler.take(n)]

    def state_dict(self) -> Dict[str, Any]:
        return self._sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._sampler.load_state_dict(state)


class JsonlSource(_ListSource):
    """Prompt records from a JSONL file (one JSON object a line; blank lines and '#' lines skipped)."""

    def __init__(self, path: str, seed: int = 0, shuffle: bool = True, domain: str = ""):
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"prompt file not found: {path}")
        records = []
        base = os.path.basename(path)
        with open(path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(s)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
                rec = validate_record(rec, where, domain)
                rec.setdefault("id", f"{base}:{lineno}")
                records.append(rec)
        if not records:
            raise DataError(f"{path}: no prompt records")
        super().__init__(records, seed, shuffle)


def _plain(x: Any) -> Any:
    """numpy / pyarrow values to plain Python."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class ParquetSource(_ListSource):
    """Prompt records from a Parquet file (one row per record; nested columns allowed; columns
    holding JSON text for 'tests'/'kwargs'/'entry' are decoded)."""

    def __init__(self, path: str, seed: int = 0, shuffle: bool = True, domain: str = ""):
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"prompt file not found: {path}")
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover
            raise DataError("reading Parquet prompt files needs pyarrow (pip install pyarrow)") from e
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot read Parquet file: {e}") from None
        rows = table.to_pylist()
        base = os.path.basename(path)
        records = []
        for i, row in enumerate(rows):
            where = f"{path}: row {i}"
            rec = {k: _plain(v) for k, v in row.items() if v is not None}
            for key in ("entry", "metadata"):
                if isinstance(rec.get(key), str):
                    try:
                        rec[key] = json.loads(rec[key])
                    except ValueError as e:
                        raise DataError(f"{where}: column {key!r} is text but not JSON: {e}") from None
            rec = validate_record(rec, where, domain)
            rec.setdefault("id", f"{base}:{i}")
            records.append(rec)
        if not records:
            raise DataError(f"{path}: no prompt records")
        super().__init__(records, seed, shuffle)


ANSWER_FORMAT = "Give your final answer inside <answer></answer> tags."


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


class ReasoningGymSource:
    """Logic-puzzle prompts generated offline by Reasoning Gym (``task`` = any registered dataset
    name, ``size`` entries from ``seed``; ``kwargs`` go to the dataset config)."""

    def __init__(self, task: str, size: int = 10000, seed: int = 0, shuffle: bool = True,
                 prompt_style: str = "plain", **kwargs: Any):
        import reasoning_gym

        self.task, self.size, self.seed = task, int(size), int(seed)
        if prompt_style not in ("plain", "messages"):
            raise DataError(f"reasoning_gym prompt_style must be 'plain' or 'messages', got {prompt_style!r}")
        self.prompt_style = prompt_style
        try:
            self.dataset = reasoning_gym.create_dataset(task, size=self.size, seed=self.seed, **kwargs)
        except ValueError as e:
            raise DataError(f"Reasoning Gym task {task!r}: {e}") from None
        except TypeError as e:
            raise DataError(f"Reasoning Gym task {task!r}: bad arguments {sorted(kwargs)}: {e}") from None
        self._sampler = _EpochSampler(self.size, self.seed, shuffle)

    def __len__(self) -> int:
        return self.size

    def record(self, i: int) -> Dict[str, Any]:
        entry = self.dataset[i]
        entry = {"question": entry["question"], "answer": entry["answer"], "metadata": _jsonable(entry.get("metadata", {}))}
        rec: Dict[str, Any] = {"id": f"rg/{self.task}/{self.seed}/{i}", "domain": "logic", "task": self.task,
                               "entry": entry}
        if self.prompt_style == "messages":
            from reasoning_gym.utils import SYSTEM_PROMPTS

            rec["messages"] = [{"role": "system", "content": SYSTEM_PROMPTS["default"]},
                               {"role": "user", "content": entry["question"]}]
        else:
            rec["prompt"] = entry["question"].rstrip() + "\n\n" + ANSWER_FORMAT
        return rec

    def sample(self, n: int) -> List[Dict[str, Any]]:
        return [self.record(i) for i in self._sampler.take(n)]

    def state_dict(self) -> Dict[str, Any]:
        return self._sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._sampler.load_state_dict(state)


class MixtureSource:
    """Weighted mixture: each drawn record comes from source ``name`` with probability
    ``weight / sum(weights)`` (records get ``"source": name``)."""

    def __init__(self, sources: Mapping[str, Tuple[PromptSource, float]], seed: int = 0):
        if not sources:
            raise DataError("a mixture needs at least one source")
        self.names = list(sources)
        self.sources = {k: v[0] for k, v in sources.items()}
        self.weights = [float(v[1]) for v in sources.values()]
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise DataError(f"mixture weights must be >= 0 with a positive sum, got {self.weights}")
        self.seed = seed
        self._draws = 0

    def sample(self, n: int) -> List[Dict[str, Any]]:
        rng = random.Random(f"mixture:{self.seed}:{self._draws}")
        self._draws += 1
        picks = rng.choices(self.names, weights=self.weights, k=n)
        counts = {k: picks.count(k) for k in self.names}
        drawn = {k: iter(self.sources[k].sample(c)) if c else iter(()) for k, c in counts.items()}
        out = []
        for k in picks:
            rec = next(drawn[k])
            rec["source"] = k
            out.append(rec)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"draws": self._draws, "seed": self.seed,
                "sources": {k: s.state_dict() for k, s in self.sources.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = set(self.names) - set(state.get("sources", {}))
        if missing:
            raise DataError(f"mixture state lacks sources {sorted(missing)}")
        self._draws = int(state["draws"])
        self.seed = state.get("seed", self.seed)
        for k, s in self.sources.items():
            s.load_state_dict(state["sources"][k])


# ------------------------------------------------------------------------------ config / factory
@dataclass
class DataSourceConfig:
    name: str = "default"
    type: str = "jsonl"  # "jsonl" | "parquet" | "reasoning_gym" | "builtin" | a registered type
    path: str = ""
    task: str = ""
    weight: float = 1.0
    size: int = 10000
    seed: int = 0
    domain: str = ""  # default domain for file rows without one
    shuffle: bool = True
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSetConfig:
    """One evaluation benchmark (``eval.sets[*]``): a prompt source read in full, or a seeded subset of it, with
    its own sampling budget.  The source keys mean what they mean in :class:`DataSourceConfig`."""

    name: str = ""  # metric prefix: eval/<name>/...
    type: str = "jsonl"  # "jsonl" | "parquet" | "reasoning_gym" | "builtin" (the held-out addition split) | registered
    path: str = ""
    task: str = ""
    size: int = 10000
    seed: int = 0
    domain: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    n_prompts: int = 0  # 0 = every row, in file order; N = a seeded subset of N rows, none twice
    samples_per_prompt: int = 0  # 0 = eval.samples_per_prompt
    ks: List[int] = field(default_factory=list)  # [] = eval.ks
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens


SourceFactory = Callable[[DataSourceConfig], PromptSource]
_SOURCE_TYPES: Dict[str, SourceFactory] = {}


def register_source_type(type_name: str, factory: SourceFactory) -> SourceFactory:
    """Register ``factory(cfg: DataSourceConfig) -> PromptSource`` for ``DataSourceConfig.type``."""
    _SOURCE_TYPES[type_name] = factory
    return factory


def _as_source_cfg(c: Any) -> DataSourceConfig:
    if isinstance(c, DataSourceConfig):
        return c
    if dataclasses.is_dataclass(c):
        c = dataclasses.asdict(c)
    elif not isinstance(c, Mapping):
        try:  # OmegaConf DictConfig
            from omegaconf import OmegaConf

            c = OmegaConf.to_container(c, resolve=True)
        except Exception:  # noqa: BLE001
            raise DataError(f"data source config must be a mapping, got {type(c).__name__}") from None
    names = {f.name for f in dataclasses.fields(DataSourceConfig)}
    unknown = set(c) - names
    if unknown:
        raise DataError(f"unknown data source key(s) {sorted(unknown)}; valid: {sorted(names)}")
    c = dict(c)
    c["kwargs"] = dict(c.get("kwargs") or {})
    return DataSourceConfig(**c)


class ShardedSource:
    """Data-parallel rank ``rank`` of ``world``'s share of a source: the records at positions rank,
    rank + world, rank + 2 world, ... of the source's sequence.  Every rank holds its own copy of the source,
    built with the same seed, and each draw takes whole strides of ``world`` records, keeping its own.  So the
    ranks' records are disjoint whatever each draws (dynamic sampling draws more on some ranks than on others),
    and a state saved by any rank loads on any rank at any world size (after a layout change every rank
    starts from rank 0's position, each at its own offset).  The source must be a sequence: ``sample(a)``
    then ``sample(b)`` gives what ``sample(a + b)`` gives (every source here; a registered type must too)."""

    def __init__(self, source: PromptSource, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}")
        self.source, self.rank, self.world = source, int(rank), int(world)

    def sample(self, n: int) -> List[Dict[str, Any]]:
        return self.source.sample(n * self.world)[self.rank::self.world] if n > 0 else []

    def state_dict(self) -> Dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def shard_source(src: PromptSource, shard: Optional[Tuple[int, int]]) -> PromptSource:
    """``src`` drawn as data-parallel rank ``shard[0]`` of ``shard[1]`` (:class:`ShardedSource`); itself at one rank."""
    if shard is not None and int(shard[1]) > 1:
        return ShardedSource(src, int(shard[0]), int(shard[1]))
    return src


def build_one(cfg: Any, shard: Optional[Tuple[int, int]] = None) -> PromptSource:
    """One source from its config, drawn as ``shard`` = (rank, world) when given (``shard_source``)."""
    return shard_source(_build_one(cfg), shard)


def _build_one(cfg: Any) -> PromptSource:
    c = _as_source_cfg(cfg)
    t = c.type
    if t == "jsonl":
        if not c.path:
            raise DataError(f"data source {c.name!r}: type 'jsonl' needs 'path'")
        return JsonlSource(c.path, seed=c.seed, shuffle=c.shuffle, domain=c.domain)
    if t == "parquet":
        if not c.path:
            raise DataError(f"data source {c.name!r}: type 'parquet' needs 'path'")
        return ParquetSource(c.path, seed=c.seed, shuffle=c.shuffle, domain=c.domain)
    if t in ("reasoning_gym", "rg"):
        if not c.task:
            raise DataError(f"data source {c.name!r}: type 'reasoning_gym' needs 'task'")
        return ReasoningGymSource(c.task, size=c.size, seed=c.seed, shuffle=c.shuffle, **c.kwargs)
    if t not in _SOURCE_TYPES:
        try:  # a type may be provided by megaprorl.data.<type> registering itself at import
            importlib.import_module(f"megaprorl.data.{t}")
        except ImportError:
            pass
    if t in _SOURCE_TYPES:
        return _SOURCE_TYPES[t](c)
    known = sorted({"jsonl", "parquet", "reasoning_gym"} | set(_SOURCE_TYPES))
    raise DataError(f"data source {c.name!r}: unknown type {t!r} (known: {', '.join(known)})")


def build_source(cfg: Any, seed: Optional[int] = None, shard: Optional[Tuple[int, int]] = None) -> PromptSource:
    """Build a prompt source from config.

    ``cfg`` may be one source config (a :class:`DataSourceConfig` or a dict of its fields), a
    list of them (a weighted :class:`MixtureSource`), or an object/dict with ``sources`` (that
    list) and optionally ``seed`` (the mixture seed). A single-entry list returns the source itself.
    ``shard`` = (data-parallel rank, world): each source is drawn through its :class:`ShardedSource`
    (a mixture's sources each, the mixture's own choices seeded by ``seed``).
    """
    sources = None
    if isinstance(cfg, Mapping) and "sources" in cfg:
        sources, seed = cfg["sources"], cfg.get("seed", seed)
    elif hasattr(cfg, "sources") and not isinstance(cfg, (list, tuple)):
        sources, seed = cfg.sources, getattr(cfg, "seed", seed)
    elif isinstance(cfg, (list, tuple)) or (not isinstance(cfg, Mapping) and not dataclasses.is_dataclass(cfg)
                                             and hasattr(cfg, "__iter__")):
        sources = list(cfg)
    if sources is None:
        return build_one(cfg, shard)
    cfgs = [_as_source_cfg(c) for c in sources]
    if not cfgs:
        raise DataError("data config has no sources")
    if len(cfgs) == 1:
        return build_one(cfgs[0], shard)
    names = [c.name for c in cfgs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"data source names must be unique; repeated: {sorted(dup)}")
    return MixtureSource({c.name: (build_one(c, shard), c.weight) for c in cfgs}, seed=int(seed or 0))


def load_eval_set(cfg: EvalSetConfig, where: str, min_digits: int = 1, max_digits: int = 2) -> List[Dict[str, Any]]:
    """The records of one evaluation set: every row of a source with a length (file order), or a seeded subset of
    ``n_prompts`` of them, none twice; ``n_prompts`` records of an endless source.  ``type: builtin`` is the
    built-in task's held-out split (digits from ``kwargs``, else ``data.builtin_{min,max}_digits``).  ``where``
    (the config key) names the set in errors."""
    if cfg.type == "builtin":
        from .builtin import eval_split

        if cfg.n_prompts <= 0:
            raise DataError(f"{where}.n_prompts: a builtin evaluation set needs n_prompts > 0 (it has no end)")
        kw = cfg.kwargs or {}
        return eval_split(cfg.n_prompts, cfg.seed, int(kw.get("min_digits", min_digits)),
                          int(kw.get("max_digits", max_digits)), train_seed=0)
    src_cfg = DataSourceConfig(name=cfg.name, type=cfg.type, path=cfg.path, task=cfg.task, size=cfg.size,
                               seed=cfg.seed, domain=cfg.domain, shuffle=cfg.n_prompts > 0, kwargs=dict(cfg.kwargs))
    try:
        src = _build_one(src_cfg)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    total = len(src) if hasattr(src, "__len__") else None
    if total is None:
        if cfg.n_prompts <= 0:
            raise DataError(f"{where}.n_prompts: a source of type {cfg.type!r} has no length: set n_prompts > 0")
        return src.sample(cfg.n_prompts)
    return src.sample(total if cfg.n_prompts <= 0 else min(cfg.n_prompts, total))

