"""DPO throughput on the demo model: pairs/s and tokens/s with 1 and 2 Ray Train workers.

    python -m raydpo.benchmarks.train_bench [--steps 30] [--workers 1,2] [--set key=value ...]

Runs DPO (from the base tiny model, 4-bit LoRA, ZeRO-2 — the demo config) for ``--steps``
optimizer steps per worker count and prints the throughput measured by the training loop
itself (all-reduced over workers; the first logging window, which includes start-up, and
evaluation time are excluded). A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    import ray

    from raydpo.orchestration.launch import fit_stage
    from raydpo.config.presets import demo_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="raydpo-bench-")
    log_every = max(1, args.steps // 3)
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        cfg = demo_config(overrides=[
            f"scaling.num_workers={w}", f"dpo.max_steps={args.steps}", f"dpo.log_every={log_every}",
            f"dpo.eval_every={10**6}", "dpo.eval_max_batches=1", f"dpo.save_every={10**6}",
            "generations.enabled=false",  # training throughput only
            f"run.storage_path={tmp}/runs", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"run.name=bench-w{w}", *args.overrides,
        ])
        r = fit_stage(cfg, "dpo", progress=lambda s: None)
        windows = [h for h in r.history if h["step"] > 1 and "train/samples_per_s" in h]
        pairs = statistics.mean(h["train/samples_per_s"] for h in windows)
        toks = statistics.mean(h["train/tokens_per_s"] for h in windows)
        rows.append((w, cfg.dpo.per_device_batch_size, pairs, toks, r.elapsed_s))
    print("\nDPO throughput, demo model (tiny Llama, 4-bit NF4 + LoRA, ZeRO-2, CPU):")
    print(f"{'workers':>7} {'batch/worker':>12} {'pairs/s':>9} {'tokens/s':>10} {'wall s':>7}")
    for w, b, pairs, toks, wall in rows:
        print(f"{w:>7} {b:>12} {pairs:>9.2f} {toks:>10.0f} {wall:>7.0f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
