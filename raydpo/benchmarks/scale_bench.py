"""Scale: the same short DPO run on a 10k-row and a 1M-row source.

    python -m raydpo.benchmarks.scale_bench [--rows 1000000] [--small 10000] [--steps 2] [--repeat 2] [--workdir DIR]

Builds two stack-exchange-shaped parquet datasets, in shards of 100k rows as the Hub ships
``data/rl`` (columns of ``lvwerra/stack-exchange-paired``;
question / response_j / response_k lengths drawn from log-normals near the real rows': medians
~1,200 / 700 / 450 characters, long tails; text sliced from a seeded word stream), then runs
``raydpo dpo`` on each — the demo's tiny model, 4-bit LoRA, the precomputed reference (default),
``--steps`` steps, ``eval_max_batches`` 2 — as a separate driver process joined to one local Ray
(2 CPUs) started here. For each it measures:

* time to the first training step (the driver's ``[dpo] step 1/`` line, from the command's start:
  reading the source, the reach pass, scoring, tokenizing, workers' start-up included);
* the driver's peak memory (``VmHWM`` of its process);
* the object store's peak use, polled every 0.25 s from the raylet (plus anything spilled).

Both runs train on the same number of pairs; only the source grows 100x. A benchmark, not a
test: it prints a table. Each run gets a fresh run storage (no reference cache reused). With
``--repeat`` the sizes alternate and the table holds medians: a single run's time to first step
varies by up to a quarter on this 2-core machine (the 10k run: 30 to 42 s in one session).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# (median characters, log-normal sigma) of question, response_j, response_k
LENGTHS = {"question": (1200, 0.9), "response_j": (700, 1.0), "response_k": (450, 1.0)}
MAX_CHARS = 30_000
WORDS = ("the a to of in is it you that and for this on with be not can are as if or have use your "
         "function class return value error file git python list dict key import self none true false "
         "install version run using code method string object data array set type test query table "
         "server client request response config path load save build debug thread lock memory").split()


def write_source(folder: Path, rows: int, seed: int = 0, shard: int = 100_000) -> Path:
    """A stack-exchange-shaped parquet dataset of ``rows`` rows in shards of ``shard`` rows, as the
    Hub ships ``data/rl`` (kept when it exists)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "_COMPLETE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stream = " ".join(rng.choice(WORDS, size=3_000_000)) + " "
    for k, lo in enumerate(range(0, rows, shard)):
        n = min(shard, rows - lo)
        cols = {"qid": pa.array(np.arange(lo, lo + n)), "date": pa.array(["2020/01/01"] * n),
                "metadata": pa.array([[f"https://stackoverflow.com/q/{i}"] for i in range(lo, lo + n)])}
        for name, (median, sigma) in LENGTHS.items():
            lens = np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 20, MAX_CHARS)
            starts = rng.integers(0, len(stream) - MAX_CHARS, n)
            cols[name] = pa.array([f"{i} {stream[s:s + k]}" for i, s, k in zip(range(lo, lo + n), starts, lens)])
        pq.write_table(pa.table({c: cols[c] for c in ("qid", "question", "date", "metadata", "response_j",
                                                       "response_k")}),
                       folder / f"train-{k:05d}-of-{-(-rows // shard):05d}.parquet")
    done.write_text("")
    return folder


class StorePeak(threading.Thread):
    """The object store's peak bytes in use (+ spilled), polled from the raylet."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.peak, self.done = address, 0, threading.Event()

    def run(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(self.address)
        while not self.done.is_set():
            s = get_memory_info_reply(state).store_stats
            self.peak = max(self.peak, s.object_store_bytes_used + s.spilled_bytes_total)
            self.done.wait(0.25)


def _hwm(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else 0


def run_dpo(source: Path, work: Path, address: str, steps: int, extra: list[str]) -> dict:
    """One ``raydpo dpo`` driver on ``source``: seconds to the first step, peak driver and store bytes."""
    sets = [f"data.source={source}", "data.max_chars=200000", f"dpo.max_steps={steps}", "dpo.log_every=1",
            "dpo.eval_max_batches=2", f"dpo.eval_every={steps}", f"dpo.save_every={steps}",
            f"run.storage_path={work / 'runs'}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"model.cache_dir={work.parent / 'cache'}", *extra]
    from raydpo.config.presets import demo_config

    cfg = work / "config.yaml"
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: an earlier one's reference cache would skip the pass
    work.mkdir(parents=True, exist_ok=True)
    cfg.write_text(demo_config(quick=True, overrides=sets).to_yaml())
    env = {**os.environ, "RAY_ADDRESS": address}
    store = StorePeak(address)
    store.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raydpo.cli", "dpo", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, hwm, tail = None, 0, []
    for line in proc.stdout:
        hwm = max(hwm, _hwm(proc.pid))
        tail = (tail + [line.rstrip()])[-30:]
        if first is None and line.startswith("[dpo] step 1/"):
            first = time.perf_counter() - t0
    proc.wait()
    store.done.set()
    store.join()
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"raydpo dpo on {source} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    reads = next((s for s in tail if "the run reads" in s), "")
    return {"first_step_s": first, "driver_peak_bytes": hwm, "store_peak_bytes": store.peak, "reads": reads}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the sources and runs go (default: a temp folder)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per source, alternating small and large; the table shows the medians")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raydpo-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = {}
    for n in (args.small, args.rows):
        t = time.perf_counter()
        sources[n] = write_source(work / f"stack-{n}", n)
        size = sum(f.stat().st_size for f in sources[n].glob("*.parquet"))
        print(f"source {n:,} rows: {size / 2**20:.0f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    runs: dict[int, list[dict]] = {args.small: [], args.rows: []}
    try:
        for _ in range(args.repeat):  # alternating: neither size always gets the freshly started cluster
            for n in (args.small, args.rows):
                runs[n].append(run_dpo(sources[n], work / f"run-{n}", address, args.steps, args.overrides))
                print(f"{n:,} rows: {json.dumps(runs[n][-1])}", flush=True)
    finally:
        ray.shutdown()
    out = {n: {k: statistics.median(r[k] for r in rs) for k in ("first_step_s", "driver_peak_bytes",
                                                                  "store_peak_bytes")} for n, rs in runs.items()}
    s, b = out[args.small], out[args.rows]
    if args.json:
        print(json.dumps({str(k): v for k, v in runs.items()}))
    print("\n| source rows | time to first step (s) | driver peak (MiB) | object store peak (MiB) |\n|---|---|---|---|")
    for n in (args.small, args.rows):
        r = out[n]
        print(f"| {n:,} | {r['first_step_s']:.1f} | {r['driver_peak_bytes'] / 2**20:.0f} | "
              f"{r['store_peak_bytes'] / 2**20:.1f} |")
    print(f"| ratio | {b['first_step_s'] / s['first_step_s']:.2f}x | "
          f"{b['driver_peak_bytes'] / max(s['driver_peak_bytes'], 1):.2f}x | "
          f"{b['store_peak_bytes'] / max(s['store_peak_bytes'], 1):.2f}x |")


if __name__ == "__main__":
    main()
