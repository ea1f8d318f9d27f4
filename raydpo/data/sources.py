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
* ``sample``: `raydpo.data.sample.sample_rows`, in ``data.format`` (stack-exchange for ``auto``).

The format (`raydpo.data.formats`) is decided here, on the driver, once per source: ``data.format``,
or for ``auto`` the first of the source's first rows (files in name order, at most
`PEEK_ROWS`, renamed by ``data.columns``) that looks like one — read again from the start by
Ray Data, never read whole twice. Message rows need the tokenizer's chat template (or
``data.chat_template``): a `raydpo.data.chat.ChatRenderer` built here travels to the workers in
``fn_kwargs`` and renders there.

A source that cannot be read at all (missing path, no data files, unreadable file, a broken JSON
array, an unknown hub id, columns of no known format, message rows and no chat template) raises
`DataSourceError` with a one-line message naming it, before any Ray work starts.
``DataConfig.split`` applies to hub datasets only (`hub_files`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from raydpo.config import BUILTIN_SOURCE, CANONICAL_COLUMNS, HUB_ID, DataConfig, Stage
from raydpo.data.formats import FormatError, first_match
from raydpo.data.rows import decode_line, encode_row, parse_json_line, prepare_rows

if TYPE_CHECKING:
    from raydpo.data.chat import ChatRenderer

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COLUMNS = ("reason", "prompt", "chosen", "rejected", "is_eval", "templated")
LINES_PER_BLOCK = 8192  # JSONL rows per output block: bounds worker memory on big files
ITEMS_PER_BLOCK = 1024  # rows per block of in-memory rows (JSON arrays, the sample): Ray's default
# cuts them into 200 blocks whatever their size, and every block is a task in every later pass


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
        "templated": pa.array(cols["templated"], type=pa.bool_()),
    })


def _projection(fmt: str, columns: dict[str, str], schema: Any) -> list[str] | None:
    """The parquet columns a row of ``fmt`` reads (renamed by ``columns``), when ``schema`` (the
    first file's) holds them all; None (read every column) otherwise. Not reading a source's other
    columns (stack-exchange's ``metadata`` lists, ``qid``, ``date``) halves a 1M-row read."""
    from raydpo.data.formats import FIELDS as FORMAT_FIELDS

    wanted = [columns.get(f, f) for f in FORMAT_FIELDS[fmt]]
    return wanted if all(c in schema.names for c in wanted) else None


def _opts(cfg: DataConfig, fmt: str, renderer: ChatRenderer | None) -> dict[str, Any]:
    return {"max_chars": cfg.max_chars, "template": cfg.prompt_template, "eval_fraction": cfg.eval_fraction,
            "fmt": fmt, "columns": dict(cfg.columns) or None, "renderer": renderer}


def lines_to_rows(batch, max_chars: int, template: str, eval_fraction: float, **fmt):
    """``read_binary_files`` batch (column ``bytes``, one file per row) → prepared rows, one per
    non-blank line, yielded in blocks of `LINES_PER_BLOCK`. ``fmt``: `prepare_rows`'s ``fmt``,
    ``columns`` and ``renderer``."""
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
                yield _table(prepare_rows(objs, max_chars, template, eval_fraction, pre, **fmt))
                objs, pre = [], []
    if objs:
        yield _table(prepare_rows(objs, max_chars, template, eval_fraction, pre, **fmt))


def json_texts_to_rows(batch, max_chars: int, template: str, eval_fraction: float, **fmt):
    """Column ``raw`` (JSON text of one row each) → prepared rows."""
    objs = [parse_json_line(t) for t in batch["raw"].to_pylist()]
    return _table(prepare_rows(objs, max_chars, template, eval_fraction, **fmt))


