"""Cost of a DPO search: shared reference log-probs + ASHA against the naive search.

    python -m raydpo.benchmarks.tune_bench [--steps 600] [--eval-every 60] [--lrs ...] [--betas ...]

Both searches run the same grid of (beta, lr) trials (default 4 lr x 2 beta = 8 trials, two
epochs of the demo sample each) from the same SFT adapter on the demo model, 2 trials at a time
on 2 CPUs. The naive one computes the reference forward pass at every training and evaluation
step and runs every trial to the end (FIFO), as a search stitched from TRL + Tune would; raydpo's
computes the reference log-probs once (Ray Data batch inference, inside its cost) and lets ASHA
stop weak trials at evaluations. Both share the tokenized data across trials (`tune.share_data`),
so the difference is what the shared reference and ASHA buy.

Prints, for each search, the wall-clock cost of the whole ``run_tune`` (data, reference pass,
every trial's start-up and steps, MLflow), the training compute (the trials' optimizer-step
time, from MLflow's ``train/step_time_s``, plus the one reference pass), the steps run and the
best eval accuracy; then the ratios and whether the target holds: raydpo's cost <= 0.5x the
naive one at the same best eval accuracy (+-0.02). A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time

TARGET_RATIO = 0.5
ACC_TOLERANCE = 0.02


def train_seconds(uri: str, run_ids: list[str]) -> float:
    """Sum over runs of optimizer-step time: each logged ``train/step_time_s`` is the mean over
    the steps since the previous log."""
    from raydpo.tracking import fetch_history

    total = 0.0
    for rid in run_ids:
        prev = 0
        for h in fetch_history(uri, rid, ["train/step_time_s"]):
            if "train/step_time_s" in h:
                total += h["train/step_time_s"] * (h["step"] - prev)
                prev = h["step"]
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600, help="DPO steps per trial (600 x 8 pairs ~ two epochs of the sample)")
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--lrs", default="2e-4,1e-3,5e-3,1e-2")
    p.add_argument("--betas", default="0.05,0.5")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    import ray

    from raydpo.orchestration.launch import fit_stage
    from raydpo.config.presets import demo_config
    from raydpo.orchestration.tune import format_table, run_tune

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)  # State API: frees stopped trials
    tmp = tempfile.mkdtemp(prefix="raydpo-tune-bench-")
    base = [f"run.storage_path={tmp}/runs", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "scaling.num_workers=1",  # one worker per trial: 2 trials at a time on 2 cores
            "generations.enabled=false",  # the search cost as measured before eval generations existed
            f"dpo.max_steps={args.steps}", f"dpo.eval_every={args.eval_every}", f"dpo.save_every={args.steps}",
            "tune.beta.kind=grid", f"tune.beta.values=[{args.betas}]", "tune.lr.kind=grid", f"tune.lr.values=[{args.lrs}]",
            "tune.num_samples=1", "tune.grace_period=1", f"tune.reduction_factor={args.reduction_factor}", *args.overrides]
    sft = fit_stage(demo_config(overrides=base + ["run.name=bench-sft"]), "sft", progress=lambda s: None)
    out = {}
    for label, extra in (("naive: reference every step, FIFO", ["tune.shared_reference=false", "tune.scheduler=fifo"]),
                         ("raydpo: shared reference + ASHA", ["tune.shared_reference=true", "tune.scheduler=asha"])):
        cfg = demo_config(overrides=base + extra + [f"run.name=bench-{extra[1][-4:]}", f"dpo.sft_adapter={sft.adapter_path}"])
        said: list[str] = []
        t0 = time.perf_counter()
        rows, best = run_tune(cfg, progress=said.append)
        wall = time.perf_counter() - t0
        ref = [float(m.group(1)) for m in (re.search(r"reference log-probs ready in (\d+)s", x) for x in said) if m]
        compute = train_seconds(cfg.tracking.tracking_uri, [r.run_id for r in rows if r.run_id])
        compute += ref[0] if ref and cfg.tune.shared_reference else 0.0
        out[label] = (wall, compute, best.accuracy if best else math.nan, sum(r.steps for r in rows))
        print(f"\n{label}\n{format_table(rows, best)}", flush=True)
    print(f"\nDPO search, {len(rows)} trials x {args.steps} steps (eval every {args.eval_every}), demo model, 2 CPUs:")
    print(f"{'search':<38} {'wall s':>7} {'compute s':>9} {'steps run':>9} {'best eval acc':>13}")
    for label, (wall, compute, acc, steps) in out.items():
        print(f"{label:<38} {wall:>7.0f} {compute:>9.0f} {steps:>9} {acc:>13.4f}")
    (naive_s, naive_c, naive_acc, _), (ours_s, ours_c, ours_acc, _) = out.values()
    ratio, diff = ours_s / naive_s, ours_acc - naive_acc
    print(f"cost ratio: wall {ratio:.2f}x, training compute {ours_c / naive_c:.2f}x; best accuracy difference {diff:+.4f}")
    met = ratio <= TARGET_RATIO and abs(diff) <= ACC_TOLERANCE
    print(f"target (wall <= {TARGET_RATIO}x at best accuracy +-{ACC_TOLERANCE}): {'met' if met else 'NOT met'}")
    ray.shutdown()


if __name__ == "__main__":
    main()
