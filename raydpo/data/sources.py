"""Data sources → a Ray dataset with one string column ``raw`` (each row JSON-encoded).

Carrying rows as JSON text until validation means a file that mixes good rows with malformed
ones (missing keys, nulls, numbers instead of text, broken JSON lines) never trips Arrow's
type inference: every bad row reaches validation and is counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from raydpo.config import BUILTIN_SOURCE, DataConfig
from raydpo.data.rows import encode_row

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


class DataSourceError(Exception):
    """The source cannot be read at all (as opposed to bad rows, which are counted)."""


def _files(path: Path) -> dict[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_kind: dict[str, list[str]] = {}
    for f in files:
        kind = SUFFIXES.get(f.suffix.lower())
        if kind:
            by_kind.setdefault(kind, []).append(str(f.resolve()))
    if not by_kind:
        raise DataSourceError(f"{path}: no .jsonl, .json or .parquet files")
    return by_kind


def _rows_to_raw(batch):
    import pyarrow as pa

    cols = {k: v.to_pylist() for k, v in zip(batch.column_names, batch.columns)}
    n = batch.num_rows
    rows = [{k: cols[k][i] for k in cols} for i in range(n)]
    return pa.table({"raw": pa.array([encode_row(r) for r in rows], type=pa.string())})


def _lines_to_raw(batch):
    import pyarrow as pa

    lines = [s for s in batch["text"].to_pylist() if s is not None and s.strip()]
    return pa.table({"raw": pa.array(lines, type=pa.string())})


def _json_array(path: str):
    import ray

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataSourceError(f"{path}: not readable as JSON ({e.__class__.__name__}: {e})") from None
    if isinstance(data, dict):  # {"data": [...]} or a single row
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON array of rows")
    return ray.data.from_items([{"raw": encode_row(r)} for r in data])


def read_raw(cfg: DataConfig, stage: Literal["sft", "dpo"] = "dpo"):
    """The source as a Ray dataset of ``{"raw": json}`` rows (at most ``max_rows``)."""
    import ray

    src = cfg.source
    if src == BUILTIN_SOURCE:
        from raydpo.data.sample import generate_rows

        ds = ray.data.from_items([{"raw": encode_row(r)} for r in generate_rows(cfg.sample_size, cfg.seed)])
    elif Path(src).exists():
        parts = []
        for kind, files in _files(Path(src)).items():
            if kind == "jsonl":
                parts.append(ray.data.read_text(files).map_batches(_lines_to_raw, batch_format="pyarrow"))
            elif kind == "parquet":
                parts.append(ray.data.read_parquet(files).map_batches(_rows_to_raw, batch_format="pyarrow"))
            else:
                parts.extend(_json_array(f) for f in files)
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    else:
        ds = _hub(cfg, stage)
    if cfg.max_rows is not None:
        ds = ds.limit(cfg.max_rows)
    return ds


def _hub(cfg: DataConfig, stage: str):
    """A hub dataset, e.g. ``lvwerra/stack-exchange-paired`` with ``data/finetune`` (SFT) or
    ``data/rl`` (DPO), through ``datasets`` and ``ray.data.from_huggingface``."""
    import datasets
    import ray

    data_dir = cfg.sft_data_dir if stage == "sft" else cfg.dpo_data_dir
    try:
        hf = datasets.load_dataset(cfg.source, data_dir=data_dir, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - any hub/network/format failure is "unreadable source"
        raise DataSourceError(f"{cfg.source} (data_dir={data_dir}, split={cfg.split}): {e.__class__.__name__}: {e}") from None
    return ray.data.from_huggingface(hf).map_batches(_rows_to_raw, batch_format="pyarrow")
