"""Metric names, written once: what `raydpo.losses` computes, the loops log with a ``train/`` or
``eval/`` prefix, `raydpo.tracking` plots, the Prometheus exporter (`raydpo.tracking.prometheus`) and
``dashboards/`` read, and Tune and ``raydpo report`` rank runs on.

A leaf module that imports nothing: `raydpo.losses` (torch) and the torch-free modules
(`raydpo.tracking`, `raydpo.tracking.prometheus`) both import it, and neither may import the other — the
losses stay below tracking, and tracking, the exporter and ``raydpo report`` load no torch.
"""

from __future__ import annotations

LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
NLL_LOSS = "nll_loss"  # only for losses with a chosen-NLL term (sft, orpo, simpo with cpo_alpha), as TRL names it
# every DPO metric, logged for both splits
METRIC_KEYS = (LOSS, REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_ACCURACIES, REWARDS_MARGINS,
               LOGPS_CHOSEN, LOGPS_REJECTED)
SPLITS = ("train", "eval")

# train-only throughput, memory and schedule metrics (each has a Prometheus gauge)
TOKENS_PER_S = "train/tokens_per_s"
SAMPLES_PER_S = "train/samples_per_s"
SCORED_TOKENS_PER_S = "train/scored_tokens_per_s"
PADDING_FRACTION = "train/padding_fraction"
STEP_TIME = "train/step_time_s"
PEAK_MEMORY_GB = "train/peak_memory_gb"
PEAK_RSS_MIB = "train/peak_rss_mib"
NONFINITE_STEPS = "train/nonfinite_steps"
LR = "train/lr"

# what a Tune search (``tune.metric``) and ``raydpo report`` rank DPO runs on
EVAL_ACCURACY = f"eval/{REWARDS_ACCURACIES}"
EVAL_MARGINS = f"eval/{REWARDS_MARGINS}"
