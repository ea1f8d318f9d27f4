"""The progress line rank 0 prints at each logging step, and its parser (the driver's console
turns those lines into a progress bar): one format, written and read here only.

    [dpo] step 3/6 t:loss=0.6828 t:rewards/accuracies=0.8125 e:loss=0.6279 t:tokens_per_s=3165
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from raydpo.metric_names import EVAL_ACCURACY, EVAL_MARGINS, LOSS, REWARDS_ACCURACIES, REWARDS_MARGINS, TOKENS_PER_S

SHOWN = (f"train/{LOSS}", f"train/{REWARDS_ACCURACIES}", f"train/{REWARDS_MARGINS}", f"eval/{LOSS}",
         EVAL_ACCURACY, EVAL_MARGINS, TOKENS_PER_S)
_PREFIX = {"t": "train", "e": "eval"}
_LINE = re.compile(r"^\[(?P<stage>[a-z0-9_-]+)\] step (?P<step>\d+)/(?P<total>\d+)(?P<rest>(?: \S+=\S+)*)\s*$")


@dataclass
class Progress:
    stage: str
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


def format_progress(stage: str, step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"{k.split('/', 1)[0][0]}:{k.split('/', 1)[1]}={m[k]:.4g}" for k in SHOWN if k in m]
    return " ".join([f"[{stage}] step {step}/{total}", *parts])


def parse_progress(line: str) -> Progress | None:
    """The `Progress` a `format_progress` line holds, or None for any other line."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    metrics: dict[str, float] = {}
    for part in match["rest"].split():
        key, _, value = part.partition("=")
        short, _, name = key.partition(":")
        try:
            metrics[f"{_PREFIX.get(short, short)}/{name}"] = float(value)
        except ValueError:
            continue
    return Progress(match["stage"], int(match["step"]), int(match["total"]), metrics)
