"""Configs shipped inside the package (so `raydpo demo` works from any directory)."""

from __future__ import annotations

import time
from importlib import resources

from raydpo.config import Config, load_config

QUICK = [
    "data.sample_size=600", "sft.max_steps=6", "sft.log_every=3", "sft.eval_every=6", "sft.save_every=6",
    "dpo.max_steps=6", "dpo.log_every=3", "dpo.eval_every=6", "dpo.save_every=6",
]


def demo_config_path() -> str:
    return str(resources.files("raydpo") / "configs" / "demo_cpu.yaml")


def demo_config(quick: bool = False, overrides: list[str] | None = None) -> Config:
    """The CPU demo config; a fresh run name each time so a new demo never resumes an old one."""
    name = f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"
    return load_config(demo_config_path(), (QUICK if quick else []) + [name] + list(overrides or []))
