"""``raydpo data stats``: run the pipeline on a source and account for every row.

Counted with Ray Data (``materialize`` once, then ``count``/``groupby``/``aggregate``), never
by iterating rows on the driver. Invariant: ``valid + sum(dropped.values()) == rows``.

Both reductions are tiny however large the source: a group count over (reason, is_eval), a few
dozen groups at most, and one global aggregate. They run on Ray Data's task-based sort shuffle,
which combines each block on the map side and merges a handful of partial results, instead of
Ray 2.60's default hash shuffle, which starts a pool of aggregator actors for every reduction
(the same numbers, `test_data_pipeline`; the cost is in README, Performance).
"""

from __future__ import annotations

import contextlib
from typing import Any

from raydpo.config import Config
from raydpo.data.rows import REASONS, VALID

PERCENTILES = (50, 90, 99)
PARTS = ("prompt", "chosen", "rejected")


def _measure(batch, *, tokenizer: str, max_length: int, max_prompt_length: int, block_size: int,
             revision: str | None = None):
    """Ray Data batch function: validated rows → for each valid one its DPO token lengths and
    ``truncated``, plus the SFT blocks the batch's valid rows pack into (on its first row, 0 on
    the others). Both tokenizations in one pass, with the pipeline's functions, batch size and
    per-process tokenizer; batches are cut before dropping invalid rows here, so ``sft_blocks``
    can differ from a training run's count by the per-batch tails (< 1 block per batch)."""
    import pyarrow as pa

    from raydpo.data.tokenize import cached_tokenizer, pack_sft, templated, tokenize_dpo

    tok = cached_tokenizer(tokenizer, revision)
    batch = _valid_only(batch)
    prompts, chosen, flags = batch["prompt"].to_pylist(), batch["chosen"].to_pylist(), templated(batch)
    out = tokenize_dpo(tok, prompts, chosen, batch["rejected"].to_pylist(), max_length, max_prompt_length, flags)
    blocks = [0] * batch.num_rows
    if blocks:
        blocks[0] = len(pack_sft(tok, [p + c for p, c in zip(prompts, chosen)], block_size, flags))
    cols = {k: pa.array([len(x) for x in out[f"{k}_input_ids"]], type=pa.int64()) for k in PARTS}
    return pa.table(cols | {"truncated": pa.array([int(t) for t in out["truncated"]], type=pa.int64()),
                            "sft_blocks": pa.array(blocks, type=pa.int64())})


def _valid_only(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["reason"], VALID))


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n] + f"... [{len(s) - n} more chars]"