def records_to_rows(batch, max_chars: int, template: str, eval_fraction: float, **fmt):
    """A typed Arrow batch (parquet, hub, sample) → prepared rows. Only the columns a row format
    reads become Python objects (not stack-exchange's ``qid``, ``date``, ``metadata``: a fifth of
    the reach pass's time on a 1M-row source)."""
    from raydpo.data.arrow_rows import arrow_rows

    fast = arrow_rows(batch, fmt.get("fmt", "stack_exchange"), max_chars, template, eval_fraction, fmt.get("columns"))
    if fast is not None:  # the plain-text formats' checks as Arrow kernels (no Python object per row)
        return fast
    read = set(CANONICAL_COLUMNS) | set((fmt.get("columns") or {}).values())
    keep = [c for c in batch.column_names if c in read]
    return _table(prepare_rows((batch.select(keep) if keep else batch).to_pylist(), max_chars, template,
                               eval_fraction, **fmt))


# -- the format of a source (driver side) ------------------------------------------------------

def resolve_format(cfg: DataConfig, rows: Iterable[Any], where: str, tokenizer: str | None = None,
                   revision: str | None = None) -> tuple[str, ChatRenderer | None]:
    """``(format, renderer)`` of a source whose first rows are ``rows`` (read lazily, at most
    `PEEK_ROWS`): ``data.format``, or for ``auto`` the first row that looks like a format
    (stack-exchange when no row is even an object). The renderer (None for plain-text formats)
    comes from the tokenizer ``tokenizer`` or ``data.chat_template``."""
    fmt, first = cfg.format, None
    if fmt in ("auto", "implicit_prompt"):
        try:
            found = first_match(rows, cfg.columns)
        except FormatError as e:
            if fmt == "auto":
                raise DataSourceError(f"{where}: {e}") from None
            found = None
        if fmt == "auto":
            fmt = found[0] if found else "stack_exchange"
        first = found[1] if found else None
    if fmt not in ("conversational", "implicit_prompt"):
        return fmt, None
    needs = fmt == "conversational" or isinstance((first or {}).get("chosen"), list)
    return fmt, chat_renderer(cfg, fmt, tokenizer, revision, required=needs)


def chat_renderer(cfg: DataConfig, fmt: str, tokenizer: str | None, revision: str | None = None,
                  required: bool = True) -> ChatRenderer | None:
    """The renderer of ``data.chat_template`` or else the tokenizer's template, with the
    tokenizer's special tokens; `DataSourceError` when ``required`` and there is none."""
    from raydpo.data.chat import ChatRenderer

    tok = None
    if tokenizer is not None:
        from raydpo.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer, revision=revision)
    try:
        renderer = ChatRenderer.from_tokenizer(tok, cfg.chat_template)
    except ValueError as e:
        owner = "data.chat_template" if cfg.chat_template else f"the tokenizer {tokenizer}"
        raise DataSourceError(f"{owner}: {e}") from None
    if renderer is None and required:
        raise DataSourceError(f"data.format {fmt} needs a chat template: the tokenizer {tokenizer} has none; "
                              "set data.chat_template")
    return renderer


