"""Configs shipped inside the package (so `raydpo demo` works from any directory)."""

from __future__ import annotations

import time
from importlib import resources

from raydpo.config import Config, load_config

QUICK = [
    "data.sample_size=300", "sft.max_steps=6", "sft.log_every=3", "sft.eval_every=6", "sft.save_every=6",
    "dpo.max_steps=6", "dpo.log_every=3", "dpo.eval_every=6", "dpo.save_every=6",
]


def demo_config_path() -> str:
    return str(resources.files("raydpo") / "configs" / "demo_cpu.yaml")


# the search: 4 trials, each DPO evaluated 3 times, so ASHA can stop the weak ones early
# One worker per trial, so 2 trials run at once on 2 CPUs (2 x 0.5 CPU + 1 for Ray Data): a
# trial's fixed start-up (process spawns and imports) then overlaps with another's training;
# SFT shortened too (README, Performance: what these presets cost on the development machine).
TUNE = ["tune.num_samples=4", "scaling.num_workers=1", "sft.max_steps=50", "dpo.max_steps=40", "dpo.eval_every=10",
        "dpo.save_every=40", "tune.grace_period=1", "tune.reduction_factor=2"]
TUNE_QUICK = ["tune.num_samples=4", "scaling.num_workers=1", "dpo.max_steps=4", "dpo.eval_every=2", "dpo.save_every=4"]


def demo_config(quick: bool = False, tune: bool = False, overrides: list[str] | None = None) -> Config:
    """The CPU demo config; a fresh run name each time so a new demo never resumes an old one."""
    name = f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"
    extra = (QUICK if quick else []) + ((TUNE_QUICK if quick else TUNE) if tune else [])
    return load_config(demo_config_path(), extra + [name] + list(overrides or []))
