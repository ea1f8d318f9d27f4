"""Data sources → one Ray dataset of validated, formatted rows.

Every source ends in the same columns (see `raydpo.data.rows.prepare_rows`): ``reason`` (``""``
= valid), ``prompt``, ``chosen``, ``rejected``, ``is_eval``. Rows are read and validated in the
same ``map_batches`` call, in Python, so malformed rows never meet Arrow's type inference:

* JSONL (``.jsonl``/``.ndjson``, and ``.json`` files that are not one JSON document): the files'
  bytes are split into lines by us, each line decoded and parsed on its own — a line that is not
  UTF-8 or not JSON is a counted bad row, not a crash (``ray.data.read_json`` would infer one
  schema and fail on the first row that disagrees).
* JSON array files (``[{...}, ...]``): parsed on the driver (a JSON document cannot be split),
  each element carried as JSON text to the workers.
* Parquet and hub datasets: typed columns, turned into Python rows batch by batch.
* ``sample``: `raydpo.data.sample.generate_rows`.

A source that cannot be read at all (missing path, no data files, unreadable file, a broken JSON
array, an unknown hub id) raises `DataSourceError` with a one-line message naming it, before
any Ray work starts. ``DataConfig.split`` applies to hub datasets only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from raydpo.config import BUILTIN_SOURCE, HUB_ID, DataConfig
from raydpo.data.rows import decode_line, encode_row, parse_json_line, prepare_rows

Stage = Literal["sft", "dpo"]
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COLUMNS = ("reason", "prompt", "chosen", "rejected", "is_eval")
LINES_PER_BLOCK = 8192  # JSONL rows per output block: bounds worker memory on big files


class DataSourceError(Exception):
    """The source cannot be read at all (as opposed to bad rows, which are counted)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:300]}" if text else e.__class__.__name__


# -- pure batch functions (run in Ray Data workers) --------------------------------------------

def _table(cols: dict[str, list]):
    import pyarrow as pa

    return pa.table({
        "reason": pa.array(cols["reason"], type=pa.string()),
        "prompt": pa.array(cols["prompt"], type=pa.string()),
        "chosen": pa.array(cols["chosen"], type=pa.string()),
        "rejected": pa.array(cols["rejected"], type=pa.string()),
        "is_eval": pa.array(cols["is_eval"], type=pa.bool_()),
    })


def _opts(cfg: DataConfig) -> dict[str, Any]:
    return {"max_chars": cfg.max_chars, "template": cfg.prompt_template, "eval_fraction": cfg.eval_fraction}


def lines_to_rows(batch, max_chars: int, template: str, eval_fraction: float):
    """``read_binary_files`` batch (column ``bytes``, one file per row) → prepared rows, one per
    non-blank line, yielded in blocks of `LINES_PER_BLOCK`."""
    objs: list[Any] = []
    pre: list[str] = []
    for data in batch["bytes"].to_pylist():
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            text = decode_line(raw)
            objs.append(parse_json_line(text))
            pre.append("bad_encoding" if text is None else "")
            if len(objs) >= LINES_PER_BLOCK:
                yield _table(prepare_rows(objs, max_chars, template, eval_fraction, pre))
                objs, pre = [], []
    if objs:
        yield _table(prepare_rows(objs, max_chars, template, eval_fraction, pre))


def json_texts_to_rows(batch, max_chars: int, template: str, eval_fraction: float):
    """Column ``raw`` (JSON text of one row each) → prepared rows."""
    objs = [parse_json_line(t) for t in batch["raw"].to_pylist()]
    return _table(prepare_rows(objs, max_chars, template, eval_fraction))


def records_to_rows(batch, max_chars: int, template: str, eval_fraction: float):
    """A typed Arrow batch (parquet, hub, sample) → prepared rows."""
    return _table(prepare_rows(batch.to_pylist(), max_chars, template, eval_fraction))


# -- sources (driver side: checks eagerly, builds a lazy dataset) ------------------------------

def _data_files(path: Path) -> dict[str, list[str]]:
    if not os.access(path, os.R_OK):
        raise DataSourceError(f"{path}: permission denied")
    if path.is_file():
        kind = KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataSourceError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
        return {kind: [str(path.resolve())]}
    by_kind: dict[str, list[str]] = {}
    for f in sorted(path.rglob("*")):
        hidden = any(part.startswith((".", "_")) for part in f.relative_to(path).parts)
        if f.is_file() and not hidden and f.suffix.lower() in KINDS:
            by_kind.setdefault(KINDS[f.suffix.lower()], []).append(str(f.resolve()))
    if not by_kind:
        raise DataSourceError(f"{path}: no .jsonl, .json or .parquet files in this folder")
    return by_kind


