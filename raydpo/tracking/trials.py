"""A Tune search's trials as MLflow holds them: the row of each trial and the tags that mark them.

Written by `raydpo.orchestration.tune`, read back by it and by `raydpo.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydpo.metric_names import EVAL_ACCURACY

BEST_TAG = "raydpo.best_trial"
TRIAL_TAG = "raydpo.trial_id"
BEST_RUN_TAG = "raydpo.best_run_id"  # on the search's parent run: its best trial's run id


@dataclass
class TrialRow:
    trial_id: str
    beta: float
    lr: float
    accuracy: float
    margins: float
    steps: int
    status: str
    run_id: str | None = None

    def score(self, metric: str) -> float:
        """The value ``metric`` (``tune.metric``: eval reward accuracy or margins) ranks this trial
        by; higher is better. The one place that maps the metric's name to a column."""
        return self.accuracy if metric == EVAL_ACCURACY else self.margins
