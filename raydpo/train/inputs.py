"""What crosses the Ray boundary to a training worker: one typed record, built on the driver.

`raydpo.orchestration.launch` builds it; Ray Train carries it to every worker as plain data
(``train_loop_config``, `WorkerInputs.to_dict`), and `raydpo.train.worker` rebuilds it first
thing (`WorkerInputs.from_dict`): an unknown key, or a missing one without a default, fails there,
by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class WorkerInputs:
    config: dict[str, Any]  # `raydpo.config.Config.to_dict()`: workers rebuild the typed config
    stage: str  # 'sft' or 'dpo'
    base_path: str  # the model the stage loads (for DPO from SFT: the merged SFT model)
    tokenizer_path: str
    storage_dir: str | None = None  # the stage's folder (`raydpo.storage.stage_dir`); None: nothing kept
    tracking_uri: str | None = None
    run_id: str | None = None  # the stage's MLflow run; None: no tracking
    report_eval_only: bool = False  # Tune: report only results with eval metrics
    has_eval: bool = True  # False: the eval split is empty and not passed
    fingerprint: dict[str, Any] = field(default_factory=dict)  # saved in checkpoints, checked on resume
    logged_through_step: int = 0  # steps the driver saw logged already (not logged again)
    faults: str = ""  # injected faults (`raydpo.train.faults`)
    eval_prompts: list[dict[str, list[int]]] = field(default_factory=list)  # the run's held-out prompts
    score_reference: str = ""  # the reference cache folder the workers fill first (`raydpo.train.ref_scoring`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerInputs:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown worker input(s) {', '.join(unknown)}: the driver and workers run different raydpo")
        return cls(**d)