def _lines(path: str) -> Iterator[Any]:
    """A JSONL file's rows, parsed one by one (for the format's first look)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield parse_json_line(decode_line(raw.removesuffix(b"\n")))
    except OSError as e:
        raise DataSourceError(f"{path}: {_one_line(e)}") from None


def _parquet_rows(path: str | BinaryIO) -> Iterator[Any]:
    import pyarrow.parquet as pq

    # a buffered read decodes page by page: the first rows of a 100k-row row group cost a few
    # pages, not the whole group in the driver's memory (+130 MB on a 1M-row file)
    for batch in pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=64,
                                                                                           use_threads=False):
        yield from batch.to_pylist()


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


def _json_document(path: str, names: tuple[str, ...] = CANONICAL_COLUMNS) -> list[Any] | None:
    """The rows of a ``.json`` file holding one JSON document (an array of rows, a ``{"data":
    [...]}``-style object, or a single row object: one with a key of ``names``, the columns rows
    have); None when it is JSON Lines instead."""
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
        data = lists[0] if len(lists) == 1 and not any(k in data for k in names) else [data]
    return data


def _check_parquet(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).metadata  # noqa: B018 - reads only the footer
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot be read"
        raise DataSourceError(f"{path}: not a readable parquet file ({_one_line(e)})") from None


def _local(path: Path, cfg: DataConfig, tokenizer: str | None, revision: str | None):
    import pyarrow.parquet as pq
    import ray

    files = _data_files(path)
    docs = {f: _json_document(f, CANONICAL_COLUMNS + tuple(cfg.columns.values())) for f in files.get("json", [])}
    line_files = sorted(files.get("jsonl", []) + [f for f, rows in docs.items() if rows is None])
    for f in files.get("parquet", []):
        _check_parquet(f)

    def first_rows() -> Iterator[Any]:  # every file in name order, lazily
        for f in sorted(f for fs in files.values() for f in fs):
            yield from (docs[f] if docs.get(f) is not None else _lines(f) if f in line_files else _parquet_rows(f))

    fmt, renderer = resolve_format(cfg, first_rows(), str(path), tokenizer, revision)
    opts = _opts(cfg, fmt, renderer)
    read = {"num_cpus": cfg.tokenize_num_cpus}  # not the 1-CPU default: Train workers hold the rest
    parts = []
    for f, rows in docs.items():
        if rows:
            parts.append(_from_items([{"raw": encode_row(r)} for r in rows]).map_batches(
                json_texts_to_rows, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if line_files:
        # batch_size=1: one file per call; the function yields bounded blocks
        parts.append(ray.data.read_binary_files(line_files, ray_remote_args=read).map_batches(
            lines_to_rows, batch_size=1, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if files.get("parquet"):
        # batch_size None: whole read blocks, so Ray Data fuses the read with this and the next maps
        # into one task (a map that asks for a batch size is not fused after a read) and the raw
        # columns never pass through the object store
        read_cols = _projection(fmt, cfg.columns, pq.read_schema(files["parquet"][0]))
        parts.append(ray.data.read_parquet(files["parquet"], columns=read_cols, ray_remote_args=read).map_batches(
            records_to_rows, batch_size=None, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cfg.tokenize_num_cpus))
    if not parts:  # only empty JSON arrays
        return ray.data.from_arrow(_table({k: [] for k in COLUMNS})), fmt
    return (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])), fmt


# -- the Hugging Face Hub (driver side: lists the files and peeks at the first rows; Ray Data read
# tasks read the files, in parallel, straight from the Hub) ---------------------------------------

# datasets' default split rule (datasets/data_files.py SPLIT_KEYWORDS): a data file belongs to the
# split whose keyword is a word of one of its folder or file names below data_dir (words end at
# "-", ".", "_", " " or a digit), folders first; files that name no split are all "train"
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
_SPLIT_WORDS = {split: re.compile(rf"(?:^|[-._ 0-9])(?:{'|'.join(words)})(?:[-._ 0-9]|$)")
                for split, words in SPLIT_KEYWORDS.items()}
# a repository's own .json files, never data (datasets' FILES_TO_IGNORE)
HUB_METADATA = ("config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json")


def hub_filesystem():
    """The Hub as an fsspec filesystem (`huggingface_hub.HfFileSystem`), paths
    ``datasets/<repo>[@<revision>]/<path>``. It carries the driver's token (``HF_TOKEN``, else the
    ``huggingface-cli login`` file) to the read tasks it is pickled into, so workers on nodes without
    one read private and gated datasets too. Tests replace this function with a local filesystem laid
    out like a repository."""
    from huggingface_hub import HfFileSystem, get_token

    return HfFileSystem(token=get_token())


def hub_path(src: str, data_dir: str | None, revision: str | None = None) -> str:
    """``data_dir`` of dataset repo ``src`` (at ``revision``; None: the default branch) on `hub_filesystem`."""
    root = f"datasets/{src}" + (f"@{revision}" if revision else "")
    return f"{root}/{data_dir.strip('/')}" if data_dir else root


def split_of(rel_path: str) -> str | None:
    """The split datasets' default rule gives the data file at ``rel_path`` (below data_dir), or None."""
    for part in rel_path.split("/"):
        for split, words in _SPLIT_WORDS.items():
            if words.search(part):
                return split
    return None


