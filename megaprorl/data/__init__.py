"""Prompt data: file sources (JSONL, Parquet), Reasoning Gym generators, mixtures. See docs/data.md."""

from .retire import SolvedPromptFilter, prompt_key
from .sources import (
    DataError,
    DataSourceConfig,
    JsonlSource,
    MixtureSource,
    ParquetSource,
    PromptSource,
    ReasoningGymSource,
    build_source,
    register_source_type,
    validate_record,
)

__all__ = [
    "DataError",
    "DataSourceConfig",
    "JsonlSource",
    "MixtureSource",
    "ParquetSource",
    "PromptSource",
    "ReasoningGymSource",
    "SolvedPromptFilter",
    "build_source",
    "prompt_key",
    "register_source_type",
    "validate_record",
]
