"""Dotted keys (``dpo.beta``): how a ``--set dpo.beta=0.2`` override is read and set, how a config
flattens for MLflow params and the resume fingerprint, and how validation errors are named."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A config failed validation. ``errors`` holds ``(path, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{p}: {m}" for p, m in errors))


def validation_errors(e: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as ``(dotted path, message)`` pairs, every one of them."""
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append((loc, msg))
    return out


def parse_override(s: str) -> tuple[str, Any]:
    """``"dpo.beta=0.2"`` -> ``("dpo.beta", 0.2)``; the value is read as YAML."""
    if "=" not in s:
        raise ConfigError([(s, "override must look like section.key=value")])
    key, raw = s.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([(s, "override key must be a dotted path like dpo.beta")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"value is not valid YAML: {e}")]) from None
    return key, value


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if nxt is None:  # missing or empty section: create it; validation reports unknown ones
            cur[p] = nxt = {}
        if not isinstance(nxt, dict):
            raise KeyError(f"unknown key (no section '{'.'.join(parts[: i + 1])}')")
        cur = nxt
    # unknown leaf keys are kept so validation reports them with their path
    cur[parts[-1]] = value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