def hub_files(fs, base: str, split: str, where: str) -> list[tuple[str, str]]:
    """``(kind, path)`` of the data files of ``split`` below ``base`` on ``fs``, in name order: split
    "train" of a folder whose files name no split is every file in it (what ``load_dataset`` reads);
    one-line `DataSourceError` for an unknown repo, no network, no data files or no such split."""
    try:
        found = sorted(fs.find(base))
    except Exception as e:  # noqa: BLE001 - repo not found, no access, no network: "unreadable source"
        raise DataSourceError(f"{where}: {_one_line(e)}") from None
    rel = {f: f[len(base):].lstrip("/") if f.startswith(base) else f for f in found}
    files = [f for f in found if Path(f).suffix.lower() in KINDS and Path(f).name not in HUB_METADATA
             and not any(part.startswith((".", "_")) for part in rel[f].split("/"))]
    if not files:
        raise DataSourceError(f"{where}: no .parquet, .jsonl or .json files")
    splits = {f: split_of(rel[f]) for f in files}
    named = sorted({s for s in splits.values() if s})
    if not named and split != "train":
        raise DataSourceError(f"{where}: its files name no split, so all of them are split train; set data.split=train")
    chosen = [f for f in files if splits[f] == split] if named else files
    if not chosen:
        raise DataSourceError(f"{where}: no files of split {split} (its files name {', '.join(named)})")
    kinds = [(KINDS[Path(f).suffix.lower()], f) for f in chosen]
    for kind, f in kinds:
        if kind == "json" and _hub_head(fs, f)[:1] == b"[":
            raise DataSourceError(f"{f}: a JSON array is read whole, not streamed from the Hub; "
                                  "use .jsonl or .parquet files")
    return kinds


def _hub_head(fs, path: str) -> bytes:
    try:
        with fs.open(path, "rb") as h:
            return h.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except Exception as e:  # noqa: BLE001
        raise DataSourceError(f"{path}: {_one_line(e)}") from None


def _hub_first_rows(fs, files: list[tuple[str, str]]) -> Iterator[Any]:
    """The files' rows in name order, read lazily from the start: `resolve_format` reads at most
    `PEEK_ROWS` of them, from the first file only as a rule."""
    for kind, f in files:
        try:
            with fs.open(f, "rb") as h:
                if kind == "parquet":
                    yield from _parquet_rows(h)  # page by page: a few ranged reads, not the row group
                else:  # JSON Lines (.json files too: an array was refused in `hub_files`)
                    for raw in h:
                        if raw.strip():
                            yield parse_json_line(decode_line(raw.removesuffix(b"\n")))
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot be read"
            raise DataSourceError(f"{f}: {_one_line(e)}") from None


def _hub(src: str, cfg: DataConfig, stage: Stage, tokenizer: str | None, revision: str | None):
    """A hub dataset, e.g. ``lvwerra/stack-exchange-paired`` with ``data/finetune`` (SFT) or
    ``data/rl`` (DPO): its data files (`hub_files`) read by Ray Data tasks through `hub_filesystem`,
    in parallel and streaming, so rows never pass through the driver and ``data.max_rows`` stops the
    reads early. Parquet, JSON Lines and ``.json`` files of JSON Lines.

    Not ``datasets.load_dataset``: it downloads the whole split to the driver before the first row.
    Not ``ray.data.from_huggingface``: it reads the hub's parquet export of the dataset's default
    config, every folder of the repository rather than ``data_dir``.
    """
    import ray

    data_dir = cfg.sft_data_dir if stage == "sft" else cfg.dpo_data_dir
    where = f"{src} (data_dir={data_dir}, split={cfg.split})"
    fs = hub_filesystem()
    files = hub_files(fs, hub_path(src, data_dir), cfg.split, where)
    fmt, renderer = resolve_format(cfg, _hub_first_rows(fs, files), where, tokenizer, revision)
    opts = _opts(cfg, fmt, renderer)
    cpus = cfg.tokenize_num_cpus  # not the 1-CPU default: Train workers hold the rest
    parquet = [f for kind, f in files if kind == "parquet"]
    lines = [f for kind, f in files if kind != "parquet"]
    parts = []
    if parquet:
        import pyarrow.parquet as pq

        with fs.open(parquet[0], "rb") as fh:
            read_cols = _projection(fmt, cfg.columns, pq.read_schema(fh))
        parts.append(ray.data.read_parquet(parquet, filesystem=fs, columns=read_cols, partitioning=None,
                                           num_cpus=cpus).map_batches(
            records_to_rows, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cpus))
    if lines:
        parts.append(ray.data.read_binary_files(lines, filesystem=fs, num_cpus=cpus).map_batches(
            lines_to_rows, batch_size=1, batch_format="pyarrow", fn_kwargs=opts, num_cpus=cpus))
    return (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])), fmt


