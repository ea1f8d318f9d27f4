"""How many rows each data pass of a DPO run reads, tokenizes and scores, and what the reference
pass costs: a pure function of the config and the source's size (``raydpo validate --estimate``).

The rules are the pipeline's (`raydpo.data.reach`): the reach pass reads (checks, hashes) every
row of the source once; a run inside epoch 0 tokenizes and scores the first
``max_steps x accumulation x global batch`` train pairs of its seeded order and the
``eval_max_batches x global batch`` eval pairs evaluation reads (every eval pair when unbounded);
a run past epoch 0 every pair. Scoring happens only with a precomputed reference
(`DPOConfig.precomputed_reference`). SFT reads and tokenizes every row (its packed blocks are
ordered by their content). Source sizes and split sizes are estimates: ``eval_fraction`` of the
rows go to eval (the split is a hash), and bad rows are not known before the pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from raydpo.config import BUILTIN_SOURCE, Config


@dataclass
class Passes:
    source_rows: int | None  # read by the reach pass (None: unknown offline)
    tokenize_train: int | None
    tokenize_eval: int | None
    score: int | None  # pairs the reference pass scores (0: no precomputed reference)
    reference_s: float | None  # seconds of the reference pass at the stated rate, all replicas
    whole_split_reference_s: float | None  # the same pass over every pair of the source

    def to_json(self) -> dict:
        return asdict(self)


def count_source_rows(cfg: Config) -> tuple[int | None, str]:
    """Rows of the DPO source when cheaply known: ``data.max_rows``, the sample's size, a local
    jsonl's lines or parquet metadata; else None and why."""
    d = cfg.data
    if d.max_rows is not None:
        return d.max_rows, "data.max_rows"
    if d.source == BUILTIN_SOURCE:
        return d.sample_size, "data.sample_size"
    p = Path(d.source).expanduser()
    if not p.exists():
        return None, f"{d.source} is not local: its size is unknown offline (set data.max_rows)"
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    n = 0
    for f in files:
        if f.suffix in (".jsonl", ".ndjson"):
            with open(f, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(str(f)).metadata.num_rows
        elif f.suffix == ".json":
            return None, f"{f}: a .json document's rows are not counted cheaply (set data.max_rows)"
    return n, f"rows in {d.source}"


def data_passes(cfg: Config, rows: int | None, pair_forward_flops: float, tflops: float | None) -> Passes:
    """The passes of a DPO run over a source of ``rows`` rows (None: unknown). ``pair_forward_flops``:
    one pair's reference forward; the reference pass runs one replica per training worker."""
    from raydpo.data.order import usable_rows
    from raydpo.data.reach import Want

    d = cfg.dpo
    g = d.per_device_batch_size * cfg.scaling.num_workers
    want = Want.of(d.max_steps * d.gradient_accumulation_steps, g, d.eval_max_batches)
    if rows is None:
        train, evals = want.train, want.eval
        all_pairs = None
    else:
        n_eval = round(rows * cfg.data.eval_fraction)
        n_train = rows - n_eval
        train = want.train if want.train <= usable_rows(n_train, g) else n_train
        evals = n_eval if want.eval is None else min(want.eval, n_eval)
        all_pairs = rows
    scored = (train + evals if train is not None and evals is not None else None) if d.precomputed_reference else 0

    def seconds(pairs):
        if pairs is None or tflops is None:
            return None
        return pairs * pair_forward_flops / (tflops * 1e12 * cfg.scaling.num_workers)
    return Passes(rows, train, evals, scored, seconds(scored),
                  seconds(all_pairs) if d.precomputed_reference else None)


def format_passes(p: Passes, why: str) -> list[str]:
    def n(x):
        return "?" if x is None else f"{x:,}"
    lines = [f"data passes (DPO): read {n(p.source_rows)} source rows ({why}) once to find what the run reads; "
             f"tokenize {n(p.tokenize_train)} train + {n(p.tokenize_eval)} eval pairs; "
             f"score {n(p.score)} pairs for the reference"]
    if p.reference_s is not None:
        whole = f" (the whole source would take {p.whole_split_reference_s:,.0f} s)" if p.whole_split_reference_s else ""
        lines.append(f"reference pass: {p.reference_s:,.0f} s at the full rate on {{workers}} replicas{whole}")
    lines.append("SFT reads and tokenizes every row of its source (its packed blocks are ordered by content)")
    return lines
