"""Typed, validated configuration: YAML files plus dotted ``--set`` overrides.

One section per stage. Every section forbids unknown keys; a config is validated once, at the
boundary, and *all* errors are reported together with their dotted field path. This package
imports no torch, ray, deepspeed, bitsandbytes or mlflow (a test proves it), so ``raydpo
validate`` is instant and never starts Ray.

The whole config crosses to Ray workers as plain data (``Config.to_dict()``) and is rebuilt
there with ``Config.from_dict`` — workers hold no globals.

This file is the package's interface (``from raydpo.config import Config, load_config``); the
code lives in its modules, bottom to top:

| module | holds |
|---|---|
| `sections` | every section, its fields, defaults and own checks; the built-in names |
| `keys` | dotted keys: ``--set`` parsing, nested set/flatten, `ConfigError` |
| `root` | `Config`: the sections together, checks across them, conversions; `resolve_precision` |
| `fingerprint` | what a resumed run must share with its checkpoint |
| `load` | `load_config` (YAML + overrides) and `check_resources` (the filesystem) |
"""

from raydpo.config.fingerprint import RESUME_FREE, fingerprint_diff, fingerprint_hash, resume_fingerprint
from raydpo.config.keys import ConfigError, flatten, parse_override
from raydpo.config.load import check_resources, load_config
from raydpo.config.root import Config, resolve_precision
from raydpo.config.sections import (
    BUILTIN_MODEL,
    BUILTIN_SOURCE,
    CANONICAL_COLUMNS,
    DATA_FORMATS,
    DTYPES,
    HUB_ID,
    DataConfig,
    DeepSpeedConfig,
    DPOConfig,
    GenerationsConfig,
    LoraConfig,
    ModelConfig,
    QuantizationConfig,
    RunConfig,
    ScalingConfig,
    SearchSpace,
    SFTConfig,
    Stage,
    TinyModelConfig,
    TrackingConfig,
    TrainStageConfig,
    TuneConfig,
)

__all__ = [
    "BUILTIN_MODEL", "BUILTIN_SOURCE", "CANONICAL_COLUMNS", "DATA_FORMATS", "DTYPES", "HUB_ID", "RESUME_FREE",
    "Config", "ConfigError", "DPOConfig", "DataConfig", "DeepSpeedConfig", "GenerationsConfig", "LoraConfig",
    "ModelConfig", "QuantizationConfig", "RunConfig", "SFTConfig", "ScalingConfig", "SearchSpace", "Stage",
    "TinyModelConfig", "TrackingConfig", "TrainStageConfig", "TuneConfig",
    "check_resources", "fingerprint_diff", "fingerprint_hash", "flatten", "load_config", "parse_override",
    "resolve_precision", "resume_fingerprint",
]
