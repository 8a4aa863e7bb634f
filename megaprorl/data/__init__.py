"""Prompt data: file sources (JSONL, Parquet), Reasoning Gym generators, mixtures. See docs/data.md."""

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
    "build_source",
    "register_source_type",
    "validate_record",
]