def _sample(cfg: DataConfig, tokenizer: str | None, revision: str | None):
    from raydpo.data.sample import sample_rows

    rows = sample_rows(cfg.sample_size, cfg.seed, "stack_exchange" if cfg.format == "auto" else cfg.format,
                       cfg.prompt_template)
    fmt, renderer = resolve_format(cfg, rows, BUILTIN_SOURCE, tokenizer, revision)
    return _from_items(rows).map_batches(
        records_to_rows, batch_format="pyarrow", fn_kwargs=_opts(cfg, fmt, renderer),
        num_cpus=cfg.tokenize_num_cpus), fmt


def _from_items(rows: list):
    """In-memory rows as a Ray dataset of blocks of `ITEMS_PER_BLOCK` rows."""
    import ray

    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // ITEMS_PER_BLOCK)))


def _looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or Path(src).suffix.lower() in KINDS or not HUB_ID.match(src)


def stage_source(cfg: DataConfig, stage: Stage) -> str:
    """The source a stage reads: ``sft_source`` for SFT when set, else ``source``."""
    return cfg.sft_source if stage == "sft" and cfg.sft_source else cfg.source


def read(cfg: DataConfig, stage: Stage = "dpo", tokenizer: str | None = None, revision: str | None = None):
    """``(rows, format)``: every row of the stage's source (`stage_source`, at most ``max_rows``),
    validated and formatted — a lazy Ray dataset with columns `COLUMNS` — and the format it was
    read as. ``tokenizer`` (name or path) provides the chat template of message rows."""
    src = stage_source(cfg, stage)
    if src == BUILTIN_SOURCE:
        ds, fmt = _sample(cfg, tokenizer, revision)
    elif Path(src).expanduser().exists():
        ds, fmt = _local(Path(src).expanduser(), cfg, tokenizer, revision)
    elif _looks_like_path(src):
        raise DataSourceError(f"{src}: no such file or folder")
    else:
        ds, fmt = _hub(src, cfg, stage, tokenizer, revision)
    if cfg.max_rows is not None:
        ds = ds.limit(cfg.max_rows)
    return ds, fmt


def source_rows(cfg: DataConfig, stage: Stage = "dpo") -> int | None:
    """How many rows `read` reads, where the source says so without being read (the sample,
    parquet files' footers, ``max_rows``); None otherwise (JSON Lines) or when asking fails."""
    import pyarrow.parquet as pq

    src = stage_source(cfg, stage)
    try:
        if src == BUILTIN_SOURCE:
            n = cfg.sample_size
        elif Path(src).expanduser().exists():
            files = _data_files(Path(src).expanduser())
            n = sum(pq.ParquetFile(f).metadata.num_rows for f in files["parquet"]) if set(files) == {"parquet"} else None
        elif _looks_like_path(src):
            n = None
        else:
            fs = hub_filesystem()
            data_dir = cfg.sft_data_dir if stage == "sft" else cfg.dpo_data_dir
            files = hub_files(fs, hub_path(src, data_dir), cfg.split, src)
            n = None if any(kind != "parquet" for kind, _ in files) else 0
            for _, f in files if n is not None else ():
                with fs.open(f, "rb") as fh:
                    n += pq.ParquetFile(fh).metadata.num_rows
    except Exception:  # noqa: BLE001 - a hint only: `read` reports what is wrong with the source
        return None
    return n if cfg.max_rows is None or n is None else min(n, cfg.max_rows)


def read_rows(cfg: DataConfig, stage: Stage = "dpo", tokenizer: str | None = None, revision: str | None = None):
    """The rows of `read`, without the format."""
    return read(cfg, stage, tokenizer, revision)[0]