def _first_char(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise DataSourceError(f"{path}: {_one_line(e)}") from None
    return head[:1].decode("latin-1")


def _json_document(path: str) -> list[Any] | None:
    """The rows of a ``.json`` file holding one JSON document (an array of rows, a ``{"data":
    [...]}``-style object, or a single row object); None when it is JSON Lines instead."""
    first = _first_char(path)
    if first not in ("[", "{"):
        return None
    try:
        data = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:
        if first == "{":  # JSON Lines saved as .json (what datasets.Dataset.to_json writes)
            return None
        raise DataSourceError(f"{path}: not valid JSON ({_one_line(e)})") from None
    except OSError as e:
        raise DataSourceError(f"{path}: {_one_line(e)}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 and not any(k in data for k in ("question", "response_j")) else [data]
    return data


def _check_parquet(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).metadata  # noqa: B018 - reads only the footer
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot be read"
        raise DataSourceError(f"{path}: not a readable parquet file ({_one_line(e)})") from None


def _local(path: Path, cfg: DataConfig):
    import ray

    opts = _opts(cfg)
    read = {"num_cpus": cfg.tokenize_num_cpus}  # not the 1-CPU default: Train workers hold the rest
    parts = []
    files = _data_files(path)
    line_files = list(files.get("jsonl", []))
    for f in files.get("json", []):
        rows = _json_document(f)
        if rows is None:
            line_files.append(f)
        elif rows:
            parts.append(ray.data.from_items([{"raw": encode_row(r)} for r in rows]).map_batches(
                json_texts_to_rows, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if line_files:
        # batch_size=1: one file per call; the function yields bounded blocks
        parts.append(ray.data.read_binary_files(sorted(line_files), ray_remote_args=read).map_batches(
            lines_to_rows, batch_size=1, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if files.get("parquet"):
        for f in files["parquet"]:
            _check_parquet(f)
        parts.append(ray.data.read_parquet(files["parquet"], ray_remote_args=read).map_batches(
            records_to_rows, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if not parts:  # only empty JSON arrays
        return ray.data.from_arrow(_table({k: [] for k in COLUMNS}))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _hub(cfg: DataConfig, stage: Stage):
    """A hub dataset, e.g. ``lvwerra/stack-exchange-paired`` with ``data/finetune`` (SFT) or
    ``data/rl`` (DPO).

    Not ``ray.data.from_huggingface``: for a hub dataset it looks for the hub's parquet export of
    the dataset's *config*, which for a ``data_dir`` load is the default config — every folder of
    the repository, not just ``data_dir`` — and, for a non-streaming dataset, first reloads that
    whole default config to compare fingerprints. Instead the rows ``load_dataset`` cached
    locally go into Ray as Arrow tables (its own fallback path), in blocks.
    """
    import datasets
    import ray

    data_dir = cfg.sft_data_dir if stage == "sft" else cfg.dpo_data_dir
    where = f"{cfg.source} (data_dir={data_dir}, split={cfg.split})"
    try:
        hf = datasets.load_dataset(cfg.source, data_dir=data_dir, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - any hub/network/format failure is "unreadable source"
        raise DataSourceError(f"{where}: {_one_line(e)}") from None
    if cfg.max_rows is not None and cfg.max_rows < len(hf):
        hf = hf.select(range(cfg.max_rows))
    table = hf.with_format("arrow")[:]
    step = 65_536
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
    return ray.data.from_arrow(blocks).map_batches(
        records_to_rows, batch_format="pyarrow", fn_kwargs=_opts(cfg), num_cpus=cfg.tokenize_num_cpus)


def _looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or Path(src).suffix.lower() in KINDS or not HUB_ID.match(src)


def read_rows(cfg: DataConfig, stage: Stage = "dpo"):
    """Every row of ``cfg.source`` (at most ``max_rows``), validated and formatted: a lazy Ray
    dataset with columns ``reason``, ``prompt``, ``chosen``, ``rejected``, ``is_eval``."""
    import ray

    src = cfg.source
    if src == BUILTIN_SOURCE:
        from raydpo.data.sample import generate_rows

        ds = ray.data.from_items(generate_rows(cfg.sample_size, cfg.seed)).map_batches(
            records_to_rows, batch_format="pyarrow", fn_kwargs=_opts(cfg), num_cpus=cfg.tokenize_num_cpus)
    elif Path(src).expanduser().exists():
        ds = _local(Path(src).expanduser(), cfg)
    elif _looks_like_path(src):
        raise DataSourceError(f"{src}: no such file or folder")
    else:
        ds = _hub(cfg, stage)
    if cfg.max_rows is not None:
        ds = ds.limit(cfg.max_rows)
    return ds
