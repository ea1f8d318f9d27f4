"""Cost of a DPO search: shared reference log-probs + ASHA against the naive search.

    python -m raydpo.benchmarks.tune_bench [--trials 4] [--steps 60]

Both searches run the same grid of (beta, lr) trials from the same SFT adapter on the demo
model. The naive one computes the reference forward pass at every step and runs every trial to
the end (FIFO); raydpo's computes the reference log-probs once (Ray Data batch inference,
counted in its cost) and lets ASHA stop weak trials. Prints, for each, the wall-clock cost,
the training compute (the trials' optimizer-step time, from their MLflow ``train/step_time_s``,
plus the one reference pass for raydpo's: what the shared reference and ASHA cut, while each
trial's fixed start-up -- worker processes, imports, DeepSpeed init -- is paid by both) and the
best eval accuracy. A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time


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
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    import ray

    from raydpo.launch import fit_stage
    from raydpo.presets import demo_config
    from raydpo.tune import format_table, run_tune

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)  # State API: frees stopped trials
    tmp = tempfile.mkdtemp(prefix="raydpo-tune-bench-")
    base = [f"run.storage_path={tmp}/runs", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"dpo.max_steps={args.steps}", f"dpo.eval_every={args.eval_every}", f"dpo.save_every={args.steps}",
            "tune.beta.kind=grid", "tune.beta.values=[0.02,0.3]", "tune.lr.kind=grid", "tune.lr.values=[1e-4,5e-3]",
            "tune.num_samples=1", "tune.grace_period=1", "tune.reduction_factor=2", *args.overrides]
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
        print(f"\n{label}\n{format_table(rows, best)}")
    print(f"\nDPO search, {len(rows)} trials x {args.steps} steps, demo model, 2 CPUs:")
    print(f"{'search':<38} {'wall s':>7} {'compute s':>9} {'steps run':>9} {'best eval acc':>13}")
    for label, (wall, compute, acc, steps) in out.items():
        print(f"{label:<38} {wall:>7.0f} {compute:>9.0f} {steps:>9} {acc:>13.4f}")
    (naive_s, naive_c, naive_acc, _), (ours_s, ours_c, ours_acc, _) = out.values()
    print(f"cost ratio: wall {ours_s / naive_s:.2f}x, training compute {ours_c / naive_c:.2f}x; "
          f"best accuracy difference {ours_acc - naive_acc:+.4f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
