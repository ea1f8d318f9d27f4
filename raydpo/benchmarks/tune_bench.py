"""Cost of a DPO search: shared reference log-probs + ASHA against the naive search.

    python -m raydpo.benchmarks.tune_bench [--trials 4] [--steps 60]

Both searches run the same grid of (beta, lr) trials from the same SFT adapter on the demo
model. The naive one computes the reference forward pass at every step and runs every trial to
the end (FIFO); raydpo's computes the reference log-probs once (Ray Data batch inference,
counted in its cost) and lets ASHA stop weak trials. Prints wall-clock cost and best eval
accuracy of each. A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time


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
        t0 = time.perf_counter()
        rows, best = run_tune(cfg, progress=lambda s: None)
        out[label] = (time.perf_counter() - t0, best.accuracy if best else math.nan, sum(r.steps for r in rows))
        print(f"\n{label}\n{format_table(rows, best)}")
    print(f"\nDPO search, {len(rows)} trials x {args.steps} steps, demo model, 2 CPUs:")
    print(f"{'search':<38} {'wall s':>7} {'steps run':>9} {'best eval acc':>13}")
    for label, (wall, acc, steps) in out.items():
        print(f"{label:<38} {wall:>7.0f} {steps:>9} {acc:>13.4f}")
    (naive_s, naive_acc, _), (ours_s, ours_acc, _) = out.values()
    print(f"cost ratio {ours_s / naive_s:.2f}x, best accuracy difference {ours_acc - naive_acc:+.4f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
