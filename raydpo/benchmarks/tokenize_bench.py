"""Tokenization throughput: the Ray Data DPO path against ``datasets.Dataset.map``.

    python -m raydpo.benchmarks.tokenize_bench [--rows 20000] [--cpus 2] [--batch-size 256]

Same rows (the generated sample, already formatted), same tokenizer (the tiny model's), same
function (`raydpo.data.tokenize.tokenize_dpo`), same batch size. Three ways:

* a plain Python loop over batches in this process (the floor: no framework at all);
* ``datasets.Dataset.map(batched=True)`` with ``num_proc`` = 1 and = ``--cpus``;
* Ray Data: `raydpo.data.pipeline.tokenized` (``dpo_batch`` tasks, at most 1 and ``--cpus`` at
  once, the CPUs shared between them), over the rows in blocks as the pipeline hands them over, timed until the result is materialized. Starting the task workers and
  loading the tokenizer in each (importing transformers dominates) is timed first on a 1-row
  dataset, and a rate with that start-up included is printed: what a run pays
  (``datasets.map``'s process pool start-up is inside its own time).

A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", default=None, help="model.cache_dir for the tiny tokenizer")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker, as in Ray

    import datasets
    import ray

    datasets.disable_progress_bars()

    from raydpo.config import load_config
    from raydpo.data.pipeline import tokenized
    from raydpo.data.rows import format_prompt
    from raydpo.data.sample import generate_rows
    from raydpo.data.tokenize import tokenize_dpo
    from raydpo.models.factory import resolve_model_path
    from raydpo.data.tokenizer import load_tokenizer

    overrides = [f"data.tokenize_batch_size={args.batch_size}", "data.tokenize_num_cpus=1"]
    if args.cache_dir:
        overrides.append(f"model.cache_dir={args.cache_dir}")
    cfg = load_config(None, overrides)
    d = cfg.data
    tok_path = resolve_model_path(cfg.model)
    rows = [{"prompt": format_prompt(r["question"], d.prompt_template), "chosen": r["response_j"],
             "rejected": r["response_k"]} for r in generate_rows(args.rows, seed=0)]
    tok = load_tokenizer(tok_path)
    results: list[tuple[str, float]] = []

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        n = fn()
        assert n == args.rows, (name, n)
        results.append((name, args.rows / (time.perf_counter() - t0)))
        print(f"  {name:<44} {results[-1][1]:>10,.0f} rows/s", flush=True)

    print(f"DPO tokenization, {args.rows} rows, tiny BPE tokenizer, batch {args.batch_size}, {args.cpus} CPUs:")

    def loop() -> int:
        n = 0
        for i in range(0, len(rows), args.batch_size):
            b = rows[i:i + args.batch_size]
            out = tokenize_dpo(tok, [r["prompt"] for r in b], [r["chosen"] for r in b], [r["rejected"] for r in b],
                               d.max_length, d.max_prompt_length)
            n += len(out["truncated"])
        return n

    timed("python loop, in process", loop)

    hf = datasets.Dataset.from_list(rows)

    def hf_fn(batch):
        return tokenize_dpo(tok, batch["prompt"], batch["chosen"], batch["rejected"], d.max_length, d.max_prompt_length)

    for nproc in sorted({1, args.cpus}):
        timed(f"datasets.map num_proc={nproc}",
              lambda nproc=nproc: len(hf.map(hf_fn, batched=True, batch_size=args.batch_size,
                                             remove_columns=hf.column_names, num_proc=nproc if nproc > 1 else None,
                                             load_from_cache_file=False)))

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    import pyarrow as pa

    from raydpo.data.pipeline import _dataset

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # the rows in blocks as the pipeline hands them to tokenization
    ds = _dataset(pa.Table.from_pylist(rows), None, args.cpus, args.batch_size).materialize()
    try:
        c = cfg.with_overrides({"data.tokenize_concurrency": args.cpus, "data.tokenize_num_cpus": 1.0})
        # the first execution starts the task workers and loads the tokenizer in each: what a run pays
        timed(f"Ray Data, {args.cpus} task(s), from cold (start-up included)",
              lambda: tokenized(ds, c, "dpo", tok_path).materialize().count())
        timed(f"Ray Data, {args.cpus} task(s), warm workers", lambda: tokenized(ds, c, "dpo", tok_path).materialize().count())
    finally:
        ray.shutdown()
    best_hf = max(r for n, r in results if n.startswith("datasets.map"))
    cold = next(r for n, r in results if "from cold" in n)
    print(f"Ray Data from cold, start-up included / datasets.map (best): {cold / best_hf:.2f}x")


if __name__ == "__main__":
    main()
