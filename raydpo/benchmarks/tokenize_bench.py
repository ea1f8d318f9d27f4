"""Tokenization throughput: the Ray Data DPO path against ``datasets.Dataset.map``.

    python -m raydpo.benchmarks.tokenize_bench [--rows 20000] [--cpus 2]

Same rows (the generated sample, already formatted), same tokenizer (the tiny model's), same
function (`raydpo.data.tokenize.tokenize_dpo`). Ray Data's time includes scheduling and
materializing the result; ``datasets`` runs in-process with ``num_proc`` = 1 and = cpus.
A benchmark, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)

    import datasets
    import ray

    from raydpo.config import load_config
    from raydpo.data.rows import format_prompt
    from raydpo.data.sample import generate_rows
    from raydpo.data.tokenize import DPOTokenize, tokenize_dpo
    from raydpo.models import load_tokenizer, resolve_model_path

    cfg = load_config(None, [f"data.tokenize_batch_size={args.batch_size}"])
    tok_path = resolve_model_path(cfg.model)
    rows = [{"prompt": format_prompt(r["question"], cfg.data.prompt_template), "chosen": r["response_j"],
             "rejected": r["response_k"]} for r in generate_rows(args.rows, seed=0)]
    d = cfg.data
    results = []

    hf = datasets.Dataset.from_list(rows)
    tok = load_tokenizer(tok_path)

    def hf_fn(batch):
        return tokenize_dpo(tok, batch["prompt"], batch["chosen"], batch["rejected"], d.max_length, d.max_prompt_length)

    for nproc in sorted({1, args.cpus}):
        t0 = time.perf_counter()
        out = hf.map(hf_fn, batched=True, batch_size=args.batch_size, remove_columns=hf.column_names,
                     num_proc=nproc if nproc > 1 else None, load_from_cache_file=False)
        assert len(out) == args.rows
        results.append((f"datasets.map num_proc={nproc}", args.rows / (time.perf_counter() - t0)))

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items(rows).materialize()
    for conc in sorted({1, args.cpus}):
        t0 = time.perf_counter()
        n = ds.map_batches(DPOTokenize, fn_constructor_args=(tok_path, d.max_length, d.max_prompt_length),
                           batch_size=args.batch_size, batch_format="pyarrow", num_cpus=1,
                           concurrency=conc).materialize().count()
        assert n == args.rows
        results.append((f"Ray Data map_batches actors={conc}", args.rows / (time.perf_counter() - t0)))
    ray.shutdown()

    print(f"\nDPO tokenization, {args.rows} rows, tiny BPE tokenizer, batch {args.batch_size}, {args.cpus} CPUs:")
    for name, rate in results:
        print(f"  {name:<36} {rate:>10,.0f} rows/s")


if __name__ == "__main__":
    main()