@contextlib.contextmanager
def _task_shuffle():
    """Datasets created under this reduce with task-based sort shuffle (they keep a copy of the
    context they were created under); the caller's context is left as it was."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    saved = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = saved


def compute_stats(cfg: Config, tokenizer_name_or_path: str, *, task_shuffle: bool = True) -> dict[str, Any]:
    """Read, validate, split and tokenize ``cfg.data.source`` (DPO and SFT) and report:

    ``format`` (as read: ``data.format``, or the one detected), ``rows``, ``valid``, ``dropped``
    (every reason of `REASONS` → count), ``train_pairs``, ``eval_pairs``, ``dpo_pairs``,
    ``truncated_pairs``, ``sft_blocks``, ``token_lengths``
    (``{"prompt"|"chosen"|"rejected": {"p50", "p90", "p99", "max"}}``, DPO ids after
    truncation, special tokens included) and ``example`` (one formatted pair, shortened).
    A hub source is read from ``dpo_data_dir``. Raises `DataSourceError` when the source cannot
    be read at all. Runs on the Ray the caller connected to (`raydpo.orchestration.ray_connect`).
    ``task_shuffle=False`` reduces with the caller's Ray Data shuffle strategy instead (the module
    docstring says why the default is faster; the numbers are the same).
    """
    with _task_shuffle() if task_shuffle else contextlib.nullcontext():
        return _compute_stats(cfg, tokenizer_name_or_path)


def _compute_stats(cfg: Config, tokenizer_name_or_path: str) -> dict[str, Any]:
    from ray.data import TaskPoolStrategy
    from ray.data.aggregate import Count, Max, Quantile, Sum

    from raydpo.data.sources import read

    d = cfg.data
    rows_ds, fmt = read(d, "dpo", tokenizer_name_or_path, cfg.model.revision)
    rows_ds = rows_ds.materialize()  # read + validate once, reused below
    rows = rows_ds.count()
    counts: dict[str, int] = {}
    eval_pairs = 0
    for r in rows_ds.groupby(["reason", "is_eval"]).count().take_all():
        counts[r["reason"]] = counts.get(r["reason"], 0) + int(r["count()"])
        eval_pairs += int(r["count()"]) if r["reason"] == VALID and r["is_eval"] else 0
    dropped = {r: counts.get(r, 0) for r in REASONS}
    dropped.update({r: c for r, c in counts.items() if r != VALID and r not in dropped})
    valid = counts.get(VALID, 0)

    out: dict[str, Any] = {"source": d.source, "format": fmt, "rows": rows, "valid": valid, "dropped": dropped,
                           "train_pairs": valid - eval_pairs, "eval_pairs": eval_pairs, "dpo_pairs": 0,
                           "truncated_pairs": 0, "sft_blocks": 0, "token_lengths": {}, "example": None,
                           "limits": {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                                      "sft_block_size": d.sft_block_size}}
    if valid == 0:
        return out
    measured = rows_ds.map_batches(
        _measure, fn_kwargs={"tokenizer": tokenizer_name_or_path, "max_length": d.max_length,
                             "max_prompt_length": d.max_prompt_length, "block_size": d.sft_block_size,
                             "revision": cfg.model.revision},
        batch_size=d.tokenize_batch_size, batch_format="pyarrow", num_cpus=d.tokenize_num_cpus,
        compute=TaskPoolStrategy(size=cfg.tokenize_tasks()))
    aggs = [Count(), Sum("truncated", alias_name="truncated"), Sum("sft_blocks", alias_name="sft_blocks")]
    for k in PARTS:
        aggs.append(Max(k, alias_name=f"{k}.max"))
        aggs += [Quantile(k, q=p / 100, alias_name=f"{k}.p{p}") for p in PERCENTILES]
    agg = measured.aggregate(*aggs)  # one pass: tokenize and aggregate
    out["dpo_pairs"] = int(agg["count()"])
    out["truncated_pairs"] = int(agg["truncated"] or 0)
    out["sft_blocks"] = int(agg["sft_blocks"] or 0)
    out["token_lengths"] = {k: {f"p{p}": round(float(agg[f"{k}.p{p}"])) for p in PERCENTILES}
                            | {"max": int(agg[f"{k}.max"])} for k in PARTS}
    ex = rows_ds.map_batches(_valid_only, batch_format="pyarrow").take(1)[0]
    out["example"] = {k: _short(ex[k]) for k in PARTS}
    return out


def format_stats(d: dict[str, Any]) -> str:
    """The dict of `compute_stats`, for humans."""
    lines = [f"source: {d['source']}" + (f"   format: {d['format']}" if d.get("format") else ""),
             f"rows read: {d['rows']}   valid: {d['valid']}   dropped: {sum(d['dropped'].values())}"]
    for reason, n in d["dropped"].items():
        if n:
            lines.append(f"  dropped {reason}: {n}")
    lines.append(f"DPO pairs: {d['dpo_pairs']} (train {d['train_pairs']}, eval {d['eval_pairs']}; "
                 f"truncated {d['truncated_pairs']})   SFT blocks: {d['sft_blocks']}")
    lim = d.get("limits") or {}
    if d["token_lengths"]:
        lines.append(f"tokens per pair (max_length {lim.get('max_length')}, "
                     f"max_prompt_length {lim.get('max_prompt_length')}):")
        for k, q in d["token_lengths"].items():
            lines.append(f"  {k:>8}: " + "  ".join(f"{a}={b}" for a, b in q.items()))
    if d["example"]:
        lines.append("example:")
        for k, v in d["example"].items():
            lines.append(f"  [{k}] {v!r}")
    return "\n".join(lines)
