"""Reading a config: a YAML file plus dotted ``--set`` overrides, validated once with every error
listed; and the checks that need the filesystem (the data source and the model exist).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from raydpo.config.keys import ConfigError, parse_override, set_dotted
from raydpo.config.root import Config
from raydpo.config.sections import BUILTIN_MODEL, BUILTIN_SOURCE, HUB_ID


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (or defaults when ``path`` is None), apply overrides, validate once."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([("<file>", f"config file not found: {p}")])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError([("<file>", f"{p} is not valid YAML: {e}")]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([("<root>", f"{p} must hold a mapping of sections, got {type(loaded).__name__}")])
        raw = copy.deepcopy(loaded)
    if isinstance(overrides, list):
        overrides = dict(parse_override(s) for s in overrides)
    errs: list[tuple[str, str]] = []
    for k, v in (overrides or {}).items():
        try:
            set_dotted(raw, k, v)
        except KeyError as e:
            errs.append((k, str(e.args[0])))
    try:
        cfg = Config.from_dict(raw)
    except ConfigError as e:
        errs.extend(e.errors)
    if errs:
        raise ConfigError(errs)
    return cfg


def check_resources(cfg: Config) -> list[tuple[str, str]]:
    """Checks that need the filesystem (not Ray): the data source and model must exist."""
    errs: list[tuple[str, str]] = []
    for key, src in (("data.source", cfg.data.source), ("data.sft_source", cfg.data.sft_source)):
        if src is None or src == BUILTIN_SOURCE or Path(src).expanduser().exists():
            continue
        if src.startswith((".", "/", "~")) or not HUB_ID.match(src):
            errs.append((key, f"no such file or folder, and not a hub dataset id: {src}"))
    m = cfg.model.name_or_path
    # a folder in object storage (s3://...) is checked where storage is reached (`raydpo validate`, the stage)
    if "://" in m:
        pass
    elif m != BUILTIN_MODEL and not Path(m).exists():
        if m.startswith((".", "/", "~")) or not HUB_ID.match(m):
            errs.append(("model.name_or_path", f"no such folder, and not a hub model id: {m}"))
    elif m != BUILTIN_MODEL and Path(m).is_dir() and not (Path(m) / "config.json").exists():
        errs.append(("model.name_or_path", f"{m} has no config.json: not a Hugging Face model folder"))
    for key, adapter in (("dpo.sft_adapter", cfg.dpo.sft_adapter),):
        if adapter and "://" not in adapter and not (Path(adapter) / "adapter_config.json").exists():
            errs.append((key, f"{adapter} is not a PEFT adapter folder (no adapter_config.json)"))
    return errs
